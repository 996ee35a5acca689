"""LoRA-family adapters: the canonical model, its probe, every dialect read and written (Flux dialects: flux_*)."""

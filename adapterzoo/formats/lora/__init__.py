"""LoRA-family adapters: the canonical model, its probe, every common dialect read and written, fused <-> split math."""

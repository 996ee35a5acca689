"""Full checkpoints: their probe, config, and conversion between single-file (LDM) and diffusers folders."""

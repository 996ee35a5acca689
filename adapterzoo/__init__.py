"""adapterzoo: index, read, convert, merge and verify Stable Diffusion checkpoints and adapters."""

__version__ = "0.1.0"

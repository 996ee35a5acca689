"""Tensor math on adapters and checkpoints (merge, resize, extract); uses formats/ for files, never zoo/."""

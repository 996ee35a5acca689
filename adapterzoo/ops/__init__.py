"""Tensor math on adapters (merge, resize, extract); imports torch and errors only, never other rooms."""

"""Bytes in and out, safely: safetensors header checks and writer, pickle scan, tensor sources, atomic outputs."""

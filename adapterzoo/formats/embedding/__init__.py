"""Textual-inversion embeddings and A1111 hypernetworks: their probe (converters need the dispatcher, one level up)."""

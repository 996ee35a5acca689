"""Full checkpoints: their probe and conversion, asked of the families; configs read from shapes, the CLIP tokenizer."""

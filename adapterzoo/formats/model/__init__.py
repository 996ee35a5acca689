"""The base models themselves: architectures (SD1/SD2/SDXL, Flux), module tables, UNet/CLIP/VAE key names."""

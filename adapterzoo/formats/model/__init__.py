"""What every model family shares: targets and architectures, module tables, UNet/CLIP/VAE key names, where a
target's weight lives; the `Family` interface and the registry that finds the families (formats/families/)."""

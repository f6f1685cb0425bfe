"""EfficientViT-style decoder (to be written)."""

"""Video decoders (to be written)."""

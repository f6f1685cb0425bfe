"""The decoder zoo. Importing this package registers every architecture and preset."""
from .base import LatentDecoder
from .registry import ARCHITECTURES, PRESETS, build_decoder, create_decoder, list_decoders, register_architecture, register_preset
from .tae import TAEConfig, TAEDecoder, TAEEncoder, TAEEncoderConfig
from . import presets, effvit, temporal  # noqa: F401  (each registers its architectures and presets)

__all__ = [
    "LatentDecoder", "ARCHITECTURES", "PRESETS", "build_decoder", "create_decoder", "list_decoders",
    "register_architecture", "register_preset", "TAEConfig", "TAEDecoder", "TAEEncoder", "TAEEncoderConfig",
]

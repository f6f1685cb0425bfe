"""The decoder zoo. Importing this package registers every architecture and preset.

Each architecture module registers its own class and presets when imported: tae (tae-64, tae-192),
effvit (effvit-paper, effvit-attn), causal (tae-causal-64, tae-causal-192), temporal (tae-temporal-192).
"""
from .base import LatentDecoder
from .registry import ARCHITECTURES, PRESETS, build_decoder, create_decoder, list_decoders, register_architecture, register_preset
from .tae import TAEConfig, TAEDecoder, TAEEncoder, TAEEncoderConfig
from . import effvit, causal, temporal  # noqa: F401,E402  (each registers its architectures and presets)

__all__ = [
    "LatentDecoder", "ARCHITECTURES", "PRESETS", "build_decoder", "create_decoder", "list_decoders",
    "register_architecture", "register_preset", "TAEConfig", "TAEDecoder", "TAEEncoder", "TAEEncoderConfig",
]

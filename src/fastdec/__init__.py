"""fastdec: fast, lightweight latent decoders for diffusion models."""
from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, FastdecError
from .latent_spaces import LatentSpace, get_latent_space, list_latent_spaces
from .models import LatentDecoder, create_decoder, list_decoders
from .io.checkpoints import save_decoder
from .pretrained import list_pretrained, model_card
from .resolve import load_decoder, load_encoder, resolve_decoder

__version__ = "0.1.0"

# Heavier pieces (diffusers pipelines, onnxruntime) import on first use so `import fastdec` stays fast.
_LAZY = {
    "FastVAE": "pipelines",
    "swap_decoder": "pipelines",
    "restore_decoder": "pipelines",
    "PreviewCallback": "pipelines",
    "optimize": "runtime",
    "decode_tiled": "runtime",
    "deflicker": "runtime",
    "Deflicker": "runtime",
    "DeflickerSettings": "runtime",
    "OnnxDecoder": "runtime",
    "grow": "models.growth",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastdec' has no attribute '{name}'")


__all__ = [
    "LatentSpace", "get_latent_space", "list_latent_spaces", "LatentDecoder", "create_decoder", "list_decoders",
    "CheckpointError", "FastdecError", "list_pretrained", "model_card", "load_decoder", "load_encoder", "resolve_decoder",
    "save_decoder", *_LAZY,
]

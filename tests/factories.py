"""The one way tests build tiny decoders: ``tiny_decoder(preset, space, seed, **overrides)``.

A preset's architecture at test size (width 8, one block per stage), random weights from ``seed``. The
output bias is raised by ``bias`` so pictures sit mid-range instead of clamped to black, which keeps pixel
comparisons meaningful. ``overrides`` change config fields (``width=16``, ``stage_blocks=(1, 1)``, ...).
"""
from __future__ import annotations

from typing import Any

import torch

from fastdec.latent_spaces import get_latent_space
from fastdec.models import ARCHITECTURES, PRESETS, LatentDecoder, create_decoder

# test-size config per architecture family (the preset's other fields are kept)
TINY = {
    "tae": dict(width=8, final_blocks=1),
    "tae-temporal": dict(width=8, head_dim=8, final_blocks=1),
    "tae-causal": dict(width=8, final_blocks=1),
    "effvit": dict(widths=(8, 8, 8, 16, 16, 16), head_dim=8),
}


def tiny_config(preset: str, space: str = "sdxl", **overrides: Any) -> dict:
    architecture = PRESETS[preset].architecture
    tiny = dict(TINY.get(architecture, {}))
    full = PRESETS[preset].make_config(get_latent_space(space))
    if "stage_blocks" in full:
        tiny["stage_blocks"] = tuple(1 for _ in full["stage_blocks"])
    if architecture in ("tae", "tae-causal") and full.get("widths"):  # per-stage widths (tae-turbo, tae-large,
        # tae-causal-turbo): kept, scaled down
        tiny["widths"] = tuple(max(4, w // 8) for w in full["widths"])
        tiny["width"] = tiny["widths"][0]
    if "depths" in full:
        tiny["depths"] = tuple(min(d, 1) for d in full["depths"])
    return {**tiny, **overrides}


def tiny_decoder(preset: str = "tae-64", space: str = "sdxl", seed: int = 0, bias: float = 0.5,
                 **overrides: Any) -> LatentDecoder:
    torch.manual_seed(seed)
    decoder = create_decoder(preset, space, **tiny_config(preset, space, **overrides)).eval()
    last = [m for m in decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
    if bias and last.bias is not None and last.out_channels == 3:
        with torch.no_grad():
            last.bias += bias
    return decoder


def is_video(preset: str) -> bool:
    return ARCHITECTURES[PRESETS[preset].architecture].is_video

"""The named presets. Each returns config fields for a given latent space."""
from __future__ import annotations

from ..latent_spaces import LatentSpace
from .registry import register_architecture, register_preset
from .tae import TAEDecoder

register_architecture(TAEDecoder)


def _tae_stages(space: LatentSpace) -> tuple[int, ...]:
    # 32x spaces (Sana) get two extra, cheap (1 block) stages at the highest resolutions
    return (3, 3, 3) if space.spatial_factor == 8 else (3, 3, 3) + (1,) * (space.spatial_factor.bit_length() - 4)


@register_preset("tae-64", "tae", "TAESD layout, width 64 (TAESD/TAEF2-compatible weights), ~1.2M params")
def tae_64(space: LatentSpace) -> dict:
    return dict(width=64, stage_blocks=_tae_stages(space), use_midblock_gn=space.name == "flux2")


@register_preset("tae-192", "tae", "the paper's TAE-192: TAESD layout at width 192, ~11M params")
def tae_192(space: LatentSpace) -> dict:
    return dict(width=192, stage_blocks=_tae_stages(space), use_midblock_gn=space.name == "flux2")

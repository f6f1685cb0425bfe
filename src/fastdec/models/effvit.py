"""EfficientViT-style decoder: residual conv stages at high resolution, EfficientViT stages at low resolution.

Stage i works at 1/2^i of the output resolution; ``widths``, ``depths`` and
``block_types`` list the stages from the highest resolution (stage 0) down. The
latents enter at the stage of their spatial factor (8x -> stage 3, Sana's 32x
-> stage 5), are projected to its width, and the stages run from there up to
full resolution, joined by 2x nearest upsampling + 3x3 conv (which also
changes the width). Stages below the latent resolution are unused and must
have depth 0. An EfficientViT block is ReLU linear attention (global,
multi-scale) then a GLU-MBConv, both residual; a "res" block is TAESD's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UsageError
from ..latent_spaces import LatentSpace
from .base import LatentDecoder, check_sizes, config_entries, doublings
from .blocks import Clamp, GLUMBConv, ReLULinearAttention, ResBlock, conv3x3
from .registry import register_architecture, register_preset

BLOCK_TYPES = ("res", "vit")


@dataclass
class EffViTConfig:
    latent_channels: int = 4
    # per stage, highest resolution (stage 0, full size) first
    widths: tuple[int, ...] = (128, 128, 128, 256, 256, 256)
    depths: tuple[int, ...] = (0, 5, 10, 0, 0, 0)
    block_types: tuple[str, ...] = ("res", "res", "res", "vit", "vit", "vit")
    head_dim: int = 32
    # kernel sizes of the multi-scale Q/K/V aggregation; () = single-scale attention
    attention_scales: tuple[int, ...] = (5,)
    mlp_expansion: int = 4

    def __post_init__(self):
        # checkpoint metadata is JSON: tuples come back as lists (entries are checked, not coerced, below)
        self.widths, self.depths, self.block_types, self.attention_scales = (
            config_entries("EffViT", name, getattr(self, name)) for name in ("widths", "depths", "block_types", "attention_scales"))
        if not len(self.widths) == len(self.depths) == len(self.block_types):
            raise UsageError(
                f"widths, depths and block_types need one entry per stage, got "
                f"{len(self.widths)}, {len(self.depths)} and {len(self.block_types)} (overriding one of them? "
                f"pass all three with the same length)"
            )
        check_sizes("EffViT", {"widths": self.widths, "head_dim": self.head_dim, "mlp_expansion": self.mlp_expansion,
                               "attention_scales": self.attention_scales}, {"depths": self.depths})
        for stage, (width, depth, kind) in enumerate(zip(self.widths, self.depths, self.block_types)):
            if kind not in BLOCK_TYPES:
                raise UsageError(f"block_types[{stage}] is '{kind}': use one of {BLOCK_TYPES}")
            if kind == "vit" and depth and width % self.head_dim:
                raise UsageError(
                    f"stage {stage} holds EfficientViT blocks of width {width}, not a multiple of head_dim "
                    f"{self.head_dim}: change the width or head_dim"
                )


def make_block(kind: str, width: int, config: EffViTConfig) -> nn.Module:
    if kind == "res":
        return ResBlock(width, width)
    # EfficientViT block: global context (attention), then local mixing (gated inverted-residual conv)
    return nn.Sequential(
        ReLULinearAttention(width, config.head_dim, config.attention_scales),
        GLUMBConv(width, config.mlp_expansion),
    )


class EffViTDecoder(LatentDecoder):
    """Latents (N, C, h, w) -> RGB in [0, 1] (N, 3, f*h, f*w), f the latent space's spatial factor."""

    architecture = "effvit"
    config_class = EffViTConfig

    def __init__(self, config: EffViTConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        # the latents enter at the stage of their resolution (8x -> 3, 32x -> 5): the layout upsamples by the
        # latent space's factor by construction
        entry = doublings(latent_space, "EffViT")
        if len(config.widths) <= entry:
            raise UsageError(
                f"latent space '{latent_space.name}' is {latent_space.spatial_factor}x smaller than the image, so "
                f"the decoder needs {entry + 1} stages (1 down to 1/{latent_space.spatial_factor}); the config "
                f"has {len(config.widths)}"
            )
        unused = [s for s in range(entry + 1, len(config.depths)) if config.depths[s]]
        if unused:
            raise UsageError(
                f"stages {unused} lie below the latent resolution of '{latent_space.name}' (1/"
                f"{latent_space.spatial_factor}) and would never run: set their depths to 0"
            )
        widths = config.widths
        layers: list[nn.Module] = [Clamp(), conv3x3(config.latent_channels, widths[entry]), nn.ReLU()]
        for stage in range(entry, -1, -1):
            layers += [make_block(config.block_types[stage], widths[stage], config) for _ in range(config.depths[stage])]
            if stage > 0:
                layers += [nn.Upsample(scale_factor=2), conv3x3(widths[stage], widths[stage - 1], bias=False)]
        # the upsampling conv is linear: without this ReLU, a depth-0 stage 0 would be two convs in a row
        layers += [nn.ReLU(), conv3x3(widths[0], 3)]
        self.layers = nn.Sequential(*layers)
        self.entry_stage = entry

    @property
    def num_attention_blocks(self) -> int:
        return sum(isinstance(m, ReLULinearAttention) for m in self.modules())

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


# =============================================================================== registry
register_architecture(EffViTDecoder)


@register_preset(
    "effvit-paper", "effvit",
    "the paper's EfficientViT-decoder configuration: widths (128,128,128,256,256,256), depths (0,5,10,0,0,0). "
    "The stages meant for EfficientViT blocks (1/8 and below) have depth 0, so it has NO attention: "
    "10 residual conv blocks at 1/4 and 5 at 1/2 resolution, ~7.2M params (~8.5M for sana)",
)
def effvit_paper(space: LatentSpace) -> dict:
    return dict(
        widths=(128, 128, 128, 256, 256, 256),
        depths=(0, 5, 10, 0, 0, 0),
        block_types=("res", "res", "res", "vit", "vit", "vit"),
    )


@register_preset(
    "effvit-attn", "effvit",
    "EfficientViT decoder with real attention: 4 EfficientViT blocks (multi-scale ReLU linear attention + "
    "GLU-MBConv, width 256) at 1/8 resolution (plus 2 at 1/16 and 2 at 1/32 for sana), then 6 residual conv "
    "blocks at 1/4 and 4 at 1/2, ~9.8M params (~15.7M for sana)",
)
def effvit_attn(space: LatentSpace) -> dict:
    low = (2, 2) if space.spatial_factor == 32 else (0, 0)
    return dict(
        widths=(128, 128, 128, 256, 256, 256),
        depths=(0, 4, 6, 4) + low,
        block_types=("res", "res", "res", "vit", "vit", "vit"),
    )


__all__ = ["EffViTConfig", "EffViTDecoder", "make_block"]

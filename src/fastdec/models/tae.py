"""TAE family: the TAESD layout (Clamp, conv, residual blocks, nearest upsampling) at any width.

width 64 with 3 upsamplings is TAESD-compatible (TAESD/TAESDXL/TAESD3/TAEF1, and
TAEF2 with ``use_midblock_gn``); width 192 is the paper's TAE-192; 5 upsamplings
give the 32x variant for Sana's DC-AE space. Layer order matches the original
nn.Sequential, so original ``.pth`` state dicts load strictly without renaming.

The video decoders (temporal.py, causal.py) are this stack with a temporal part
added; the helpers at the end let them start from a trained image decoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import InputTypeError, UsageError
from ..latent_spaces import LatentSpace
from .base import LatentDecoder, check_sizes, doublings
from .blocks import Clamp, ResBlock, conv3x3
from .registry import register_architecture, register_preset


@dataclass
class TAEConfig:
    latent_channels: int = 4
    width: int = 64
    # residual blocks before each 2x upsampling, lowest resolution first; len() upsamplings
    stage_blocks: tuple[int, ...] = (3, 3, 3)
    final_blocks: int = 1
    # TAEF2's GroupNorm branch in the lowest-resolution stage
    use_midblock_gn: bool = False

    def __post_init__(self):
        self.stage_blocks = tuple(int(b) for b in self.stage_blocks)  # JSON metadata gives lists
        check_sizes("TAE", {"width": self.width}, {"stage_blocks": self.stage_blocks, "final_blocks": self.final_blocks})


def tae_layers(config: TAEConfig, block: Callable[..., nn.Module] = ResBlock) -> nn.Sequential:
    """The TAESD decoder stack. Video decoders pass their own residual block and so keep the
    image decoder's layer names: a trained image decoder's weights load into them directly."""
    w = config.width
    layers: list[nn.Module] = [Clamp(), conv3x3(config.latent_channels, w), nn.ReLU()]
    for stage, n_blocks in enumerate(config.stage_blocks):
        # stage 0 works at the latent resolution: TAEF2's mid block, the one with the GroupNorm branch
        gn = config.use_midblock_gn and stage == 0
        layers += [block(w, w, use_gn_branch=gn) for _ in range(n_blocks)]
        layers += [nn.Upsample(scale_factor=2), conv3x3(w, w, bias=False)]
    layers += [block(w, w) for _ in range(config.final_blocks)]
    layers.append(conv3x3(w, 3))
    return nn.Sequential(*layers)


def mid_block_end(layers: nn.Sequential) -> int:
    """Index in a TAE stack just after the latent-resolution (mid) blocks: where its first upsampling sits.

    Read from the stack itself, so it follows the stem, ``stage_blocks`` and any block type."""
    return next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Upsample))


def tae_factor(config: TAEConfig) -> int:
    """How much a TAE stack upsamples: 2x per stage (what a TAESD .pth's latent space is guessed from)."""
    return 2 ** len(config.stage_blocks)


def check_tae_upsampling(decoder: LatentDecoder, config: TAEConfig) -> None:
    """The stack must upsample by the latent space's factor: the number of stages must match it."""
    needed = doublings(decoder.latent_space, "TAE")
    decoder.check_upsampling(
        tae_factor(config),
        f"stage_blocks {config.stage_blocks} has {len(config.stage_blocks)} stages, this space needs {needed}",
    )


class TAEDecoder(LatentDecoder):
    architecture = "tae"
    config_class = TAEConfig

    def __init__(self, config: TAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        check_tae_upsampling(self, config)
        self.layers = tae_layers(config)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


@dataclass
class TAEEncoderConfig:
    latent_channels: int = 4
    width: int = 64
    # TAESana starts with two strided convs (3 -> stem_width -> width) instead of one conv
    stem_width: int | None = None
    stage_blocks: tuple[int, ...] = (3, 3, 3)
    first_blocks: int = 1
    use_midblock_gn: bool = False

    def __post_init__(self):
        self.stage_blocks = tuple(int(b) for b in self.stage_blocks)


class TAEEncoder(nn.Module):
    """TAESD-family encoder: RGB in [0, 1] (N, 3, H, W) -> latents in decoder space.

    Used as a teacher (real latents for training and evaluation), never in pipelines.
    """

    def __init__(self, config: TAEEncoderConfig, latent_space: LatentSpace):
        super().__init__()
        self.config = config
        self.latent_space = latent_space
        w = config.width
        if config.stem_width:
            layers: list[nn.Module] = [
                conv3x3(3, config.stem_width, stride=2), nn.ReLU(),
                conv3x3(config.stem_width, w, stride=2), nn.ReLU(),
            ]
        else:
            layers = [conv3x3(3, w)]
        layers += [ResBlock(w, w) for _ in range(config.first_blocks)]
        last = len(config.stage_blocks) - 1
        for stage, n_blocks in enumerate(config.stage_blocks):
            gn = config.use_midblock_gn and stage == last
            layers.append(conv3x3(w, w, stride=2, bias=False))
            layers += [ResBlock(w, w, use_gn_branch=gn) for _ in range(n_blocks)]
        layers.append(conv3x3(w, config.latent_channels))
        self.layers = nn.Sequential(*layers)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.stage_blocks) + (2 if self.config.stem_width else 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"encoder expects RGB images shaped (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise UsageError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of {f}: crop or pad to a multiple of {f}"
            )
        p = next(self.parameters())
        return self.layers(images.to(device=p.device, dtype=p.dtype))


# =============================================================================== video decoders from image ones
# The layout fields a video decoder copies from the image decoder it starts from: all of TAEConfig's.
IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(TAEConfig))


def video_config_from_image(image_decoder: LatentDecoder, overrides: dict) -> dict:
    """The config fields of a TAE video decoder that starts as ``image_decoder`` (``overrides`` on top)."""
    if not isinstance(image_decoder, TAEDecoder):
        raise InputTypeError(
            f"from_image_decoder needs a TAE image decoder (tae-64, tae-192 or a TAESD-family checkpoint), "
            f"got {type(image_decoder).__name__}"
        )
    base = {name: getattr(image_decoder.config, name) for name in IMAGE_FIELDS}
    return {**base, **overrides}


def load_image_weights(video_decoder: nn.Module, image_decoder: TAEDecoder, temporal_parts: tuple[str, ...]) -> None:
    """Copy an image decoder's weights; only the (zero-initialised) temporal parts may stay unset."""
    result = video_decoder.load_state_dict(image_decoder.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not any(p in k for p in temporal_parts)]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"image decoder does not match this video decoder's layout (missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}): build it with from_image_decoder(image_decoder)"
        )


# =============================================================================== registry
register_architecture(TAEDecoder)


def tae_layout(space: LatentSpace, width: int) -> dict:
    """A TAE preset's layout for ``space``: 3 stages of 3 blocks for 8x spaces; 32x spaces (Sana) get two
    extra, cheap (1 block) stages at the highest resolutions; FLUX.2 keeps TAEF2's GroupNorm branch."""
    extra_stages = doublings(space, "TAE") - 3
    return dict(width=width, stage_blocks=(3, 3, 3) + (1,) * extra_stages, use_midblock_gn=space.name == "flux2")


@register_preset("tae-64", "tae", "TAESD layout, width 64 (TAESD/TAEF2-compatible weights), ~1.2M params")
def tae_64(space: LatentSpace) -> dict:
    return tae_layout(space, 64)


@register_preset("tae-192", "tae", "the paper's TAE-192: TAESD layout at width 192, ~11M params")
def tae_192(space: LatentSpace) -> dict:
    return tae_layout(space, 192)


__all__ = [
    "TAEConfig", "TAEDecoder", "TAEEncoderConfig", "TAEEncoder", "tae_layers", "mid_block_end", "tae_factor",
    "check_tae_upsampling", "tae_layout", "video_config_from_image", "load_image_weights",
]

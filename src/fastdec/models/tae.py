"""TAE family: the TAESD layout (Clamp, conv, residual blocks, nearest upsampling) at any width.

width 64 with 3 upsamplings is TAESD-compatible (TAESD/TAESDXL/TAESD3/TAEF1, and
TAEF2 with ``use_midblock_gn``); width 192 is the paper's TAE-192; 5 upsamplings
give the 32x variant for Sana's DC-AE space. Layer order matches the original
nn.Sequential, so original ``.pth`` state dicts load strictly without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..latent_spaces import LatentSpace
from .base import LatentDecoder
from .blocks import Clamp, ResBlock, conv3x3


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
        self.stage_blocks = tuple(int(b) for b in self.stage_blocks)


def tae_layers(config: TAEConfig, block: Callable[..., nn.Module] = ResBlock) -> nn.Sequential:
    """The TAESD decoder stack. Video decoders pass their own residual block and so keep the
    image decoder's layer names: a trained image decoder's weights load into them directly."""
    w = config.width
    layers: list[nn.Module] = [Clamp(), conv3x3(config.latent_channels, w), nn.ReLU()]
    for stage, n_blocks in enumerate(config.stage_blocks):
        gn = config.use_midblock_gn and stage == 0
        layers += [block(w, w, use_gn_branch=gn) for _ in range(n_blocks)]
        layers += [nn.Upsample(scale_factor=2), conv3x3(w, w, bias=False)]
    layers += [block(w, w) for _ in range(config.final_blocks)]
    layers.append(conv3x3(w, 3))
    return nn.Sequential(*layers)


class TAEDecoder(LatentDecoder):
    architecture = "tae"
    config_class = TAEConfig

    def __init__(self, config: TAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        self.layers = tae_layers(config)

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.config.stage_blocks)

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
            raise ValueError(f"encoder expects RGB images shaped (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of {f}: crop or pad to a multiple of {f}"
            )
        p = next(self.parameters())
        return self.layers(images.to(device=p.device, dtype=p.dtype))

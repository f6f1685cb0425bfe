"""A decoder family in your own file: fastdec's guide example (docs/adding_a_decoder.md).

``my-shuffle-32``: residual blocks at latent resolution, then one PixelShuffle (ESPCN) per 2x, so no
3x3 conv ever runs at full resolution. ``my-shuffle-temporal-32``: the same decoder plus a temporal
mix after the blocks; its mix starts at zero, so it begins equal to the image decoder it is made from.
Nothing in fastdec is edited: registering is enough (``fastdec --plugin this_file.py ...``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdec.latent_spaces import LatentSpace
from fastdec.models import LatentDecoder, register_architecture, register_preset
from fastdec.models.blocks import Clamp, ResBlock, conv3x3


@dataclass
class ShuffleConfig:
    latent_channels: int = 4
    width: int = 32
    blocks: int = 2  # residual blocks at latent resolution


def upsampler(width: int, doublings: int) -> nn.Sequential:
    """Each 2x: a conv to 4x the channels, then PixelShuffle(2) rearranges them into space. The last one
    makes the 3 RGB channels that way too (ESPCN), so the most expensive resolution runs no conv at all."""
    layers: list[nn.Module] = []
    for _ in range(doublings - 1):
        layers += [conv3x3(width, 4 * width), nn.PixelShuffle(2), nn.ReLU()]
    return nn.Sequential(*layers, conv3x3(width, 3 * 4), nn.PixelShuffle(2))


@register_architecture
class ShuffleDecoder(LatentDecoder):
    architecture = "my-shuffle"
    config_class = ShuffleConfig

    def __init__(self, config: ShuffleConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        w = config.width
        self.body = nn.Sequential(Clamp(), conv3x3(config.latent_channels, w), nn.ReLU(),
                                  *[ResBlock(w, w) for _ in range(config.blocks)])
        self.head = upsampler(w, latent_space.spatial_factor.bit_length() - 1)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z))


@register_preset("my-shuffle-32", "my-shuffle", "guide example: ResBlocks at latent resolution + PixelShuffle")
def my_shuffle_32(space: LatentSpace) -> dict:
    return dict(width=32, blocks=2)


# ----------------------------------------------------------------------------- a temporal version
class TemporalMix(nn.Module):
    """x + conv over (previous, current, next) frame features; zero-initialised, so it starts as identity."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = nn.Conv3d(width, width, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        clips = x.unflatten(0, (-1, frames)).transpose(1, 2)  # (N, C, T, h, w)
        return x + self.mix(clips).transpose(1, 2).flatten(0, 1)


@register_architecture
class TemporalShuffleDecoder(ShuffleDecoder):
    architecture = "my-shuffle-temporal"
    is_video = True  # takes (N, T, C, h, w), returns (N, T, 3, H, W)
    temporal_parts = ("temporal.",)  # what train --temporal-lr trains at its own rate

    def __init__(self, config: ShuffleConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        self.temporal = TemporalMix(config.width)

    @classmethod
    def from_image_decoder(cls, image: ShuffleDecoder) -> "TemporalShuffleDecoder":
        """Same weights as ``image``, temporal mix at zero: decodes every frame exactly as ``image`` does."""
        video = cls(image.config, image.latent_space)
        video.load_state_dict(image.state_dict(), strict=False)
        return video.to(device=image.device, dtype=image.dtype)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        n, t = z.shape[:2]
        features = self.temporal(self.body(z.flatten(0, 1)), t)
        return self.head(features).unflatten(0, (n, t))


@register_preset("my-shuffle-temporal-32", "my-shuffle-temporal", "guide example: my-shuffle-32 + temporal mix")
def my_shuffle_temporal_32(space: LatentSpace) -> dict:
    return dict(width=32, blocks=2)

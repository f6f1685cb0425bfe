"""Chunked temporal-attention video decoder: (N, T, C, h, w) decoder-space latents -> (N, T, 3, H, W) RGB.

``TemporalTAEDecoder`` (preset ``tae-temporal-192``, the paper's decoder) is
the TAE layout plus one temporal self-attention block after the
latent-resolution (mid) blocks. Every latent pixel attends over the same pixel
in the other frames of its chunk. Frames are decoded in overlapping chunks (see
``chunk_windows``) so every frame is produced exactly once and always with
temporal context, which removes the seam a plain split into chunks would leave.

It keeps the image decoder's layer names and its attention output projection
starts at zero, so ``from_image_decoder`` gives a video decoder that starts
exactly equal to a trained image decoder.

The causal decoder (memory blocks, streaming) lives in :mod:`fastdec.models.causal`; its names are
re-exported here, where they used to be defined.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..latent_spaces import LatentSpace
from .base import LatentDecoder, check_sizes
from .causal import CausalStream, CausalTAEConfig, CausalTAEDecoder, MemBlock  # noqa: F401  (old import path)
from .registry import register_architecture, register_preset
from .tae import TAEConfig, TAEDecoder, check_tae_upsampling, load_image_weights, mid_block_end, tae_layers, \
    tae_layout, video_config_from_image


# =============================================================================== chunked temporal decoder
class Window(NamedTuple):
    """Frames [start, stop) go through the temporal block together; only [keep_start, keep_stop) are output."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def chunk_windows(num_frames: int, chunk_size: int, overlap: int) -> list[Window]:
    """Split ``num_frames`` into windows of ``chunk_size`` frames that overlap by ``overlap`` on each side.

    Each window keeps its centre frames; the kept ranges tile [0, num_frames)
    exactly once. A kept frame has at least ``overlap`` context frames on each
    side except at the ends of the clip, where the window slides inwards so it
    still holds ``chunk_size`` frames.
    """
    if chunk_size < 1 or overlap < 0 or chunk_size - 2 * overlap < 1:
        raise UsageError(
            f"chunk_size={chunk_size}, overlap={overlap}: need chunk_size >= 2 * overlap + 1 so each chunk keeps a frame"
        )
    if num_frames <= chunk_size:
        return [Window(0, num_frames, 0, num_frames)]
    windows = []
    keep_start = 0
    while keep_start < num_frames:
        start = max(0, keep_start - overlap)
        stop = min(num_frames, start + chunk_size)
        if stop == num_frames:
            start = max(0, num_frames - chunk_size)
            keep_stop = num_frames
        else:
            keep_stop = stop - overlap
        windows.append(Window(start, stop, keep_start, keep_stop))
        keep_start = keep_stop
    return windows


def _sinusoid(num_positions: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    position = torch.arange(num_positions, device=like.device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, channels, 2, device=like.device, dtype=torch.float32) * (-math.log(1e4) / channels))
    table = torch.zeros(num_positions, channels, device=like.device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: channels // 2])
    return table.to(like.dtype)


class TemporalAttention(nn.Module):
    """Per-pixel self-attention over frames: (N, T, C, h, w) -> same shape, residual.

    Each latent pixel is a sequence of T tokens (its features in each frame),
    with a sinusoidal frame-position code. The output projection starts at
    zero, so a fresh block is the identity and the decoder starts as the
    image decoder. We do not use diffusers' ``MidBlockTemporalDecoder``: its
    attention is spatial (frames only mix through temporal convs) and its
    GroupNorm resnets are not the identity at init, so it could not start from
    a trained image decoder.
    """

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        if channels % head_dim:
            raise UsageError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads = channels // head_dim
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = x.shape
        tokens = x.permute(0, 3, 4, 1, 2).reshape(n * h * w, t, c)
        q, k, v = self.qkv(self.norm(tokens) + _sinusoid(t, c, tokens)).chunk(3, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        tokens = tokens + self.out(attended)
        return tokens.reshape(n, h, w, t, c).permute(0, 3, 4, 1, 2)


@dataclass
class TemporalTAEConfig(TAEConfig):
    width: int = 192
    head_dim: int = 64
    # frames per temporal-attention window, and context frames on each side that are not output
    chunk_size: int = 8
    chunk_overlap: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_sizes("TAE temporal", {"head_dim": self.head_dim}, {"chunk_size": self.chunk_size,
                                                                   "chunk_overlap": self.chunk_overlap})
        chunk_windows(self.chunk_size + 1, self.chunk_size, self.chunk_overlap)  # validates the pair


class TemporalTAEDecoder(LatentDecoder):
    """TAE decoder with a temporal-attention mid block, decoded in overlapping chunks of frames."""

    architecture = "tae-temporal"
    config_class = TemporalTAEConfig
    is_video = True
    temporal_parts = ("temporal_mid.",)

    def __init__(self, config: TemporalTAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        check_tae_upsampling(self, config)
        # The same nn.Sequential as TAEDecoder, so image weights load under the same names.
        self.layers = tae_layers(config)
        # the attention runs after the latent-resolution (mid) blocks, before the first upsampling
        self.mid_index = mid_block_end(self.layers)
        self.temporal_mid = TemporalAttention(config.width, config.head_dim)

    @classmethod
    def from_image_decoder(cls, image_decoder: TAEDecoder, **overrides) -> "TemporalTAEDecoder":
        """A temporal decoder holding ``image_decoder``'s weights; its temporal block starts as the identity."""
        config = TemporalTAEConfig(**video_config_from_image(image_decoder, overrides))
        decoder = cls(config, image_decoder.latent_space)
        load_image_weights(decoder, image_decoder, cls.temporal_parts)
        return decoder.to(device=image_decoder.device, dtype=image_decoder.dtype)

    def windows(self, num_frames: int) -> list[Window]:
        return chunk_windows(num_frames, self.config.chunk_size, self.config.chunk_overlap)

    def _decode_window(self, z: torch.Tensor, keep: slice) -> torch.Tensor:
        n, t = z.shape[:2]
        x = self.layers[: self.mid_index](z.flatten(0, 1))
        x = self.temporal_mid(x.unflatten(0, (n, t)))
        # The expensive high-resolution layers run only on the frames this window outputs.
        kept = x[:, keep]
        out = self.layers[self.mid_index :](kept.flatten(0, 1))
        return out.unflatten(0, (n, kept.shape[1]))

    def decode_chunks(self, z: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_frame, rgb)`` per window, rgb (N, k, 3, H, W) in [0, 1]: for long videos, to write
        frames as they come instead of holding the whole decoded clip."""
        z = self.check_latents(z)
        if self.is_empty(z):  # no clips: one empty chunk covers the frames; no frames: no chunks
            yield from [(0, self.empty_output(z))] if z.shape[1] else []
            return
        for win in self.windows(z.shape[1]):
            keep = slice(win.keep_start - win.start, win.keep_stop - win.start)
            yield win.keep_start, self.finish(self._decode_window(z[:, win.start : win.stop], keep))

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        outs = []
        for win in self.windows(z.shape[1]):
            keep = slice(win.keep_start - win.start, win.keep_stop - win.start)
            outs.append(self._decode_window(z[:, win.start : win.stop], keep))
        return torch.cat(outs, dim=1)


# =============================================================================== registry
register_architecture(TemporalTAEDecoder)


@register_preset(
    "tae-temporal-192", "tae-temporal",
    "the paper's video decoder: TAE-192 + temporal self-attention at the lowest resolution, overlapping 8-frame chunks",
)
def tae_temporal_192(space: LatentSpace) -> dict:
    return dict(tae_layout(space, 192), chunk_size=8, chunk_overlap=2)


__all__ = [
    "TemporalAttention", "TemporalTAEConfig", "TemporalTAEDecoder", "Window", "chunk_windows",
    "MemBlock", "CausalTAEConfig", "CausalTAEDecoder", "CausalStream",
]

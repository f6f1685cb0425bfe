"""Video decoders: (N, T, C, h, w) decoder-space latents -> (N, T, 3, H, W) RGB in [0, 1].

Two ways to make a TAE decoder see time:

* ``TemporalTAEDecoder`` (preset ``tae-temporal-192``, the paper's decoder): the
  TAE layout plus one temporal self-attention block at the lowest resolution.
  Every latent pixel attends over the same pixel in the other frames of its
  chunk. Frames are decoded in overlapping chunks (see ``chunk_windows``) so
  every frame is produced exactly once and always with temporal context, which
  removes the seam a plain split into chunks would leave.
* ``CausalTAEDecoder`` (presets ``tae-causal-64``, ``tae-causal-192``,
  TAEHV-style): every residual block also sees its own input at the previous
  frame through a ``memory`` conv. Nothing looks ahead, so the same weights
  decode all frames in one call (``decoder(z)``; memory grows with T) or stream them
  (``decoder.stream()``: push latent frames, get RGB frames back; state is one
  frame of features per block, whatever the video length).

Both keep the image decoder's layer names, and their temporal parts start at
zero (attention output projection, memory convs), so ``from_image_decoder``
gives a video decoder that starts exactly equal to a trained image decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..latent_spaces import LatentSpace
from .base import LatentDecoder
from .blocks import ResBlock, conv3x3
from .presets import _tae_stages
from .registry import register_architecture, register_preset
from .tae import TAEConfig, TAEDecoder, tae_layers

_IMAGE_FIELDS = ("latent_channels", "width", "stage_blocks", "final_blocks", "use_midblock_gn")


def _config_from_image(image_decoder: LatentDecoder, overrides: dict) -> dict:
    if not isinstance(image_decoder, TAEDecoder):
        raise TypeError(
            f"from_image_decoder needs a TAE image decoder (tae-64, tae-192 or a TAESD-family checkpoint), "
            f"got {type(image_decoder).__name__}"
        )
    base = {name: getattr(image_decoder.config, name) for name in _IMAGE_FIELDS}
    return {**base, **overrides}


def _load_image_weights(video_decoder: nn.Module, image_decoder: TAEDecoder, temporal_prefixes: tuple[str, ...]) -> None:
    """Copy an image decoder's weights; only the (zero-initialised) temporal parts may stay unset."""
    result = video_decoder.load_state_dict(image_decoder.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not any(p in k for p in temporal_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"image decoder does not match this video decoder's layout (missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}): build it with from_image_decoder(image_decoder)"
        )


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
        raise ValueError(
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
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
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
        chunk_windows(self.chunk_size + 1, self.chunk_size, self.chunk_overlap)  # validates the pair


class TemporalTAEDecoder(LatentDecoder):
    """TAE decoder with a temporal-attention mid block, decoded in overlapping chunks of frames."""

    architecture = "tae-temporal"
    config_class = TemporalTAEConfig
    is_video = True

    def __init__(self, config: TemporalTAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        # The same nn.Sequential as TAEDecoder, so image weights load under the same names.
        w = config.width
        self.layers = tae_layers(config)
        # after the lowest-resolution residual blocks, before the first upsampling
        self.mid_index = 3 + config.stage_blocks[0]
        self.temporal_mid = TemporalAttention(w, config.head_dim)

    @classmethod
    def from_image_decoder(cls, image_decoder: TAEDecoder, **overrides) -> "TemporalTAEDecoder":
        """A temporal decoder holding ``image_decoder``'s weights; its temporal block starts as the identity."""
        config = TemporalTAEConfig(**_config_from_image(image_decoder, overrides))
        decoder = cls(config, image_decoder.latent_space)
        _load_image_weights(decoder, image_decoder, ("temporal_mid.",))
        return decoder.to(device=image_decoder.device, dtype=image_decoder.dtype)

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.config.stage_blocks)

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
        for win in self.windows(z.shape[1]):
            keep = slice(win.keep_start - win.start, win.keep_stop - win.start)
            yield win.keep_start, self._decode_window(z[:, win.start : win.stop], keep).clamp(0, 1)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        outs = []
        for win in self.windows(z.shape[1]):
            keep = slice(win.keep_start - win.start, win.keep_stop - win.start)
            outs.append(self._decode_window(z[:, win.start : win.stop], keep))
        return torch.cat(outs, dim=1)


# =============================================================================== causal decoder
class MemBlock(ResBlock):
    """ResBlock whose first conv also sees the block input at the previous frame.

    ``conv[0](x_t) + memory(x_{t-1})`` is a conv over concat(x_t, x_{t-1})
    split in two, so a zero ``memory`` adds exactly 0.0: the block then equals
    the image ResBlock bit for bit.
    """

    def __init__(self, n_in: int, n_out: int, use_gn_branch: bool = False):
        super().__init__(n_in, n_out, use_gn_branch=use_gn_branch)
        self.memory = conv3x3(n_in, n_out, bias=False)
        nn.init.zeros_(self.memory.weight)

    def forward_frames(
        self, x: torch.Tensor, num_clips: int, previous: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N*T, C, h, w) frames in order; previous: (N, C, h, w) input at the frame before x, or None."""
        if self.pool is not None:
            x = x + self.pool(x)
        frames = x.unflatten(0, (num_clips, -1))
        if previous is None:
            previous = torch.zeros_like(frames[:, 0])
        past = torch.cat([previous[:, None], frames[:, :-1]], dim=1).flatten(0, 1)
        h = self.conv[0](x) + self.memory(past)
        out = self.fuse(self.conv[1:](h) + self.skip(x))
        # clone: a view of the last frame would keep the whole chunk's features alive
        return out, frames[:, -1].clone()


@dataclass
class CausalTAEConfig(TAEConfig):
    """The image decoder's config: the memory blocks add no settings."""


class CausalTAEDecoder(LatentDecoder):
    """TAE decoder with memory blocks: frame t depends on latent frames 0..t only; parallel or streaming."""

    architecture = "tae-causal"
    config_class = CausalTAEConfig
    is_video = True

    def __init__(self, config: CausalTAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        self.layers = tae_layers(config, block=MemBlock)

    @classmethod
    def from_image_decoder(cls, image_decoder: TAEDecoder) -> "CausalTAEDecoder":
        """A causal decoder holding ``image_decoder``'s weights, memory convs at zero: it starts equal to it."""
        config = CausalTAEConfig(**_config_from_image(image_decoder, {}))
        decoder = cls(config, image_decoder.latent_space)
        _load_image_weights(decoder, image_decoder, (".memory.",))
        return decoder.to(device=image_decoder.device, dtype=image_decoder.dtype)

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.config.stage_blocks)

    @property
    def num_memory_blocks(self) -> int:
        return sum(isinstance(m, MemBlock) for m in self.layers)

    def run_frames(
        self, z: torch.Tensor, state: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode checked latents (N, T, C, h, w) continuing from ``state`` (None: start of a video).

        Returns unclamped RGB (N, T, 3, H, W) and the state after the last frame.
        """
        n, t = z.shape[:2]
        x = z.flatten(0, 1)
        new_state: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, MemBlock):
                previous = state[len(new_state)] if state is not None else None
                x, last = layer.forward_frames(x, n, previous)
                new_state.append(last)
            else:
                x = layer(x)
        return x.unflatten(0, (n, t)), new_state

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        return self.run_frames(z)[0]

    def stream(self, run_frames: Callable | None = None) -> "CausalStream":
        """A streaming decoder: ``push`` latent frames in order, get their RGB frames back.

        ``run_frames`` replaces :meth:`run_frames` for the pushes (``fastdec.optimize`` passes a compiled one).
        """
        return CausalStream(self, run_frames)


class CausalStream:
    """Streaming state of a ``CausalTAEDecoder``.

    ``push(z)`` takes (N, k, C, h, w) latent frames (or (N, C, h, w) for one
    frame) and returns their (N, k, 3, H, W) RGB frames in [0, 1]; the result
    equals parallel decoding of the whole video, for any split into pushes.
    Between pushes it holds one frame of features per memory block. Use it
    under ``torch.inference_mode()``: with autograd on, the graph of every
    pushed frame stays alive.
    """

    def __init__(self, decoder: CausalTAEDecoder, run_frames: Callable | None = None):
        self.decoder = decoder
        self._run_frames = run_frames or decoder.run_frames
        self.state: list[torch.Tensor] | None = None
        self.frames_decoded = 0
        self._clips: int | None = None

    def push(self, z: torch.Tensor) -> torch.Tensor:
        if isinstance(z, torch.Tensor) and z.ndim == 4:
            z = z[:, None]
        z = self.decoder.check_latents(z)
        if self._clips is not None and z.shape[0] != self._clips:
            raise ValueError(
                f"this stream decodes {self._clips} clip(s) at once, got a push of {z.shape[0]}: "
                f"start a new decoder.stream() for a different batch"
            )
        if self.state is not None and z.shape[-2:] != self.state[0].shape[-2:]:
            raise ValueError(
                f"latent frame size changed mid-stream from {tuple(self.state[0].shape[-2:])} to {tuple(z.shape[-2:])}"
            )
        out, self.state = self._run_frames(z, self.state)
        self._clips = z.shape[0]
        self.frames_decoded += z.shape[1]
        return out.clamp(0, 1)

    def reset(self) -> None:
        """Forget the past: the next push starts a new video."""
        self.state, self.frames_decoded, self._clips = None, 0, None

    def state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.state or [])


# =============================================================================== registry
register_architecture(TemporalTAEDecoder)
register_architecture(CausalTAEDecoder)


def _image_layout(space: LatentSpace, width: int) -> dict:
    return dict(width=width, stage_blocks=_tae_stages(space), use_midblock_gn=space.name == "flux2")


@register_preset(
    "tae-temporal-192", "tae-temporal",
    "the paper's video decoder: TAE-192 + temporal self-attention at the lowest resolution, overlapping 8-frame chunks",
)
def tae_temporal_192(space: LatentSpace) -> dict:
    return dict(_image_layout(space, 192), chunk_size=8, chunk_overlap=2)


@register_preset("tae-causal-64", "tae-causal", "causal TAE-64 with memory blocks (TAEHV-style): parallel or streaming")
def tae_causal_64(space: LatentSpace) -> dict:
    return _image_layout(space, 64)


@register_preset("tae-causal-192", "tae-causal", "causal TAE-192 with memory blocks: parallel or streaming")
def tae_causal_192(space: LatentSpace) -> dict:
    return _image_layout(space, 192)


__all__ = [
    "TemporalAttention", "TemporalTAEConfig", "TemporalTAEDecoder", "Window", "chunk_windows",
    "MemBlock", "CausalTAEConfig", "CausalTAEDecoder", "CausalStream",
]

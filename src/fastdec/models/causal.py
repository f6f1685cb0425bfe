"""Causal video decoder (TAEHV-style): (N, T, C, h, w) decoder-space latents -> (N, T, 3, H, W) RGB in [0, 1].

Every residual block of the TAE stack also sees its own input at the previous
frame through a ``memory`` conv. Nothing looks ahead, so the same weights
decode all frames in one call (``decoder(z)``; memory grows with T) or stream
them (``decoder.stream()``: push latent frames, get RGB frames back; the state
is one frame of features per block, whatever the video length).

The memory convs start at zero and the layer names are the image decoder's, so
``CausalTAEDecoder.from_image_decoder`` gives a video decoder that starts
exactly equal to a trained image decoder. Presets ``tae-causal-64``, ``tae-causal-192`` and
``tae-causal-turbo`` (tae-turbo's per-stage widths and pixel-shuffle head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import UsageError
from ..latent_spaces import LatentSpace
from .base import LatentDecoder
from .blocks import ResBlock, conv3x3
from .registry import register_architecture, register_preset
from .tae import TAEConfig, TAEDecoder, check_tae_upsampling, load_image_weights, tae_layers, tae_layout, \
    video_config_from_image


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
    temporal_parts = (".memory.",)

    def __init__(self, config: CausalTAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        check_tae_upsampling(self, config)
        self.layers = tae_layers(config, block=MemBlock)

    @classmethod
    def from_image_decoder(cls, image_decoder: TAEDecoder) -> "CausalTAEDecoder":
        """A causal decoder holding ``image_decoder``'s weights, memory convs at zero: it starts equal to it."""
        config = CausalTAEConfig(**video_config_from_image(image_decoder, {}))
        decoder = cls(config, image_decoder.latent_space)
        load_image_weights(decoder, image_decoder, cls.temporal_parts)
        return decoder.to(device=image_decoder.device, dtype=image_decoder.dtype)

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
        self.reset()

    def _check_continues(self, z: torch.Tensor) -> None:
        """A push must hold the clips and the latent frame size of the pushes before it."""
        if self._clips is not None and z.shape[0] != self._clips:
            raise UsageError(
                f"this stream decodes {self._clips} clip(s) at once, got a push of {z.shape[0]}: "
                f"start a new decoder.stream() for a different batch"
            )
        if self._frame_size is not None and z.shape[-2:] != self._frame_size:
            raise UsageError(
                f"latent frame size changed mid-stream from {tuple(self._frame_size)} to {tuple(z.shape[-2:])}"
            )

    def push(self, z: torch.Tensor) -> torch.Tensor:
        if isinstance(z, torch.Tensor) and z.ndim == 4:
            z = z[:, None]
        z = self.decoder.check_latents(z)
        self._check_continues(z)
        if self.decoder.is_empty(z):  # no frames (or no clips): nothing to decode, the state stays as it is
            return self.decoder.empty_output(z)
        if self.state and (self.state[0].dtype, self.state[0].device) != (z.dtype, z.device):
            # the decoder was moved (.half(), .to(device)) mid-stream: the features held move with it (the conv
            # met fp32 features with fp16 weights and failed; .double() mixed dtypes silently)
            self.state = [s.to(device=z.device, dtype=z.dtype) for s in self.state]
        out, self.state = self._run_frames(z, self.state)
        self._clips, self._frame_size = z.shape[0], z.shape[-2:]
        self.frames_decoded += z.shape[1]
        return self.decoder.finish(out)

    def reset(self) -> None:
        """Forget the past: the next push starts a new video."""
        self.state: list[torch.Tensor] | None = None
        self.frames_decoded = 0
        self._clips: int | None = None
        self._frame_size: torch.Size | None = None

    def state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.state or [])


# =============================================================================== registry
register_architecture(CausalTAEDecoder)


@register_preset("tae-causal-64", "tae-causal", "causal TAE-64 with memory blocks (TAEHV-style): parallel or streaming")
def tae_causal_64(space: LatentSpace) -> dict:
    return tae_layout(space, 64)


@register_preset("tae-causal-192", "tae-causal", "causal TAE-192 with memory blocks: parallel or streaming")
def tae_causal_192(space: LatentSpace) -> dict:
    return tae_layout(space, 192)


@register_preset("tae-causal-turbo", "tae-causal", "causal tae-turbo (widths 128, 64, 48, 32, pixel-shuffle head) "
                 "with memory blocks: flux2-turbo's architecture for video, parallel or streaming")
def tae_causal_turbo(space: LatentSpace) -> dict:
    return tae_layout(space, None, widths=(128, 64, 48, 32), head="pixel_shuffle")


__all__ = ["MemBlock", "CausalTAEConfig", "CausalTAEDecoder", "CausalStream"]

"""What every fastdec decoder shares: its config, its latent space, and input checks."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..latent_spaces import LatentSpace


def _is_tracing() -> bool:
    # Data-dependent checks (NaN scans) cannot run inside torch.compile / ONNX export graphs.
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or (hasattr(torch.onnx, "is_in_onnx_export") and torch.onnx.is_in_onnx_export())
    )


class LatentDecoder(nn.Module):
    """Base class: latents in decoder space (N, C, h, w) -> RGB in [0, 1] (N, 3, f*h, f*w).

    Subclasses set ``architecture`` (the registry key stored in checkpoints),
    ``config_class`` (a dataclass) and implement ``decode_layers``.
    Video decoders set ``is_video = True`` and take (N, T, C, h, w).
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    is_video: ClassVar[bool] = False

    def __init__(self, config: Any, latent_space: LatentSpace):
        super().__init__()
        if config.latent_channels != latent_space.channels:
            raise ValueError(
                f"config has {config.latent_channels} latent channels but latent space "
                f"'{latent_space.name}' has {latent_space.channels}"
            )
        self.config = config
        self.latent_space = latent_space

    # -- properties -----------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def upsample_factor(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    # -- input contract ---------------------------------------------------------------
    def check_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Validate shape/dtype/values and cast to the decoder's dtype and device."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
        rank = 5 if self.is_video else 4
        layout = "(N, T, C, h, w)" if self.is_video else "(N, C, h, w)"
        if z.ndim != rank:
            hint = ""
            if not self.is_video and z.ndim == 3:
                hint = ": add a batch dimension with z[None]"
            elif not self.is_video and z.ndim == 5:
                hint = ": this is a video; decode frames with z.flatten(0, 1) or use a video decoder"
            elif self.is_video and z.ndim == 4:
                hint = ": add a time dimension, e.g. z[None] for one clip of N frames"
            raise ValueError(f"{type(self).__name__} expects latents shaped {layout}, got {tuple(z.shape)}{hint}")
        channels = z.shape[-3]
        if channels != self.latent_channels:
            raise ValueError(self.latent_space.channel_mismatch_message(channels))
        if not z.is_floating_point():
            raise TypeError(f"latents must be floating point, got {z.dtype}; convert with z.float()")
        if not _is_tracing() and not torch.isfinite(z).all():
            raise ValueError(
                "latents contain NaN or inf: the sampler diverged or the latents were corrupted "
                "(in fp16, try bf16 or fp32 for the denoiser)"
            )
        return z.to(device=self.device, dtype=self.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_layers(self.check_latents(z)).clamp(0, 1)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"latent_space={self.latent_space.name}"

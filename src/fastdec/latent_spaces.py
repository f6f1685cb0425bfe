"""Latent spaces of the VAEs fastdec decodes, and conversion between their three views.

* **pipeline space**: what the denoiser (UNet/transformer) produces. For FLUX.2 it
  is the patchified, batch-normalised 128-channel tensor.
* **VAE space** ("raw"): what diffusers pipelines pass to ``vae.decode``.
* **decoder space**: what fastdec (and TAESD-family) decoders take. For every
  space except FLUX.2 this is the pipeline space (roughly unit variance),
  i.e. ``z = (raw - shift) * scaling`` (or per-channel mean/std). TAEF2 decodes
  the raw 32-channel FLUX.2 latents, so for ``flux2`` decoder space = VAE space,
  and the batch-norm statistics (buffers of the FLUX.2 VAE, not constants) are
  applied by the pipeline on patchified latents before ``vae.decode``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .errors import LatentSpaceError, UnknownNameError


@dataclass(frozen=True)
class LatentSpace:
    name: str
    channels: int
    spatial_factor: int = 8
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # per-channel statistics (SDXL-derived VAEs such as Playground v2.5): raw = z * std / scaling + mean
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # FLUX.2: pipeline latents are 2x2-patchified and batch-normalised with the VAE's bn buffers
    patch_size: int = 1
    batch_norm_eps: float | None = None
    # typical magnitude of decoder-space latents (TAESD-family decoders soft-clamp at 3)
    value_range: float = 3.0
    temporal: bool = False
    source: str = ""
    description: str = field(default="", compare=False)

    # -- conversions -------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.latents_mean is None or self.latents_std is None:
            return None
        shape = [1] * like.ndim
        shape[-3] = self.channels
        mean = torch.tensor(self.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def vae_to_decoder(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (what ``vae.decode`` receives) -> decoder-space latents."""
        stats = self._stats(raw)
        if stats is not None:
            mean, std = stats
            return (raw - mean) * self.scaling_factor / std
        return (raw - self.shift_factor) * self.scaling_factor

    def decoder_to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder-space latents -> raw VAE latents (the inverse of ``vae_to_decoder``)."""
        stats = self._stats(z)
        if stats is not None:
            mean, std = stats
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + self.shift_factor

    # -- FLUX.2 batch-norm view ------------------------------------------------------
    def patchify(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C*p*p, h/p, w/p), the layout FLUX.2's bn statistics refer to."""
        p = self.patch_size
        n, c, h, w = raw.shape
        x = raw.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * p * p, h // p, w // p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        n, cpp, h, w = x.shape
        c = cpp // (p * p)
        x = x.view(n, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c, h * p, w * p)

    def _bn_mean_std(self, like: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor):
        if self.batch_norm_eps is None:
            raise LatentSpaceError(f"latent space '{self.name}' has no batch-norm statistics")
        mean = running_mean.view(1, -1, 1, 1).to(like)
        return mean, torch.sqrt(running_var.view(1, -1, 1, 1).to(like) + self.batch_norm_eps)

    def bn_denormalize(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """Pipeline-space FLUX.2 latents (patchified, normalised) -> raw VAE latents."""
        mean, std = self._bn_mean_std(x, running_mean, running_var)
        return self.unpatchify(x * std + mean)

    def bn_normalize(self, raw: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> pipeline-space FLUX.2 latents (what Flux2Pipeline does after vae.encode)."""
        mean, std = self._bn_mean_std(raw, running_mean, running_var)
        return (self.patchify(raw) - mean) / std

    # -- helpers ---------------------------------------------------------------------
    def channel_mismatch_message(self, got: int) -> str:
        candidates = [s.name for s in PRESETS.values() if s.channels == got]
        hint = f": is this a {'/'.join(candidates)} latent?" if candidates else ""
        return f"decoder expects {self.channels} latent channels ({self.name}), got {got}{hint}"

    def with_vae_config(self, config: Mapping[str, Any]) -> "LatentSpace":
        """This space with scaling/shift/mean/std taken from a diffusers VAE config (fine-tuned VAEs differ)."""
        changes: dict[str, Any] = {}
        if self.name != "flux2":  # FLUX.2 decoders take raw latents: its scaling_factor is not applied
            for key in ("scaling_factor", "shift_factor"):
                if config.get(key) is not None:
                    changes[key] = float(config[key])
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                changes[key] = tuple(float(v) for v in config[key])
        if config.get("batch_norm_eps") is not None:
            changes["batch_norm_eps"] = float(config["batch_norm_eps"])
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatentSpace":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("latents_mean", "latents_std"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def get(cls, space: "str | LatentSpace") -> "LatentSpace":
        return get_latent_space(space)


PRESETS: dict[str, LatentSpace] = {
    s.name: s
    for s in [
        LatentSpace(
            "sd15", channels=4, scaling_factor=0.18215,
            source="stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json (scaling_factor); TAESD",
            description="Stable Diffusion 1.x/2.x KL-f8 VAE",
        ),
        LatentSpace(
            "sdxl", channels=4, scaling_factor=0.13025,
            source="stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (scaling_factor, no latents_mean/std); "
                   "TAESDXL",
            description="SDXL VAE; derived VAEs with latents_mean/std load via with_vae_config",
        ),
        LatentSpace(
            "sd3", channels=16, scaling_factor=1.5305, shift_factor=0.0609,
            source="stabilityai/stable-diffusion-3-medium-diffusers vae/config.json; TAESD3",
            description="SD3 16-channel VAE",
        ),
        LatentSpace(
            "flux1", channels=16, scaling_factor=0.3611, shift_factor=0.1159,
            source="black-forest-labs/FLUX.1-dev vae/config.json; TAEF1",
            description="FLUX.1 16-channel VAE",
        ),
        LatentSpace(
            "flux2", channels=32, patch_size=2, batch_norm_eps=1e-4,
            source="diffusers AutoencoderKLFlux2 (batch_norm_eps=1e-4, patch_size=(2, 2); bn running stats are "
                   "buffers of the VAE checkpoint); Flux2Pipeline un-normalises before vae.decode; TAEF2",
            description="FLUX.2 32-channel VAE; decoders take raw VAE latents",
        ),
        LatentSpace(
            "svd", channels=4, scaling_factor=0.18215, temporal=True,
            source="stabilityai/stable-video-diffusion-img2vid vae/config.json (AutoencoderKLTemporalDecoder)",
            description="Stable Video Diffusion (SD 2.1 latent space, temporal VAE decoder)",
        ),
        LatentSpace(
            "sana", channels=32, spatial_factor=32, scaling_factor=0.41407,
            source="mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers config.json (AutoencoderDC); TAESana encoder",
            description="Sana DC-AE f32c32",
        ),
    ]
}


def get_latent_space(space: "str | LatentSpace") -> LatentSpace:
    if isinstance(space, LatentSpace):
        return space
    if isinstance(space, Mapping):
        return LatentSpace.from_dict(space)
    key = str(space).lower().replace("-", "").replace("_", "").replace(".", "")
    aliases = {"sd1": "sd15", "sd": "sd15", "sd21": "sd15", "sd2": "sd15", "flux": "flux1", "flux1dev": "flux1"}
    key = aliases.get(key, key)
    if key not in PRESETS:
        raise UnknownNameError(f"unknown latent space '{space}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def list_latent_spaces() -> Sequence[str]:
    return list(PRESETS)

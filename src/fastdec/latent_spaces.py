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
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .errors import LatentSpaceError, UnknownNameError, is_number


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

    def __post_init__(self):
        # every field is checked however the space is made (LatentSpace(...), with_vae_config, from_dict):
        # channels=0, a scaling factor of 0 or NaN, or a std list of the wrong length decoded garbage later
        record = dataclasses.asdict(self)
        for key, value in record.items():
            checked = _check_space_field(key, value, record)
            if checked is not value:
                object.__setattr__(self, key, checked)  # frozen: 1 -> 1.0, a list of stats -> a tuple
        # a mean without a std (or the reverse) was dropped silently: latents converted with scaling/shift instead
        if (self.latents_mean is None) != (self.latents_std is None):
            given, missing = ("latents_mean", "latents_std") if self.latents_std is None else \
                ("latents_std", "latents_mean")
            raise LatentSpaceError(f"latent space '{self.name}' has {given} but no {missing}: per-channel statistics "
                                   "convert latents only as a pair; give both, or neither")

    # -- conversions -------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.latents_mean is None or self.latents_std is None:
            return None
        if not isinstance(like, torch.Tensor) or like.ndim < 3 or like.shape[-3] != self.channels:
            # the per-channel statistics met another channel count as a raw broadcasting error
            got = like.shape[-3] if isinstance(like, torch.Tensor) and like.ndim >= 3 else like
            raise LatentSpaceError(self.channel_mismatch_message(got) if isinstance(got, int) else
                                   f"'{self.name}' converts latent tensors (..., C, h, w), got {type(like).__name__}")
        shape = [1] * like.ndim
        shape[-3] = self.channels
        dtype = like.dtype if like.is_floating_point() else torch.float32  # int latents truncated the statistics
        mean = torch.tensor(self.latents_mean, device=like.device, dtype=dtype).view(shape)
        std = torch.tensor(self.latents_std, device=like.device, dtype=dtype).view(shape)
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
    @property
    def patchified_channels(self) -> int:
        """Channels of the patchified layout (C * p * p): what FLUX.2's bn statistics and pipeline latents hold."""
        return self.channels * self.patch_size ** 2

    def patchify(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C*p*p, h/p, w/p), the layout FLUX.2's bn statistics refer to."""
        p = self.patch_size
        _check_layout(raw, "patchify", "(N, C, h, w) raw VAE latents")
        n, c, h, w = raw.shape
        if h % p or w % p:
            raise LatentSpaceError(f"'{self.name}' patchifies {p}x{p}: raw latents of {h}x{w} do not divide; "
                                   f"encode an image whose sides are multiples of {p * self.spatial_factor} pixels")
        x = raw.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * p * p, h // p, w // p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        _check_layout(x, "unpatchify", "(N, C*p*p, h, w) patchified latents")
        n, cpp, h, w = x.shape
        if cpp % (p * p):
            raise LatentSpaceError(f"'{self.name}' unpatchifies {p}x{p} patches: {cpp} channels are not a multiple "
                                   f"of {p * p}; pass the pipeline's patchified latents ({self.patchified_channels} "
                                   "channels for this space)")
        c = cpp // (p * p)
        x = x.view(n, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c, h * p, w * p)

    def _bn_mean_std(self, like: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor):
        if self.batch_norm_eps is None:
            raise LatentSpaceError(f"latent space '{self.name}' has no batch-norm statistics")
        packed = self.patchified_channels
        for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
            if not isinstance(stat, torch.Tensor) or stat.numel() != packed:  # a raw view/size error before
                size = stat.numel() if isinstance(stat, torch.Tensor) else type(stat).__name__
                raise LatentSpaceError(f"'{self.name}' batch-norm {name} holds one value per patchified channel "
                                       f"({packed}, as the VAE's bn.{name}), got {size}")
        mean = running_mean.view(1, -1, 1, 1).to(like)
        return mean, torch.sqrt(running_var.view(1, -1, 1, 1).to(like) + self.batch_norm_eps)

    def bn_denormalize(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """Pipeline-space FLUX.2 latents (patchified, normalised) -> raw VAE latents."""
        _check_layout(x, "bn_denormalize", "(N, C*p*p, h, w) patchified latents")
        if x.shape[1] != self.patchified_channels:
            raise LatentSpaceError(f"'{self.name}' pipeline latents have {self.patchified_channels} patchified "
                                   f"channels, got {x.shape[1]}")
        mean, std = self._bn_mean_std(x, running_mean, running_var)
        return self.unpatchify(x * std + mean)

    def bn_normalize(self, raw: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> pipeline-space FLUX.2 latents (what Flux2Pipeline does after vae.encode)."""
        mean, std = self._bn_mean_std(raw, running_mean, running_var)
        return (self.patchify(raw) - mean) / std

    # -- helpers ---------------------------------------------------------------------
    def latent_differences(self, other: "LatentSpace") -> list[str]:
        """How ``other``'s decoder-space latents differ from this space's: the fields that shape them or set their
        scale ("channels 4 vs 16", "scaling_factor 0.13025 vs 0.18215"); empty when a decoder for one decodes
        the other's latents (SVD's and SD 1.5's share theirs). Per-channel statistics are left to the pipeline
        checks (:func:`fastdec.pipelines.check_decoder_fits`), since fine-tuned VAEs carry their own."""
        return [f"{key} {getattr(self, key)!r} vs {getattr(other, key)!r}" for key in _LATENT_FIELDS
                if getattr(self, key) != getattr(other, key)]

    def channel_mismatch_message(self, got: int) -> str:
        candidates = [s.name for s in PRESETS.values() if s.channels == got]
        hint = f": is this a {'/'.join(candidates)} latent?" if candidates else ""
        return f"decoder expects {self.channels} latent channels ({self.name}), got {got}{hint}"

    def with_vae_config(self, config: Mapping[str, Any]) -> "LatentSpace":
        """This space with scaling/shift/mean/std taken from a diffusers VAE config (fine-tuned VAEs differ).
        A value that cannot be one (a scaling factor of 0, a std list of the wrong length) is a
        :class:`LatentSpaceError` naming the config key."""
        if not isinstance(config, Mapping):
            raise LatentSpaceError(f"a VAE config is a mapping of its values (vae.config), got {type(config).__name__}")
        try:
            return self._with_vae_values(config)
        except (LatentSpaceError, TypeError, ValueError) as e:  # float("abc"), a number where a list belongs
            raise LatentSpaceError(f"the VAE config does not describe usable '{self.name}' latents: {e}") from e

    def _with_vae_values(self, config: Mapping[str, Any]) -> "LatentSpace":
        # the values go in as given, for __post_init__'s checks: float() read True as 1.0 and the string "1234"
        # as the statistics (1, 2, 3, 4)
        keys = ("latents_mean", "latents_std", "batch_norm_eps")
        if self.name != "flux2":  # FLUX.2 decoders take raw latents: its scaling_factor is not applied
            keys = ("scaling_factor", "shift_factor", *keys)
        changes = {key: config[key] for key in keys if config.get(key) is not None}
        for key in ("latents_mean", "latents_std"):
            if hasattr(changes.get(key), "tolist"):  # a numpy array or tensor of statistics
                changes[key] = changes[key].tolist()
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatentSpace":
        """A space from its :meth:`to_dict` record (checkpoint metadata, a config file), checked field by field.

        A preset's name fills the fields the record leaves out from that preset, and the preset's shape fields
        (channels, spatial factor, patch size, temporal) must agree with it; a name fastdec does not know must
        give ``channels``, ``spatial_factor`` and ``scaling_factor`` itself. Anything else that does not fit
        (unknown fields, a spatial factor of 7, a scaling factor of 0 or "abc", NaN) is a
        :class:`LatentSpaceError` naming the field."""
        if not isinstance(d, Mapping):
            raise LatentSpaceError(f"a latent space record is a JSON object of fields, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise LatentSpaceError(
                f"unknown latent space field(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)}): a newer "
                "fastdec wrote it (upgrade fastdec), or the record is corrupt"
            )
        name = _check_space_name(d.get("name"))
        preset = PRESETS.get(name)
        if preset is None:
            missing = [k for k in _DEFINING_FIELDS if k not in d]
            if missing:
                raise LatentSpaceError(
                    f"latent space '{name}' is not one fastdec knows ({', '.join(PRESETS)}) and its record lacks "
                    f"{', '.join(missing)}: name a known space, or give {', '.join(_DEFINING_FIELDS)}"
                )
        base = preset.to_dict() if preset is not None else {}
        space = cls(**{**base, **d})  # __post_init__ checks every field
        if preset is not None:
            _check_agrees_with_preset(dataclasses.asdict(space), preset)
        return space

    @classmethod
    def get(cls, space: "str | LatentSpace") -> "LatentSpace":
        return get_latent_space(space)


def _check_layout(x: Any, what: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LatentSpaceError(f"{what} takes {layout}, got {shape}")


# ----------------------------------------------------------------------------- checking a record
# what a space fastdec does not know must state itself (the dataclass defaults would silently fill them in)
_DEFINING_FIELDS = ("channels", "spatial_factor", "scaling_factor")
# the fields that shape latents: a preset's name with other values is a corrupt record, not a variant
_SHAPE_FIELDS = ("channels", "spatial_factor", "patch_size", "temporal")
# what two spaces must share for one's decoder to decode the other's latents (temporal: an image decoder of a
# space decodes its video latents frame by frame)
_LATENT_FIELDS = ("channels", "spatial_factor", "patch_size", "scaling_factor", "shift_factor")
MAX_CHANNELS = 4096
MAX_SPATIAL_FACTOR = 256
MAX_PATCH_SIZE = 16
MAX_NAME_LENGTH = 100


def _check_space_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise LatentSpaceError(f"latent space field 'name' is {name!r}: it must be a non-empty name such as "
                               f"{', '.join(PRESETS)}")
    if len(name) > MAX_NAME_LENGTH or any(not c.isprintable() for c in name):
        raise LatentSpaceError(f"latent space field 'name' is {name[:40]!r}...: names are at most {MAX_NAME_LENGTH} "
                               "printable characters")
    return name


def _number(key: str, value: Any, condition: str = "") -> float:
    """``value`` as a finite float (ints accepted, bools and text refused), naming ``key``."""
    if not is_number(value) or not math.isfinite(value):
        raise LatentSpaceError(f"latent space field '{key}' is {value!r}: it must be a finite number{condition}")
    return float(value)


def _integer(key: str, value: Any, low: int, high: int, rule: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LatentSpaceError(f"latent space field '{key}' is {value!r}: it must be a whole number from {low} to "
                               f"{high}{rule}")
    return value


def _statistics(key: str, value: Any, channels: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or (isinstance(channels, int) and len(value) != channels):
        raise LatentSpaceError(f"latent space field '{key}' is {value!r}: it must list one number per channel "
                               f"({channels}), or be null")
    positive = key == "latents_std"
    stats = tuple(_number(f"{key}[{i}]", v, " > 0" if positive else "") for i, v in enumerate(value))
    if positive and any(v <= 0 for v in stats):
        raise LatentSpaceError(f"latent space field '{key}' holds {min(stats)}: standard deviations are > 0")
    return stats


def _positive(key: str, value: Any) -> float:
    number = _number(key, value, " > 0")
    if number <= 0:
        raise LatentSpaceError(f"latent space field '{key}' is {value!r}: it must be > 0 (latents are divided by it)")
    return number


def _check_space_field(key: str, value: Any, record: Mapping[str, Any]) -> Any:
    """One field of a latent space record, checked and in its Python type."""
    if key == "name":
        return _check_space_name(value)
    if key == "channels":
        return _integer(key, value, 1, MAX_CHANNELS)
    if key == "spatial_factor":
        factor = _integer(key, value, 1, MAX_SPATIAL_FACTOR, " and a power of 2 (8 for SD/SDXL/FLUX, 32 for Sana)")
        if factor & (factor - 1):
            raise LatentSpaceError(f"latent space field 'spatial_factor' is {factor}: decoders upsample by powers of "
                                   "2 (8 for SD/SDXL/FLUX, 32 for Sana)")
        return factor
    if key == "patch_size":
        return _integer(key, value, 1, MAX_PATCH_SIZE)
    if key in ("scaling_factor", "value_range"):
        return _positive(key, value)
    if key == "shift_factor":
        return _number(key, value)
    if key == "batch_norm_eps":
        return None if value is None else _positive(key, value)
    if key in ("latents_mean", "latents_std"):
        return _statistics(key, value, record.get("channels"))
    if key == "temporal":
        if not isinstance(value, bool):
            raise LatentSpaceError(f"latent space field 'temporal' is {value!r}: it must be true or false")
        return value
    if not isinstance(value, str):  # source, description
        raise LatentSpaceError(f"latent space field '{key}' is {value!r}: it must be text")
    return value


def _check_agrees_with_preset(record: Mapping[str, Any], preset: "LatentSpace") -> None:
    for key in _SHAPE_FIELDS:
        if record[key] != getattr(preset, key):
            raise LatentSpaceError(
                f"latent space field '{key}' is {record[key]!r} but '{preset.name}' latents have {key} "
                f"{getattr(preset, key)!r}: the record is corrupt (a variant of a space keeps its shape; name a "
                "new space for another shape)"
            )


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

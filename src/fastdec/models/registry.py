"""Named decoder presets (timm-style): ``create_decoder("tae-64", "sdxl")``.

A preset maps a latent space to a config of one architecture; architectures
are the decoder classes checkpoints refer to by name. Each architecture module
(tae, effvit, temporal, causal) registers its own class and presets when imported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UnknownNameError, UsageError, check_flags
from ..latent_spaces import LatentSpace, get_latent_space
from .base import LatentDecoder

ARCHITECTURES: dict[str, type[LatentDecoder]] = {}


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str
    make_config: Callable[[LatentSpace], dict]
    description: str


PRESETS: dict[str, Preset] = {}


def register_architecture(cls: type[LatentDecoder]) -> type[LatentDecoder]:
    ARCHITECTURES[cls.architecture] = cls
    return cls


def register_preset(name: str, architecture: str, description: str) -> Callable:
    def wrap(make_config: Callable[[LatentSpace], dict]) -> Callable[[LatentSpace], dict]:
        PRESETS[name] = Preset(name, architecture, make_config, description)
        return make_config

    return wrap


def build_decoder(architecture: str, config: dict[str, Any], latent_space: LatentSpace | str) -> LatentDecoder:
    """Instantiate an architecture from a plain config dict (as stored in checkpoints)."""
    if architecture not in ARCHITECTURES:
        raise UnknownNameError(f"unknown decoder architecture '{architecture}'; known: {', '.join(sorted(ARCHITECTURES))}")
    cls = ARCHITECTURES[architecture]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = set(config) - fields
    if unknown:
        raise UsageError(f"config for '{architecture}' has unknown fields {sorted(unknown)}")
    return cls(cls.config_class(**config), get_latent_space(latent_space))


def create_decoder(name: str, latent_space: LatentSpace | str = "sdxl", **overrides: Any) -> LatentDecoder:
    """A decoder preset for a latent space, with random weights. ``overrides`` change config fields."""
    if not isinstance(name, str) or name not in PRESETS:  # a list was an "unhashable type" TypeError
        raise UnknownNameError(f"unknown decoder preset {name!r}; choose one of {', '.join(list_decoders())}")
    space = get_latent_space(latent_space)
    preset = PRESETS[name]
    config = {"latent_channels": space.channels, **preset.make_config(space), **overrides}
    return build_decoder(preset.architecture, config, space)


def list_decoders(video: bool | None = None) -> list[str]:
    if video is not None:
        check_flags("list_decoders", video=video)  # "yes" listed nothing
    names = sorted(PRESETS)
    if video is None:
        return names
    return [n for n in names if ARCHITECTURES[PRESETS[n].architecture].is_video == video]

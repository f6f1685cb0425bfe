"""Named decoder presets (timm-style): ``create_decoder("tae-64", "sdxl")``.

A preset maps a latent space to a config of one architecture; architectures
are the decoder classes checkpoints refer to by name. Each architecture module
(tae, effvit, temporal, causal) registers its own class and presets when imported.
"""
from __future__ import annotations

import dataclasses
import os
import sys
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
    """Make ``cls`` known by its ``architecture`` name (what checkpoints store), after checking what every
    command relies on: a name, a config dataclass with ``latent_channels``, and a name no other class has."""
    if not (isinstance(cls, type) and issubclass(cls, LatentDecoder)):
        raise UsageError(f"register_architecture takes a LatentDecoder subclass, got {cls!r}")
    name = cls.architecture
    if not isinstance(name, str) or not name:
        raise UsageError(f"{cls.__name__} sets no architecture name: add a class attribute architecture = "
                         "'my-name' (the key its checkpoints are stored under)")
    if "architecture" not in cls.__dict__ and ARCHITECTURES.get(name) not in (None, cls):
        raise UsageError(f"{cls.__name__} inherits the architecture name {name!r} of "
                         f"{_where(ARCHITECTURES[name])}: give it its own (architecture = 'my-name')")
    config = cls.config_class
    if not dataclasses.is_dataclass(config) or "latent_channels" not in {f.name for f in dataclasses.fields(config)}:
        raise UsageError(f"{cls.__name__}.config_class must be a @dataclass with a latent_channels field (every "
                         f"preset's config gets the latent space's channel count there), got {config!r}")
    _check_unclaimed("architecture", name, ARCHITECTURES.get(name), cls)
    ARCHITECTURES[name] = cls
    return cls


def register_preset(name: str, architecture: str, description: str) -> Callable:
    def wrap(make_config: Callable[[LatentSpace], dict]) -> Callable[[LatentSpace], dict]:
        old = PRESETS.get(name)
        if old is not None and old.architecture != architecture:
            raise UsageError(f"preset name {name!r} is taken by {_where(old.make_config)} ({old.architecture!r}): "
                             f"register {_where(make_config)} under another name")
        _check_unclaimed("preset", name, None if old is None else old.make_config, make_config)
        PRESETS[name] = Preset(name, architecture, make_config, description)
        return make_config

    return wrap


def _where(obj: Any) -> str:
    target = getattr(obj, "func", obj)  # a functools.partial: the function it wraps
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def _definition(obj: Any) -> tuple[str, ...]:
    """Where ``obj`` is defined: its source file and qualified name (and a partial's arguments). One plugin file
    imported under two module names (``--plugin x.py`` and a plain ``import x``) defines the same thing twice."""
    target = getattr(obj, "func", obj)
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    origin = os.path.realpath(file) if file else getattr(target, "__module__", "?")
    bound = repr((getattr(obj, "args", ()), sorted(getattr(obj, "keywords", {}).items()))) if target is not obj else ""
    return origin, getattr(target, "__qualname__", type(target).__name__), bound


def _check_unclaimed(kind: str, name: str, old: Any, new: Any) -> None:
    """A plugin reusing a built-in name replaced it silently (``tae`` then blamed fastdec's own checkpoints
    for not fitting); the same definition registered again (a reloaded module) replaces its old self."""
    if old is not None and _definition(old) != _definition(new):
        raise UsageError(f"{kind} name {name!r} is taken by {_where(old)}: register {_where(new)} under another "
                         "name")


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

"""``resolve_decoder``: the one place that decides what a decoder spec means.

Every command's ``--decoder`` (and ``--init``, ``--decoders``), ``swap_decoder`` and ``load_decoder`` go
through :func:`locate`, with one precedence rule:

1. a decoder object (``nn.Module``) is used as it is;
2. an existing local file or folder is loaded from disk (a file of yours named like a preset wins);
3. a pretrained name (:func:`fastdec.list_pretrained`) loads fastdec's packaged weights;
4. a preset name (:func:`fastdec.list_decoders`) is an untrained architecture: refused unless random
   weights are asked for (``random_weights=True``, ``--random-weights``);
5. a spec that looks like a path (a weights suffix, or starting with ``.``, ``/`` or ``~``) but does not
   exist is a missing file; so is ``folder/name`` when ``folder`` exists here (``runs/dec`` beside a
   ``runs/`` folder is a file that is missing, not a Hub repository);
6. ``owner/name`` is a Hugging Face Hub id, downloaded (or read from the local Hub cache);
7. anything else is an error that lists the names fastdec knows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .devices import check_device
from .dtypes import parse_dtype
from .errors import CheckpointError, DecoderSpecError, LatentSpaceMismatchError, check_flags
from .latent_spaces import LatentSpace, get_latent_space
from .models.base import LatentDecoder
from .models.registry import PRESETS, create_decoder, list_decoders
from .models.tae import TAEEncoder
from .pretrained import PRETRAINED, list_pretrained

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

SpecKind = Literal["object", "path", "pretrained", "preset", "hub"]


@dataclass(frozen=True)
class Located:
    """What a spec names: its kind and where it is (a path, a name or a Hub id)."""

    kind: SpecKind
    target: Any


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(_WEIGHT_SUFFIXES) or text.startswith((".", "/", "~")) or text.count("/") > 1 \
        or os.sep != "/" and os.sep in text


def _missing_file(text: str, what: str, note: str = "") -> DecoderSpecError:
    return DecoderSpecError(f"{what} file '{text}' not found{note}: check the path (relative paths start from "
                            f"{Path.cwd()})")


def locate(spec: Any, what: str = "decoder") -> Located:
    """Apply the precedence rule (module docstring) to ``spec``, without loading anything. ``what`` names the
    file in messages ("decoder", "encoder")."""
    if isinstance(spec, torch.nn.Module):
        return Located("object", spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise DecoderSpecError(f"a {what} spec is a name, a path or a {what} object, got {type(spec).__name__}")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return Located("path", path)
    if text in PRETRAINED:
        return Located("pretrained", text)
    if text in PRESETS:
        return Located("preset", text)
    if _looks_like_path(text) or isinstance(spec, Path):
        raise _missing_file(text, what)
    if _HUB_ID.match(text):
        if path.parent.is_dir():  # the "owner" is a folder here: a path to a file that is missing
            raise _missing_file(text, what, f" ('{path.parent}' is a local folder, so this is not read as a Hub id)")
        return Located("hub", text)
    known = ", ".join(list_pretrained()) or "none packaged in this install"
    raise DecoderSpecError(
        f"'{text}' is not a decoder file, folder, pretrained name or Hub id. Pretrained decoders: {known}; "
        f"untrained presets (need --random-weights): {', '.join(list_decoders())}"
    )


def download(repo_id: str) -> Path:
    """A Hub repository's files (weights, configs) in the local cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with diffusers
        raise CheckpointError(f"'{repo_id}' looks like a Hub id but huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.pth", "*.md"],
                                      etag_timeout=10))
    except Exception as e:  # network errors come in many types: all mean the same to the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"'{repo_id}' is not a local file or folder, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {first}). If this machine is offline, download the repository elsewhere and "
            "pass its local folder (or a .safetensors/.pth file) instead"
        ) from e


def untrained_message(name: str) -> str:
    pretrained = ", ".join(list_pretrained()) or "none packaged in this install"
    return (
        f"'{name}' is an untrained architecture (a preset with random weights): it would decode noise. Use a "
        f"trained decoder instead: a pretrained name ({pretrained}), a checkpoint from `fastdec train --decoder "
        f"{name}`, or a Hub id. To build it untrained on purpose (benchmarks, tests) pass --random-weights; in "
        f"Python, create_decoder('{name}') or resolve_decoder('{name}', random_weights=True) (load_decoder takes "
        "trained decoders only)"
    )


def check_random_weights(spec: Any, random_weights: bool) -> None:
    """For the commands' ``--random-weights``: it builds a preset, so with a checkpoint, a pretrained name or a Hub
    id (whose weights would load all the same) it is an error, not a flag silently dropped."""
    if not random_weights:
        return
    located = locate(spec)
    if located.kind != "preset":
        kind = {"object": "a decoder object", "path": "a checkpoint", "pretrained": "a pretrained decoder",
                "hub": "a Hub id"}[located.kind]
        raise DecoderSpecError(f"--random-weights builds a preset ({', '.join(list_decoders())}) with random "
                               f"weights, but '{describe(spec)}' is {kind}, whose trained weights would be used: drop "
                               "--random-weights, or name a preset")


def describe(spec: Any) -> str:
    return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else type(spec).__name__


def resolve_decoder(
    spec: Any,
    latent_space: LatentSpace | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    random_weights: bool = False,
) -> LatentDecoder:
    """The decoder a spec names: a decoder object, a checkpoint file, a folder, a Hub id, a pretrained
    name, or (with ``random_weights=True``) a preset. See the module docstring for the precedence rule.

    ``latent_space`` picks the space where the weights cannot tell (TAESD vs TAESDXL) and is checked
    against the one they record; presets are built for it (default ``sdxl``). ``device`` and ``dtype``
    (``fp32|fp16|bf16`` or a torch dtype) move the result.
    """
    from .io.checkpoints import read_decoder

    check_flags("resolve_decoder", random_weights=random_weights)
    if device is not None:
        check_device(device, "device")  # before any weights are read: 'tpu' or an absent cuda:3 named as such
    torch_dtype = parse_dtype(dtype)
    located = locate(spec)
    if located.kind == "object":
        decoder = _decoder_object(located.target, device, torch_dtype)
        if latent_space is not None:
            _check_space(decoder, latent_space, "the decoder object")
    elif located.kind == "path":
        decoder = read_decoder(located.target, latent_space=latent_space)
    elif located.kind == "pretrained":
        entry = PRETRAINED[located.target]
        decoder = read_decoder(entry.path(), latent_space=entry.latent_space)
        if latent_space is not None:
            _check_space(decoder, latent_space, f"pretrained '{entry.name}'")
    elif located.kind == "preset":
        if not random_weights:
            raise DecoderSpecError(untrained_message(located.target))
        decoder = create_decoder(located.target, latent_space or "sdxl")
    else:
        decoder = read_decoder(download(located.target), latent_space=latent_space)
    if device is not None or torch_dtype is not None:
        decoder = decoder.to(device=device, dtype=torch_dtype)
    return decoder


def _decoder_object(decoder: torch.nn.Module, device: Any, dtype: torch.dtype | None) -> LatentDecoder:
    """A decoder object given as the spec: a fastdec decoder (or one ``optimize`` wrapped), copied when it is to
    be moved, so the caller's object keeps its device and dtype (``module.to`` converts in place: a decode in
    bf16 left the caller's decoder in bf16, and load_decoder's default device moved a GPU decoder to the CPU)."""
    import copy

    from .runtime.optimize import OptimizedDecoder

    if not isinstance(decoder, (LatentDecoder, OptimizedDecoder)):  # it failed later, far from here
        kind = "an encoder (it makes latents, it does not decode them)" if isinstance(decoder, TAEEncoder) else \
            f"a {type(decoder).__name__}"
        raise DecoderSpecError(f"a decoder object must be a fastdec decoder (create_decoder, load_decoder, "
                               f"optimize), got {kind}")
    weight = next(iter(decoder.parameters()), None)
    moves = weight is not None and (
        (device is not None and weight.device != torch.device(device)) or (dtype is not None and weight.dtype != dtype))
    return copy.deepcopy(decoder) if moves and isinstance(decoder, LatentDecoder) else decoder


def _check_space(decoder: LatentDecoder, latent_space: LatentSpace | str, what: str) -> None:
    """``decoder`` decodes the latents of the asked space (only channels were compared: an SDXL decoder was
    returned for SD 1.5 latents, a x8 one for Sana's x32)."""
    want, have = get_latent_space(latent_space), decoder.latent_space
    differences = have.latent_differences(want)
    if differences:
        raise LatentSpaceMismatchError(what, have.name, want.name, differences)


def resolve_in_space(spec: Any, latent_space: LatentSpace | str | None, fix: str, **kwargs: Any) -> LatentDecoder:
    """:func:`resolve_decoder` in a space the user did not name (a teacher's, a pipeline's): a decoder for other
    latents is the same :class:`LatentSpaceMismatchError`, ending in ``fix`` ("or a --teacher of that space")
    instead of advice to leave out a latent space nobody gave."""
    try:
        return resolve_decoder(spec, latent_space=latent_space, **kwargs)
    except LatentSpaceMismatchError as e:
        raise LatentSpaceMismatchError(e.what, e.have, e.want, e.differences, fix=fix) from e


def load_decoder(
    source: Any,
    latent_space: LatentSpace | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LatentDecoder:
    """A trained decoder: a pretrained name, a checkpoint (fastdec safetensors, TAESD .pth, AutoencoderTiny
    folder) or a Hub id. Presets are refused (they have no weights): use ``create_decoder`` for those."""
    return resolve_decoder(source, latent_space=latent_space, device=device, dtype=dtype)


def load_encoder(
    source: str | os.PathLike,
    latent_space: LatentSpace | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> TAEEncoder:
    """A TAESD-family encoder from a .pth, an AutoencoderTiny folder/state dict, or a Hub id."""
    from .io.checkpoints import read_encoder

    check_device(device, "device")  # 'tpu' was torch's list of every device type, after the weights were read
    torch_dtype = parse_dtype(dtype)
    located = locate(source, what="encoder")
    if located.kind not in ("path", "hub"):
        raise CheckpointError(f"'{source}' is not an encoder checkpoint file, folder or Hub id")
    path = located.target if located.kind == "path" else download(located.target)
    encoder = read_encoder(path, latent_space=latent_space)
    return encoder.to(device=device, dtype=torch_dtype)

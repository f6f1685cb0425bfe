"""Latent files: the one reader for .safetensors / .pt / .pth / .npy, single tensors and shards.

A file holds one tensor or many; each is one latent (C, h, w) or a stack (N, C, h, w). Shards written by
:func:`write_latent_shard` (or any safetensors file) may name the latents of a stack in their metadata,
``{"fastdec_keys": json.dumps({tensor_name: [name, ...]})}``. ``.pt``/``.pth`` files are read with
``weights_only=True``: nothing but tensors is ever unpickled.

Indexing (:func:`index_latent_file`) reads headers only where the format allows, so a folder of shards is
listed without loading it; :class:`LatentReader` then reads one latent at a time. :func:`check_latent` is
the check every command runs before decoding: floating dtype, (C, h, w) with the decoder's channel count,
no empty dimension, finite values.
"""
from __future__ import annotations

import glob as globlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import LatentFileError, UnsafePathError
from .files import as_path, atomic_write, check_name, printable
from .pickles import load_weights_only

LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")


def check_key(key: str) -> str:
    """A latent name that becomes a file name: refused (``UnsafePathError``) unless it stays in its folder."""
    return check_name(key, "latent name")


def write_latent_shard(path: str | os.PathLike, latents: Mapping[str, torch.Tensor]) -> Path:
    """Write ``{name: (C, h, w) latent}`` to a safetensors shard that ``decode-batch`` reads (atomically)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, tensor in latents.items():
        check_key(key)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise LatentFileError(f"latent '{key}' must be a (C, h, w) tensor, got {shape}; for a batch use z.unbind(0)")
        tensors[key] = tensor.detach().contiguous().cpu()
    path = as_path(path, "the latent shard's path")
    if path.suffix != ".safetensors":
        raise LatentFileError(f"latent shards are .safetensors files, got '{path}'")
    return atomic_write(path, lambda tmp: save_file(tensors, tmp), suffix=".safetensors")


@dataclass(frozen=True, order=True)
class LatentRef:
    """One latent: where it is stored and the name it goes by."""

    file: str
    tensor: str  # key inside the file ("" for .npy / bare-tensor .pt)
    index: int  # position in a stacked (N, C, h, w) tensor, -1 for a single latent
    key: str = field(compare=False)
    shape: tuple[int, ...] = field(compare=False)


def _stack_names(tensor_name: str, shape: Sequence[int], names: Sequence[str] | None, source: str) -> list[tuple[int, str]]:
    if len(shape) == 3:
        return [(-1, tensor_name)]
    if len(shape) == 4:
        if names is not None and (not isinstance(names, list) or len(names) != shape[0]
                                  or not all(isinstance(n, str) for n in names)):
            raise LatentFileError(f"{source}: 'fastdec_keys' for '{tensor_name}' must list {shape[0]} names "
                                  f"(one per stacked latent): rewrite the shard with write_latent_shard")
        return [(i, names[i] if names is not None else f"{tensor_name}_{i:05d}") for i in range(shape[0])]
    raise LatentFileError(
        f"{source}: '{tensor_name}' has shape {tuple(shape)}; latents are (C, h, w) or stacked (N, C, h, w)"
    )


def _load_pt(source: str) -> Any:
    return load_weights_only(source, LatentFileError, "latents file", mmap=True)


def _pt_tensors(obj: Any, path: Path) -> dict[str, tuple[torch.Tensor, Sequence[str] | None]]:
    """tensor name -> (tensor, names of a stack or None)."""
    if isinstance(obj, torch.Tensor):
        return {path.stem: (obj, None)}
    if isinstance(obj, dict) and isinstance(obj.get("latents"), torch.Tensor) and isinstance(obj.get("keys"), list):
        return {"latents": (obj["latents"], [str(k) for k in obj["keys"]])}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): (v, None) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        return {str(i): (v, None) for i, v in enumerate(obj)}
    raise LatentFileError(
        f"{path}: a .pt latent file holds a tensor, a list or dict of tensors, or {{'latents': tensor, 'keys': [names]}}"
    )


def _first_line(e: Exception) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return (f"'{path}' is a folder, not a latents file: pass one file ({', '.join(LATENT_SUFFIXES)}), or decode "
                "a whole folder with fastdec decode-batch --latents FOLDER")
    return f"no latents file at '{path}': check the path"


def index_latent_file(path: str | os.PathLike) -> list[LatentRef]:
    """The latents a file holds (names and shapes), reading headers only where the format allows."""
    path = as_path(path, "the latents file")
    source = str(path)
    if not path.is_file():
        raise LatentFileError(_not_a_file(path))
    entries: list[tuple[str, tuple[int, ...], Sequence[str] | None]] = []
    suffix = path.suffix.lower()
    _check_safetensors_name(path)
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(source, framework="pt") as f:
                meta = f.metadata() or {}
                names = json.loads(meta["fastdec_keys"]) if "fastdec_keys" in meta else {}
                if not isinstance(names, dict):
                    raise LatentFileError(f"{source}: 'fastdec_keys' metadata must map tensor names to lists of names")
                for name in f.keys():
                    entries.append((name, tuple(f.get_slice(name).get_shape()), names.get(name)))
        elif suffix == ".npy":
            array = np.load(source, mmap_mode="r", allow_pickle=False)
            entries.append((path.stem, tuple(array.shape), None))
        elif suffix in (".pt", ".pth"):
            entries = [(n, tuple(t.shape), k) for n, (t, k) in _pt_tensors(_load_pt(source), path).items()]
        else:
            raise LatentFileError(f"{source}: unknown latent file type (use {', '.join(LATENT_SUFFIXES)})")
    except LatentFileError:
        raise
    except Exception as e:  # every reader has its own error types; all mean "unreadable file"
        raise LatentFileError(
            f"{source}: cannot read latents ({type(e).__name__}: {_first_line(e)}): the file is truncated, corrupt "
            "or not a latents file"
        ) from e
    if not entries:
        raise LatentFileError(f"{source} holds no tensors")
    refs = []
    for name, shape, names in entries:
        for index, key in _stack_names(name, shape, names, source):
            refs.append(LatentRef(source, name if suffix != ".npy" else "", index, key, tuple(shape[-3:])))
    if not refs:
        raise LatentFileError(f"{source} holds no latents (its stacks have batch size 0)")
    return refs


def _check_safetensors_name(path: Path) -> None:
    """safetensors opens files by a UTF-8 name only: another name was reported as a corrupt file."""
    shown = printable(path)
    if path.suffix.lower() == ".safetensors" and shown != os.fspath(path):
        raise LatentFileError(f"'{shown}': its path is not valid UTF-8, which the safetensors library cannot open: "
                              "rename the file (or its folder)")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a latents file by name, whatever its shape (a video clip is one (T, C, h, w) or
    (1, T, C, h, w) tensor, which :func:`index_latent_file` does not list as latents)."""
    path = as_path(path, "the latents file")
    if not path.is_file():
        raise LatentFileError(_not_a_file(path))
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise LatentFileError(f"{path}: unknown latent file type (use {', '.join(LATENT_SUFFIXES)})")
    _check_safetensors_name(path)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if suffix == ".npy":
            return {path.stem: torch.from_numpy(np.load(path, allow_pickle=False))}
        return {name: t for name, (t, _) in _pt_tensors(_load_pt(str(path)), path).items()}
    except LatentFileError:
        raise
    except Exception as e:  # every reader has its own error types; all mean "unreadable file"
        raise LatentFileError(f"{path}: cannot read latents ({type(e).__name__}: {_first_line(e)}): the file is "
                              "truncated, corrupt or not a latents file") from e


def find_latent_files(spec: str | os.PathLike) -> list[Path]:
    """Files named by a folder (searched recursively), a single file, or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in LATENT_SUFFIXES and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file()]
    files = sorted(p for p in files if not p.name.startswith("."))
    if not files:
        raise LatentFileError(
            f"no latent files found at '{spec}': pass a folder, a file or a glob such as 'latents/*.safetensors' "
            f"(types: {', '.join(LATENT_SUFFIXES)})"
        )
    return files


class LatentReader:
    """Reads the latents of :class:`LatentRef` s, keeping a few files open (work is sorted: reads are local)."""

    def __init__(self, cache_size: int = 8):
        self._open: OrderedDict[str, Any] = OrderedDict()
        self.cache_size = cache_size

    def _handle(self, file: str) -> Any:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        path = Path(file)
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(file, framework="pt")
        elif path.suffix.lower() == ".npy":
            handle = np.load(file, mmap_mode="r", allow_pickle=False)
        else:
            handle = {name: t for name, (t, _) in _pt_tensors(_load_pt(file), path).items()}
        self._open[file] = handle
        if len(self._open) > self.cache_size:
            self._open.popitem(last=False)
        return handle

    def read(self, ref: LatentRef) -> torch.Tensor:
        try:
            handle = self._handle(ref.file)
            if isinstance(handle, np.ndarray):
                tensor = torch.from_numpy(np.array(handle if ref.index < 0 else handle[ref.index]))
            elif isinstance(handle, dict):
                tensor = handle[ref.tensor] if ref.index < 0 else handle[ref.tensor][ref.index]
            else:
                tensor = handle.get_tensor(ref.tensor) if ref.index < 0 else handle.get_slice(ref.tensor)[ref.index]
            return tensor.clone() if tensor.ndim == 3 else tensor.reshape(ref.shape).clone()
        except Exception as e:  # a file truncated after indexing, a bad mmap: name the file
            raise LatentFileError(
                f"{ref.file}: cannot read latent '{ref.key}' ({type(e).__name__}: {_first_line(e)}): "
                "the file is truncated or corrupt"
            ) from e


def check_latent(z: torch.Tensor, name: str, channels: int | None = None, hint: str = "") -> torch.Tensor:
    """The checks every command runs on one latent (C, h, w) before decoding; errors name the latent."""
    if not isinstance(z, torch.Tensor):
        raise LatentFileError(f"latent '{name}' is a {type(z).__name__}, not a tensor")
    if not z.is_floating_point():
        kind = "complex" if z.is_complex() else "boolean" if z.dtype == torch.bool else "integer"
        raise LatentFileError(f"latent '{name}' has {kind} dtype {z.dtype}: latents are float tensors "
                              "(was the file written from quantised or index data?)")
    if z.ndim != 3:
        raise LatentFileError(f"latent '{name}' has shape {tuple(z.shape)}: expected (C, h, w)")
    if 0 in z.shape:
        raise LatentFileError(f"latent '{name}' has an empty dimension, shape {tuple(z.shape)}")
    if channels is not None and z.shape[0] != channels:
        raise LatentFileError(f"latent '{name}' has {z.shape[0]} channels but the decoder takes {channels}"
                              + (f": {hint}" if hint else ""))
    if not torch.isfinite(z).all():
        raise LatentFileError(f"latent '{name}' contains NaN or inf (the sampler diverged or the file is corrupt)")
    return z


def read_latents(path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """(name, latent (C, h, w)) for every latent in one file, in file order; a stack of one keeps its
    tensor's name, a larger stack gives ``name_i``. Names are safe as file names (checked)."""
    path = as_path(path, "the latents file")
    refs = index_latent_file(path)
    reader = LatentReader(cache_size=1)
    stacks: dict[str, int] = {}
    for ref in refs:
        stacks[ref.tensor] = stacks.get(ref.tensor, 0) + 1
    out = []
    first_named: dict[str, LatentRef] = {}
    for ref in refs:
        base = "" if ref.tensor in ("", path.stem) and path.suffix.lower() != ".safetensors" else ref.tensor
        if ref.index < 0 or stacks[ref.tensor] == 1:
            name = base
        else:
            name = f"{base}_{ref.index}" if base else str(ref.index)
        if name:
            try:
                check_key(name)
            except UnsafePathError as e:
                raise LatentFileError(f"{path}: {e}") from e
        if name in first_named:  # a stack 'a' of two is a_0, a_1: a key 'a_0' beside it overwrote one image
            raise LatentFileError(f"{path}: {_describe(first_named[name])} and {_describe(ref)} are both named "
                                  f"{name!r} (a stack's latents are named KEY_INDEX): rename one key")
        first_named[name] = ref
        out.append((name, reader.read(ref)))
    return out


def _describe(ref: LatentRef) -> str:
    return f"key {ref.tensor!r}" if ref.index < 0 else f"latent {ref.index} of key {ref.tensor!r}"

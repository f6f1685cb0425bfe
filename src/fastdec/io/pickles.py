"""The one way fastdec reads a torch pickle (``.pt``, ``.pth``, ``.bin``): ``weights_only``, so nothing but
tensors, numbers, strings and containers is ever built. A file that asks for anything else (a class, a
function: what a planted file uses to run code) is refused with a message that says so and names what it
asked for, instead of torch's advice on how to allow it."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import FastdecError
from .files import printable

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def asks_for_code(error: Exception) -> bool:
    """Whether an unpickling error is torch's weights-only refusal of a global (not a corrupt file)."""
    return isinstance(error, pickle.UnpicklingError) and _GLOBAL.search(str(error)) is not None


def refusal_message(path: str | Path, error: Exception, what: str) -> str:
    found = _GLOBAL.search(str(error))
    asked = f" (it asks to call or build '{found.group(1)}')" if found else ""
    return (
        f"'{path}' holds pickled Python objects, not only tensors{asked}: fastdec never unpickles code from a "
        f"{what}, so it is refused. If you made this file, save a plain dict of tensors (torch.save of a "
        "state_dict or of tensors) or a .safetensors file"
    )


def load_weights_only(path: str | Path, error: type[FastdecError], what: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped when ``mmap`` and the format allows);
    a file that holds code, or that is no torch pickle at all, is an ``error`` naming it; a missing or
    unreadable file (OSError) propagates to the caller, which names it its own way."""
    try:
        if printable(path) != os.fspath(path):  # torch hands the name to C++ as UTF-8: another read as "corrupt"
            with open(path, "rb") as f:  # a file object cannot be memory-mapped; the bytes are the same
                return torch.load(f, map_location="cpu", weights_only=True)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # legacy (non-zip) files cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, FastdecError):
        raise  # a missing or unreadable file: the caller names it its own way
    except Exception as e:  # unpickling a file that is no torch pickle fails in many ways (IndexError, ...)
        if asks_for_code(e):
            raise error(refusal_message(path, e, what)) from e
        # torch's own text here advises weights_only=False, which would run whatever the file holds
        raise error(f"'{path}' is not a {what} fastdec can read: {_what_it_is(Path(path))}. fastdec reads "
                    ".safetensors files, and .pt / .pth / .bin files of tensors saved with torch.save") from e


def _what_it_is(path: Path) -> str:
    """A guess at what a file that is no torch pickle holds, for the message."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return "it cannot be read"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF")):
        return "it is an image"
    if head and b"\0" not in head:
        try:
            head.decode("utf-8")
            return "it is a text file (a config, a list?), not weights"
        except UnicodeDecodeError:
            pass
    return "it is truncated, corrupt or in another format"

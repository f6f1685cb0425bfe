"""The one check of a ``--device`` value, run by every command that takes one before any work: an unknown
name or a device this machine lacks is a :class:`~fastdec.errors.UsageError`, not a torch traceback after the
model was loaded."""
from __future__ import annotations

import torch

from .errors import UsageError


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """``device`` as a torch.device, refused (``UsageError``) when it is no device name or not on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"unknown {flag} '{device}': use cpu, cuda, cuda:N or mps") from e
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise UsageError(f"{flag} {device} is not available: this machine has {count} CUDA device(s); "
                             f"use {flag} cpu")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {device} is not available on this machine: use {flag} cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {device}: fastdec runs on cpu, cuda[:N] or mps")
    return parsed

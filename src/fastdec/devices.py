"""The one check of a ``--device`` value, run by every command that takes one before any work: an unknown
name or a device this machine lacks is a :class:`~fastdec.errors.UsageError`, not a torch traceback after the
model was loaded."""
from __future__ import annotations

import os
from typing import Mapping

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


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def check_launch_environment(environ: Mapping[str, str] | None = None) -> None:
    """The process-group variables torchrun / accelerate launch set, checked before accelerate reads them:
    a RANK past WORLD_SIZE waits forever at the rendezvous, and other mistakes end in raw tracebacks."""
    env = os.environ if environ is None else environ
    values = {}
    for name in LAUNCH_VARIABLES:
        if name in env:
            try:
                values[name] = int(env[name])
            except ValueError:
                raise UsageError(f"{name}={env[name]!r} is not a whole number ({_LAUNCH_FIX})") from None
    world, rank = values.get("WORLD_SIZE", 1), values.get("RANK", 0)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world}: a run needs at least 1 process ({_LAUNCH_FIX})")
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} with WORLD_SIZE={world}: a rank is 0 to WORLD_SIZE - 1 ({_LAUNCH_FIX})")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} without {', '.join(missing)}: the processes cannot meet ({_LAUNCH_FIX})")


_LAUNCH_FIX = "start several processes with torchrun or accelerate launch, or unset these variables for one process"

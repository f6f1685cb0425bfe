"""What a run folder keeps between runs: training checkpoints and ``metrics.csv``.

A checkpoint (``OUT/checkpoints/step_XXXXXXXX.pt``) holds tensors and plain values only: the model, EMA,
optimizer and schedule states, the step, every rank's RNG state (numpy's as a tensor), the config and the
latent-cache key. It is read back with ``torch.load(weights_only=True)``, which builds tensors, numbers,
strings, lists, tuples and dicts and refuses every other Python object, so a file planted in the run folder
cannot run code on ``--resume``. Checkpoints are written atomically; one that is truncated or corrupt anyway
(a full disk, a copy cut short) is skipped, with a warning, for the newest intact one.
"""
from __future__ import annotations

import csv
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, TrainError
from ..io.files import atomic_write, output_subfolder, write_csv as write_csv_rows
from ..io.pickles import asks_for_code

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng")


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python, cuda) as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(out: Path, step: int) -> Path:
    """Where step ``step``'s checkpoint is saved (the checkpoints folder made, and refused if a link leads out)."""
    return output_subfolder(out, "checkpoints", "the checkpoints folder") / f"step_{step:08d}.pt"


def list_checkpoints(out: Path) -> list[Path]:
    """The run folder's checkpoints, oldest first (the step is zero-padded, so names sort by step)."""
    return sorted((Path(out) / "checkpoints").glob("step_*.pt"))


def prune_checkpoints(out: Path, keep: int, written: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints up to ``written`` (the one just saved); returns the deleted.

    Checkpoints of later steps than ``written`` are neither kept in its stead nor deleted: a run resumed past
    an unreadable checkpoint (a truncated copy) has one ahead of it, and counted as the newest it would have
    the checkpoint just saved deleted, leaving nothing to resume from. The run overwrites it on reaching its step.
    """
    output_subfolder(out, "checkpoints", "the checkpoints folder")  # never delete through a link
    checkpoints = list_checkpoints(out)
    if written is not None:  # zero-padded steps: names sort and compare by step
        checkpoints = [path for path in checkpoints if path.name <= written.name]
    old = checkpoints[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def latest_checkpoint(out: Path) -> Path | None:
    checkpoints = list_checkpoints(out)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint_file(path: Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def _refused(path: Path, error: pickle.UnpicklingError) -> TrainError:
    """The error for a checkpoint holding an object torch's weights-only loader refuses (named from its message)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    name = found.group(1) if found else "an object that is not a tensor or a plain value"
    if name.startswith("numpy"):  # older fastdec versions stored numpy's RNG state as an array
        return TrainError(f"checkpoint '{path}' holds numpy objects ({name}): it was written by an older fastdec, "
                          "whose checkpoints this version does not unpickle. Finish that run with the fastdec that "
                          "started it, or start the run again")
    return TrainError(
        f"checkpoint '{path}' holds {name}: fastdec train writes only tensors and plain values, and never "
        "unpickles code from a checkpoint. This file was not written by fastdec train (or was altered): delete "
        "it, then --resume continues from the newest checkpoint left"
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling code.

    Raises ``CheckpointError`` when the file cannot be read (truncated, corrupt: an older one may be intact)
    and ``TrainError`` when it holds Python objects beyond tensors and plain values or is no training state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's zip reader raises RuntimeError; a cut legacy pickle IndexError, EOFError...
        if asks_for_code(e):
            raise _refused(path, e) from e
        # not torch's own text for an unpickling error: it advises weights_only=False, which runs what a file holds
        detail = type(e).__name__ if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({detail}): it is truncated or corrupt") from e
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    problem = f"missing {', '.join(missing)}" if missing else _layout_problem(state)
    if problem:
        raise TrainError(f"'{path}' is not a fastdec training checkpoint ({problem}): "
                         "delete it or move it out of the checkpoints folder")
    return state


def _layout_problem(state: dict[str, Any]) -> str | None:
    """What in a checkpoint's entries is not what fastdec train writes (None when all is): the resume reads
    them as such, and a file with the right keys but other values met a TypeError deep inside it."""
    for key in ("model", "ema"):
        if not isinstance(state[key], dict):
            return f"'{key}' is of type {type(state[key]).__name__}, not a dict of tensors"
        # a module's get_extra_state may hold any plain value; every other entry is a weight
        wrong = next((k for k, v in state[key].items()
                      if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")), None)
        if wrong is not None:
            return f"'{key}' holds {wrong!r} of type {type(state[key][wrong]).__name__}, not a tensor"
    for key in ("optimizer", "scheduler", "config", "discriminator", "disc_optimizer"):
        if key in state and not isinstance(state[key], dict) and not (key == "config" and state[key] is None):
            return f"'{key}' is of type {type(state[key]).__name__}, not a dict"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' is {step!r}, not a step number"
    rng = state["rng"]
    if not isinstance(rng, (list, tuple)) or not rng or not all(isinstance(r, dict) for r in rng):
        return "'rng' is not a list of RNG states"
    return None


def load_resume_state(out: Path) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint in ``out`` and its state. Unreadable newer ones are skipped with a
    warning; a checkpoint holding objects other than tensors and plain values stops the resume."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise TrainError(f"--resume: no checkpoint in '{Path(out) / 'checkpoints'}'")
    problems = []
    for path in reversed(checkpoints):
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}. Resuming from the newest intact checkpoint, {path.name}",
                          stacklevel=2)
        return path, state
    raise TrainError(f"--resume: no checkpoint in '{Path(out) / 'checkpoints'}' can be read: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- metrics.csv
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV, with every key any row has as a column (in order of first appearance)."""
    write_csv_rows(path, rows, list(dict.fromkeys(k for row in rows for k in row)))


def read_csv(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv`` up to ``up_to_step`` (a resumed run rewrites what came later)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]

"""The one dtype vocabulary: ``fp32``, ``fp16``, ``bf16`` (``float32``, ``half``, ``torch.bfloat16`` ... as
aliases). Every command and function that takes a dtype name reads it here."""
from __future__ import annotations

import torch

from .errors import UsageError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {
    "float32": "fp32", "float": "fp32", "f32": "fp32",
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name (``fp32|fp16|bf16``) of a dtype or any accepted alias."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise UsageError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPE_NAMES)}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_NAMES)} (or float32, float16, bfloat16)")
    return key


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp16' / 'bf16' / 'fp32' or an alias (or a torch.dtype, or None) -> torch.dtype (or None)."""
    if dtype is None:
        return None
    return DTYPES[dtype_name(dtype)]


def _dtype_argument(text: str) -> str:
    import argparse

    try:
        return dtype_name(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_dtype_argument(parser, default: str = "fp32", help: str | None = None, **kwargs) -> None:  # noqa: A002
    """``--dtype`` for a command: canonical names, aliases accepted, stored canonical (``nargs`` etc. pass on)."""
    parser.add_argument(
        "--dtype", default=default, type=_dtype_argument, **kwargs, metavar="{fp32,fp16,bf16}",
        help=help or "fp32, fp16 or bf16 (bf16 is several times faster on CPUs with AMX/AVX512-BF16)",
    )

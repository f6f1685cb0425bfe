"""What a training run computes in: the arithmetic and memory layout that ``--mixed-precision`` and
``--channels-last`` resolve to on this machine, decided once, logged, and written to the run's config.json.

``--mixed-precision auto``:

- on a GPU: bf16 autocast when the GPU supports bf16, else fp32 (as before);
- on a CPU: bf16 autocast when the CPU does bf16 arithmetic natively (the ``avx512_bf16`` or ``amx_bf16``
  flag in /proc/cpuinfo: AVX512-BF16 on Cooper Lake / Zen 4 and later, AMX on Sapphire Rapids and later),
  else fp32. Without those flags bf16 is emulated and slower than fp32; off Linux there is no cpuinfo to
  read, so ``auto`` stays fp32 there (``--mixed-precision bf16`` forces it).

``--channels-last auto`` puts the student's convolutions (and the discriminator's and the teacher decoder's)
in channels_last (NHWC) when bf16 runs on a CPU, where oneDNN's bf16 convolutions are NHWC kernels (the
issue's probe of one tae-64 step: 8.0 img/s fp32, 10.8 fp32 channels_last, 25.1 bf16 channels_last).
Elsewhere it keeps the layout fp32 and GPU runs always had.

Whatever the forward passes run in, the weights, gradients, optimizer state, EMA and checkpoints stay
fp32, and the loss terms are computed in fp32 outside autocast (see ``loop.forward_loss``).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, ContextManager

import torch

from ..errors import UsageError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CHANNELS_LAST = ("auto", "on", "off")


@dataclass(frozen=True)
class Precision:
    """The resolved choice: ``mixed_precision`` is what the forward passes run in (fp32, bf16 or fp16)."""

    mixed_precision: str
    channels_last: bool
    device: str
    reason: str

    def autocast(self, accelerator: Any = None) -> ContextManager:
        """The context the forward passes run under: torch's bf16 autocast, accelerate's fp16 one, or none."""
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device, dtype=torch.bfloat16)
        if self.mixed_precision == "fp16" and accelerator is not None:
            return accelerator.autocast()
        return nullcontext()

    def describe(self) -> str:
        arithmetic = "fp32" if self.mixed_precision == "fp32" else f"{self.mixed_precision} autocast (losses in fp32)"
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        return f"{arithmetic}, {layout} on {self.device}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 flags this CPU has (of ``NATIVE_BF16_FLAGS``), read from ``cpuinfo`` (the text of
    /proc/cpuinfo; read from the file when None). Empty off Linux or when the file cannot be read."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return ()
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return ()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags: the first line is enough
            flags = set(value.split())
            return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)
    return ()


def _cuda_bf16(supported: bool | None) -> bool:
    return torch.cuda.is_bf16_supported() if supported is None else supported


def _arithmetic(mixed_precision: str, device: str, cpu_flags: tuple[str, ...], cuda_bf16: bool) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for the requested ``--mixed-precision`` on ``device``."""
    native = f"native bf16 ({', '.join(cpu_flags)})" if cpu_flags else "no native bf16 (no AVX512-BF16 or AMX flag)"
    if mixed_precision in ("no", "fp32"):
        return "fp32", f"--mixed-precision {mixed_precision}"
    if mixed_precision == "fp16":
        if device == "cpu":
            raise UsageError("--mixed-precision fp16 needs a GPU (CPU autocast has no fp16 training path): "
                             "use --mixed-precision bf16 or auto on a CPU")
        return "fp16", "--mixed-precision fp16"
    if mixed_precision == "bf16":
        if device == "cuda" and not cuda_bf16:
            raise UsageError("--mixed-precision bf16: this GPU has no bf16 support; use fp16 or no")
        if device == "cpu" and not cpu_flags:
            return "bf16", f"--mixed-precision bf16 on a CPU with {native}: emulated, expect it slower than fp32"
        return "bf16", "--mixed-precision bf16" + (f" on a CPU with {native}" if device == "cpu" else "")
    if device == "cuda":
        return ("bf16", "auto: the GPU supports bf16") if cuda_bf16 else ("fp32", "auto: the GPU has no bf16")
    if device != "cpu":
        return "fp32", f"auto: fp32 on {device}"
    return ("bf16", f"auto: the CPU has {native}") if cpu_flags else ("fp32", f"auto: the CPU has {native}")


def resolve_precision(mixed_precision: str, channels_last: str, device: str,
                      cpu_flags: tuple[str, ...] | None = None, cuda_bf16: bool | None = None) -> Precision:
    """What ``--mixed-precision`` and ``--channels-last`` mean on ``device`` (``cpu``, ``cuda``, ...).

    ``cpu_flags`` (default: :func:`cpu_bf16_flags`) and ``cuda_bf16`` (default: asked of torch) are
    parameters so the rule can be checked for any machine on any machine.
    """
    if channels_last not in CHANNELS_LAST:
        raise UsageError(f"--channels-last must be one of {', '.join(CHANNELS_LAST)}, got {channels_last!r}")
    flags = cpu_bf16_flags() if cpu_flags is None else tuple(cpu_flags)
    arithmetic, reason = _arithmetic(mixed_precision, device, flags if device == "cpu" else (),
                                     _cuda_bf16(cuda_bf16) if device == "cuda" else False)
    layout = channels_last == "on" or channels_last == "auto" and arithmetic == "bf16" and device == "cpu"
    return Precision(arithmetic, layout, device, reason)

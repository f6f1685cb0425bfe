"""How the bench measures: wall time (median of timed runs), peak memory (in an isolated process), FLOPs
and parameters, and what machine the numbers came from.

Nothing here knows about decoders: every function takes a callable or a module, so the image, video and
pipeline benches (and scripts under ``benchmarks/``) share one way of measuring.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import BenchError

RESULT_MARKER = "FASTDEC_BENCH_RESULT "
MEMORY_WORKER = "from fastdec.bench.measure import _memory_worker; _memory_worker()"


# ----------------------------------------------------------------------------- time
@dataclass
class TimingStats:
    """Wall-clock seconds of the timed runs (warm-up runs excluded)."""

    median_s: float
    p10_s: float
    p90_s: float
    runs: list[float]

    @property
    def n(self) -> int:
        return len(self.runs)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work so that a timer measures the work, not the launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_callable(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> TimingStats:
    """Median / p10 / p90 wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Runs under ``torch.inference_mode``; on GPU each timed run is bracketed by ``synchronize``. ``clock``
    is the timer (seconds), replaceable so that tests need not sleep.
    """
    if repeats < 1:
        raise BenchError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise BenchError(f"warmup must be >= 0, got {warmup}")
    runs: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        for _ in range(repeats):
            start = clock()
            fn()
            synchronize(device)
            runs.append(clock() - start)
    p10, median, p90 = np.percentile(runs, [10, 50, 90]).tolist()
    return TimingStats(median_s=median, p10_s=p10, p90_s=p90, runs=runs)


# ----------------------------------------------------------------------------- arithmetic and size
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one ``fn()`` call as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    That counter covers convolutions, matmuls and attention (2 FLOPs per multiply-accumulate); element-wise
    ops, normalisation and resampling are not counted (they are a few percent of a conv decoder).
    Runs ``fn`` once, so only pass PyTorch-eager callables (not ONNX Runtime sessions).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _modules(module: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [module] if isinstance(module, nn.Module) else list(module)


def count_parameters(module: nn.Module | Iterable[nn.Module]) -> int:
    """Number of parameters (shared ones counted once) of a module or of several modules together."""
    params = {id(p): p for m in _modules(module) for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def tensor_bytes(module: nn.Module | Iterable[nn.Module]) -> int:
    """Bytes held by parameters and buffers (the resident weights)."""
    tensors = {id(t): t for m in _modules(module) for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def make_latents(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal decoder-space latents (fp32, CPU) from a fixed seed: every row gets the same values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


# ----------------------------------------------------------------------------- memory (isolated process)
@dataclass
class MemoryStats:
    """Peak memory a single call needs beyond what was resident after building (MB = 2**20 bytes)."""

    peak_mb: float | None
    method: str
    error: str | None = None


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: reset this process's RSS high-water mark (VmHWM) to the current RSS (``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def _peak_rss() -> int:
    # VmHWM, not getrusage: a child's ru_maxrss starts at its parent's high-water mark (exec keeps the
    # maximum of the old address space), so it would report the benchmark process's peak, not the probe's.
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def _import_by_name(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise BenchError(f"builder must be 'module:function', got '{spec}'")
    return getattr(importlib.import_module(module_name), attr)


def _peak_cuda(fn: Callable[[], Any], device: torch.device, warm: str) -> tuple[int, str]:
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return peak, f"CUDA max_memory_allocated during one call minus allocated after build{warm}, isolated process"


def _release_heap() -> bool:
    """glibc: hand the free memory malloc still holds back to the OS (``malloc_trim(0)``); False elsewhere.

    Without it, a call after a full-size warm-up reuses that call's freed pages without raising RSS, and its
    peak reads anywhere from 0 to its true size: 0, 12, 24, 48 and 56 MB in five probes of one compiled
    8-frame decode, 83-91 MB with the trim."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return False
    trim(0)
    return True


def _peak_cpu(fn: Callable[[], Any], warm: str) -> tuple[int, str]:
    # after any warm-up, even the tiny one: at 64 px its 8x8 latents are the full size, and the measured call
    # then reused its pages (SDXL's VAE read 2 MB, where one of its convs holds 8 MB)
    if _release_heap():
        warm += " (freed heap returned to the OS first)"
    base = _current_rss()
    if _reset_peak_rss():
        method = f"peak RSS (VmHWM, reset after build) during one call minus RSS after build{warm}, isolated process"
    else:
        method = (f"peak RSS (getrusage ru_maxrss) of the whole process minus RSS after build{warm}, isolated "
                  "process (this OS cannot reset the high-water mark: an upper bound)")
    fn()
    return _peak_rss() - base, method


def _memory_worker() -> None:
    """Entry point of the isolated process started by :func:`peak_memory` (request as JSON on stdin)."""
    from ..plugins import load_plugin

    request = json.loads(sys.stdin.read())
    for plugin in request.get("plugins", []):  # the parent's --plugin decoders (they were "not a decoder file")
        load_plugin(plugin)
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    device = torch.device(request["device"])
    warm_calls = int(request.get("warm_calls", 0))
    built = _import_by_name(request["builder"])(**request["kwargs"])
    fn, warm_fn = built if isinstance(built, tuple) else (built, None)
    warm = " after warm-up call(s)" if warm_calls else ""
    with torch.inference_mode():
        if warm_fn is not None:
            warm_fn()
        for _ in range(warm_calls):
            fn()
        gc.collect()
        peak, method = _peak_cuda(fn, device, warm) if device.type == "cuda" else _peak_cpu(fn, warm)
    print(RESULT_MARKER + json.dumps({"peak_bytes": max(0, int(peak)), "method": method}), flush=True)


def _child_env() -> dict[str, str]:
    # Builders importable here (e.g. from a test module or a script's folder) must be importable there too.
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def peak_memory(
    builder: str,
    kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warm_calls: int = 0,
    timeout: float = 1800,
) -> MemoryStats:
    """Peak memory of one call, measured in a fresh Python process so nothing else in this process counts.

    ``builder`` is ``"module:function"``; in the child, ``function(**kwargs)`` (JSON-serialisable kwargs)
    builds the model and its inputs and returns a zero-argument callable doing one call, or a pair
    ``(call, warm_up_call)``. Return the pair where you can, with ``warm_up_call`` doing the same work on a
    tiny input: the first call of a process maps shared-library code into memory (RSS), by an amount that
    depends on the OS page cache, so without a warm-up the figure is noisy by tens to hundreds of MB,
    while a tiny warm-up leaves little behind. The child then measures the call: on CPU (Linux), peak RSS
    (``VmHWM`` of /proc/self/status, reset after the build) minus the RSS after the build, elsewhere
    ``getrusage`` ru_maxrss (an upper bound); on CUDA, ``torch.cuda.max_memory_allocated`` minus the memory
    allocated after the build. So the figure is the call's working memory, the weights excluded.
    ``warm_calls`` run first and are not measured (use 1 for ``torch.compile``d models so compilation does
    not count); on glibc the memory every warm-up freed is then handed back to the OS (``malloc_trim``), else
    the measured call would reuse it unseen. Failures are reported in ``MemoryStats.error``, never raised: memory
    is one column among several.
    """
    from ..plugins import loaded_plugins

    request = {
        "builder": builder, "kwargs": kwargs or {}, "device": str(device), "plugins": loaded_plugins(),
        "threads": threads or torch.get_num_threads(), "warm_calls": warm_calls,
    }
    method = "isolated process"
    try:
        done = subprocess.run([sys.executable, "-c", MEMORY_WORKER], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return MemoryStats(None, method, f"memory probe timed out after {timeout:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            return MemoryStats(result["peak_bytes"] / 2**20, result["method"])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return MemoryStats(None, method, f"memory probe failed (exit {done.returncode}): {' | '.join(tail)}")


def release_memory(device: str | torch.device) -> None:
    """Hand freed memory back (CUDA cache too) so the next row or the probe process gets it."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the machine
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (what bench output and model cards name), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_average() -> float | None:
    """The 1-minute load average (above the CPU count, other processes share the CPUs), where the OS has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def system_info(device: str | torch.device = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, thread count, library versions, device and dtype."""
    from .. import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "onnxruntime": _version("onnxruntime"),
        "fastdec": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "dtype": dtype,
    }
    if load_average() is not None:
        info["load_avg_1m"] = load_average()
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info

"""``fastdec bench``: decoders side by side in one run (time, speed-up, peak memory, parameters, GFLOPs).

The image benchmark lives here, and so does the measuring harness that ``fastdec.bench_video`` and
``fastdec.bench_pipeline`` import: :func:`time_callable`, :func:`peak_memory`, :func:`count_flops`,
:func:`count_parameters`, :func:`system_info`, :func:`render_table`, :func:`write_json`, :func:`plot_speedup`.

Baselines are the real diffusers classes with their real configs and random weights (speed does not depend
on the weights), so the comparison needs no download. Every row in a run decodes the same random latents.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- baselines
# Verbatim from stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (diffusers AutoencoderKL).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Verbatim from stabilityai/stable-video-diffusion-img2vid(-xt) vae/config.json
# (diffusers AutoencoderKLTemporalDecoder).
SVD_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class Baseline:
    key: str            # --baselines value
    name: str           # row name
    kind: str           # "baseline" (speed-up reference candidates) or "reference" (for comparison only)
    diffusers_class: str
    config: dict[str, Any]
    latent_space: str   # decoder-space latents are converted to this VAE's raw space before decode
    source: str


BASELINES: dict[str, Baseline] = {
    "sdxl": Baseline("sdxl", "sdxl-vae", "baseline", "AutoencoderKL", SDXL_VAE_CONFIG, "sdxl",
                     "stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (decoder + post_quant_conv)"),
    "svd": Baseline("svd", "svd-vae", "baseline", "AutoencoderKLTemporalDecoder", SVD_VAE_CONFIG, "svd",
                    "stabilityai/stable-video-diffusion-img2vid vae/config.json (temporal decoder, num_frames=--frames)"),
    # TAESD as shipped in diffusers: what users compare tiny decoders with. Its default config is TAESD's.
    "tiny": Baseline("tiny", "autoencoder-tiny", "reference", "AutoencoderTiny", {}, "sd15",
                     "diffusers AutoencoderTiny() default config (TAESD layout, width 64)"),
}
DEFAULT_BASELINES = ("sdxl", "svd", "tiny")
DEFAULT_DECODERS = ("tae-64", "tae-192", "effvit-paper", "effvit-attn")
BACKENDS = ("eager", "channels_last", "compile", "onnx")
DEFAULT_SIZES = (256,)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULT_MARKER = "FASTDEC_BENCH_RESULT "


class BenchError(ValueError):
    """A bad benchmark request (unknown decoder, size not divisible, no CUDA...): the message says the fix."""


# ============================================================================= harness
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
    fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: str | torch.device = "cpu"
) -> TimingStats:
    """Median / p10 / p90 wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Runs under ``torch.inference_mode``; on GPU each timed run is bracketed by ``synchronize``.
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
            start = time.perf_counter()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - start)
    p10, median, p90 = np.percentile(runs, [10, 50, 90]).tolist()
    return TimingStats(median_s=median, p10_s=p10, p90_s=p90, runs=runs)


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


def count_parameters(module: nn.Module | Iterable[nn.Module]) -> int:
    """Number of parameters (shared ones counted once) of a module or of several modules together."""
    modules = [module] if isinstance(module, nn.Module) else list(module)
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def tensor_bytes(module: nn.Module | Iterable[nn.Module]) -> int:
    """Bytes held by parameters and buffers (the resident weights)."""
    modules = [module] if isinstance(module, nn.Module) else list(module)
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


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


def _memory_worker() -> None:
    """Entry point of the isolated process started by :func:`peak_memory` (request as JSON on stdin)."""
    request = json.loads(sys.stdin.read())
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    device = torch.device(request["device"])
    built = _import_by_name(request["builder"])(**request["kwargs"])
    fn, warm_fn = built if isinstance(built, tuple) else (built, None)
    with torch.inference_mode():
        if warm_fn is not None:
            warm_fn()
        for _ in range(int(request.get("warm_calls", 0))):
            fn()
        gc.collect()
        warm = " after warm-up call(s)" if request.get("warm_calls") else ""
        if device.type == "cuda":
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            method = f"CUDA max_memory_allocated during one call minus allocated after build{warm}, isolated process"
        else:
            base = _current_rss()
            if _reset_peak_rss():
                method = f"peak RSS (VmHWM, reset after build) during one call minus RSS after build{warm}, isolated process"
            else:
                method = (f"peak RSS (getrusage ru_maxrss) of the whole process minus RSS after build{warm}, isolated "
                          "process (this OS cannot reset the high-water mark: an upper bound)")
            fn()
            peak = _peak_rss() - base
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
    while a tiny warm-up leaves little behind. The child then
    measures the call: on CPU (Linux), peak RSS (``VmHWM`` of /proc/self/status, reset after the build)
    minus the RSS after the build, elsewhere ``getrusage`` ru_maxrss (an upper bound); on CUDA, ``torch.cuda.max_memory_allocated`` minus the memory allocated
    after the build. So the figure is the call's working memory, the weights excluded. ``warm_calls`` run
    first and are not measured (use 1 for ``torch.compile``d models so compilation does not count).
    Failures are reported in ``MemoryStats.error``, never raised: memory is one column among several.
    """
    request = {
        "builder": builder, "kwargs": kwargs or {}, "device": str(device),
        "threads": threads or torch.get_num_threads(), "warm_calls": warm_calls,
    }
    command = [sys.executable, "-c", "from fastdec.bench import _memory_worker; _memory_worker()"]
    method = "isolated process"
    try:
        done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True,
                              timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return MemoryStats(None, method, f"memory probe timed out after {timeout:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            return MemoryStats(result["peak_bytes"] / 2**20, result["method"])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return MemoryStats(None, method, f"memory probe failed (exit {done.returncode}): {' | '.join(tail)}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # not installed
        return None


def system_info(device: str | torch.device = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, thread count, library versions, device and dtype."""
    from . import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
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
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: other processes share the CPUs
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- output
def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}" if v < 10 else f"{v * 1e3:,.0f}"


def _fmt_range(row: dict) -> str:
    if row.get("p10_s") is None:
        return "-"
    return f"{_fmt_ms(row['p10_s'])}–{_fmt_ms(row['p90_s'])}"


def _fmt_num(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "-"
    x = v / scale
    return f"{x:,.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"


# key, header, formatter (row -> str), justify
TABLE_COLUMNS: list[tuple[str, str, Callable[[dict], str], str]] = [
    ("name", "decoder", lambda r: str(r["name"]), "left"),
    ("kind", "kind", lambda r: str(r["kind"]), "left"),
    ("backend", "backend", lambda r: str(r["backend"]), "left"),
    ("size", "px", lambda r: str(r["size"]), "right"),
    ("batch", "batch", lambda r: str(r["batch"]), "right"),
    ("frames", "frames", lambda r: str(r["frames"]), "right"),
    ("dtype", "dtype", lambda r: str(r["dtype"]), "left"),
    ("median_s", "median ms", lambda r: _fmt_ms(r["median_s"]), "right"),
    ("p10_s", "p10–p90 ms", _fmt_range, "right"),
    ("per_image_s", "ms/image", lambda r: _fmt_ms(r["per_image_s"]), "right"),
    ("speedup", "speed-up", lambda r: "-" if r["speedup"] is None else f"{r['speedup']:.1f}x", "right"),
    ("speedup_same_dtype", "same-dtype speed-up",
     lambda r: "-" if r.get("speedup_same_dtype") is None else f"{r['speedup_same_dtype']:.1f}x", "right"),
    ("peak_mem_mb", "peak MB", lambda r: _fmt_num(r["peak_mem_mb"], digits=1), "right"),
    ("params", "params M", lambda r: _fmt_num(r["params"], 1e6), "right"),
    ("gflops", "GFLOPs", lambda r: _fmt_num(r["gflops"], digits=1), "right"),
]


def render_table(rows: Sequence[dict], title: str, columns: Sequence[str] | None = None, caption: str | None = None):
    """A ``rich.table.Table`` of result rows (dicts). Shows the standard columns present in any row, or
    exactly ``columns`` (keys; unknown keys are shown with ``str``). Print it with a rich Console."""
    from rich.table import Table

    known = {key: (header, fmt, justify) for key, header, fmt, justify in TABLE_COLUMNS}
    if columns is None:
        columns = [key for key, *_ in TABLE_COLUMNS if any(key in r for r in rows)]
    table = Table(title=title, caption=caption, caption_justify="left")
    for key in columns:
        header, _, justify = known.get(key, (key, None, "right"))
        table.add_column(header, justify=justify, no_wrap=True)
    for row in rows:
        cells = []
        for key in columns:
            if key not in row:
                cells.append("")
            elif key in known:
                cells.append(known[key][1](row))
            else:
                cells.append("-" if row[key] is None else str(row[key]))
        table.add_row(*cells)
    return table


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe(dataclasses.asdict(obj))
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (NaN/inf become null so the file is strict JSON)."""
    from .checkpoints import atomic_write

    text = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), suffix=".json")


def plot_speedup(rows: Sequence[dict], path: str | os.PathLike, x: str = "gflops", title: str | None = None) -> Path:
    """Scatter of speed-up (y) against GFLOPs per image or parameters (x), log-log, one point per row.

    Marker = image size, colour = dtype; the fastest row of each decoder (per size and dtype) is labelled.

    Rows need ``speedup`` and ``gflops`` (per call; divided by ``images``) or ``params``; others are left out.
    Written with matplotlib's Agg canvas (no display needed), atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    from .checkpoints import atomic_write

    if x not in ("gflops", "params"):
        raise BenchError(f"plot x axis must be 'gflops' or 'params', got '{x}'")

    def x_value(r: dict) -> float | None:
        if x == "params":
            return r["params"] / 1e6 if r.get("params") else None
        return r["gflops"] / max(1, r.get("images") or 1) if r.get("gflops") else None

    points = [(x_value(r), r["speedup"], r) for r in rows if r.get("speedup")]
    points = [p for p in points if p[0] and p[0] > 0 and p[1] > 0]
    if not points:
        raise BenchError("nothing to plot: no row has both a speed-up and a "
                         f"{'parameter' if x == 'params' else 'FLOP'} count (are there baselines in the run?)")
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sizes = sorted({r.get("size") for *_, r in points}, key=lambda s: (s is None, s))
    dtypes = list(dict.fromkeys(r.get("requested_dtype") or r.get("dtype") for *_, r in points))
    markers, colours = "osD^v<>p*h", ["tab:blue", "tab:orange", "tab:green"]
    # Many backend rows per decoder would bury the labels: name the fastest row of each (decoder, size, dtype)
    # and show the others as unlabelled points of the same colour.
    fastest: dict[tuple, tuple[float, float, dict]] = {}
    for xv, yv, r in points:
        key = (r["name"], r.get("size"), r.get("requested_dtype") or r.get("dtype"))
        if key not in fastest or yv > fastest[key][1]:
            fastest[key] = (xv, yv, r)
    for i, size in enumerate(sizes):
        for j, dtype in enumerate(dtypes):
            pts = [(xv, yv) for xv, yv, r in points
                   if r.get("size") == size and (r.get("requested_dtype") or r.get("dtype")) == dtype]
            parts = [f"{size} px" if size is not None else None, dtype if len(dtypes) > 1 else None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], s=40,
                       color=colours[j % len(colours)], label=", ".join(t for t in parts if t) or None, zorder=3)
    for xv, yv, r in fastest.values():
        backend = r.get("backend", "eager")
        label = r["name"] if backend == "eager" else f"{r['name']} ({backend})"
        ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20 and 0.5, not 2x10^1 and 5x10^-1
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels even within one decade
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.set_xlabel("GFLOPs per image" if x == "gflops" else "parameters (M)")
    reference = next((r.get("reference") for *_, r in points if r.get("reference")), "baseline")
    ax.set_ylabel(f"speed-up vs {reference} (same run)")
    ax.set_title(title or "fastdec bench")
    ax.grid(True, which="both", alpha=0.3)
    if len(sizes) > 1 or sizes[0] is not None or len(dtypes) > 1:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


# ============================================================================= the image benchmark
@dataclass
class RowSpec:
    """Everything needed to rebuild one benchmark row, in this process or in the memory probe's process."""

    name: str            # baseline key's row name, preset name, or checkpoint stem
    kind: str            # "baseline" | "reference" | "preset" | "checkpoint"
    backend: str         # "eager" | "channels_last" | "compile" | "onnx"
    size: int
    batch: int
    frames: int
    latent_space: str    # presets: the space they are built for
    dtype: str           # requested: fp32 | fp16 | bf16
    device: str
    channels_last: bool
    seed: int
    baseline: str | None = None     # BASELINES key
    checkpoint: str | None = None
    onnx_path: str | None = None
    upcast: bool = True             # follow force_upcast (fp16 VAE decodes in fp32) as diffusers pipelines do


@dataclass
class PreparedRow:
    fn: Callable[[], torch.Tensor]          # one timed call on the benchmark latents
    warm_fn: Callable[[], torch.Tensor]     # the same call on tiny latents (maps code pages before memory probes)
    modules: list[nn.Module]                # what the row's parameters/weights are counted on
    images: int                             # images produced by one call
    latent_shape: tuple[int, ...]
    run_dtype: str                          # the dtype the row really runs in
    note: str = ""


def make_latents(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal decoder-space latents (fp32, CPU) from a fixed seed: every row gets the same values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def _warm_side(side: int) -> int:
    return min(side, 8)  # 8x8 latents: every layer runs, next to no activation memory stays cached


def _prepare_baseline(spec: RowSpec) -> PreparedRow:
    import diffusers

    from .latent_spaces import get_latent_space

    base = BASELINES[spec.baseline]
    torch.manual_seed(spec.seed)
    vae = getattr(diffusers, base.diffusers_class)(**base.config).eval()
    dtype = DTYPES[spec.dtype]
    note = ""
    # SDXL/SVD pipelines run an fp16 VAE with force_upcast=True in fp32 (it overflows in fp16): time what users get.
    if spec.upcast and dtype == torch.float16 and vae.config.get("force_upcast", False):
        dtype, note = torch.float32, "fp16 requested; force_upcast decodes in fp32 as diffusers pipelines do"
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # to() warns about from_pretrained(torch_dtype=...): moot without weights
    try:
        vae = vae.to(device=spec.device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    channels_last = spec.channels_last or spec.backend == "channels_last"
    if channels_last:
        from .runtime import to_channels_last

        to_channels_last(vae)  # not vae.to(memory_format=...): SVD's Conv3d weights are 5-D
    factor = 8  # all three VAEs upsample 8x (three 2x stages)
    if spec.size % factor:
        raise BenchError(f"size {spec.size} is not a multiple of {factor} ({base.name} latents are 1/{factor} "
                         "of the image): pick e.g. 256 or 512")
    frames = spec.frames if spec.baseline == "svd" else 1
    space = get_latent_space(base.latent_space)

    def raw_latents(batch: int, side: int) -> torch.Tensor:
        # The same decoder-space latents as every other row, mapped to the raw space this VAE's decode() gets.
        z = space.decoder_to_vae(make_latents((batch * frames, vae.config.latent_channels, side, side), spec.seed))
        z = z.to(device=spec.device, dtype=dtype)
        return z.contiguous(memory_format=torch.channels_last) if channels_last else z

    def decode(raw: torch.Tensor) -> torch.Tensor:
        out = vae.decode(raw, num_frames=frames) if spec.baseline == "svd" else vae.decode(raw)
        return out.sample.mul(0.5).add(0.5).clamp(0, 1)

    side = spec.size // factor
    full, tiny = raw_latents(spec.batch, side), raw_latents(1, _warm_side(side))
    modules = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return PreparedRow(lambda: decode(full), lambda: decode(tiny), modules, spec.batch * frames,
                       tuple(full.shape), _dtype_name(dtype), note)


def _load_row_decoder(spec: RowSpec):
    from .checkpoints import load_decoder
    from .models import create_decoder

    if spec.kind == "checkpoint":
        return load_decoder(spec.checkpoint)
    torch.manual_seed(spec.seed)
    return create_decoder(spec.name, spec.latent_space)


def _prepare_decoder(spec: RowSpec) -> PreparedRow:
    dtype = DTYPES[spec.dtype]
    decoder = _load_row_decoder(spec).eval().to(device=spec.device, dtype=dtype)
    factor = decoder.upsample_factor
    if spec.size % factor:
        raise BenchError(f"size {spec.size} is not a multiple of {factor} ({spec.name} upsamples its latents "
                         f"{factor}x): pick e.g. {factor * max(1, round(spec.size / factor))}")
    channels_last = spec.channels_last or spec.backend == "channels_last"
    note = ""
    if spec.backend == "compile":
        from .runtime import optimize

        model = optimize(decoder, channels_last=True, compile=True)
        note = "fastdec.optimize: channels_last + torch.compile"
    elif spec.backend == "onnx":
        from .export import OnnxDecoder

        model = OnnxDecoder(spec.onnx_path)
        note = "ONNX Runtime (fastdec.export.OnnxDecoder)"
    else:
        model = decoder.to(memory_format=torch.channels_last) if channels_last else decoder

    def latents(batch: int, side: int) -> torch.Tensor:
        z = make_latents((batch, decoder.latent_channels, side, side), spec.seed).to(device=spec.device, dtype=dtype)
        if channels_last and spec.backend != "onnx":
            z = z.contiguous(memory_format=torch.channels_last)
        return z

    side = spec.size // factor
    full, tiny = latents(spec.batch, side), latents(1, _warm_side(side))
    return PreparedRow(lambda: model(full), lambda: model(tiny), [decoder], spec.batch, tuple(full.shape),
                       spec.dtype, note)


def prepare_row(spec: RowSpec) -> PreparedRow:
    """Build a row's model and inputs; ``.fn`` is the zero-argument call that is timed."""
    if spec.kind in ("baseline", "reference"):
        return _prepare_baseline(spec)
    return _prepare_decoder(spec)


def build_row_callable(**spec: Any) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Builder for :func:`peak_memory` (``"fastdec.bench:build_row_callable"``, kwargs = a RowSpec as a dict)."""
    prepared = prepare_row(RowSpec(**spec))
    return prepared.fn, prepared.warm_fn


# ----------------------------------------------------------------------------- planning
@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    batch: int = 1
    frames: int = 1
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])  # the first is the speed-up reference's dtype
    device: str = "cpu"
    channels_last: bool = False
    decoders: list[str] | None = None       # None: DEFAULT_DECODERS that are registered; ["all"]: every image preset
    baselines: list[str] | None = None      # None: DEFAULT_BASELINES; [] or ["none"]: no baselines
    backends: list[str] = field(default_factory=lambda: ["eager"])
    repeats: int = 5
    warmup: int = 1
    latent_space: str = "sdxl"
    seed: int = 0
    threads: int | None = None
    memory: bool = True
    upcast: bool = True


@dataclass
class Skip:
    name: str
    backend: str
    reason: str


def _resolve_decoders(cfg: BenchConfig) -> tuple[list[tuple[str, str, str | None]], list[Skip]]:
    """(row name, kind, checkpoint path) for each requested decoder, plus default presets not registered here."""
    from .models import list_decoders

    image = list_decoders(video=False)
    video = set(list_decoders(video=True))
    if cfg.decoders is None:
        chosen = [n for n in DEFAULT_DECODERS if n in image]
        skipped = [Skip(n, "-", "preset not registered in this install") for n in DEFAULT_DECODERS if n not in image]
        return [(n, "preset", None) for n in chosen], skipped
    out: list[tuple[str, str, str | None]] = []
    for name in cfg.decoders:
        if name == "all":
            out += [(n, "preset", None) for n in image]
        elif name in image:
            out.append((name, "preset", None))
        elif name in video:
            raise BenchError(f"'{name}' is a video decoder: benchmark it with `fastdec bench --video --decoders {name}`")
        elif name.endswith(".safetensors") or Path(name).exists():
            if not Path(name).is_file():
                raise BenchError(f"decoder checkpoint '{name}' not found: pass an existing .safetensors file")
            out.append((Path(name).stem, "checkpoint", str(Path(name).resolve())))
        else:
            raise BenchError(f"unknown decoder '{name}': choose from {', '.join(image)} (or 'all', or a .safetensors "
                             "checkpoint saved with fastdec.save_decoder)")
    seen: set[str] = set()
    unique = [d for d in out if not (d[0] in seen or seen.add(d[0]))]
    return unique, []


def _validate(cfg: BenchConfig) -> None:
    from .latent_spaces import get_latent_space

    if not cfg.sizes:
        raise BenchError("no sizes given: pass e.g. --sizes 256 512")
    for size in cfg.sizes:
        if size <= 0 or size % 8:
            raise BenchError(f"size {size} must be a positive multiple of 8 (the VAEs' latents are 1/8 of the image): "
                             "pick e.g. 256 or 512")
    for name, value in (("batch", cfg.batch), ("frames", cfg.frames), ("repeats", cfg.repeats)):
        if value < 1:
            raise BenchError(f"--{name} must be >= 1, got {value}")
    if cfg.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {cfg.warmup}")
    if not cfg.dtypes:
        raise BenchError("no dtype given: pass e.g. --dtype fp32 bf16")
    for dtype in cfg.dtypes:
        if dtype not in DTYPES:
            raise BenchError(f"unknown dtype '{dtype}': choose from {', '.join(DTYPES)}")
    unknown = [b for b in cfg.backends if b not in BACKENDS]
    if unknown:
        raise BenchError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    for b in cfg.baselines or []:
        if b not in BASELINES and b != "none":
            raise BenchError(f"unknown baseline '{b}': choose from {', '.join(BASELINES)} or none")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {cfg.device}: CUDA is not available to this torch ({torch.__version__}): "
                         "use --device cpu, or install a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda[:N], got '{cfg.device}'")
    try:
        get_latent_space(cfg.latent_space)
    except KeyError as e:
        raise BenchError(f"--latent-space: {e.args[0]}") from None


def plan_rows(cfg: BenchConfig) -> tuple[list[RowSpec], list[Skip]]:
    """The rows of a run, in order: per size and dtype, baselines, then each decoder x backend.

    Baselines get the eager and channels_last backends when those are requested (torch.compile and ONNX
    are fastdec's runtimes, not what users of the diffusers VAEs run), so a same-dtype speed-up compares
    each decoder with the baseline's fastest form, not a handicapped one.
    """
    _validate(cfg)
    decoders, skipped = _resolve_decoders(cfg)
    baselines = list(DEFAULT_BASELINES) if cfg.baselines is None else [b for b in cfg.baselines if b != "none"]
    common = dict(batch=cfg.batch, frames=cfg.frames, latent_space=cfg.latent_space,
                  device=cfg.device, channels_last=cfg.channels_last, seed=cfg.seed, upcast=cfg.upcast)
    baseline_backends = [b for b in dict.fromkeys(["eager", *cfg.backends]) if b in ("eager", "channels_last")]
    if cfg.channels_last:
        baseline_backends = ["eager"]
    rows: list[RowSpec] = []
    for size in cfg.sizes:
        for dtype in dict.fromkeys(cfg.dtypes):
            for key in dict.fromkeys(baselines):
                base = BASELINES[key]
                for backend in baseline_backends:
                    rows.append(RowSpec(base.name, base.kind, backend, size, baseline=key, dtype=dtype, **common))
            for name, kind, checkpoint in decoders:
                for backend in dict.fromkeys(cfg.backends):
                    first = size == cfg.sizes[0] and dtype == cfg.dtypes[0]
                    if backend == "channels_last" and cfg.channels_last:
                        if first:
                            skipped.append(Skip(name, backend, "same as eager with --channels-last"))
                        continue
                    if backend == "onnx" and dtype == "bf16":
                        if size == cfg.sizes[0]:
                            skipped.append(Skip(name, f"{backend} bf16", "ONNX Runtime has no bf16 convolution "
                                                "kernels on CPU: use fp32 or fp16 for ONNX"))
                        continue
                    rows.append(RowSpec(name, kind, backend, size, checkpoint=checkpoint, dtype=dtype, **common))
    return rows, skipped


# ----------------------------------------------------------------------------- running
def _backend_unavailable(backend: str) -> str | None:
    modules = {"compile": ("fastdec.runtime", "optimize"), "onnx": ("fastdec.export", "OnnxDecoder")}
    if backend not in modules:
        return None
    module_name, attr = modules[backend]
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # missing module or a broken optional dependency: skip the row, keep the run
        return f"{module_name} cannot be imported ({type(e).__name__}: {e})"
    if not hasattr(module, attr):
        return f"{module_name} has no {attr} yet"
    if backend == "onnx" and not hasattr(module, "export_onnx"):
        return f"{module_name} has no export_onnx yet"
    return None


def _export_onnx(spec: RowSpec, directory: Path) -> str:
    from .export import export_onnx

    decoder = _load_row_decoder(spec).eval().to(dtype=DTYPES[spec.dtype])
    path = directory / f"{spec.name}-{spec.dtype}.onnx"
    return str(export_onnx(decoder, path))


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_bench(cfg: BenchConfig, console=None) -> dict[str, Any]:
    """Run the image benchmark and return the JSON payload (rows, skipped rows, system info, settings).

    Raises :class:`BenchError` for bad requests; a backend that fails is recorded as skipped, not raised.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows_plan, skipped = plan_rows(cfg)
    if not rows_plan:
        raise BenchError("nothing to benchmark: no decoders and no baselines selected")
    unavailable = {b: _backend_unavailable(b) for b in cfg.backends}
    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    results: list[dict[str, Any]] = []
    failed: list[Skip] = []
    eager_flops: dict[tuple[str, int], int | None] = {}
    onnx_files: dict[str, str] = {}
    workdir = tempfile.TemporaryDirectory(prefix="fastdec-bench-")
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("fastdec bench", total=len(rows_plan))
            for spec in rows_plan:
                dtype_tag = f", {spec.dtype}" if len(cfg.dtypes) > 1 else ""
                label = f"{spec.name} ({spec.backend}{dtype_tag}) {spec.size}px"  # () not []: rich reads [x] as markup
                progress.update(task, description=f"{label}: building")
                reason = unavailable.get(spec.backend)
                if reason:
                    skipped.append(Skip(spec.name, spec.backend, reason))
                    progress.console.print(f"[yellow]skip[/] {escape(label)}: {escape(reason)}")
                    progress.advance(task)
                    continue
                try:
                    if spec.backend == "onnx":
                        if (spec.name, spec.dtype) not in onnx_files:
                            progress.update(task, description=f"{label}: exporting ONNX")
                            onnx_files[spec.name, spec.dtype] = _export_onnx(spec, Path(workdir.name))
                        spec.onnx_path = onnx_files[spec.name, spec.dtype]
                    prepared = prepare_row(spec)
                    # compile: the first call compiles; it must never land in the timed runs
                    warmup = max(cfg.warmup, 1) if spec.backend in ("compile", "onnx") else cfg.warmup
                    flops_key = (spec.name, spec.size)
                    if flops_key not in eager_flops:
                        progress.update(task, description=f"{label}: counting FLOPs")
                        # compiled / ONNX graphs do the same arithmetic as the eager model, which torch can count
                        eager = prepared if spec.backend in ("eager", "channels_last") else \
                            prepare_row(dataclasses.replace(spec, backend="eager"))
                        eager_flops[flops_key] = count_flops(eager.fn)
                        del eager
                    progress.update(task, description=f"{label}: timing ({warmup} warm-up + {cfg.repeats} runs)")
                    timing = time_callable(prepared.fn, warmup=warmup, repeats=cfg.repeats, device=spec.device)
                except BenchError:
                    raise
                except Exception as e:  # one broken row must not lose the others' numbers
                    reason = _short_error(e)
                    if spec.backend in ("eager", "channels_last"):
                        failed.append(Skip(spec.name, spec.backend, reason))
                        progress.console.print(f"[red]FAILED[/] {escape(label)}: {escape(reason)}")
                    else:
                        skipped.append(Skip(spec.name, spec.backend, reason))
                        progress.console.print(f"[yellow]skip[/] {escape(label)}: {escape(reason)}")
                    progress.advance(task)
                    continue
                row: dict[str, Any] = {
                    "name": spec.name, "kind": spec.kind, "backend": spec.backend, "size": spec.size,
                    "batch": spec.batch, "frames": spec.frames if spec.baseline == "svd" else 1,
                    "images": prepared.images, "latent_shape": list(prepared.latent_shape),
                    "dtype": prepared.run_dtype, "requested_dtype": spec.dtype, "device": spec.device,
                    "channels_last": spec.channels_last or spec.backend in ("channels_last", "compile"),
                    "median_s": timing.median_s, "p10_s": timing.p10_s, "p90_s": timing.p90_s,
                    "runs_s": timing.runs, "warmup": warmup, "repeats": cfg.repeats,
                    "per_image_s": timing.median_s / prepared.images, "speedup": None,
                    "peak_mem_mb": None, "peak_mem_method": None,
                    "params": count_parameters(prepared.modules),
                    "weights_mb": tensor_bytes(prepared.modules) / 2**20,
                    "gflops": None if eager_flops.get(flops_key) is None else eager_flops[flops_key] / 1e9,
                    "note": prepared.note,
                }
                del prepared
                gc.collect()
                if torch.device(spec.device).type == "cuda":
                    torch.cuda.empty_cache()  # hand the memory back so the probe process gets it
                if cfg.memory:
                    progress.update(task, description=f"{label}: peak memory (isolated process)")
                    mem = peak_memory("fastdec.bench:build_row_callable", dataclasses.asdict(spec),
                                      device=spec.device, threads=torch.get_num_threads(),
                                      warm_calls=1 if spec.backend == "compile" else 0)
                    row["peak_mem_mb"], row["peak_mem_method"] = mem.peak_mb, mem.method
                    if mem.error:
                        row["peak_mem_error"] = mem.error
                        progress.console.print(f"[yellow]memory[/] {escape(label)}: {escape(mem.error)}")
                results.append(row)
                progress.console.print(
                    f"[green]done[/] {escape(label)}: {_fmt_ms(timing.median_s)} ms median of {timing.n}"
                    + (f", {row['peak_mem_mb']:.0f} MB peak" if row["peak_mem_mb"] is not None else ""))
                progress.advance(task)
            progress.update(task, description="fastdec bench: done")
    finally:
        workdir.cleanup()

    reference = _add_speedups(results, cfg.dtypes[0])
    system = system_info(cfg.device, "/".join(cfg.dtypes))
    system["load_avg_1m_start"] = load_at_start
    return {
        "benchmark": "fastdec bench (image decoders)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - started,
        "system": system,
        "settings": dataclasses.asdict(cfg),
        "reference": reference,
        "reference_dtype": cfg.dtypes[0] if reference else None,
        "speedup_definition": (f"{reference} (eager, {cfg.dtypes[0]}) seconds per image / row seconds per image, "
                               "same size, same run (= median time ratio when both decode the same number of images)"
                               ) if reference else None,
        "speedup_same_dtype_definition": (f"fastest {reference} row (any backend) in the row's dtype, seconds per "
                                          "image / row seconds per image, same size, same run") if reference else None,
        "flops_definition": "torch.utils.flop_counter.FlopCounterMode total per call (convs, matmuls, attention; "
                            "2 FLOPs per multiply-accumulate); backend rows reuse the eager count",
        "baselines": {b.name: b.source for b in BASELINES.values()},
        "rows": results,
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "failed": [dataclasses.asdict(s) for s in failed],
    }


def _add_speedups(rows: list[dict[str, Any]], reference_dtype: str) -> str | None:
    """Two speed-ups per row, against the first baseline (SDXL by default) at the same size:

    ``speedup``: vs that baseline as its users run it, eager in ``reference_dtype`` (the first --dtype);
    ``speedup_same_dtype``: vs the baseline's fastest row (eager or channels_last) in the row's own dtype,
    the like-for-like figure when a row gains from a lower precision the baseline could use too.
    """
    reference = next((r["name"] for r in rows if r["kind"] == "baseline"), None)
    if reference is None:
        return None
    ref_rows = [r for r in rows if r["name"] == reference]
    stock = {r["size"]: r["per_image_s"] for r in ref_rows
             if r["backend"] == "eager" and r["requested_dtype"] == reference_dtype}
    fastest: dict[tuple[int, str], float] = {}
    for r in ref_rows:
        key = (r["size"], r["requested_dtype"])
        fastest[key] = min(fastest.get(key, math.inf), r["per_image_s"])
    for r in rows:
        if r["size"] in stock:
            r["speedup"] = stock[r["size"]] / r["per_image_s"]
            r["reference"] = reference
        same = fastest.get((r["size"], r["requested_dtype"]))
        r["speedup_same_dtype"] = None if same is None else same / r["per_image_s"]
    return reference


# ----------------------------------------------------------------------------- CLI
def _console_out():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # files/pipes: wide enough that the table never wraps
        console = Console(width=200)
    return console


def print_report(payload: dict[str, Any], console=None) -> None:
    """The final table, the system line, and any skipped rows."""
    console = console or _console_out()
    s, cfg = payload["system"], payload["settings"]
    sizes = ", ".join(str(x) for x in cfg["sizes"])
    threads = f", {s['torch_threads']} torch threads" if s["device"].startswith("cpu") else ""
    title = f"fastdec bench: {sizes} px, batch {cfg['batch']}, {'/'.join(cfg['dtypes'])}, {s['device']}{threads}"
    caption = (f"{s.get('gpu') or s['cpu']} ({s['cpu_count']} logical CPUs) | torch {s['torch']} | "
               f"diffusers {s['diffusers']} | fastdec {s['fastdec']} | dtype {s['dtype']} | "
               f"channels_last {cfg['channels_last']} | median of {cfg['repeats']} after {cfg['warmup']} warm-up")
    columns = [key for key, *_ in TABLE_COLUMNS]
    if all(r.get("frames", 1) == 1 for r in payload["rows"]):
        columns.remove("frames")
    like_for_like = any(r.get("speedup_same_dtype") is not None and r["speedup_same_dtype"] != r["speedup"]
                        for r in payload["rows"])
    if not like_for_like:
        columns.remove("speedup_same_dtype")
    console.print(render_table(payload["rows"], title, columns=columns, caption=caption))
    if payload.get("reference"):
        reference = f"{payload['reference']} (eager, {payload.get('reference_dtype') or cfg['dtypes'][0]})"
        same = (f"; same-dtype speed-up = the fastest {payload['reference']} row in the row's dtype / row time"
                if like_for_like else "")
        console.print(f"speed-up = {reference} time per image / row time per image (same size, same run, "
                      f"same latents){same}. peak MB = working memory of one decode beyond the weights "
                      + ("(CUDA max allocated)" if s["device"].startswith("cuda") else "(peak RSS, isolated process)")
                      + ". GFLOPs per call from torch.utils.flop_counter.")
    loads = [x for x in (s.get("load_avg_1m_start"), s.get("load_avg_1m")) if x is not None]
    if s["device"].startswith("cpu") and loads and max(loads) > (s["cpu_count"] or 1):
        console.print(f"warning: the machine was busy (1-min load average up to {max(loads):.1f} on {s['cpu_count']} "
                      "CPUs): other processes slowed these rows, unequally; rerun on a quiet machine before quoting "
                      "numbers", style="yellow", markup=False)
    notes = [r for r in payload["rows"] if r.get("note")]
    for r in notes:
        console.print(f"note: {r['name']} ({r['backend']}, {r['dtype']}) {r['size']}px: {r['note']}", markup=False)
    for skip in payload["skipped"]:
        console.print(f"skipped: {skip['name']} ({skip['backend']}): {skip['reason']}", markup=False)
    for fail in payload.get("failed", []):
        console.print(f"FAILED: {fail['name']} ({fail['backend']}): {fail['reason']}", markup=False, style="red")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        sizes=list(args.sizes) if args.sizes else list(DEFAULT_SIZES), batch=args.batch, frames=args.frames,
        dtypes=list(args.dtype), device=args.device, channels_last=args.channels_last, decoders=args.decoders,
        baselines=args.baselines, backends=list(args.backends or ["eager"]), repeats=args.repeats,
        warmup=args.warmup, latent_space=args.latent_space, seed=args.seed, threads=args.threads,
        memory=not args.no_memory, upcast=not args.no_upcast,
    )


def _dispatch(module_name: str, function: str, flag: str, args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"fastdec bench: error: {flag} needs {module_name}, which is not part of this fastdec install; "
              "run `fastdec bench` without it for the image decoders", file=sys.stderr)
        return 2
    try:
        return int(getattr(module, function)(args) or 0)
    except BenchError as e:
        print(f"fastdec bench {flag}: error: {e}", file=sys.stderr)
        return 2


def bench_command(args: argparse.Namespace) -> int:
    """``fastdec bench``: the image benchmark, or ``--video`` / ``--pipeline`` dispatched to their modules."""
    if args.video and args.pipeline:
        print("fastdec bench: error: choose one of --video and --pipeline", file=sys.stderr)
        return 2
    if args.video:
        return _dispatch("fastdec.bench_video", "run_video_bench", "--video", args)
    if args.pipeline:
        return _dispatch("fastdec.bench_pipeline", "run_pipeline_bench", "--pipeline", args)
    try:
        cfg = config_from_args(args)
        out = _console_out()
        if args.sizes is None:
            out.print(f"default run: {', '.join(map(str, DEFAULT_SIZES))} px output only, so it finishes in under "
                      "3 minutes on a 2-core CPU; pass --sizes 256 512 (or 1024) for larger images")
        payload = run_bench(cfg)
        if args.json:
            write_json(args.json, payload)
        if args.plot:
            plot_speedup(payload["rows"], args.plot, x=args.plot_x)
    except BenchError as e:
        print(f"fastdec bench: error: {e}", file=sys.stderr)
        return 2
    print_report(payload, out)
    for label, path in (("json", args.json), ("plot", args.plot)):
        if path:
            out.print(f"wrote {label}: {path}")
    out.print(f"total wall time {payload['wall_s']:.0f} s")
    return 1 if payload["failed"] else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastdec bench`` options (shared with ``--video`` and ``--pipeline``, which read the same namespace)."""
    p = parser
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="PX",
                   help=f"output sizes in pixels (square); default {' '.join(map(str, DEFAULT_SIZES))} (fits 3 min on 2 CPU cores)")
    p.add_argument("--batch", type=int, default=1, help="images per decode call (default 1)")
    p.add_argument("--frames", type=int, default=1, help="frames per SVD decode call (num_frames; default 1 = per frame)")
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["fp32"],
                   help="weights and latents dtype(s); every row runs in each, and speed-up is relative to the "
                        "baseline in the first (default fp32). On CPUs with AMX/AVX512-BF16, bf16 with "
                        "--backends channels_last is the fastest")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--channels-last", action="store_true", help="run every eager row in channels_last memory format")
    p.add_argument("--decoders", nargs="+", default=None, metavar="NAME",
                   help=f"presets, 'all', or .safetensors checkpoints; default {' '.join(DEFAULT_DECODERS)}")
    p.add_argument("--baselines", nargs="+", default=None, choices=[*BASELINES, "none"],
                   help="diffusers VAEs to compare with (random weights, real configs); the first 'baseline' kind is "
                        "the speed-up reference; default sdxl svd tiny")
    p.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                   help="backend rows for our decoders: eager, channels_last, compile (fastdec.optimize), "
                        "onnx (ONNX Runtime); default eager")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--latent-space", default="sdxl", help="latent space our presets are built for (default sdxl)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and latents (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the isolated-process peak-memory probes (faster)")
    p.add_argument("--no-upcast", action="store_true",
                   help="with --dtype fp16, run force_upcast VAEs in fp16 too instead of fp32 as pipelines do")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a speed-up plot (log-log)")
    p.add_argument("--plot-x", choices=["gflops", "params"], default="gflops", help="x axis of --plot (default gflops)")
    p.add_argument("--video", action="store_true", help="benchmark video decoders (fastdec.bench_video)")
    p.add_argument("--pipeline", action="store_true", help="benchmark full diffusers pipelines (fastdec.bench_pipeline)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark decoders side by side (time, speed-up, memory, params, GFLOPs)",
        description="Decoders side by side in one run: diffusers baselines (SDXL and SVD VAE decoders, "
                    "AutoencoderTiny; real configs, random weights) against fastdec presets, on the same latents.",
    )
    add_arguments(parser)
    # The video and pipeline benches may add their own options to the same command.
    for module_name in ("fastdec.bench_video", "fastdec.bench_pipeline"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        hook = getattr(module, "add_bench_arguments", None)
        if hook is not None:
            hook(parser.add_argument_group(module_name))
    parser.set_defaults(func=bench_command)

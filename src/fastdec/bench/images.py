"""``fastdec bench``: image decoders side by side in one run (time, speed-up, peak memory, parameters, GFLOPs).

A run is a list of rows (per size and dtype: the baselines, then each decoder x backend). Each fastdec
decoder is built once per run (:func:`fastdec.bench.baselines.named_decoders`); a row works on a copy of it,
from which it derives everything it reports: parameters, FLOPs (counted on the eager model, also for
compiled and ONNX rows), the ONNX export and the timed calls. The memory probe's process builds the row
again from its :class:`RowSpec`. Every row in a run decodes the same random latents.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..devices import check_device
from ..dtypes import DTYPES, dtype_name
from ..errors import BenchError
from .baselines import (
    BASELINES, DEFAULT_BASELINES, VAE_FACTOR, NamedDecoder, build_decoder, build_vae, decode_rgb, decoder_modules,
    named_decoders, place_vae, upcast_dtype, vae_latents,
)
from .measure import (
    TimingStats, count_flops, count_parameters, load_average, make_latents, peak_memory, release_memory,
    system_info, tensor_bytes, time_callable,
)
from .report import console_out, plot_speedup, print_report, write_json

DEFAULT_DECODERS = ("tae-64", "tae-192", "effvit-paper", "effvit-attn")
BACKENDS = ("eager", "channels_last", "compile", "onnx")
DEFAULT_SIZES = (256,)
ROW_BUILDER = "fastdec.bench.images:build_row_callable"
# optional packages a backend needs; a row whose backend cannot import them is skipped, not failed
_BACKEND_PACKAGES = {"onnx": ("onnx", "onnxruntime")}


# ----------------------------------------------------------------------------- one row
@dataclass
class RowSpec:
    """Everything needed to rebuild one benchmark row, in this process or in the memory probe's process."""

    name: str            # baseline row name, or the decoder's row name (preset, checkpoint stem, ...)
    kind: str            # "baseline" | "reference" | "preset" | "checkpoint" | "pretrained" | "hub"
    backend: str         # "eager" | "channels_last" | "compile" | "onnx"
    size: int
    batch: int
    frames: int
    latent_space: str | None  # the space presets are built for (None: sdxl); checkpoints keep theirs
    dtype: str           # requested: fp32 | fp16 | bf16
    device: str
    channels_last: bool
    seed: int
    baseline: str | None = None     # BASELINES key
    source: str | None = None       # the decoder spec the memory probe's process resolves again
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
    flops_fn: Callable[[], Any] | None = None  # the eager call FLOPs are counted on (None: ``fn``)


def _warm_side(side: int) -> int:
    return min(side, 8)  # 8x8 latents: every layer runs, next to no activation memory stays cached


def _uses_channels_last(spec: RowSpec) -> bool:
    return spec.channels_last or spec.backend == "channels_last"


def _prepare_baseline(spec: RowSpec) -> PreparedRow:
    base = BASELINES[spec.baseline]
    if spec.size % VAE_FACTOR:
        raise BenchError(f"size {spec.size} is not a multiple of {VAE_FACTOR} ({base.name} latents are "
                         f"1/{VAE_FACTOR} of the image): pick e.g. 256 or 512")
    vae = build_vae(spec.baseline, spec.seed)
    run_dtype, note = upcast_dtype(vae, spec.dtype, spec.upcast)  # time what pipeline users get
    channels_last = _uses_channels_last(spec)
    vae = place_vae(vae, spec.device, run_dtype, channels_last)
    frames = spec.frames if spec.baseline == "svd" else None

    def raw_latents(batch: int, side: int) -> torch.Tensor:
        # The same decoder-space latents as every other row, mapped to the raw space this VAE's decode() gets.
        shape = (batch * (frames or 1), vae.config.latent_channels, side, side)
        z = vae_latents(spec.baseline, shape, spec.seed).to(device=spec.device, dtype=DTYPES[run_dtype])
        return z.contiguous(memory_format=torch.channels_last) if channels_last else z

    side = spec.size // VAE_FACTOR
    full, tiny = raw_latents(spec.batch, side), raw_latents(1, _warm_side(side))
    return PreparedRow(lambda: decode_rgb(vae, full, frames), lambda: decode_rgb(vae, tiny, frames),
                       decoder_modules(vae), spec.batch * (frames or 1), tuple(full.shape), run_dtype, note)


def _backend_model(spec: RowSpec, decoder: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """What the row times: the decoder itself, its optimize()d form, or its ONNX Runtime session."""
    if spec.backend == "compile":
        from ..runtime import optimize

        return optimize(decoder, channels_last=True, compile=True), "fastdec.optimize: channels_last + torch.compile"
    if spec.backend == "onnx":
        from ..runtime.onnx import OnnxDecoder

        return OnnxDecoder(spec.onnx_path), "ONNX Runtime (fastdec.runtime.onnx.OnnxDecoder)"
    if _uses_channels_last(spec):
        decoder.to(memory_format=torch.channels_last)
    return decoder, ""


def _prepare_decoder(spec: RowSpec, decoder: nn.Module) -> PreparedRow:
    dtype = DTYPES[spec.dtype]
    decoder = decoder.eval().to(device=spec.device, dtype=dtype)
    factor = decoder.upsample_factor
    if spec.size % factor:
        raise BenchError(f"size {spec.size} is not a multiple of {factor} ({spec.name} upsamples its latents "
                         f"{factor}x): pick e.g. {factor * max(1, round(spec.size / factor))}")
    model, note = _backend_model(spec, decoder)

    def latents(batch: int, side: int) -> torch.Tensor:
        z = make_latents((batch, decoder.latent_channels, side, side), spec.seed).to(device=spec.device, dtype=dtype)
        if _uses_channels_last(spec) and spec.backend != "onnx":
            z = z.contiguous(memory_format=torch.channels_last)
        return z

    side = spec.size // factor
    full, tiny = latents(spec.batch, side), latents(1, _warm_side(side))
    # compiled and ONNX graphs do the same arithmetic as the eager model, which torch can count
    return PreparedRow(lambda: model(full), lambda: model(tiny), [decoder], spec.batch, tuple(full.shape),
                       spec.dtype, note, flops_fn=lambda: decoder(full))


def prepare_row(spec: RowSpec, decoder: nn.Module | None = None) -> PreparedRow:
    """Build a row's model and inputs; ``.fn`` is the zero-argument call that is timed.

    ``decoder``: the fastdec decoder to use (it is moved and converted in place); without it the row's
    ``source`` is resolved (as the memory probe's process does).
    """
    if spec.kind in ("baseline", "reference"):
        return _prepare_baseline(spec)
    if decoder is None:
        decoder = build_decoder(spec.source or spec.name, spec.latent_space, spec.seed)
    return _prepare_decoder(spec, decoder)


def build_row_callable(**spec: Any) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Builder for :func:`peak_memory` (``ROW_BUILDER``, kwargs = a RowSpec as a dict)."""
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
    decoders: list[str] | None = None       # None: DEFAULT_DECODERS; ["all"]: every image preset
    baselines: list[str] | None = None      # None: DEFAULT_BASELINES; [] or ["none"]: no baselines
    backends: list[str] = field(default_factory=lambda: ["eager"])
    repeats: int = 5
    warmup: int = 1
    latent_space: str | None = None         # presets are built for it (None: sdxl); checkpoints are checked
    seed: int = 0
    threads: int | None = None
    memory: bool = True
    upcast: bool = True


@dataclass
class Skip:
    name: str
    backend: str
    reason: str


def _check_numbers(cfg: BenchConfig) -> None:
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
    if cfg.threads is not None and cfg.threads < 0:
        raise BenchError(f"--threads must be >= 1 (or 0 for torch's choice), got {cfg.threads}")


def _check_choices(cfg: BenchConfig) -> None:
    from ..latent_spaces import get_latent_space

    unknown = [b for b in cfg.backends if b not in BACKENDS]
    if unknown:
        raise BenchError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    for b in cfg.baselines or []:
        if b not in BASELINES and b != "none":
            raise BenchError(f"unknown baseline '{b}': choose from {', '.join(BASELINES)} or none")
    device = check_device(cfg.device)  # an unknown name or a device this machine lacks
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda[:N], got '{cfg.device}'")
    if cfg.latent_space is not None:
        try:
            get_latent_space(cfg.latent_space)
        except KeyError as e:
            raise BenchError(f"--latent-space: {e}") from None


def validate_config(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` checked (a bad request raises :class:`BenchError` before any work), dtypes canonical."""
    _check_numbers(cfg)
    if not cfg.dtypes:
        raise BenchError("no dtype given: pass e.g. --dtype fp32 bf16")
    _check_choices(cfg)
    return dataclasses.replace(cfg, dtypes=list(dict.fromkeys(dtype_name(d) for d in cfg.dtypes)))


def bench_decoders(cfg: BenchConfig) -> list[NamedDecoder]:
    """The run's fastdec decoders, each built once."""
    names = DEFAULT_DECODERS if cfg.decoders is None else cfg.decoders
    return named_decoders(names, cfg.latent_space, cfg.seed, video=False)


def _baseline_rows(cfg: BenchConfig, size: int, dtype: str, common: dict) -> list[RowSpec]:
    # torch.compile and ONNX are fastdec's runtimes, not what users of the diffusers VAEs run; eager and
    # channels_last are, so a same-dtype speed-up compares with the baseline's fastest form
    baselines = list(DEFAULT_BASELINES) if cfg.baselines is None else [b for b in cfg.baselines if b != "none"]
    backends = ["eager"] if cfg.channels_last else \
        [b for b in dict.fromkeys(["eager", *cfg.backends]) if b in ("eager", "channels_last")]
    return [RowSpec(BASELINES[key].name, BASELINES[key].kind, backend, size, baseline=key, dtype=dtype, **common)
            for key in dict.fromkeys(baselines) for backend in backends]


def _decoder_rows(cfg: BenchConfig, size: int, dtype: str, named: NamedDecoder, common: dict,
                  skipped: list[Skip]) -> list[RowSpec]:
    rows = []
    for backend in dict.fromkeys(cfg.backends):
        if backend == "channels_last" and cfg.channels_last:
            if size == cfg.sizes[0] and dtype == cfg.dtypes[0]:
                skipped.append(Skip(named.name, backend, "same as eager with --channels-last"))
            continue
        if backend == "onnx" and dtype == "bf16":
            if size == cfg.sizes[0]:
                skipped.append(Skip(named.name, f"{backend} bf16", "ONNX Runtime has no bf16 convolution kernels "
                                    "on CPU: use fp32 or fp16 for ONNX"))
            continue
        rows.append(RowSpec(named.name, named.kind, backend, size, source=named.source, dtype=dtype, **common))
    return rows


def plan_rows(cfg: BenchConfig, decoders: list[NamedDecoder] | None = None) -> tuple[list[RowSpec], list[Skip]]:
    """The rows of a run, in order: per size and dtype, baselines, then each decoder x backend.

    ``decoders``: the run's decoders (:func:`bench_decoders`), built here when not given.
    """
    cfg = validate_config(cfg)
    if decoders is None:
        decoders = bench_decoders(cfg)
    common = dict(batch=cfg.batch, frames=cfg.frames, latent_space=cfg.latent_space,
                  device=cfg.device, channels_last=cfg.channels_last, seed=cfg.seed, upcast=cfg.upcast)
    rows: list[RowSpec] = []
    skipped: list[Skip] = []
    for size in cfg.sizes:
        for dtype in cfg.dtypes:
            rows += _baseline_rows(cfg, size, dtype, common)
            for named in decoders:
                rows += _decoder_rows(cfg, size, dtype, named, common, skipped)
    return rows, skipped


# ----------------------------------------------------------------------------- running
def _backend_unavailable(backend: str) -> str | None:
    for package in _BACKEND_PACKAGES.get(backend, ()):
        try:
            importlib.import_module(package)
        except Exception as e:  # missing or broken optional dependency: skip the backend's rows, keep the run
            return (f"the {backend} backend needs {package}, which cannot be imported ({type(e).__name__}: {e}): "
                    f'pip install "fastdec[{backend}]"')
    return None


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class _Run:
    """What the rows of one run share: the decoders, the progress display, and what was measured so far."""

    cfg: BenchConfig
    decoders: dict[str, NamedDecoder]
    workdir: Path
    progress: Any
    task: Any
    skipped: list[Skip]
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: list[Skip] = field(default_factory=list)
    flops: dict[tuple[str, int], int] = field(default_factory=dict)
    onnx_files: dict[tuple[str, str], str] = field(default_factory=dict)

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def say(self, markup: str) -> None:
        self.progress.console.print(markup)

    def skip(self, spec: RowSpec, label: str, reason: str) -> None:
        from rich.markup import escape

        self.skipped.append(Skip(spec.name, spec.backend, reason))
        self.say(f"[yellow]skip[/] {escape(label)}: {escape(reason)}")

    def fail(self, spec: RowSpec, label: str, reason: str) -> None:
        """A broken eager row is a failure; a broken backend row only skips that backend."""
        from rich.markup import escape

        if spec.backend not in ("eager", "channels_last"):
            return self.skip(spec, label, reason)
        self.failed.append(Skip(spec.name, spec.backend, reason))
        self.say(f"[red]FAILED[/] {escape(label)}: {escape(reason)}")

    def onnx_file(self, spec: RowSpec, decoder: nn.Module) -> str:
        """The row decoder's ONNX export, once per decoder and dtype (sizes share it: the graph is dynamic)."""
        from ..runtime.onnx import export_onnx

        key = (spec.name, spec.dtype)
        if key not in self.onnx_files:
            self.status(f"{spec.name} ({spec.dtype}): exporting ONNX")
            stem = spec.name.replace("/", "--")  # a Hub id names a row too
            self.onnx_files[key] = str(export_onnx(decoder, self.workdir / f"{stem}-{spec.dtype}.onnx"))
        return self.onnx_files[key]


def _label(cfg: BenchConfig, spec: RowSpec) -> str:
    dtype_tag = f", {spec.dtype}" if len(cfg.dtypes) > 1 else ""
    return f"{spec.name} ({spec.backend}{dtype_tag}) {spec.size}px"  # () not []: rich reads [x] as markup


def _prepare(run: _Run, spec: RowSpec) -> PreparedRow:
    if spec.baseline is not None:
        return prepare_row(spec)
    # a copy of the run's decoder: rows change dtype, layout and compilation in place
    decoder = copy.deepcopy(run.decoders[spec.name].decoder).to(device=spec.device, dtype=DTYPES[spec.dtype])
    if spec.backend == "onnx":
        spec.onnx_path = run.onnx_file(spec, decoder)
    return prepare_row(spec, decoder)


def _measure_row(run: _Run, spec: RowSpec, label: str) -> tuple[PreparedRow, TimingStats, int]:
    run.status(f"{label}: building")
    prepared = _prepare(run, spec)
    # compile: the first call compiles; ONNX: the first run sets up the session. Neither may be timed.
    warmup = max(run.cfg.warmup, 1) if spec.backend in ("compile", "onnx") else run.cfg.warmup
    if (spec.name, spec.size) not in run.flops:
        run.status(f"{label}: counting FLOPs")
        run.flops[spec.name, spec.size] = count_flops(prepared.flops_fn or prepared.fn)
    run.status(f"{label}: timing ({warmup} warm-up + {run.cfg.repeats} runs)")
    return prepared, time_callable(prepared.fn, warmup=warmup, repeats=run.cfg.repeats, device=spec.device), warmup


def _row_record(run: _Run, spec: RowSpec, prepared: PreparedRow, timing: TimingStats, warmup: int) -> dict[str, Any]:
    flops = run.flops.get((spec.name, spec.size))
    return {
        "name": spec.name, "kind": spec.kind, "backend": spec.backend, "size": spec.size,
        "batch": spec.batch, "frames": spec.frames if spec.baseline == "svd" else 1,
        "images": prepared.images, "latent_shape": list(prepared.latent_shape),
        "dtype": prepared.run_dtype, "requested_dtype": spec.dtype, "device": spec.device,
        "channels_last": spec.channels_last or spec.backend in ("channels_last", "compile"),
        "median_s": timing.median_s, "p10_s": timing.p10_s, "p90_s": timing.p90_s,
        "runs_s": timing.runs, "warmup": warmup, "repeats": run.cfg.repeats,
        "per_image_s": timing.median_s / prepared.images, "speedup": None,
        "peak_mem_mb": None, "peak_mem_method": None,
        "params": count_parameters(prepared.modules),
        "weights_mb": tensor_bytes(prepared.modules) / 2**20,
        "gflops": None if flops is None else flops / 1e9,
        "note": prepared.note,
    }


def _probe_memory(run: _Run, spec: RowSpec, row: dict[str, Any], label: str) -> None:
    from rich.markup import escape

    run.status(f"{label}: peak memory (isolated process)")
    mem = peak_memory(ROW_BUILDER, dataclasses.asdict(spec), device=spec.device, threads=torch.get_num_threads(),
                      warm_calls=1 if spec.backend == "compile" else 0)
    row["peak_mem_mb"], row["peak_mem_method"] = mem.peak_mb, mem.method
    if mem.error:
        row["peak_mem_error"] = mem.error
        run.say(f"[yellow]memory[/] {escape(label)}: {escape(mem.error)}")


def _bench_row(run: _Run, spec: RowSpec, unavailable: str | None) -> None:
    """Measure one row into ``run.results`` (or record why it was skipped or failed)."""
    from rich.markup import escape

    label = _label(run.cfg, spec)
    if unavailable:
        return run.skip(spec, label, unavailable)
    try:
        prepared, timing, warmup = _measure_row(run, spec, label)
    except BenchError:
        raise
    except Exception as e:  # one broken row must not lose the others' numbers
        return run.fail(spec, label, _short_error(e))
    row = _row_record(run, spec, prepared, timing, warmup)
    del prepared
    release_memory(spec.device)  # so the probe process gets the memory
    if run.cfg.memory:
        _probe_memory(run, spec, row, label)
    run.results.append(row)
    peak = f", {row['peak_mem_mb']:.0f} MB peak" if row["peak_mem_mb"] is not None else ""
    run.say(f"[green]done[/] {escape(label)}: {timing.median_s * 1e3:,.1f} ms median of {timing.n}{peak}")


def _progress(console: Any):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def run_bench(cfg: BenchConfig, console: Any = None) -> dict[str, Any]:
    """Run the image benchmark and return the JSON payload (rows, skipped rows, system info, settings).

    Raises :class:`BenchError` for bad requests (before any timing); a backend that fails is recorded as
    skipped and an eager row that fails as failed, not raised.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    cfg = validate_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    decoders = bench_decoders(cfg)
    rows, skipped = plan_rows(cfg, decoders)
    if not rows:
        raise BenchError("nothing to benchmark: no decoders and no baselines selected")
    unavailable = {b: _backend_unavailable(b) for b in cfg.backends}
    if all(unavailable.get(spec.backend) for spec in rows):  # else: exit 0 with an empty table
        reasons = "; ".join(f"--backends {b}: {why}" for b, why in unavailable.items() if why)
        raise BenchError(f"nothing can be timed: every row's backend is unavailable ({reasons})")
    started, load_at_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="fastdec-bench-") as workdir, _progress(console) as progress:
        run = _Run(cfg, {d.name: d for d in decoders}, Path(workdir), progress,
                   progress.add_task("fastdec bench", total=len(rows)), skipped)
        for spec in rows:
            _bench_row(run, spec, unavailable.get(spec.backend))
            progress.advance(run.task)
        run.status("fastdec bench: done")
    return _payload(run, started, load_at_start)


def _payload(run: _Run, started: float, load_at_start: float | None) -> dict[str, Any]:
    cfg = run.cfg
    reference = _add_speedups(run.results, cfg.dtypes[0])
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
        "rows": run.results,
        "skipped": [dataclasses.asdict(s) for s in run.skipped],
        "failed": [dataclasses.asdict(s) for s in run.failed],
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
        fastest[key] = min(fastest.get(key, float("inf")), r["per_image_s"])
    for r in rows:
        if r["size"] in stock:
            r["speedup"] = stock[r["size"]] / r["per_image_s"]
            r["reference"] = reference
        same = fastest.get((r["size"], r["requested_dtype"]))
        r["speedup_same_dtype"] = None if same is None else same / r["per_image_s"]
    return reference


def bench_images(cfg: BenchConfig, json_path: str | None = None, plot_path: str | None = None,
                 plot_x: str = "gflops") -> int:
    """The ``fastdec bench`` command: run, write the JSON and the plot, print the report. Exit status 1 when
    a row failed."""
    out = console_out()
    payload = run_bench(cfg)
    if json_path:
        write_json(json_path, payload)
    if plot_path:
        plot_speedup(payload["rows"], plot_path, x=plot_x)
    print_report(payload, out)
    for label, path in (("json", json_path), ("plot", plot_path)):
        if path:
            out.print(f"wrote {label}: {path}")
    out.print(f"total wall time {payload['wall_s']:.0f} s")
    return 1 if payload["failed"] else 0

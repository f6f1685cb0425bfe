"""``fastdec bench --video``: video decoders against SVD's temporal VAE decoder, per frame, in one run.

Rows per (size, frame count): SVD's ``AutoencoderKLTemporalDecoder`` (real config, random weights;
decoded in chunks of ``--svd-chunk`` frames, as ``StableVideoDiffusionPipeline.decode_latents`` does with
``decode_chunk_size``), then each fastdec video decoder in each of its modes: causal decoders ``parallel``
(all frames in one call) and ``streaming`` (``--push-frames`` frames per push, default 1; outputs dropped as a
video writer would; ``fastdec decode-video`` pushes ``--chunk`` frames, default 8), the temporal decoder
``chunked`` (overlapping windows, outputs dropped per window). ``--deflicker`` adds, for causal decoders,
``streaming+deflicker``: the streaming rows with every pushed output deflickered (``fastdec.runtime.deflickering``,
default settings), what ``fastdec decode-video --deflicker`` costs.

Every row runs in each ``--dtype`` (SVD too). ``--channels-last`` puts every row's convolutions in NHWC;
SVD then runs both ways (its 2-D convs only; its Conv3d weights are 5-D) and speed-ups are taken against
its faster form. Each speed-up is reported twice: against SVD in the first dtype, and against SVD in the
row's own dtype (like for like). Each decoder is built once per run; rows work on copies.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..dtypes import DTYPES, dtype_name
from ..errors import BenchError, NonFiniteOutputError
from ..runtime.deflickering import Deflicker
from .baselines import (
    VAE_FACTOR, NamedDecoder, build_decoder, build_vae, decode_rgb, decoder_modules, named_decoders, place_vae,
    vae_latents,
)
from .measure import count_parameters, make_latents, peak_memory, release_memory, system_info, time_callable
from .report import console_out, print_video_report, write_json

DEFAULT_VIDEO_DECODERS = ("tae-temporal-192", "tae-causal-64", "tae-causal-192")
VIDEO_BACKENDS = ("eager", "compile")
DEFAULT_FRAMES = (8, 32)
DEFAULT_SIZE = 256
DEFAULT_VIDEO_SPACE = "svd"
SVD_ROW = "svd-vae"
STREAMING_DEFLICKER = "streaming+deflicker"  # streaming, each pushed output deflickered
STREAMING_MODES = ("streaming", STREAMING_DEFLICKER)
VIDEO_BUILDER = "fastdec.bench.video:build_video_callable"


@dataclass
class VideoBenchConfig:
    sizes: list[int] = field(default_factory=lambda: [DEFAULT_SIZE])
    frames: list[int] = field(default_factory=lambda: list(DEFAULT_FRAMES))
    svd_frames: list[int] | None = None     # frame counts SVD runs at (None: all of ``frames``)
    svd_chunk: int = 8                      # SVD decode_chunk_size
    svd_repeats: int = 1                    # timed SVD calls (each takes seconds to minutes on a CPU)
    push_frames: list[int] = field(default_factory=lambda: [1])  # latent frames per push of the streaming rows
    decoders: list[str] | None = None       # None: DEFAULT_VIDEO_DECODERS
    baselines: list[str] | None = None      # None or ["svd"]: with SVD; ["none"]: without
    backends: list[str] = field(default_factory=lambda: ["eager"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    channels_last: bool = False
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    threads: int | None = None
    memory: bool = True
    deflicker: bool = False                 # also the streaming rows with their outputs deflickered
    latent_space: str | None = None         # None: svd
    json: str | None = None                 # rewritten after every row, so partial results survive


@dataclass(frozen=True)
class VideoRow:
    """One line of the plan; it runs at every size, frame count and dtype."""

    name: str
    mode: str
    channels_last: bool
    backend: str
    push: int | None = None                 # streaming rows: latent frames per push


@dataclass
class VideoCall:
    fn: Callable[[], Any]                   # one whole-clip decode
    warm_fn: Callable[[], Any] | None       # the same mode on a tiny clip (None: no warm-up)
    modules: list[nn.Module]                # what parameters are counted on


def decoder_modes(decoder: nn.Module | str) -> list[str]:
    """The modes a video decoder is benchmarked in: causal ones stream, chunked ones decode in chunks, any other
    (a plugin's) decodes the whole clip in one call."""
    if isinstance(decoder, str):
        decoder = build_decoder(decoder, DEFAULT_VIDEO_SPACE)
    if not getattr(decoder, "is_video", False):
        raise BenchError(f"{type(decoder).__name__} is an image decoder: benchmark it with `fastdec bench`")
    if hasattr(decoder, "stream"):
        return ["parallel", "streaming"]
    return ["chunked"] if hasattr(decoder, "decode_chunks") else ["parallel"]


# ----------------------------------------------------------------------------- one whole-clip call
def _svd_call(size: int, frames: int, seed: int, svd_chunk: int, dtype: str, channels_last: bool) -> VideoCall:
    vae = place_vae(build_vae("svd", seed), "cpu", dtype, channels_last)
    h = size // VAE_FACTOR
    raw = vae_latents("svd", (frames, vae.config.latent_channels, h, h), seed).to(DTYPES[dtype])

    def svd() -> torch.Tensor:
        return torch.cat([decode_rgb(vae, raw[i : i + svd_chunk], num_frames=raw[i : i + svd_chunk].shape[0])
                          for i in range(0, frames, svd_chunk)])

    return VideoCall(svd, None, decoder_modules(vae))


def _mode_call(model: Any, mode: str, push: int = 1) -> Callable[[torch.Tensor], Any]:
    if mode in STREAMING_MODES:
        def streaming(latents: torch.Tensor) -> None:
            stream, steady = model.stream(), Deflicker() if mode == STREAMING_DEFLICKER else None
            for t in range(0, latents.shape[1], push):
                frames = stream.push(latents[:, t : t + push])
                if steady is not None:
                    steady(frames)

        return streaming
    if mode == "chunked":
        def chunked(latents: torch.Tensor) -> None:
            for _ in model.decode_chunks(latents):
                pass

        return chunked
    return model


def _decoder_call(decoder: nn.Module, mode: str, size: int, frames: int, seed: int, dtype: str,
                  channels_last: bool, backend: str, push: int | None = None) -> VideoCall:
    """``backend="compile"``: ``fastdec.optimize`` (channels_last + torch.compile of the parallel call and of
    the streaming step)."""
    from ..runtime import optimize, to_channels_last

    torch_dtype = DTYPES[dtype]
    decoder = decoder.eval().to(torch_dtype)
    if channels_last:
        to_channels_last(decoder)
    if backend == "compile":
        # Dynamo keeps its compiled graphs per code object (run_frames, forward), across decoder copies: after
        # recompile_limit (8) graphs, e.g. the rows before this one, it silently runs the function eagerly. Each
        # row starts from an empty cache, as a user's process that optimizes one decoder does.
        torch._dynamo.reset()
    model = optimize(decoder, channels_last=True, compile=True) if backend == "compile" else decoder
    h = size // decoder.upsample_factor
    z = make_latents((1, frames, decoder.latent_channels, h, h), seed).to(torch_dtype)
    # The memory probe's warm-up runs the same mode on a tiny clip: it maps library code and sets up thread
    # pools without leaving a full-size clip's buffers in the allocator (which would hide the real peak).
    tiny = make_latents((1, 2, decoder.latent_channels, 2, 2), seed).to(torch_dtype)
    run = _mode_call(model, mode, push or 1)
    return VideoCall(lambda: run(z), lambda: run(tiny), [decoder])


def build_video_callable(
    name: str, mode: str, size: int, frames: int, seed: int = 0, svd_chunk: int = 8,
    latent_space: str = DEFAULT_VIDEO_SPACE, dtype: str = "fp32", channels_last: bool = False,
    backend: str = "eager", source: str | None = None, push: int | None = None,
) -> Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]:
    """One whole-clip decode as a zero-argument callable, or (call, tiny warm-up call) for our decoders: the
    builder of the memory probe's process. ``source`` is the decoder spec to resolve (default ``name``)."""
    if name == SVD_ROW:
        call = _svd_call(size, frames, seed, svd_chunk, dtype, channels_last)
    else:
        decoder = build_decoder(source or name, latent_space, seed)
        call = _decoder_call(decoder, mode, size, frames, seed, dtype, channels_last, backend, push)
    return call.fn if call.warm_fn is None else (call.fn, call.warm_fn)


# ----------------------------------------------------------------------------- planning
def validate_video_config(cfg: VideoBenchConfig) -> VideoBenchConfig:
    """``cfg`` checked before any work, with dtypes canonical and defaults filled in."""
    if cfg.baselines and any(b not in ("svd", "none") for b in cfg.baselines):
        raise BenchError("--video compares with the SVD decoder only: use --baselines svd or --baselines none")
    backends = list(dict.fromkeys(cfg.backends or ["eager"]))
    if cfg.device != "cpu" or any(b not in VIDEO_BACKENDS for b in backends):
        raise BenchError(f"--video runs on CPU with --backends {' '.join(VIDEO_BACKENDS)}: drop --device and other "
                         "backends (--dtype and --channels-last change the runtime of every row)")
    for size in cfg.sizes:
        if size <= 0 or size % 8:
            raise BenchError(f"size {size} must be a positive multiple of 8")
    if not cfg.sizes or not cfg.frames:
        raise BenchError("--sizes and --video-frames need values")
    for flag, values in (("--video-frames", cfg.frames), ("--svd-frames", cfg.svd_frames or []),
                         ("--svd-chunk", [cfg.svd_chunk])):
        bad = [f for f in values if f < 1]
        if bad:
            raise BenchError(f"{flag} must be >= 1 (a number of latent frames), got {bad[0]}")
    if cfg.repeats < 1 or cfg.svd_repeats < 1 or cfg.warmup < 0 or (cfg.threads is not None and cfg.threads < 0):
        raise BenchError("--repeats and --svd-repeats must be >= 1, --warmup >= 0 and --threads >= 0")
    outside = [f for f in cfg.svd_frames or [] if f not in cfg.frames]
    if outside and (not cfg.baselines or "svd" in cfg.baselines):  # SVD was silently not timed at all
        raise BenchError(f"--svd-frames {' '.join(map(str, outside))} not in --video-frames "
                         f"{' '.join(map(str, cfg.frames))}: SVD is timed at clip lengths our rows share, so each "
                         "speed-up compares equal clips; pick --svd-frames from --video-frames")
    if not cfg.push_frames or any(k < 1 for k in cfg.push_frames):
        raise BenchError(f"--push-frames needs values >= 1 (latent frames per push of a streaming row), got "
                         f"{cfg.push_frames}")
    return dataclasses.replace(cfg, backends=backends, push_frames=list(dict.fromkeys(cfg.push_frames)),
                               dtypes=list(dict.fromkeys(dtype_name(d) for d in cfg.dtypes)),
                               svd_frames=list(cfg.svd_frames or cfg.frames))


def _plan(cfg: VideoBenchConfig, decoders: list[NamedDecoder]) -> list[VideoRow]:
    # the temporal decoder's chunked mode runs window by window in Python: only causal decoders compile
    extra = [STREAMING_DEFLICKER] if cfg.deflicker else []
    plan = [VideoRow(d.name, mode, cfg.channels_last, backend, push) for d in decoders for backend in cfg.backends
            for mode in _with_streaming(decoder_modes(d.decoder), extra) if backend == "eager" or mode != "chunked"
            for push in (cfg.push_frames if mode in STREAMING_MODES else [None])]
    if not cfg.baselines or "svd" in cfg.baselines:
        # SVD in its stock layout too: a speed-up must never rest on a layout that slows the baseline down
        plan[:0] = [VideoRow(SVD_ROW, f"chunks of {cfg.svd_chunk}", layout, "eager")
                    for layout in dict.fromkeys([False, cfg.channels_last])]
    return plan


def _check_plan_uses_options(cfg: VideoBenchConfig, plan: list[VideoRow]) -> None:
    """An option that adds rows to decoders that have none of the modes it times is an error: the run gave no
    compiled, deflickered or multi-frame-push row and said nothing."""
    ours = [row for row in plan if row.name != SVD_ROW]
    problems = [f"--backends {b} (only causal decoders compile in --video; a temporal decoder's chunks run window "
                "by window)" for b in cfg.backends if not any(row.backend == b for row in ours)]
    if cfg.deflicker and not any(row.mode == STREAMING_DEFLICKER for row in ours):
        problems.append("--deflicker (it times a streaming decoder's pushes with the filter)")
    if cfg.push_frames != [1] and not any(row.mode in STREAMING_MODES for row in ours):
        problems.append("--push-frames (it sets a streaming decoder's push size)")
    if problems:
        raise BenchError(f"no decoder of --decoders {' '.join(cfg.decoders or DEFAULT_VIDEO_DECODERS)} has a row for "
                         f"{'; '.join(problems)}: add a causal decoder (tae-causal-64, flux2-video), or drop it")


def _with_streaming(modes: list[str], extra: list[str]) -> list[str]:
    """``modes`` plus the ``extra`` streaming variants, for decoders that stream."""
    return modes + extra if "streaming" in modes else modes


def _jobs(cfg: VideoBenchConfig, plan: list[VideoRow]) -> list[tuple[int, int, str, VideoRow]]:
    """(size, frames, dtype, row) in run order; SVD only at ``svd_frames``."""
    return [(size, frames, dtype, row) for size in cfg.sizes for frames in cfg.frames for dtype in cfg.dtypes
            for row in plan if row.name != SVD_ROW or frames in cfg.svd_frames]


# ----------------------------------------------------------------------------- running
@dataclass
class _VideoRun:
    cfg: VideoBenchConfig
    decoders: dict[str, NamedDecoder]
    console: Any
    total: int
    params: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _call_for(run: _VideoRun, kwargs: dict[str, Any]) -> VideoCall:
    """The job's call, from a copy of the run's decoder (SVD: built for the row)."""
    if kwargs["name"] == SVD_ROW:
        return _svd_call(kwargs["size"], kwargs["frames"], kwargs["seed"], kwargs["svd_chunk"], kwargs["dtype"],
                         kwargs["channels_last"])
    decoder = copy.deepcopy(run.decoders[kwargs["name"]].decoder)
    return _decoder_call(decoder, kwargs["mode"], kwargs["size"], kwargs["frames"], kwargs["seed"], kwargs["dtype"],
                         kwargs["channels_last"], kwargs["backend"], kwargs["push"])


def _bench_video_row(run: _VideoRun, job: tuple[int, int, str, VideoRow]) -> dict[str, Any]:
    cfg = run.cfg
    size, frames, dtype, row = job
    # a clip shorter than the push goes in one push of its length: the row says what was timed
    row = dataclasses.replace(row, push=min(row.push, frames)) if row.push else row
    runtime = "compile" if row.backend == "compile" else "channels_last" if row.channels_last else "eager"
    per_push = f", {row.push}/push" if row.push else ""
    run.console.print(f"[{len(run.rows) + 1}/{run.total}] {row.name} {row.mode}{per_push} ({dtype}, {runtime}): "
                      f"{size} px, {frames} frames ...")
    named = run.decoders.get(row.name)
    kwargs = dict(name=row.name, mode=row.mode, size=size, frames=frames, seed=cfg.seed, svd_chunk=cfg.svd_chunk,
                  latent_space=cfg.latent_space or DEFAULT_VIDEO_SPACE, dtype=dtype, channels_last=row.channels_last,
                  backend=row.backend, source=named.source if named else None, push=row.push)
    call = _call_for(run, kwargs)
    run.params.setdefault(row.name, count_parameters(call.modules))
    # SVD's decoder takes seconds to minutes per call on CPU: an untimed run would double the run time, and
    # it is timed --svd-repeats times (default once)
    is_svd = row.name == SVD_ROW
    # a compiled row compiles in its first call: that must never be timed
    warmup = 0 if is_svd else max(cfg.warmup, 1) if row.backend == "compile" else cfg.warmup
    try:
        stats = time_callable(call.fn, warmup=warmup, repeats=cfg.svd_repeats if is_svd else cfg.repeats)
    except NonFiniteOutputError as e:  # a NaN decoder has no speed worth reporting: name it and its input
        raise NonFiniteOutputError(f"decoder '{(named.source if named else None) or row.name}' produced NaN or inf "
                                   f"on {frames} random {size} px frames: {e}") from e
    del call
    release_memory("cpu")
    # one warm-up call (not measured) so lazy allocator/thread-pool set-up (and compilation) is not counted;
    # skipped for SVD, whose call takes minutes (its first-call overhead is a few MB of hundreds)
    memory = peak_memory(VIDEO_BUILDER, kwargs, threads=torch.get_num_threads(),
                         warm_calls=0 if is_svd else 1) if cfg.memory else None
    result = {
        "name": row.name, "mode": row.mode, "push_frames": row.push, "size": size, "frames": frames, "dtype": dtype,
        "channels_last": row.channels_last or row.backend == "compile", "backend": row.backend, "runs": stats.n,
        "median_s": stats.median_s, "per_frame_s": stats.median_s / frames,
        "peak_mem_mb": memory.peak_mb if memory else None, "memory_error": memory.error if memory else None,
        "params": run.params[row.name],
    }
    mem = "-" if result["peak_mem_mb"] is None else f"{result['peak_mem_mb']:.0f} MB"
    run.console.print(f"    {result['per_frame_s'] * 1e3:,.1f} ms/frame, peak {mem}")
    return result


def run_video_bench(cfg: VideoBenchConfig, console: Any = None) -> dict[str, Any]:
    """Run the video benchmark and return its payload (rows with speed-ups, system, settings)."""
    console = console or console_out()
    cfg = validate_video_config(cfg)
    specs = DEFAULT_VIDEO_DECODERS if cfg.decoders is None else cfg.decoders
    decoders = named_decoders(specs, cfg.latent_space or DEFAULT_VIDEO_SPACE, cfg.seed, video=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = _plan(cfg, decoders)
    _check_plan_uses_options(cfg, plan)
    jobs = _jobs(cfg, plan)
    run = _VideoRun(cfg, {d.name: d for d in decoders}, console, len(jobs))
    started = time.perf_counter()
    for job in jobs:
        run.rows.append(_bench_video_row(run, job))
        if cfg.json:  # partial results survive an interrupted run
            write_json(cfg.json, {"rows": run.rows, "partial": True})
    _add_video_speedups(run.rows, cfg.dtypes[0])
    settings = {"sizes": cfg.sizes, "frames": cfg.frames, "svd_frames": cfg.svd_frames, "svd_chunk": cfg.svd_chunk,
                "svd_repeats": cfg.svd_repeats, "push_frames": cfg.push_frames, "deflicker": cfg.deflicker,
                "repeats": cfg.repeats, "warmup": cfg.warmup, "seed": cfg.seed, "decoders": list(specs),
                "dtypes": cfg.dtypes, "channels_last": cfg.channels_last, "backends": cfg.backends}
    return {"rows": run.rows, "system": system_info("cpu", "/".join(cfg.dtypes)),
            "wall_s": time.perf_counter() - started, "settings": settings}


def _add_video_speedups(rows: list[dict[str, Any]], reference_dtype: str) -> None:
    """``speedup``: SVD in ``reference_dtype`` per frame / row per frame; ``speedup_same_dtype``: the same
    against SVD in the row's dtype. SVD's faster memory layout counts; both at the same size and frame count
    when SVD ran it, else the closest: chunked SVD's time per frame does not depend on the clip length (each
    chunk is an independent decode)."""
    def svd_row(r: dict[str, Any], dtype: str) -> dict[str, Any] | None:
        svds = [s for s in rows if s["name"] == SVD_ROW and s["size"] == r["size"] and s["dtype"] == dtype]
        return min(svds, key=lambda s: (abs(s["frames"] - r["frames"]), s["frames"], s["per_frame_s"]), default=None)

    for r in rows:
        svd, same = svd_row(r, reference_dtype), svd_row(r, r["dtype"])
        r["speedup"] = svd["per_frame_s"] / r["per_frame_s"] if svd else None
        r["speedup_vs_frames"] = svd["frames"] if svd else None
        r["speedup_same_dtype"] = same["per_frame_s"] / r["per_frame_s"] if same else None


def bench_video(cfg: VideoBenchConfig) -> int:
    """The ``fastdec bench --video`` command: run, print the report, write the JSON."""
    console = console_out()
    payload = run_video_bench(cfg, console)
    print_video_report(payload, console)
    if cfg.json:
        write_json(cfg.json, payload)
        console.print(f"wrote json: {cfg.json}")
    return 0

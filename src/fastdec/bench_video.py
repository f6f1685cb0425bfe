"""``fastdec bench --video``: video decoders against SVD's temporal VAE decoder, per frame, in one run.

Rows per (size, frame count): SVD's ``AutoencoderKLTemporalDecoder`` (real
config, random weights; decoded in chunks of ``--svd-chunk`` frames, as
``StableVideoDiffusionPipeline.decode_latents`` does with
``decode_chunk_size``), then each fastdec video decoder in each of its modes:
causal decoders ``parallel`` (all frames in one call) and ``streaming``
(one frame per push, outputs dropped as a video writer would), the temporal
decoder ``chunked`` (overlapping windows, outputs dropped per window). Timing
and the isolated-process memory probe come from ``fastdec.bench``.

Every row runs in each ``--dtype`` (SVD too). ``--channels-last`` puts every
row's convolutions in NHWC; SVD then runs both ways (its 2-D convs only; its
Conv3d weights are 5-D) and speed-ups are taken against its faster form. Each
speed-up is reported twice: against SVD in the first dtype, and against SVD in
the row's own dtype (like for like).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch

from .bench import (
    DTYPES, SVD_VAE_CONFIG, BenchError, make_latents, peak_memory, render_table, system_info, time_callable,
    write_json,
)

DEFAULT_VIDEO_DECODERS = ("tae-temporal-192", "tae-causal-64", "tae-causal-192")
VIDEO_BACKENDS = ("eager", "compile")
DEFAULT_FRAMES = (8, 32)
DEFAULT_SIZE = 256


def decoder_modes(name: str) -> list[str]:
    from .models import ARCHITECTURES, PRESETS

    if name not in PRESETS:
        raise BenchError(f"unknown video decoder '{name}'; video presets: {', '.join(_video_presets())}")
    cls = ARCHITECTURES[PRESETS[name].architecture]
    if not cls.is_video:
        raise BenchError(f"'{name}' is an image decoder: benchmark it with `fastdec bench --decoders {name}`")
    return ["parallel", "streaming"] if hasattr(cls, "stream") else ["chunked"]


def _video_presets() -> list[str]:
    from .models import list_decoders

    return list_decoders(video=True)


def build_video_callable(
    name: str, mode: str, size: int, frames: int, seed: int = 0, svd_chunk: int = 8, latent_space: str = "svd",
    dtype: str = "fp32", channels_last: bool = False, backend: str = "eager",
) -> Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]:
    """One whole-clip decode as a zero-argument callable, or (call, tiny warm-up call) for our decoders
    (also the builder of the memory probe's process). ``backend="compile"``: ``fastdec.optimize``
    (channels_last + torch.compile of the parallel call and of the streaming step)."""
    from .latent_spaces import get_latent_space
    from .runtime import to_channels_last

    torch_dtype = DTYPES[dtype]
    if name == "svd-vae":
        import diffusers
        from diffusers.utils import logging as diffusers_logging

        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).eval()
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # to() warns about from_pretrained(torch_dtype=...): moot here
        try:
            vae = vae.to(torch_dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        if channels_last:
            to_channels_last(vae)
        h = size // 8
        raw = get_latent_space("svd").decoder_to_vae(make_latents((frames, 4, h, h), seed)).to(torch_dtype)

        def svd() -> torch.Tensor:
            outs = [vae.decode(raw[i : i + svd_chunk], num_frames=raw[i : i + svd_chunk].shape[0]).sample
                    for i in range(0, frames, svd_chunk)]
            return torch.cat(outs).mul(0.5).add(0.5).clamp(0, 1)

        return svd

    from .models import create_decoder

    torch.manual_seed(seed)
    decoder = create_decoder(name, latent_space).eval().to(torch_dtype)
    if channels_last:
        to_channels_last(decoder)
    if backend == "compile":
        from .runtime import optimize

        decoder = optimize(decoder, channels_last=True, compile=True)
    h = size // decoder.upsample_factor
    z = make_latents((1, frames, decoder.latent_channels, h, h), seed).to(torch_dtype)
    # The memory probe's warm-up runs the same mode on a tiny clip: it maps library code and sets up thread
    # pools without leaving a full-size clip's buffers in the allocator (which would hide the real peak).
    tiny = make_latents((1, 2, decoder.latent_channels, 2, 2), seed).to(torch_dtype)
    if mode == "streaming":
        def streaming(latents: torch.Tensor = z) -> None:
            stream = decoder.stream()
            for t in range(latents.shape[1]):
                stream.push(latents[:, t])

        return streaming, lambda: streaming(tiny)
    if mode == "chunked":
        def chunked(latents: torch.Tensor = z) -> None:
            for _ in decoder.decode_chunks(latents):
                pass

        return chunked, lambda: chunked(tiny)
    return (lambda: decoder(z)), (lambda: decoder(tiny))


def _params(name: str) -> int | None:
    if name == "svd-vae":
        import diffusers

        vae = diffusers.AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        modules = [vae.decoder, getattr(vae, "post_quant_conv", None)]
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())
    from .models import create_decoder

    return sum(p.numel() for p in create_decoder(name, "svd").parameters())


def run_video_bench(args: argparse.Namespace) -> int:
    """``fastdec bench --video``; reads the shared ``fastdec bench`` options plus ``--video-frames``/``--svd-chunk``."""
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        sizes = list(args.sizes) if args.sizes else [DEFAULT_SIZE]
        frame_counts = list(getattr(args, "video_frames", None) or DEFAULT_FRAMES)
        svd_chunk = int(getattr(args, "svd_chunk", 8))
        svd_frames = list(getattr(args, "svd_frames", None) or frame_counts)
        decoders = list(args.decoders) if args.decoders else list(DEFAULT_VIDEO_DECODERS)
        with_svd = not args.baselines or "svd" in args.baselines
        if args.baselines and any(b not in ("svd", "none") for b in args.baselines):
            raise BenchError("--video compares with the SVD decoder only: use --baselines svd or --baselines none")
        backends = list(dict.fromkeys(args.backends or ["eager"]))
        if args.device != "cpu" or any(b not in VIDEO_BACKENDS for b in backends):
            raise BenchError(f"--video runs on CPU with --backends {' '.join(VIDEO_BACKENDS)}: drop --device and other "
                             "backends (--dtype and --channels-last change the runtime of every row)")
        dtypes = list(dict.fromkeys([args.dtype] if isinstance(args.dtype, str) else args.dtype))
        channels_last = bool(args.channels_last)
        for size in sizes:
            if size <= 0 or size % 8:
                raise BenchError(f"size {size} must be a positive multiple of 8")
        if any(f < 1 for f in frame_counts) or svd_chunk < 1:
            raise BenchError("--video-frames and --svd-chunk must be >= 1")
        # the temporal decoder's chunked mode runs window by window in Python: only causal decoders compile
        plan = [(name, mode, channels_last, backend) for name in decoders for backend in backends
                for mode in decoder_modes(name) if backend == "eager" or mode != "chunked"]
    except BenchError as e:
        print(f"fastdec bench --video: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if with_svd:
        # SVD in its stock layout too: a speed-up must never rest on a layout that slows the baseline down
        plan[:0] = [("svd-vae", "chunks of %d" % svd_chunk, layout, "eager")
                    for layout in dict.fromkeys([False, channels_last])]
    params = {name: _params(name) for name in dict.fromkeys(name for name, *_ in plan)}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    svd_rows = sum(name == "svd-vae" for name, *_ in plan)
    svd_skipped = (len(frame_counts) - len(set(svd_frames) & set(frame_counts))) * svd_rows
    total = (len(plan) * len(frame_counts) - svd_skipped) * len(sizes) * len(dtypes)
    for size in sizes:
        for frames in frame_counts:
            for dtype, (name, mode, layout, backend) in [(d, row) for d in dtypes for row in plan]:
                if name == "svd-vae" and frames not in svd_frames:
                    continue
                runtime = "compile" if backend == "compile" else "channels_last" if layout else "eager"
                console.print(f"[{len(rows) + 1}/{total}] {name} {mode} ({dtype}, {runtime}): {size} px, "
                              f"{frames} frames ...")
                kwargs = dict(name=name, mode=mode, size=size, frames=frames, seed=args.seed, svd_chunk=svd_chunk,
                              dtype=dtype, channels_last=layout, backend=backend)
                fn = build_video_callable(**kwargs)
                fn = fn[0] if isinstance(fn, tuple) else fn  # (call, tiny warm-up call)
                # SVD's decoder takes minutes per call on CPU: one untimed run would double the run time.
                is_svd = name == "svd-vae"
                # a compiled row compiles in its first call: that must never be timed
                warmup = 0 if is_svd else max(args.warmup, 1) if backend == "compile" else args.warmup
                stats = time_callable(fn, warmup=warmup, repeats=1 if is_svd else args.repeats)
                del fn
                memory = None
                if not args.no_memory:
                    # one warm-up call (not measured) so lazy allocator/thread-pool set-up is not counted;
                    # skipped for SVD, whose call takes minutes (its first-call overhead is a few MB of hundreds)
                    memory = peak_memory("fastdec.bench_video:build_video_callable", kwargs,
                                         threads=torch.get_num_threads(), warm_calls=0 if is_svd else 1)
                    # (for compiled rows that warm-up call also compiles, so compilation is not counted)
                rows.append({
                    "name": name, "mode": mode, "size": size, "frames": frames, "dtype": dtype,
                    "channels_last": layout or backend == "compile", "backend": backend, "runs": stats.n,
                    "median_s": stats.median_s, "per_frame_s": stats.median_s / frames,
                    "peak_mem_mb": memory.peak_mb if memory else None,
                    "memory_error": memory.error if memory else None,
                    "params": params[name],
                })
                r = rows[-1]
                mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB"
                console.print(f"    {r['per_frame_s'] * 1e3:,.1f} ms/frame, peak {mem}")
                if args.json:  # partial results survive an interrupted run
                    write_json(args.json, {"rows": rows, "partial": True})
    _add_video_speedups(rows, dtypes[0])
    payload = {
        "rows": rows, "system": system_info("cpu", "/".join(dtypes)), "wall_s": time.perf_counter() - started,
        "settings": {"sizes": sizes, "frames": frame_counts, "svd_frames": svd_frames, "svd_chunk": svd_chunk,
                     "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "decoders": decoders,
                     "dtypes": dtypes, "channels_last": channels_last, "backends": backends},
    }
    print_video_report(payload, console)
    if args.json:
        write_json(args.json, payload)
        console.print(f"wrote json: {args.json}")
    return 0


def _add_video_speedups(rows: list[dict[str, Any]], reference_dtype: str) -> None:
    """``speedup``: SVD in ``reference_dtype`` per frame / row per frame; ``speedup_same_dtype``: the same
    against SVD in the row's dtype. SVD's faster memory layout counts; both at the same size and frame count
    when SVD ran it, else the closest: chunked SVD's time per frame does not depend on the clip length (each
    chunk is an independent decode)."""
    def svd_row(r: dict[str, Any], dtype: str) -> dict[str, Any] | None:
        svds = [s for s in rows if s["name"] == "svd-vae" and s["size"] == r["size"] and s["dtype"] == dtype]
        return min(svds, key=lambda s: (abs(s["frames"] - r["frames"]), s["frames"], s["per_frame_s"]), default=None)

    for r in rows:
        svd, same = svd_row(r, reference_dtype), svd_row(r, r["dtype"])
        r["speedup"] = svd["per_frame_s"] / r["per_frame_s"] if svd else None
        r["speedup_vs_frames"] = svd["frames"] if svd else None
        r["speedup_same_dtype"] = same["per_frame_s"] / r["per_frame_s"] if same else None


def print_video_report(payload: dict[str, Any], console) -> None:
    s = payload["system"]
    settings = payload["settings"]
    dtypes = settings.get("dtypes", ["fp32"])
    display = []
    for r in payload["rows"]:
        mem = r["peak_mem_mb"]
        same = r.get("speedup_same_dtype")
        display.append({
            "decoder": r["name"], "mode": r["mode"], "dtype": r.get("dtype", "fp32"),
            "backend": r.get("backend", "eager"), "layout": "channels_last" if r.get("channels_last") else "NCHW",
            "px": str(r["size"]),
            "frames": str(r["frames"]), "runs": str(r["runs"]), "clip s": f"{r['median_s']:.2f}",
            "ms/frame": f"{r['per_frame_s'] * 1e3:,.1f}",
            "speed-up": "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
            + ("" if r["speedup_vs_frames"] in (None, r["frames"]) else f" (vs {r['speedup_vs_frames']})"),
            **({"same-dtype speed-up": "-" if same is None else f"{same:.1f}x"} if len(dtypes) > 1 else {}),
            "peak MB": "-" if mem is None else f"{mem:,.0f}",
            "MB/frame": "-" if mem is None else f"{mem / r['frames']:,.1f}",
            "params M": f"{r['params'] / 1e6:.1f}",
        })
    columns = list(display[0]) if display else []
    backends = "/".join(settings.get("backends", ["eager"]))
    title = f"fastdec bench --video: {', '.join(map(str, settings['sizes']))} px, {'/'.join(dtypes)}, {backends}, " \
            f"cpu, {s['torch_threads']} torch threads"
    caption = f"{s['cpu']} ({s['cpu_count']} logical CPUs) | torch {s['torch']} | diffusers {s['diffusers']}"
    console.print(render_table(display, title, columns=columns, caption=caption))
    same = "; same-dtype speed-up: against SVD in the row's dtype" if len(dtypes) > 1 else ""
    console.print(
        f"speed-up = SVD decoder ({dtypes[0]}, faster layout) time per frame / row time per frame (same size, same "
        f"frame count, same latents){same}. "
        f"SVD decodes in chunks of {settings['svd_chunk']} frames (decode_chunk_size) and is timed once "
        "(no warm-up). peak MB = working memory of one whole-clip decode beyond the weights (peak RSS, isolated "
        "process). streaming = one frame per push, frames dropped after decoding."
    )
    for r in payload["rows"]:
        if r.get("memory_error"):
            console.print(f"memory probe failed for {r['name']} {r['mode']} {r['frames']} frames: {r['memory_error']}")
    console.print(f"total wall time {payload['wall_s']:.0f} s")


def add_bench_arguments(group: argparse._ArgumentGroup) -> None:
    """Options of ``fastdec bench --video`` (added to the ``bench`` command by ``fastdec.bench``)."""
    group.add_argument("--video-frames", type=int, nargs="+", default=None, metavar="T",
                       help=f"--video: frames per clip (default {' '.join(map(str, DEFAULT_FRAMES))})")
    group.add_argument("--svd-chunk", type=int, default=8,
                       help="--video: SVD decode_chunk_size, frames per SVD decoder call (default 8)")
    group.add_argument("--svd-frames", type=int, nargs="+", default=None, metavar="T",
                       help="--video: frame counts to run SVD at (default: all of --video-frames); other rows' speed-up "
                            "uses the closest, since chunked SVD costs the same per frame at any clip length")

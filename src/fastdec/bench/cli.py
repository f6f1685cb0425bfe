"""The ``fastdec bench`` command: its options, and one call of the image, video or pipeline bench.

``--video`` and ``--pipeline`` read the same options as the image bench (sizes, dtypes, decoders,
repeats, ...) plus a few of their own.
"""
from __future__ import annotations

import argparse

from ..dtypes import add_dtype_argument
from ..errors import UsageError
from ..io.files import check_output_file
from .baselines import BASELINES, DEFAULT_BASELINES
from .images import BACKENDS, DEFAULT_DECODERS, DEFAULT_SIZES, BenchConfig, bench_images
from .pipeline import PipelineBenchConfig, bench_pipeline
from .video import DEFAULT_FRAMES, VideoBenchConfig, bench_video


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        sizes=list(args.sizes) if args.sizes else list(DEFAULT_SIZES), batch=args.batch, frames=args.frames,
        dtypes=list(args.dtype), device=args.device, channels_last=args.channels_last, decoders=args.decoders,
        baselines=args.baselines, backends=list(args.backends or ["eager"]), repeats=args.repeats,
        warmup=args.warmup, latent_space=args.latent_space, seed=args.seed, threads=args.threads,
        memory=not args.no_memory, upcast=not args.no_upcast,
    )


def video_config_from_args(args: argparse.Namespace) -> VideoBenchConfig:
    frames = list(args.video_frames or DEFAULT_FRAMES)
    return VideoBenchConfig(
        sizes=list(args.sizes) if args.sizes else VideoBenchConfig().sizes, frames=frames,
        svd_frames=list(args.svd_frames) if args.svd_frames else None, svd_chunk=args.svd_chunk,
        svd_repeats=args.svd_repeats, push_frames=list(args.push_frames), deflicker=args.deflicker,
        decoders=args.decoders,
        baselines=args.baselines,
        backends=list(args.backends or ["eager"]),
        dtypes=list(args.dtype), channels_last=bool(args.channels_last), device=args.device, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, threads=args.threads, memory=not args.no_memory,
        latent_space=args.latent_space, json=args.json,
    )


def pipeline_config_from_args(args: argparse.Namespace) -> PipelineBenchConfig:
    return PipelineBenchConfig(
        sizes=args.sizes, steps=args.steps, repeats=args.repeats, warmup=args.warmup, decoders=args.decoders,
        dtypes=list(args.dtype), device=args.device or "cpu", config=args.pipeline_config, seed=args.seed,
        threads=args.threads, json=args.json,
    )


# The options each mode reads (every other mode reads the rest). One given to a mode that does not read it was
# silently ignored (--pipeline --backends compile timed eager), so the run answered another question than asked.
_MODE_OPTIONS = {
    "image": {"batch", "frames", "no_upcast", "plot", "plot_x"},
    "video": {"video_frames", "svd_chunk", "svd_repeats", "push_frames", "deflicker", "svd_frames"},
    "pipeline": {"steps", "pipeline_config"},
    "image+video": {"channels_last", "baselines", "backends", "latent_space", "no_memory"},
}


def _mode(args: argparse.Namespace) -> str:
    return "video" if args.video else "pipeline" if args.pipeline else "image"


def check_options_for_mode(args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """Refuse every option the chosen mode (image, ``--video``, ``--pipeline``) does not read, naming the modes
    that do; ``defaults`` are the parser's, so only options the user gave count."""
    mode = _mode(args)
    unread = []
    for modes, dests in _MODE_OPTIONS.items():
        readers = modes.split("+")
        given = sorted(d for d in dests if mode not in readers and getattr(args, d, None) != defaults.get(d))
        names = " and ".join("the image bench" if m == "image" else f"--{m}" for m in readers)
        unread += [f"--{d.replace('_', '-')} (only {names})" for d in given]
    if unread:
        what = "the image bench (no --video or --pipeline)" if mode == "image" else f"--{mode}"
        raise UsageError(f"{what} does not read {', '.join(unread)}: drop it, or run the mode that reads it")


def check_baselines(baselines: list[str] | None, plot: str | None) -> None:
    """'none' alone or not at all (``none sdxl`` ran sdxl), and a --plot has a speed-up reference to plot."""
    if baselines and "none" in baselines and len(set(baselines)) > 1:
        others = " ".join(b for b in dict.fromkeys(baselines) if b != "none")
        raise UsageError(f"--baselines none means no baselines, but {others} was given too: pass one or the other")
    chosen = list(DEFAULT_BASELINES) if baselines is None else baselines
    references = [key for key, baseline in BASELINES.items() if baseline.kind == "baseline"]
    if plot and not any(b in references for b in chosen):
        raise UsageError(f"--plot draws each row's speed-up over a baseline ({', '.join(references)}), and --baselines "
                         f"{' '.join(chosen)} has none: add one, or drop --plot")


# options that set how the SVD baseline is timed (in image mode --frames is the SVD rows' clip length)
_SVD_OPTIONS = {"image": ("frames",), "video": ("svd_frames", "svd_chunk", "svd_repeats")}


def check_svd_options(args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """An option of the SVD baseline's, given when no SVD row is timed, is refused: it did nothing."""
    chosen = args.baselines if args.baselines is not None else (["svd"] if args.video else list(DEFAULT_BASELINES))
    if "svd" in chosen:
        return
    given = [f"--{d.replace('_', '-')}" for d in _SVD_OPTIONS.get(_mode(args), ())
             if getattr(args, d, None) != defaults.get(d)]
    if given:
        raise UsageError(f"{' and '.join(given)} set how the SVD baseline is timed, and --baselines "
                         f"{' '.join(chosen)} times none: add svd to --baselines, or drop {' and '.join(given)}")


def check_no_upcast(args: argparse.Namespace) -> None:
    """--no-upcast changes only fp16 rows of a force_upcast VAE (SDXL's, SVD's); with neither it did nothing."""
    if not getattr(args, "no_upcast", False):
        return
    chosen = args.baselines if args.baselines is not None else list(DEFAULT_BASELINES)
    upcast = [b for b in chosen if b in BASELINES and BASELINES[b].config.get("force_upcast", False)]
    if "fp16" not in args.dtype or not upcast:
        why = "--dtype has no fp16" if "fp16" not in args.dtype else f"--baselines {' '.join(chosen)} times none"
        raise UsageError(f"--no-upcast runs the fp16 rows of force_upcast VAEs (sdxl, svd) in fp16, and {why}: "
                         "drop --no-upcast, or add fp16 to --dtype and sdxl or svd to --baselines")


def bench_command(args: argparse.Namespace) -> int:
    """``fastdec bench``: the image benchmark, or ``--video`` / ``--pipeline``."""
    if args.video and args.pipeline:
        raise UsageError("choose one of --video and --pipeline")
    check_options_for_mode(args, getattr(args, "bench_defaults", {}))
    check_baselines(args.baselines, args.plot)
    check_svd_options(args, getattr(args, "bench_defaults", {}))
    check_no_upcast(args)
    # an output that cannot be written fails now, not after the whole benchmark ran
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_output_file(path, flag)
    if args.video:
        return bench_video(video_config_from_args(args))
    if args.pipeline:
        return bench_pipeline(pipeline_config_from_args(args))
    if args.sizes is None:
        print(f"default run: {', '.join(map(str, DEFAULT_SIZES))} px output only, so it finishes in under 3 minutes "
              "on a 2-core CPU; pass --sizes 256 512 (or 1024) for larger images")
    return bench_images(config_from_args(args), json_path=args.json, plot_path=args.plot, plot_x=args.plot_x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastdec bench`` options (shared with ``--video`` and ``--pipeline``, which read the same namespace)."""
    p = parser
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="PX",
                   help=f"output sizes in pixels (square); default {' '.join(map(str, DEFAULT_SIZES))} (fits 3 min "
                        "on 2 CPU cores)")
    p.add_argument("--batch", type=int, default=1, help="images per decode call (default 1)")
    p.add_argument("--frames", type=int, default=1, help="frames per SVD decode call (num_frames; default 1 = per frame)")
    add_dtype_argument(p, default=["fp32"], nargs="+",
                       help="weights and latents dtype(s); every row runs in each, and speed-up is relative to the "
                            "baseline in the first (default fp32). On CPUs with AMX/AVX512-BF16, bf16 with "
                            "--backends channels_last is the fastest")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--channels-last", action="store_true", help="run every eager row in channels_last memory format")
    p.add_argument("--decoders", nargs="+", default=None, metavar="DECODER",
                   help="presets (built with random weights), 'all', checkpoints, pretrained names or Hub ids; "
                        f"default {' '.join(DEFAULT_DECODERS)}")
    p.add_argument("--baselines", nargs="+", default=None, choices=[*BASELINES, "none"],
                   help="diffusers VAEs to compare with (random weights, real configs); the first 'baseline' kind is "
                        "the speed-up reference; default sdxl svd tiny")
    p.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                   help="backend rows for our decoders: eager, channels_last, compile (fastdec.optimize), "
                        "onnx (ONNX Runtime); default eager")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--latent-space", default=None,
                   help="latent space presets are built for (default sdxl; --video: svd); checkpoints are checked "
                        "against it when given")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and latents (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the isolated-process peak-memory probes (faster)")
    p.add_argument("--no-upcast", action="store_true",
                   help="with --dtype fp16, run force_upcast VAEs in fp16 too instead of fp32 as pipelines do")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a speed-up plot (log-log)")
    p.add_argument("--plot-x", choices=["gflops", "params"], default="gflops", help="x axis of --plot (default gflops)")
    p.add_argument("--video", action="store_true", help="benchmark video decoders (fastdec.bench.video)")
    p.add_argument("--pipeline", action="store_true", help="benchmark full diffusers pipelines (fastdec.bench.pipeline)")


def add_video_arguments(group: argparse._ArgumentGroup) -> None:
    """Options of ``fastdec bench --video``."""
    group.add_argument("--video-frames", type=int, nargs="+", default=None, metavar="T",
                       help=f"--video: frames per clip (default {' '.join(map(str, DEFAULT_FRAMES))})")
    group.add_argument("--svd-chunk", type=int, default=8,
                       help="--video: SVD decode_chunk_size, frames per SVD decoder call (default 8)")
    group.add_argument("--svd-repeats", type=int, default=1,
                       help="--video: timed SVD calls, median reported (default 1: each call takes seconds to minutes "
                            "on a CPU; more make the speed-up's reference steadier)")
    group.add_argument("--push-frames", type=int, nargs="+", default=[1], metavar="K",
                       help="--video: latent frames per push of the streaming rows, one row per K (default 1; "
                            "fastdec decode-video pushes --chunk frames, default 8); memory stays flat in the clip "
                            "length at any K")
    group.add_argument("--deflicker", action="store_true",
                       help="--video: also time each causal decoder streaming with its output deflickered "
                            "(streaming+deflicker rows, default settings: what decode-video --deflicker costs)")
    group.add_argument("--svd-frames", type=int, nargs="+", default=None, metavar="T",
                       help="--video: which of --video-frames to run SVD at (default: all); other rows' speed-up "
                            "uses the closest, since chunked SVD costs the same per frame at any clip length")


def add_pipeline_arguments(group: argparse._ArgumentGroup) -> None:
    """Options of ``fastdec bench`` that only ``--pipeline`` reads."""
    group.add_argument("--steps", type=int, default=None,
                       help="--pipeline: denoising steps, the same for every decoder (default 10 tiny / 30 real)")
    group.add_argument("--pipeline-config", choices=["tiny", "real"], default=None,
                       help="--pipeline: tiny SDXL-like stand-in (CPU default) or the real SDXL configs (CUDA default)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark decoders side by side (time, speed-up, memory, params, GFLOPs)",
        description="Decoders side by side in one run: diffusers baselines (SDXL and SVD VAE decoders, "
                    "AutoencoderTiny; real configs, random weights) against fastdec presets, on the same latents.",
    )
    add_arguments(parser)
    add_video_arguments(parser.add_argument_group("fastdec bench --video"))
    add_pipeline_arguments(parser.add_argument_group("fastdec bench --pipeline"))
    parser.set_defaults(func=bench_command)
    dests = set().union(*_MODE_OPTIONS.values())
    parser.set_defaults(bench_defaults={dest: parser.get_default(dest) for dest in dests})

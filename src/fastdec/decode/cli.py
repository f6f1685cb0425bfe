"""The decode commands: ``fastdec decode``, ``fastdec decode-video``, ``fastdec decode-batch``.

Each command's function only translates its arguments into one call of the library (``images``, ``video``,
``batch``); errors are raised, and :func:`fastdec.cli.main` prints them.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..dtypes import add_dtype_argument
from ..io.images import IMAGE_FORMATS
from ..runtime.deflickering import add_deflicker_arguments

_RANDOM_WEIGHTS_HELP = "build a preset with random weights: for benchmarks and tests"


def _add_random_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-weights", action="store_true", help=_RANDOM_WEIGHTS_HELP)


def _add_channels_last(parser: argparse.ArgumentParser) -> None:
    from ..runtime import add_channels_last_argument

    add_channels_last_argument(parser)


# ----------------------------------------------------------------------------- fastdec decode
def decode_command(args: argparse.Namespace) -> int:
    from .images import decode_file

    decode_file(args.latents, args.decoder, args.out, latent_space=args.latent_space, device=args.device,
                dtype=args.dtype, random_weights=args.random_weights, channels_last=args.channels_last,
                max_memory=args.max_memory, tile=args.tile, vae_space=args.vae_space, progress=not args.quiet)
    return 0


def add_decode_command(subparsers: Any) -> None:
    p = subparsers.add_parser("decode", help="decode latents in a file to PNGs",
                              description="Decode the latents in a .safetensors/.pt/.npy file (one or a batch) to PNGs.")
    p.add_argument("latents", help="latents file: .safetensors (every tensor), .pt (tensor, list or dict) or .npy; "
                                   "each tensor (C, h, w) or (N, C, h, w), decoder space unless --vae-space")
    p.add_argument("--decoder", required=True,
                   help="trained decoder: checkpoint file or folder, pretrained name or Hub id (a preset name needs "
                        "--random-weights)")
    _add_random_weights(p)
    p.add_argument("--latent-space", default=None, help="latent space, when the checkpoint does not record it")
    p.add_argument("--out", required=True, help="output folder for the PNGs (written atomically)")
    p.add_argument("--max-memory", default=None,
                   help="activation memory budget, e.g. 2GB: images that would exceed it are decoded in tiles")
    p.add_argument("--tile", type=int, default=None, help="force tiling with this tile size (latent pixels)")
    add_dtype_argument(p)
    _add_channels_last(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-space", action="store_true",
                   help="latents are raw VAE latents (what vae.decode takes): convert them to decoder space first")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=decode_command)


# ----------------------------------------------------------------------------- fastdec decode-video
def decode_video_command(args: argparse.Namespace) -> int:
    from ..runtime.deflickering import deflicker_from_args
    from .video import decode_video

    decode_video(args.input, args.out, args.decoder, teacher=args.teacher, latent_space=args.latent_space,
                 raw=args.raw, start=args.start, num_frames=args.num_frames, chunk=args.chunk, parallel=args.parallel,
                 fps=args.fps, crf=args.crf, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                 threads=args.threads, random_weights=args.random_weights, progress=not args.quiet,
                 deflicker=deflicker_from_args(args))
    return 0


def add_decode_video_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "decode-video",
        help="decode video latents (or reconstruct a video through a teacher) to .mp4/.gif",
        description="Decode video latents to an .mp4 (H.264) or .gif. INPUT is a latents file (.safetensors/.pt/.npy "
                    "with (T, C, h, w) or (1, T, C, h, w) decoder-space latents) or a video (file or frame folder), "
                    "which --teacher encodes first. Causal decoders stream by default.",
    )
    p.add_argument("input", metavar="LATENTS_OR_VIDEO")
    p.add_argument("--decoder", required=True, help="trained decoder: checkpoint (.safetensors, TAESD .pth), folder, "
                                                     "pretrained name or Hub id (a preset needs --random-weights)")
    _add_random_weights(p)
    p.add_argument("--out", required=True, help="output .mp4 or .gif (written atomically)")
    p.add_argument("--teacher", default=None, help="encoder for a video input: TAESD-family encoder .pth or diffusers VAE")
    p.add_argument("--latent-space", default=None, help="latent space when the checkpoint cannot tell (e.g. sd15, svd)")
    p.add_argument("--raw", action="store_true", help="latents are raw VAE latents (what vae.decode takes), not decoder space")
    p.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    p.add_argument("--num-frames", type=int, default=None, help="frames to decode (default: all)")
    p.add_argument("--chunk", type=int, default=8, help="frames per read/push/batch (default 8)")
    p.add_argument("--parallel", action="store_true", help="causal decoders: decode all frames at once (more memory)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's, or 24 for latents)")
    p.add_argument("--crf", type=int, default=None, help=".mp4: H.264 quality, lower is better (default 18)")
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p, help="decoder precision (default fp32); bf16 is several times faster on CPUs with "
                               "AMX/AVX512-BF16")
    _add_channels_last(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_deflicker_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=decode_video_command)


# ----------------------------------------------------------------------------- fastdec decode-batch
def run_decode_batch(args: argparse.Namespace) -> int:
    """The command: returns the exit status (1 if any latent failed)."""
    from .batch import decode_batch

    return decode_batch(args.latents, args.decoder, args.out, image_format=args.format, quality=args.quality,
                        batch=args.batch, latent_space=args.latent_space, vae_space=args.vae_space, dtype=args.dtype,
                        channels_last=args.channels_last, overwrite=args.overwrite, writers=args.writers,
                        threads=args.threads, seed=args.seed, progress=not args.no_progress,
                        stats_json=args.stats_json, random_weights=args.random_weights)


def add_decode_batch_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "decode-batch",
        help="decode many latent files to images (resumable; multi-process with `accelerate launch -m fastdec`)",
        description="Decode latents from .safetensors shards, .pt or .npy files to images named by each latent's key. "
                    "Run as `accelerate launch -m fastdec decode-batch ...` to split the work over processes.",
    )
    p.add_argument("--latents", required=True, help="folder (recursive), file or glob of .safetensors/.pt/.npy files")
    p.add_argument("--decoder", required=True, help="trained decoder: checkpoint (fastdec .safetensors, TAESD .pth, "
                                                     "AutoencoderTiny folder), pretrained name or Hub id (a preset "
                                                     "needs --random-weights)")
    _add_random_weights(p)
    p.add_argument("--out", required=True, help="output folder (resumes if it holds a run with the same decoder)")
    p.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="png")
    p.add_argument("--quality", type=int, default=None, help="webp/jpeg quality, 1-100 (default 95); png is lossless")
    p.add_argument("--batch", type=int, default=16, help="latents decoded together (default 16)")
    p.add_argument("--latent-space", default=None, help="latent space when the checkpoint cannot tell (sd15 vs sdxl)")
    p.add_argument("--vae-space", action="store_true",
                   help="latents are raw VAE latents (what vae.decode takes), not decoder/diffusion space")
    add_dtype_argument(p, help="decoder precision: fp32, fp16 or bf16 (float32/float16/bfloat16 accepted); bf16 is "
                               "several times faster on CPUs with AMX/AVX512-BF16")
    _add_channels_last(p)
    p.add_argument("--overwrite", action="store_true", help="decode everything again, even with another decoder")
    p.add_argument("--writers", type=int, default=4, help="image encoding/writing threads per process (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights (with --random-weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stats-json", default=None, help="write throughput and failures as JSON (rank 0)")
    p.set_defaults(func=run_decode_batch)


def add_commands(subparsers: Any) -> None:
    """All three decode commands (for ``fastdec.cli``'s command list as ``fastdec.decode.cli``)."""
    add_decode_command(subparsers)
    add_decode_video_command(subparsers)
    add_decode_batch_command(subparsers)

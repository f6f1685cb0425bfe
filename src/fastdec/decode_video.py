"""``fastdec decode-video``: latents (or a video, encoded by a teacher first) -> an .mp4 or .gif.

Causal decoders stream (a few frames at a time, bounded memory), temporal
decoders decode overlapping chunks, image decoders decode frame by frame.
Frames are written as they are decoded; the output file appears only when
the whole video is done.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .models import LatentDecoder
from .models.temporal import CausalTAEDecoder, TemporalTAEDecoder
from .video import VideoError, VideoWriter, iter_video, video_info

LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DecodeVideoError(ValueError):
    """A bad decode-video request; the message says what to change."""


# ----------------------------------------------------------------------------- inputs
def load_latents(path: str | Path) -> torch.Tensor:
    """Latents of one clip from .safetensors / .pt / .npy as (1, T, C, h, w); accepts (T, C, h, w) too."""
    path = Path(path)
    if not path.is_file():
        raise DecodeVideoError(f"latents file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
            value = _pick_tensor(state, path)
        elif suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            value = loaded if isinstance(loaded, torch.Tensor) else _pick_tensor(loaded, path)
        else:
            value = torch.from_numpy(np.load(path, allow_pickle=False))
    except DecodeVideoError:
        raise
    except Exception as e:  # each format fails differently; the user needs the file name and the cause
        raise DecodeVideoError(f"cannot read latents from '{path}': {type(e).__name__}: {e}") from e
    if value.ndim == 4:
        value = value[None]
    if value.ndim != 5:
        raise DecodeVideoError(
            f"'{path}' holds a tensor shaped {tuple(value.shape)}; decode-video needs (T, C, h, w) or (1, T, C, h, w)"
        )
    if value.shape[0] != 1:
        raise DecodeVideoError(
            f"'{path}' holds {value.shape[0]} clips {tuple(value.shape)}; decode-video writes one video: "
            "save one clip per file"
        )
    if not value.is_floating_point():
        raise DecodeVideoError(f"'{path}' holds {value.dtype} values; latents must be floating point")
    return value.float()


def _pick_tensor(state: dict, path: Path) -> torch.Tensor:
    if not isinstance(state, dict):
        raise DecodeVideoError(f"'{path}' holds a {type(state).__name__}; expected a tensor or a dict with 'latents'")
    if "latents" in state:
        return state["latents"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise DecodeVideoError(f"'{path}' holds {sorted(state)}; store one tensor, or name it 'latents'")
    return tensors[0]


def load_any_decoder(spec: str, latent_space: str | None, device: str, dtype: torch.dtype | None) -> LatentDecoder:
    """A checkpoint path / Hub id, or a preset name (random weights: for testing the plumbing only)."""
    from .models import PRESETS, create_decoder

    if spec in PRESETS and not Path(spec).exists():
        warnings.warn(
            f"'{spec}' is a preset name: it has RANDOM weights and decodes noise; pass a trained checkpoint "
            f"(.safetensors) to get real frames",
            stacklevel=2,
        )
        decoder = create_decoder(spec, latent_space or "sdxl")
    else:
        from .checkpoints import load_decoder

        decoder = load_decoder(spec, latent_space=latent_space, device=device)
    return decoder.to(device=device, dtype=dtype or torch.float32).eval()


class _Encoder:
    """The teacher that turns video frames into latents: ``fastdec.teachers`` when present, else a TAESD encoder."""

    def __init__(self, source: str, latent_space, device: str):
        try:
            from .teachers import load_teacher
        except ImportError:
            load_teacher = None
        if load_teacher is not None:
            teacher = load_teacher(source, latent_space=latent_space, device=device)
            self.encode = teacher.encode
            self.factor = int(teacher.spatial_factor)
            self.latent_space = teacher.latent_space
        else:
            from .checkpoints import load_encoder

            encoder = load_encoder(source, latent_space=latent_space, device=device)
            self.encode = encoder
            self.factor = encoder.downsample_factor
            self.latent_space = encoder.latent_space


def _crop_to(frames: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = frames.shape[-2:]
    top, left = (h % factor) // 2, (w % factor) // 2
    return frames[..., top : top + h - h % factor, left : left + w - w % factor]


def encoded_video(path: Path, encoder: _Encoder, start: int, num_frames: int | None, chunk: int) -> Iterator[torch.Tensor]:
    """(1, k, C, h, w) latents of successive chunks of a video's frames."""
    with torch.inference_mode():
        for frames in iter_video(path, start=start, num_frames=num_frames, chunk=chunk):
            images = _crop_to(frames, encoder.factor).float() / 255
            yield encoder.encode(images)[None].float()


# ----------------------------------------------------------------------------- decoding
def decode_stream(
    decoder: LatentDecoder, chunks: Iterator[torch.Tensor], parallel: bool = False, batch: int = 8
) -> Iterator[torch.Tensor]:
    """RGB frames (k, 3, H, W) in [0, 1] for latent chunks (1, k, C, h, w), in order, each decoder its own way.

    Causal: streamed push by push (or all at once with ``parallel``); temporal:
    overlapping windows over the whole clip (its latents are small, the frames
    are produced window by window); image: ``batch`` frames per call.
    """
    with torch.inference_mode():
        if isinstance(decoder, CausalTAEDecoder) and not parallel:
            stream = decoder.stream()
            for z in chunks:
                yield stream.push(z)[0]
        elif decoder.is_video:
            z = torch.cat(list(chunks), dim=1)
            if isinstance(decoder, TemporalTAEDecoder):
                for _, rgb in decoder.decode_chunks(z):
                    yield rgb[0]
            else:
                yield decoder(z)[0]
        else:
            for z in chunks:
                for i in range(0, z.shape[1], batch):
                    yield decoder(z[0, i : i + batch])


def _chunks_of(z: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, z.shape[1], size):
        yield z[:, i : i + size]


def decode_video_command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (DecodeVideoError, VideoError) as e:
        print(f"fastdec decode-video: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    source = Path(args.input)
    if not source.exists():
        raise DecodeVideoError(f"input '{source}' does not exist")
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise DecodeVideoError(f"--out must end in .mp4 or .gif, got '{out}'")
    if args.chunk < 1:
        raise DecodeVideoError(f"--chunk must be >= 1, got {args.chunk}")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder = load_any_decoder(args.decoder, args.latent_space, args.device, dtype)
    if args.channels_last:
        from .runtime import to_channels_last

        to_channels_last(decoder)
    is_latents = source.is_file() and source.suffix.lower() in LATENT_SUFFIXES

    if is_latents:
        if args.teacher:
            raise DecodeVideoError("--teacher is for video inputs; this input is a latents file")
        z = load_latents(source)
        if args.raw:
            z = decoder.latent_space.vae_to_decoder(z)
        end = z.shape[1] if args.num_frames is None else args.start + args.num_frames
        if args.start >= z.shape[1] or end > z.shape[1]:
            raise DecodeVideoError(f"'{source}' has {z.shape[1]} latent frames; cannot take {args.start}..{end - 1}")
        z = z[:, args.start : end]
        if z.shape[2] != decoder.latent_channels:
            raise DecodeVideoError(f"'{source}': {decoder.latent_space.channel_mismatch_message(z.shape[2])}")
        total, fps, what = z.shape[1], args.fps or 24.0, "latent frames"
        chunks = _chunks_of(z, args.chunk)
    else:
        if not args.teacher:
            raise DecodeVideoError(
                f"'{source}' is a video: pass --teacher ENCODER (a TAESD-family encoder .pth or a diffusers VAE) to "
                f"encode it first (reconstruct mode), or pass a latents file ({', '.join(LATENT_SUFFIXES)})"
            )
        info = video_info(source)
        encoder = _Encoder(args.teacher, args.latent_space or decoder.latent_space, args.device)
        if encoder.latent_space.channels != decoder.latent_channels:
            raise DecodeVideoError(
                f"teacher '{args.teacher}' makes {encoder.latent_space.channels}-channel latents "
                f"({encoder.latent_space.name}) but the decoder takes {decoder.latent_channels} "
                f"({decoder.latent_space.name}): use a teacher and decoder of the same latent space"
            )
        if encoder.latent_space.name != decoder.latent_space.name:
            warnings.warn(
                f"teacher latent space '{encoder.latent_space.name}' differs from the decoder's "
                f"'{decoder.latent_space.name}': colours will be wrong unless they are the same space",
                stacklevel=2,
            )
        total = (info.num_frames - args.start) if args.num_frames is None else args.num_frames
        fps, what = args.fps or info.fps or 24.0, "frames"
        chunks = encoded_video(source, encoder, args.start, args.num_frames, args.chunk)

    mode = (
        "streaming" if isinstance(decoder, CausalTAEDecoder) and not args.parallel
        else "parallel" if isinstance(decoder, CausalTAEDecoder)
        else f"overlapping chunks of {decoder.config.chunk_size}" if isinstance(decoder, TemporalTAEDecoder)
        else "frame by frame (image decoder: expect flicker)"
    )
    print(f"decoding {total} {what} with {args.decoder} ({mode}) -> {out}", file=sys.stderr)
    started = time.perf_counter()
    with VideoWriter(out, fps=fps, crf=args.crf) as writer, tqdm(total=total, unit="frame", disable=args.quiet) as bar:
        for frames in decode_stream(decoder, chunks, parallel=args.parallel, batch=args.chunk):
            writer.write(frames.float())
            bar.update(frames.shape[0])
    elapsed = time.perf_counter() - started
    print(f"wrote {writer.frames_written} frames to {out} in {elapsed:.1f} s "
          f"({writer.frames_written / max(elapsed, 1e-9):.1f} frames/s)", file=sys.stderr)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode-video",
        help="decode video latents (or reconstruct a video through a teacher) to .mp4/.gif",
        description="Decode video latents to an .mp4 (H.264) or .gif. INPUT is a latents file (.safetensors/.pt/.npy "
                    "with (T, C, h, w) or (1, T, C, h, w) decoder-space latents) or a video (file or frame folder), "
                    "which --teacher encodes first. Causal decoders stream by default.",
    )
    p.add_argument("input", metavar="LATENTS_OR_VIDEO")
    p.add_argument("--decoder", required=True, help="decoder checkpoint (.safetensors, TAESD .pth, Hub id) or preset")
    p.add_argument("--out", required=True, help="output .mp4 or .gif (written atomically)")
    p.add_argument("--teacher", default=None, help="encoder for a video input: TAESD-family encoder .pth or diffusers VAE")
    p.add_argument("--latent-space", default=None, help="latent space when the checkpoint cannot tell (e.g. sd15, svd)")
    p.add_argument("--raw", action="store_true", help="latents are raw VAE latents (what vae.decode takes), not decoder space")
    p.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    p.add_argument("--num-frames", type=int, default=None, help="frames to decode (default: all)")
    p.add_argument("--chunk", type=int, default=8, help="frames per read/push/batch (default 8)")
    p.add_argument("--parallel", action="store_true", help="causal decoders: decode all frames at once (more memory)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's, or 24 for latents)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality, lower is better (default 18)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="decoder precision (default fp32); bf16 is several times faster on CPUs with AMX/AVX512-BF16")
    from .runtime import add_channels_last_argument

    add_channels_last_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=decode_video_command)

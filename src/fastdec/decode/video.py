"""``fastdec decode-video`` as a library: latents (or a video, encoded by a teacher first) -> an .mp4 or .gif.

Causal decoders stream (a few frames at a time, bounded memory), temporal
decoders decode overlapping chunks, image decoders decode frame by frame.
Frames are written as they are decoded; the output file appears only when
the whole video is done. ``deflicker`` steadies the decoded frames where the
picture holds still (:mod:`fastdec.runtime.deflickering`), in every mode.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import (DecodeVideoError, LatentFileError, LatentSpaceError, NonFiniteOutputError, UsageError,
                      check_count)
from ..io.files import as_path, check_output_file
from ..io.latents import LATENT_SUFFIXES, check_latent, read_tensors
from ..models import LatentDecoder
from ..models.temporal import CausalTAEDecoder, TemporalTAEDecoder
from ..runtime.deflickering import Deflicker, DeflickerSettings, as_deflicker_settings
from ..io.video import WRITE_SUFFIXES as VIDEO_OUTPUTS, VideoWriter, check_fps, iter_video, video_info
from .common import build_decoder, check_device, describe_spec

DEFAULT_CRF = 18  # H.264's visually near-lossless setting, the .mp4 quality when --crf is not given


# ----------------------------------------------------------------------------- inputs
def _pick_tensor(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    if "latents" in tensors:
        return tensors["latents"]
    if len(tensors) != 1:
        raise DecodeVideoError(f"'{path}' holds {sorted(tensors)}; store one tensor, or name it 'latents'")
    return next(iter(tensors.values()))


def load_clip(path: str | os.PathLike) -> torch.Tensor:
    """Latents of one clip from .safetensors / .pt / .npy as (1, T, C, h, w); accepts (T, C, h, w) too."""
    path = as_path(path, "the latents file")
    if not path.is_file():
        raise LatentFileError(f"latents file '{path}' does not exist")
    if path.suffix.lower() not in LATENT_SUFFIXES:
        raise LatentFileError(f"'{path}': unknown latent file type (use {', '.join(LATENT_SUFFIXES)})")
    value = _pick_tensor(read_tensors(path), path)
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
    if value.shape[1] == 0:
        raise LatentFileError(f"'{path}' holds a clip of 0 frames {tuple(value.shape)}")
    if not value.is_floating_point():
        raise LatentFileError(f"'{path}' holds {value.dtype} values; latents are float tensors")
    return value.float()


# the old name (decode_video.load_latents)
load_latents = load_clip


def check_clip(z: torch.Tensor, decoder: LatentDecoder, source: Path) -> torch.Tensor:
    """Every frame's latent checked (channels, no empty dimension, finite) before any frame is written."""
    channels = decoder.latent_channels
    hint = decoder.latent_space.channel_mismatch_message(z.shape[2])
    for t in range(z.shape[1]):
        check_latent(z[0, t], f"{source.name} frame {t}", channels, hint)
    return z


def load_any_decoder(spec: Any, latent_space: str | None, device: str, dtype: Any,
                     random_weights: bool = False) -> LatentDecoder:
    """The decoder ``spec`` names, through :func:`fastdec.resolve_decoder` (presets need ``random_weights``)."""
    return build_decoder(spec, latent_space=latent_space, device=device, dtype=dtype or "fp32",
                         random_weights=random_weights, channels_last=False)


def load_video_encoder(source: str, latent_space: Any, device: str):
    """The teacher that turns video frames into latents (TAESD-family encoder or a diffusers VAE)."""
    from ..teachers import load_teacher

    return load_teacher(source, latent_space=latent_space, device=device)


def _crop_to(frames: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = frames.shape[-2:]
    top, left = (h % factor) // 2, (w % factor) // 2
    return frames[..., top : top + h - h % factor, left : left + w - w % factor]


def encoded_video(path: Path, encoder: Any, start: int, num_frames: int | None, chunk: int) -> Iterator[torch.Tensor]:
    """(1, k, C, h, w) latents of successive chunks of a video's frames (``encoder``: a teacher)."""
    factor = int(encoder.spatial_factor)
    with torch.inference_mode():
        for frames in iter_video(path, start=start, num_frames=num_frames, chunk=chunk):
            images = _crop_to(frames, factor).float() / 255
            yield encoder.encode(images)[None].float()


# ----------------------------------------------------------------------------- decoding
def decode_stream(
    decoder: LatentDecoder, chunks: Iterator[torch.Tensor], parallel: bool = False, batch: int = 8,
    deflicker: DeflickerSettings | None = None,
) -> Iterator[torch.Tensor]:
    """RGB frames (k, 3, H, W) in [0, 1] for latent chunks (1, k, C, h, w), in order, each decoder its own way.

    Causal: streamed push by push (or all at once with ``parallel``); temporal:
    overlapping windows over the whole clip (its latents are small, the frames
    are produced window by window); image: ``batch`` frames per call. With
    ``deflicker`` every decoded chunk goes through one :class:`Deflicker`.
    """
    frames = _decoded_chunks(decoder, chunks, parallel, batch)
    if deflicker is None:
        yield from frames
        return
    steady = Deflicker(deflicker)
    with torch.inference_mode():
        for chunk in frames:
            yield steady(chunk)


def _decoded_chunks(decoder: LatentDecoder, chunks: Iterator[torch.Tensor], parallel: bool,
                    batch: int) -> Iterator[torch.Tensor]:
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


def decoding_mode(decoder: LatentDecoder, parallel: bool) -> str:
    if isinstance(decoder, CausalTAEDecoder):
        return "parallel" if parallel else "streaming"
    if isinstance(decoder, TemporalTAEDecoder):
        return f"overlapping chunks of {decoder.config.chunk_size}"
    if decoder.is_video:  # a plugin's video decoder: _decoded_chunks gives it the whole clip
        return "the whole clip in one call"
    return "frame by frame (image decoder: expect flicker)"


@dataclass
class VideoSource:
    """What is decoded: latent chunks (1, k, C, h, w), how many frames they make, at which frame rate."""

    chunks: Iterator[torch.Tensor]
    total: int
    fps: float
    what: str  # "latent frames" or "frames"
    name: str = ""  # the input file or folder, for messages


def frame_range(path: Path, total: int, what: str, start: int, num_frames: int | None) -> int:
    """The end (exclusive) of the frames --start and --num-frames take from ``total``, or the error saying why not."""
    if start >= total:
        raise DecodeVideoError(f"'{path}' has {total} {what}; --start {start} is past the last one ({total - 1})")
    end = total if num_frames is None else start + num_frames
    if end > total:
        raise DecodeVideoError(f"'{path}' has {total} {what}; cannot take {start}..{end - 1} (--start {start} "
                               f"--num-frames {num_frames}): at most --num-frames {total - start}")
    return end


def latents_source(path: Path, decoder: LatentDecoder, *, raw: bool, start: int, num_frames: int | None,
                   chunk: int, fps: float | None) -> VideoSource:
    """Frames ``start`` .. of a latents file, checked whole before decoding."""
    z = check_clip(load_clip(path), decoder, path)
    if raw:
        z = decoder.latent_space.vae_to_decoder(z)
    end = frame_range(path, z.shape[1], "latent frames", start, num_frames)
    z = z[:, start:end]
    return VideoSource(_chunks_of(z, chunk), z.shape[1], fps or 24.0, "latent frames", str(path))


def encoded_source(path: Path, decoder: LatentDecoder, *, teacher: str | None, latent_space: str | None,
                   device: str, start: int, num_frames: int | None, chunk: int, fps: float | None) -> VideoSource:
    """A video file or frame folder, encoded chunk by chunk by ``teacher`` (reconstruct mode)."""
    if not teacher:
        raise DecodeVideoError(
            f"'{path}' is a video: pass --teacher ENCODER (a TAESD-family encoder .pth or a diffusers VAE) to "
            f"encode it first (reconstruct mode), or pass a latents file ({', '.join(LATENT_SUFFIXES)})"
        )
    info = video_info(path)
    try:  # the decoder's space picks the statistics where the file cannot tell (TAESD vs TAESDXL)
        encoder = load_video_encoder(teacher, latent_space or decoder.latent_space, device)
    except LatentSpaceError as e:
        raise DecodeVideoError(f"teacher and decoder are of different latent spaces: {e}") from e
    space, want = encoder.latent_space, decoder.latent_space
    if space.channels != decoder.latent_channels:
        raise DecodeVideoError(
            f"teacher '{teacher}' makes {space.channels}-channel latents ({space.name}) but the decoder takes "
            f"{decoder.latent_channels} ({want.name}): use a teacher and decoder of the same latent space"
        )
    if int(encoder.spatial_factor) != decoder.upsample_factor:
        raise DecodeVideoError(
            f"teacher '{teacher}' makes latents /{encoder.spatial_factor} ({space.name}) but the decoder upsamples "
            f"x{decoder.upsample_factor} ({want.name}): the video would come out the wrong size; use a teacher and "
            "decoder of the same latent space")
    if space.name != want.name:
        warnings.warn(f"teacher latent space '{space.name}' differs from the decoder's '{want.name}': colours will "
                      "be wrong unless they are the same space", stacklevel=2)
    total = frame_range(path, info.num_frames, "frames", start, num_frames) - start
    return VideoSource(encoded_video(path, encoder, start, num_frames, chunk), total, fps or info.fps or 24.0, "frames",
                       str(path))


def write_decoded(decoder: LatentDecoder, source: VideoSource, out: Path, spec: Any, *, parallel: bool,
                  chunk: int, crf: int, progress: bool, deflicker: DeflickerSettings | None = None) -> int:
    """Decode ``source`` into ``out`` (atomically); returns the number of frames written."""
    from tqdm.auto import tqdm

    with VideoWriter(out, fps=source.fps, crf=crf) as writer, \
            tqdm(total=source.total, unit="frame", disable=not progress) as bar:
        try:  # the decoder itself refuses NaN; frames of a wrapper that does not are checked here
            for frames in decode_stream(decoder, source.chunks, parallel=parallel, batch=chunk, deflicker=deflicker):
                if not torch.isfinite(frames).all():
                    raise NonFiniteOutputError("non-finite frames")
                writer.write(frames.float())
                bar.update(frames.shape[0])
        except NonFiniteOutputError as e:
            raise NonFiniteOutputError(
                f"decoder '{describe_spec(spec)}' produced NaN or inf on '{source.name}' at frame "
                f"{writer.frames_written} or after: no video is written. Check the decoder weights ({e})") from e
    return writer.frames_written


def check_video_options(source: Path, out: Path, *, start: int, num_frames: int | None, chunk: int, crf: int,
                        fps: float | None, threads: int | None) -> None:
    """Every option and the two paths, before the decoder is built."""
    if not source.exists():
        raise DecodeVideoError(f"input '{source}' does not exist")
    if out.suffix.lower() not in VIDEO_OUTPUTS:
        raise UsageError(f"--out must end in .mp4 or .gif, got '{out}'")
    check_output_file(out, "--out")
    if out.exists() and source.is_file() and out.resolve() == source.resolve():
        # the reconstruction would replace the very clip it was made from once it is renamed into place
        raise UsageError(f"--out '{out}' is the input video: write the decode to another file")
    for flag, value, least in (("--chunk", chunk, 1), ("--start", start, 0), ("--num-frames", num_frames, 1),
                               ("--crf", crf, 0), ("--threads", threads, 1)):
        if value is None and flag not in ("--num-frames", "--threads", "--crf"):
            raise UsageError(f"{flag} needs a value")
        check_count(flag, value, least)
    if crf is not None and crf > 51:
        raise UsageError(f"--crf must be <= 51 (H.264's scale: 0 lossless, 51 worst), got {crf}")
    if crf is not None and out.suffix.lower() == ".gif":  # both GIFs came out the same, whatever --crf said
        raise UsageError("--crf sets H.264 quality, and a .gif is not H.264: drop --crf, or write an .mp4")
    if fps is not None:
        check_fps(fps, out.suffix.lower(), "--fps")


def decode_video(
    source: str | os.PathLike,
    out: str | os.PathLike,
    decoder: Any,
    *,
    teacher: str | None = None,
    latent_space: str | None = None,
    raw: bool = False,
    start: int = 0,
    num_frames: int | None = None,
    chunk: int = 8,
    parallel: bool = False,
    fps: float | None = None,
    crf: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    channels_last: bool = True,
    threads: int | None = None,
    random_weights: bool = False,
    progress: bool = True,
    deflicker: DeflickerSettings | bool | None = None,
) -> Path:
    """Decode a latents file, or a video encoded by ``teacher``, to ``out`` (.mp4 or .gif); returns ``out``.

    ``crf`` is the .mp4's H.264 quality (default :data:`DEFAULT_CRF`). ``deflicker`` (settings, True for the
    defaults, or None: off) steadies the frames where the picture holds
    still: for generated latents, which jitter from frame to frame (:mod:`fastdec.runtime.deflickering` says what
    it trades)."""
    source, out = Path(source), Path(out)
    deflicker = as_deflicker_settings(deflicker)
    check_video_options(source, out, start=start, num_frames=num_frames, chunk=chunk, crf=crf, fps=fps,
                        threads=threads)
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    is_latents = source.is_file() and source.suffix.lower() in LATENT_SUFFIXES
    if raw and not is_latents:  # a video's latents come from --teacher: --raw had nothing to convert
        raise UsageError("--raw says a latents file holds raw VAE latents; this input is a video, which --teacher "
                         "encodes to decoder latents itself: drop --raw")
    model = build_decoder(decoder, latent_space=latent_space, device=device, dtype=dtype,
                          random_weights=random_weights, channels_last=channels_last)
    if parallel and not isinstance(model, CausalTAEDecoder):  # it decoded as without the flag
        raise UsageError(f"--parallel decodes a causal video decoder's frames at once; '{describe_spec(decoder)}' "
                         f"decodes {decoding_mode(model, False)} whatever it is given: drop --parallel")
    crf = DEFAULT_CRF if crf is None else crf
    if is_latents:
        if teacher:
            raise UsageError("--teacher is for video inputs; this input is a latents file")
        frames = latents_source(source, model, raw=raw, start=start, num_frames=num_frames, chunk=chunk, fps=fps)
    else:
        frames = encoded_source(source, model, teacher=teacher, latent_space=latent_space, device=device,
                                start=start, num_frames=num_frames, chunk=chunk, fps=fps)
    if fps is None:  # a 60 fps input cannot become a .gif at its own rate
        check_fps(frames.fps, out.suffix.lower(), "the input's frame rate (choose another with --fps)")
    steady = "" if deflicker is None else (f", deflicker strength {deflicker.strength:g} threshold "
                                           f"{deflicker.threshold:g}")
    print(f"decoding {frames.total} {frames.what} with {describe_spec(decoder)} ({decoding_mode(model, parallel)}"
          f"{steady}) -> {out}", file=sys.stderr)
    started = time.perf_counter()
    written = write_decoded(model, frames, out, decoder, parallel=parallel, chunk=chunk, crf=crf, progress=progress,
                            deflicker=deflicker)
    elapsed = time.perf_counter() - started
    print(f"wrote {written} frames to {out} in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.1f} frames/s)",
          file=sys.stderr)
    return out

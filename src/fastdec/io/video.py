"""Reading and writing video: files through PyAV (FFmpeg), frame folders through PIL.

Frames are uint8 tensors (T, 3, H, W) in RGB. Reading decodes only what is
asked for (``start``/``num_frames``: it seeks to the nearest keyframe before
``start``), so a random clip of a long video costs a few frames, not the file.
Writing is atomic (a temporary file renamed on success): a crash or a bad
frame never leaves a half-written video behind. Errors name the file.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError, InputTypeError, UsageError, VideoError
from .files import _UMASK, as_path, temp_file_for
from .images import IMAGE_SUFFIXES, as_rgb

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
WRITE_SUFFIXES = (".mp4", ".gif")
# A GIF stores each frame's delay in hundredths of a second, and browsers play a delay under 0.02 s at 10 fps:
# past 50 fps a .gif would play slower, not faster. An .mp4's rate is a fraction with a denominator up to 1e5.
FPS_RANGE = {".mp4": (0.01, 1000.0), ".gif": (0.02, 50.0)}


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    # None for frame folders, which carry no frame rate
    fps: float | None


# ----------------------------------------------------------------------------- frame folders
def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise VideoError(f"'{folder}' holds no image frames ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(as_rgb(im, path, upright=False))
    except DataError as e:
        raise VideoError(str(e)) from e
    except (UnidentifiedImageError, OSError) as e:
        raise VideoError(f"cannot read frame '{path}': {e}") from e


def _folder_info(folder: Path) -> VideoInfo:
    from PIL import Image

    files = _frame_files(folder)
    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except OSError as e:
        raise VideoError(f"cannot read frame '{files[0]}': {e}") from e
    return VideoInfo(len(files), height, width, None)


def _iter_folder(folder: Path, start: int, num_frames: int | None, chunk: int) -> Iterator[torch.Tensor]:
    files = _frame_files(folder)
    _check_range(folder, start, num_frames, len(files))
    stop = len(files) if num_frames is None else start + num_frames
    size = None
    for i in range(start, stop, chunk):
        frames = [_read_image(p) for p in files[i : min(i + chunk, stop)]]
        for p, f in zip(files[i:], frames):
            if size is None:
                size = f.shape
            elif f.shape != size:
                raise VideoError(f"frame '{p}' is {f.shape[1]}x{f.shape[0]}, earlier frames are {size[1]}x{size[0]}")
        yield torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- files (PyAV)
def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(f"cannot open video '{path}': the file is corrupt, truncated or not a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"'{path}' has no video stream")
    return container


def _stream_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _file_info(path: Path) -> VideoInfo:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        num_frames = stream.frames
        if not num_frames and stream.duration and fps:
            num_frames = round(float(stream.duration * stream.time_base) * fps)
        if not num_frames:  # container without a frame count (some webm/gif): count by demuxing, no decoding
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        return VideoInfo(int(num_frames), stream.codec_context.height, stream.codec_context.width, fps)
    finally:
        container.close()


def _check_range(path: Path, start: int, num_frames: int | None, total: int) -> None:
    if start < 0 or (num_frames is not None and num_frames < 1):
        raise VideoError(f"'{path}': need start >= 0 and num_frames >= 1, got start={start}, num_frames={num_frames}")
    if start >= total or (num_frames is not None and start + num_frames > total):
        want = f"frames {start}..{start + (num_frames or 1) - 1}"
        raise VideoError(f"'{path}' has {total} frames, cannot read {want}")


def _iter_file(path: Path, start: int, num_frames: int | None, chunk: int, seek: bool = True) -> Iterator[torch.Tensor]:
    """Frames [start, start + num_frames) in chunks; seeks to the keyframe before ``start`` unless ``seek=False``."""
    import av

    info = _file_info(path)
    _check_range(path, start, num_frames, info.num_frames)
    container = _open(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = info.fps
    origin = stream.start_time or 0

    def index_of(frame) -> int | None:
        if frame.pts is None or not fps:
            return None
        return round(float((frame.pts - origin) * stream.time_base) * fps)

    sequential = not seek or start == 0 or not fps
    if not sequential:
        target = origin + int(Fraction(start) / Fraction(fps).limit_denominator(100000) / stream.time_base)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            sequential = True
    wanted = info.num_frames - start if num_frames is None else num_frames
    got, buffer, position = 0, [], 0
    try:
        first, last_index = True, -1
        for frame in container.decode(stream):
            index = position if sequential else index_of(frame)
            if index is None:  # a frame without a timestamp follows the previous one
                index = last_index + 1
            last_index = index
            if first and not sequential and (index is None or index > start):
                # the seek overshot or timestamps are unusable: decode from the beginning instead
                container.close()
                yield from _iter_file(path, start, num_frames, chunk, seek=False)
                return
            first = False
            position += 1
            if index < start:
                continue
            buffer.append(frame.to_ndarray(format="rgb24"))
            got += 1
            if len(buffer) == chunk or got == wanted:
                yield torch.from_numpy(np.stack(buffer)).permute(0, 3, 1, 2).contiguous()
                buffer = []
            if got == wanted:
                return
    except av.FFmpegError as e:
        raise VideoError(f"'{path}' is corrupt: decoding failed after {start + got} frames ({e})") from e
    finally:
        container.close()
    raise VideoError(
        f"'{path}' is truncated or corrupt: its header says {info.num_frames} frames but decoding stopped at "
        f"frame {start + got}"
    )


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise VideoError(f"'{path}' does not exist")
    return path


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and frame rate of a video file or frame folder, without decoding frames."""
    path = _existing(path)
    return _folder_info(path) if path.is_dir() else _file_info(path)


def iter_video(
    path: str | os.PathLike, start: int = 0, num_frames: int | None = None, chunk: int = 16
) -> Iterator[torch.Tensor]:
    """Yield uint8 frames (k, 3, H, W), at most ``chunk`` at a time: for videos too long to hold in memory."""
    path = _existing(path)
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    if path.is_dir():
        return _iter_folder(path, start, num_frames, chunk)
    return _iter_file(path, start, num_frames, chunk)


def read_video(path: str | os.PathLike, start: int = 0, num_frames: int | None = None) -> torch.Tensor:
    """Frames ``start`` .. ``start + num_frames - 1`` (all to the end when None) as uint8 (T, 3, H, W)."""
    return torch.cat(list(iter_video(path, start, num_frames, chunk=64)))


# ----------------------------------------------------------------------------- writing
def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(k, 3, H, W) uint8 or float in [0, 1] -> (k, H, W, 3) uint8."""
    if not isinstance(frames, torch.Tensor):
        raise InputTypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise VideoError(
            f"frames must be shaped (T, 3, H, W), got {tuple(frames.shape)}"
            + ("; for (T, H, W, 3) use frames.permute(0, 3, 1, 2)" if frames.ndim == 4 and frames.shape[-1] == 3 else "")
        )
    if frames.dtype != torch.uint8:
        if not frames.is_floating_point():
            raise VideoError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
        if not torch.isfinite(frames).all():
            raise VideoError("frames contain NaN or inf")
        frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()



def check_fps(fps: float, suffix: str, name: str = "fps") -> float:
    """``fps`` as a float when a ``suffix`` (.mp4 / .gif) file can play at that rate, else the error naming
    ``name`` (a flag, for a command) and the range."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"{name} must be a finite number of frames per second > 0, got {fps!r}")
    low, high = FPS_RANGE.get(suffix, FPS_RANGE[".mp4"])
    if not low <= fps <= high:
        why = (" (a GIF's frame delays are hundredths of a second, and players show delays under 0.02 s at 10 fps: "
               "write an .mp4 for faster video)" if suffix == ".gif" else "")
        raise VideoError(f"{name} {fps:g} is outside what a {suffix} plays, {low:g} to {high:g} fps{why}")
    return float(fps)


class VideoWriter:
    """Write frames incrementally to .mp4 (H.264, yuv420p) or .gif; the file appears only on ``close``.

    Use as a context manager: on an exception the partial output is deleted.
    H.264 in yuv420p needs even sizes: an odd height or width is padded by one
    edge-replicated pixel (with a warning).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 24.0, crf: int = 18):
        self.path = as_path(path, "the video output")
        self.suffix = self.path.suffix.lower()
        if self.suffix not in WRITE_SUFFIXES:
            raise VideoError(f"cannot write '{self.path}': choose an .mp4 or .gif output")
        self.fps, self.crf = check_fps(fps, self.suffix), int(crf)
        self._tmp = temp_file_for(self.path, self.suffix)  # a killed run's partial video is removed first
        self._container = None
        self._stream = None
        self._gif_frames: list = []
        self._size: tuple[int, int] | None = None
        self.frames_written = 0
        self._closed = False

    def _start_mp4(self, height: int, width: int) -> None:
        import av

        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        rate = Fraction(self.fps).limit_denominator(100000)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": "medium", "movflags": "+faststart"}
        if height % 2 or width % 2:
            warnings.warn(
                f"{self.path.name}: H.264 (yuv420p) needs even sizes; padding {width}x{height} by one pixel",
                stacklevel=3,
            )

    def write(self, frames: torch.Tensor) -> None:
        """Append (k, 3, H, W) (or one (3, H, W)) uint8 or float [0, 1] frames."""
        if self._closed:
            raise VideoError(f"'{self.path}' is already closed")
        array = _to_uint8(frames)
        size = array.shape[1:3]
        if self._size is None:
            self._size = size
            if self.suffix == ".mp4":
                self._start_mp4(*size)
        elif size != self._size:
            raise VideoError(f"frame size changed from {self._size} to {size} while writing '{self.path}'")
        if self.suffix == ".gif":
            from PIL import Image

            self._gif_frames += [Image.fromarray(a).quantize(256, method=Image.Quantize.MEDIANCUT) for a in array]
        else:
            import av

            pad = ((0, 0), (0, size[0] % 2), (0, size[1] % 2), (0, 0))
            if any(p[1] for p in pad):
                array = np.pad(array, pad, mode="edge")
            for a in array:
                for packet in self._stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                    self._container.mux(packet)
        self.frames_written += len(array)

    def close(self) -> Path:
        """Finish the file and move it into place."""
        if self._closed:
            return self.path
        if not self.frames_written:
            self.abort()
            raise VideoError(f"no frames were written to '{self.path}'")
        if self.suffix == ".gif":
            first, *rest = self._gif_frames
            first.save(self._tmp, save_all=True, append_images=rest, duration=round(1000 / self.fps), loop=0)
        else:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        with open(self._tmp, "rb+") as f:  # on disk before the rename makes it visible, as atomic_write does
            os.fsync(f.fileno())
        os.chmod(self._tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600
        os.replace(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the output path is left untouched."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the temporary file is deleted anyway
                pass
        self._tmp.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.abort()


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float = 24.0, crf: int = 18) -> Path:
    """Write (T, 3, H, W) uint8 or float [0, 1] frames to .mp4 (H.264) or .gif, atomically."""
    with VideoWriter(path, fps=fps, crf=crf) as writer:
        writer.write(frames)
    return writer.path


__all__ = ["VIDEO_SUFFIXES", "VideoError", "VideoInfo", "VideoWriter", "iter_video", "read_video", "video_info", "write_video"]

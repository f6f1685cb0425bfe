"""Training data: folders of images or videos, the crops taken from them, and the order they are drawn in.

Every crop is described by a ``Crop`` (file, crop box, horizontal flip, and for videos the first
frame). Crops are planned deterministically from a seed, so the latent cache can store them next to
the latents and training reloads exactly the pixels the latents were encoded from.

Images are read upright (EXIF orientation applied, as ``fastdec eval`` reads them); images smaller than the
crop resolution are first resized (shorter side = resolution, Lanczos).
Unreadable files are skipped with one warning each and counted in ``skipped``; a folder with no
readable file is an error that names the folder.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..io.files import drop_excluded
from ..io.images import IMAGE_SUFFIXES, as_rgb, list_images
from ..io.video import VIDEO_SUFFIXES


@dataclass(frozen=True)
class Crop:
    file: int      # index into the dataset's file list
    top: int       # crop box in the (resized) image, pixels
    left: int
    size: int
    flip: bool
    start: int = 0  # first frame (videos)
    stride: int = 1  # videos: the clip takes every stride-th frame from start

    def to_list(self) -> list[int]:
        return [self.file, self.top, self.left, self.size, int(self.flip), self.start, self.stride]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Crop":
        # caches written before strides existed hold 6 values: their clips are consecutive frames
        file, top, left, size, flip, start, stride = (*(int(v) for v in values), 1)[:7]
        return cls(file, top, left, size, bool(flip), start, stride)


def _resized_size(width: int, height: int, resolution: int, short_side: int | None = None) -> tuple[int, int]:
    """Size after resizing so the shorter side is ``short_side`` (down or up), or without it, at least
    ``resolution`` (upscaling only)."""
    short = min(width, height)
    target = short_side or max(short, resolution)
    if short == target:
        return width, height
    scale = target / short
    return max(target, round(width * scale)), max(target, round(height * scale))


def check_short_side(short_side: int | None, resolution: int) -> None:
    if short_side is not None and short_side < resolution:
        raise DataError(f"--short-side {short_side} is smaller than the --resolution {resolution} crops cut from it: "
                        f"use --short-side {resolution} or more")


EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # rotated by 90 degrees either way: width and height swap


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255


class _MediaFolder:
    """What image and video folders share: their files under ``root``."""

    root: Path
    files: list[Path]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> list[str]:
        """One line per file (name, size, mtime in ns): part of the cache key, so changed data means a new cache.

        A photo stored rotated (EXIF orientation other than 1) adds its orientation: caches from before
        training read photos upright are rebuilt for folders that hold such photos, and only for those."""
        lines = []
        for index, path in enumerate(self.files):
            stat = path.stat()
            note = self._file_note(index)
            lines.append(f"{path.relative_to(self.root)}:{stat.st_size}:{stat.st_mtime_ns}{note}")
        return lines

    def _file_note(self, index: int) -> str:
        return ""


class ImageFolder(_MediaFolder):
    """All images under ``root`` (recursive), to be cut into ``resolution``-pixel square crops."""

    def __init__(self, root: str | Path, resolution: int, spatial_factor: int = 8, exclude: Iterable[str] = (),
                 short_side: int | None = None):
        from PIL import Image

        self.root = Path(root).expanduser()
        if resolution % spatial_factor:
            raise DataError(f"--resolution {resolution} is not a multiple of the latent space's factor "
                            f"{spatial_factor}: use e.g. {resolution // spatial_factor * spatial_factor or spatial_factor}")
        check_short_side(short_side, resolution)
        self.resolution, self.short_side = resolution, short_side
        if not self.root.is_dir():
            raise DataError(f"data folder '{self.root}' does not exist or is not a folder")
        candidates = drop_excluded(list_images(self.root, recursive=True), self.root, exclude)
        self.files: list[Path] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) upright and after resizing
        self.orientations: list[int] = []  # EXIF orientation, 1 = stored upright
        self.skipped: list[Path] = []
        for path in candidates:
            try:
                with Image.open(path) as im:
                    im.verify()  # cheap integrity check (PNG CRCs, headers); full decode happens when cached
                with Image.open(path) as im:  # verify() must come first after opening and leaves im unusable
                    width, height = im.size
                    orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
                    # PIL's TIFF reader turns the image itself (its size is upright already); the others
                    # leave the turn to exif_transpose, as load() does
                    if orientation in TRANSPOSING_ORIENTATIONS and im.format != "TIFF":
                        width, height = height, width
            except Exception as e:  # PIL raises many types for a bad file
                self._skip(path, e)
                continue
            self.files.append(path)
            self.orientations.append(orientation)
            self.sizes.append(_resized_size(width, height, resolution, short_side))
        if not self.files:
            found = f"{len(candidates)} image files, none readable" if candidates else "no image files"
            raise DataError(f"'{self.root}' has {found} ({', '.join(IMAGE_SUFFIXES)}, searched recursively): "
                            "point --data/--val at a folder of images")

    def _file_note(self, index: int) -> str:
        return f":exif{self.orientations[index]}" if self.orientations[index] != 1 else ""

    def _skip(self, path: Path, error: Exception) -> None:
        self.skipped.append(path)
        warnings.warn(f"skipping unreadable image '{path}': {type(error).__name__}: {error}", stacklevel=3)

    def random_crops(self, per_file: int, seed: int) -> list[Crop]:
        """``per_file`` random crops (position and flip) of every file; the same for the same seed."""
        crops = []
        for index, (width, height) in enumerate(self.sizes):
            rng = np.random.default_rng([seed, index])
            for _ in range(per_file):
                top = int(rng.integers(0, height - self.resolution + 1))
                left = int(rng.integers(0, width - self.resolution + 1))
                crops.append(Crop(index, top, left, self.resolution, bool(rng.integers(0, 2))))
        return crops

    def center_crops(self, limit: int | None = None) -> list[Crop]:
        crops = []
        for index, (width, height) in enumerate(self.sizes[:limit]):
            crops.append(Crop(index, (height - self.resolution) // 2, (width - self.resolution) // 2,
                              self.resolution, False))
        return crops

    def load(self, crop: Crop) -> torch.Tensor:
        """The pixels of ``crop``, (3, R, R) float in [0, 1]. Raises ``DataError`` for an undecodable file."""
        from PIL import Image

        path = self.files[crop.file]
        try:
            with Image.open(path) as im:
                im = as_rgb(im, path)  # upright, as fastdec eval reads it
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for a bad file
            raise DataError(f"cannot decode image '{path}': {type(e).__name__}: {e}") from e
        size = self.sizes[crop.file]
        if _resized_size(*im.size, self.resolution, self.short_side) != size:  # else: a stretched picture
            raise DataError(f"image '{path}' decodes upright at {im.size[0]}x{im.size[1]} px, not the shape its "
                            f"crops were planned for ({size[0]}x{size[1]} after resizing): the file changed after "
                            "it was listed, or its orientation reads differently once decoded; run training again")
        if im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        array = np.array(im.crop((crop.left, crop.top, crop.left + crop.size, crop.top + crop.size)))
        if crop.flip:
            array = array[:, ::-1]
        return _to_tensor(array)


class VideoFolder(_MediaFolder):
    """Videos under ``root``: video files (mp4/webm/...) and folders of frames, cut into clips of
    ``frames`` frames at ``resolution`` px. Reading goes through ``fastdec.io.video``.

    Each clip has a random start and a random stride, drawn uniformly from 1 to ``max_stride`` (capped by
    the video's length): a stride of 2 or 3 shows the decoder faster motion than the footage has, as
    lower frame rates and generated video do.
    """

    def __init__(self, root: str | Path, resolution: int, frames: int, spatial_factor: int = 8,
                 exclude: Iterable[str] = (), max_stride: int = 1, short_side: int | None = None):
        from ..io.video import video_info

        self.root = Path(root).expanduser()
        if resolution % spatial_factor:
            raise DataError(f"--resolution {resolution} is not a multiple of the latent space's factor {spatial_factor}")
        if not self.root.is_dir():
            raise DataError(f"video folder '{self.root}' does not exist or is not a folder")
        if max_stride < 1:
            raise DataError(f"--max-frame-stride must be 1 or more (1 = consecutive frames), got {max_stride}")
        check_short_side(short_side, resolution)
        self.resolution, self.frames, self.max_stride, self.short_side = resolution, frames, max_stride, short_side
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        frame_dirs = sorted({p.parent for p in list_images(self.root, recursive=True)})
        candidates = drop_excluded(candidates + frame_dirs, self.root, exclude)
        self.files: list[Path] = []
        self.sizes: list[tuple[int, int]] = []
        self.lengths: list[int] = []
        self.skipped: list[Path] = []
        for path in candidates:
            try:
                info = video_info(path)
            except (OSError, ValueError) as e:  # VideoError (a ValueError) for corrupt files, OSError for I/O
                self.skipped.append(path)
                warnings.warn(f"skipping unreadable video '{path}': {type(e).__name__}: {e}", stacklevel=2)
                continue
            if info.num_frames < frames:
                self.skipped.append(path)
                warnings.warn(f"skipping video '{path}': {info.num_frames} frames < --frames {frames}", stacklevel=2)
                continue
            self.files.append(path)
            self.sizes.append(_resized_size(info.width, info.height, resolution, short_side))
            self.lengths.append(info.num_frames)
        if not self.files:
            found = f"{len(candidates)} videos, none usable" if candidates else "no videos or frame folders"
            raise DataError(f"'{self.root}' has {found} ({', '.join(VIDEO_SUFFIXES)} or folders of frames, "
                            f"at least {frames} frames each)")

    def random_crops(self, per_file: int, seed: int) -> list[Crop]:
        crops = []
        for index, ((width, height), length) in enumerate(zip(self.sizes, self.lengths)):
            rng = np.random.default_rng([seed, index])
            # the largest stride whose clip still fits in this video (1 always does: shorter ones were skipped)
            longest = min(self.max_stride, (length - 1) // (self.frames - 1)) if self.frames > 1 else 1
            for _ in range(per_file):
                stride = int(rng.integers(1, longest + 1))
                start = int(rng.integers(0, length - (self.frames - 1) * stride))
                top = int(rng.integers(0, height - self.resolution + 1))
                left = int(rng.integers(0, width - self.resolution + 1))
                crops.append(Crop(index, top, left, self.resolution, bool(rng.integers(0, 2)), start, stride))
        return crops

    def center_crops(self, limit: int | None = None) -> list[Crop]:
        return [Crop(i, (h - self.resolution) // 2, (w - self.resolution) // 2, self.resolution, False, 0)
                for i, (w, h) in enumerate(self.sizes[:limit])]

    def load(self, crop: Crop) -> torch.Tensor:
        """(T, 3, R, R) float in [0, 1]."""
        import torch.nn.functional as F

        from ..io.video import read_video

        path = self.files[crop.file]
        try:
            span = (self.frames - 1) * crop.stride + 1
            clip = read_video(path, start=crop.start, num_frames=span)[::crop.stride]
        except (OSError, ValueError) as e:  # VideoError (a ValueError) for corrupt files, OSError for I/O
            raise DataError(f"cannot decode video '{path}': {type(e).__name__}: {e}") from e
        if clip.shape[0] != self.frames:  # the file is shorter than video_info said (a truncated stream)
            raise DataError(f"video '{path}' gave {clip.shape[0]} frames from frame {crop.start} at stride "
                            f"{crop.stride}, expected {self.frames}: the file may be truncated")
        clip = clip.float() / 255
        width, height = self.sizes[crop.file]
        if clip.shape[-2:] != (height, width):
            clip = F.interpolate(clip, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)
        clip = clip[..., crop.top:crop.top + crop.size, crop.left:crop.left + crop.size]
        return clip.flip(-1) if crop.flip else clip


def open_folder(root: str | Path, resolution: int, spatial_factor: int, frames: int | None = None,
                exclude: Iterable[str] = (), max_stride: int = 1, short_side: int | None = None):
    """An ``ImageFolder``, or a ``VideoFolder`` when ``frames`` is given (video decoders)."""
    if frames:
        return VideoFolder(root, resolution, frames, spatial_factor, exclude, max_stride, short_side)
    return ImageFolder(root, resolution, spatial_factor, exclude, short_side)


def crops_to_json(crops: Iterable[Crop]) -> list[list[int]]:
    return [c.to_list() for c in crops]


def add_latent_noise(latents: torch.Tensor, max_std: float) -> torch.Tensor:
    """``latents`` plus Gaussian noise, independent per element (so per frame of a clip), with a std drawn per
    sample uniformly from [0, ``max_std``]: a decoder trained on it meets latents that jitter between frames,
    as a denoiser's do, and clean ones. Drawn from the global RNG of the latents' device, which checkpoints
    save and ``--resume`` restores."""
    if not max_std:
        return latents
    std = torch.rand(latents.shape[0], device=latents.device) * max_std
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    return latents + std.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype) * noise


class GlobalBatches:
    """Batches of sample ids for one rank: epoch-seeded permutations consumed in global batches of
    ``batch_size * world`` (rank r takes the r-th slice), starting at global batch ``start``. A resumed run
    passes the global batches already consumed as ``start`` and sees exactly the samples an uninterrupted
    run would have seen."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = num_samples, batch_size, rank, world, seed, start

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        epoch, order = -1, None
        while True:
            first = (g * self.world + self.rank) * self.batch
            ids = []
            for position in range(first, first + self.batch):
                if position // self.n != epoch:
                    epoch = position // self.n
                    order = self._order(epoch)
                ids.append(int(order[position % self.n]))
            yield ids
            g += 1


__all__ = ["Crop", "DataError", "GlobalBatches", "add_latent_noise", "ImageFolder", "VideoFolder", "open_folder",
           "crops_to_json", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]

"""Images on disk: the one list of image suffixes, loading to float tensors, tensors to uint8, atomic saving;
and the one check that image tensors hold pixels in [0, 1] (the convention every fastdec function takes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InputTypeError, NonFiniteOutputError, UsageError
from .files import as_path, atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# output formats: name -> (PIL format, file suffix)
IMAGE_FORMATS = {"png": ("PNG", ".png"), "webp": ("WEBP", ".webp"), "jpeg": ("JPEG", ".jpg")}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; hidden files left out). An empty list when there are none."""
    folder = as_path(folder, "the image folder")
    if not folder.is_dir():
        raise DataError(f"'{folder}' is not a folder of images")
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image_file(p))


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB in [0, 1], (1, 3, H, W), EXIF orientation applied. Raises ``DataError`` naming an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(as_rgb(im, path))
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable image"
        raise DataError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255


def as_rgb(im: Any, path: str | os.PathLike, upright: bool = True) -> Any:
    """An opened PIL image as 8-bit RGB (EXIF orientation applied when ``upright``), the one conversion every
    reader uses. PIL's ``convert("RGB")`` clips 16-bit grey to white and float samples to black: 16-bit is scaled
    down instead, and 32-bit integer or float samples (whose range no file states) are a ``DataError``."""
    from PIL import Image, ImageOps

    if upright:
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        grey = (np.asarray(im).astype(np.float32) / 257).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "floating-point"
        raise DataError(f"image '{path}' holds {kind} samples (PIL mode {im.mode}), whose range fastdec cannot "
                        "know: save it as an 8- or 16-bit image")
    return im.convert("RGB")


def check_pixel_range(images: torch.Tensor, who: str, data_range: float = 1.0) -> None:
    """``images`` are a finite float tensor of pixels in [0, ``data_range``], else the error names ``who`` and the
    fix. Images in 0-255 or in diffusers' [-1, 1] ran through encoders and metrics without a word and gave wrong
    latents and scores. Exact bounds: whatever was clamped to [0, 1] stays there in every float dtype."""
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(f"{who} takes images as a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():  # complex is not floating point either
        hint = " (uint8 images: images.float() / 255)" if images.dtype == torch.uint8 else ""
        raise InputTypeError(f"{who} takes float images in [0, {data_range:g}], got {images.dtype}{hint}")
    if images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        raise UsageError(f"{who} got images holding NaN or inf: they are no pixels (check what made them)")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > data_range:
        if data_range == 1 and high > 1.5:
            hint = ": they look like 0-255 values, divide by 255"
        elif low < 0:
            hint = ": they look like [-1, 1] values (diffusers' convention), use (images + 1) / 2"
        else:
            hint = ": clamp them, images.clamp(0, 1)"
        raise UsageError(f"{who} takes pixels in [0, {data_range:g}], got values from {low:.4g} to {high:.4g}{hint}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) in [0, 1] -> (N, H, W, 3) or (H, W, 3) uint8, rounded to nearest.

    Non-finite values raise :class:`NonFiniteOutputError`: NaN would otherwise become a black pixel.
    """
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise NonFiniteOutputError("the decoded image contains NaN or inf (no picture is written)")
    array = images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return array.permute(*range(array.ndim - 3), -2, -1, -3).cpu().numpy()


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike, image_format: str = "png",
               quality: int = 95) -> Path:
    """Write one image ((3, H, W) float in [0, 1], or (H, W, 3) uint8) atomically as png, webp or jpeg."""
    from PIL import Image

    array = to_uint8(image) if isinstance(image, torch.Tensor) else image
    pil_format, _ = IMAGE_FORMATS[image_format]
    options: dict[str, Any] = {"quality": quality} if image_format in ("webp", "jpeg") else {"compress_level": 1}
    picture = Image.fromarray(array)
    # PIL is told the format, so the temporary name need not end in .png: a glob for outputs never sees it
    return atomic_write(path, lambda tmp: picture.save(tmp, format=pil_format, **options))

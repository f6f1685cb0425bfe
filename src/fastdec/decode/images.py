"""``fastdec decode`` as a library: the latents of one file -> PNGs, tiled when an image would exceed a memory
budget.

Nothing is written until the whole file has been checked: every latent (dtype, shape, channels, finite
values) and every output name (it must stay inside the output folder). A decoder output that is not finite
stops the run with a message that says which images were already written.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import DecodeError, NonFiniteOutputError, UsageError
from ..io.files import output_folder, output_path
from ..io.images import save_image
from ..io.latents import check_latent, read_latents
from .common import build_decoder, check_device, describe_spec, require_image_decoder

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}

# measured: tae-64 at 87x87-latent tiles peaked at ~1580 B/px of RSS against 768 B/px of live tensors
_RUNTIME_OVERHEAD = 2.25

# the old name of the reader (it lived here before fastdec.io.latents)
load_latents = read_latents


def parse_bytes(text: str) -> int:
    """'2GB', '512MB', '1.5G', '1000000' -> bytes (binary units); zero or unreadable sizes are usage errors."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise UsageError(f"cannot read memory size '{text}': write it like 2GB, 512MB or 1.5G")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise UsageError(f"memory size '{text}' is zero: give a budget such as 2GB")
    return size


def activation_bytes_per_pixel(decoder: nn.Module) -> float:
    """Estimated peak activation bytes per output pixel, from the layer outputs of a small probe decode.

    Peak live memory in inference is about the largest layer's input plus its
    output plus a residual branch held alongside (the largest activation again),
    times ``_RUNTIME_OVERHEAD``: measured on CPU, peak RSS per tile is ~2x that
    (oneDNN reorders conv inputs/outputs into blocked layouts, and the
    allocator keeps freed blocks).
    """
    inner = getattr(decoder, "decoder", decoder)
    sizes: list[tuple[int, int]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            sizes.append((inputs[0].numel() * inputs[0].element_size(), output.numel() * output.element_size()))

    leaves = [m for m in inner.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    side = 8
    try:
        with torch.no_grad():
            out = inner(torch.zeros(1, inner.latent_channels, side, side, dtype=inner.dtype, device=inner.device))
    finally:
        for h in handles:
            h.remove()
    pixels = out.shape[-1] * out.shape[-2]
    peak = max(i + o for i, o in sizes) + max(o for _, o in sizes)
    return _RUNTIME_OVERHEAD * peak / pixels


def choose_tile(decoder: nn.Module, h: int, w: int, budget: int) -> int | None:
    """None when the untiled decode fits ``budget`` bytes, else the largest tile (latent pixels) that does."""
    from ..runtime.tiling import measure_receptive_field

    factor = decoder.upsample_factor
    per_pixel = activation_bytes_per_pixel(decoder)
    output_bytes = 3 * 4 * h * w * factor**2 * 2  # float output image + its uint8/PIL copies
    available = budget - output_bytes
    if per_pixel * h * w * factor**2 <= available:
        return None
    overlap = measure_receptive_field(decoder).radius
    tile = int((max(available, 0) / per_pixel) ** 0.5) // factor
    if tile < 2 * overlap + 8:
        raise DecodeError(
            f"--max-memory {_byte_size(budget)} is too small for this {h * factor}x{w * factor} image: it needs at "
            f"least {_byte_size(output_bytes + per_pixel * ((2 * overlap + 8) * factor) ** 2)} (output image plus "
            f"one {2 * overlap + 8}-latent-pixel tile)"
        )
    return tile


def _byte_size(size: float) -> str:
    return f"{size / 2**20:.0f}MB" if size >= 2**20 else f"{size / 2**10:.0f}KB" if size >= 2**10 else f"{size:.0f}B"


@dataclass(frozen=True)
class PlannedImage:
    """One latent of the file, the PNG it becomes and the tile it is decoded in (None: whole)."""

    name: str
    latent: torch.Tensor  # (C, h, w), decoder space
    path: Path
    tile: int | None = None


def check_all_latents(named: Sequence[tuple[str, torch.Tensor]], decoder: Any, source: Path) -> None:
    """Every latent of the file, checked before any image is written (so no batch is left half done)."""
    space = decoder.latent_space
    for name, z in named:
        hint = space.channel_mismatch_message(z.shape[0]) if z.ndim == 3 else ""
        check_latent(z, f"{source.name}:{name}" if name else source.name, decoder.latent_channels, hint)


def plan_images(named: Sequence[tuple[str, torch.Tensor]], decoder: Any, out: Path, source: Path,
                vae_space: bool) -> list[PlannedImage]:
    """Output path of each latent (``STEM_NAME.png``, kept inside ``out``), latents in decoder space."""
    plan = []
    for name, z in named:
        if vae_space:
            z = decoder.latent_space.vae_to_decoder(z[None])[0]
        filename = f"{source.stem}_{name}.png" if name else f"{source.stem}.png"
        plan.append(PlannedImage(name, z, output_path(out, filename, "output image name")))
    return plan


def plan_tiles(decoder: Any, plan: Sequence[PlannedImage], tile: int | None,
               budget: int | None) -> list[PlannedImage]:
    """Each image's tile (``tile``, or what ``budget`` bytes allow), all chosen before the first image is written:
    a --max-memory too small for the third image must not leave the first two written."""
    return [replace(item, tile=tile or (choose_tile(decoder, *item.latent.shape[-2:], budget) if budget else None))
            for item in plan]


def decode_one(decoder: Any, z: torch.Tensor, tile: int | None) -> torch.Tensor:
    """(3, H, W) image of one (C, h, w) latent, decoded in tiles of ``tile`` latent pixels (None: whole)."""
    from ..runtime.tiling import decode_tiled

    with torch.no_grad():
        image = decode_tiled(decoder, z[None], tile=tile) if tile else decoder(z[None])
    return image[0]


def write_images(decoder: Any, plan: Sequence[PlannedImage], spec: Any, *, progress: bool = True) -> list[Path]:
    """Decode and save every planned image in order; returns the paths written."""
    from tqdm import tqdm

    written: list[Path] = []
    for item in tqdm(plan, desc="decoding", unit="latent", disable=not progress):
        try:  # the decoder itself, or the conversion to pixels, refuses NaN
            image = decode_one(decoder, item.latent, item.tile)
            save_image(image, item.path)
        except NonFiniteOutputError as e:
            done = f"{len(written)} of {len(plan)} images were written before it" + (
                f" (the first: {written[0].name})" if written else "")
            raise NonFiniteOutputError(
                f"decoder '{describe_spec(spec)}' produced NaN or inf for latent '{item.name or item.path.stem}': "
                f"no picture is written for it nor for the latents after it; {done}. Check the decoder weights"
            ) from e
        written.append(item.path)
        if progress:
            # a latent within one tile is decoded whole (decode_tiled): "tiled" was printed all the same
            tiled = item.tile and max(item.latent.shape[-2:]) > item.tile
            how = f"tiled, {item.tile}x{item.tile} latent px tiles" if tiled else "untiled"
            tqdm.write(f"wrote {item.path} ({image.shape[-1]}x{image.shape[-2]}, {how})")
    return written


def decode_file(
    latents: str | os.PathLike,
    decoder: Any,
    out: str | os.PathLike,
    *,
    latent_space: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    random_weights: bool = False,
    channels_last: bool = True,
    max_memory: str | int | None = None,
    tile: int | None = None,
    vae_space: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Decode every latent of a .safetensors / .pt / .npy file to ``out/STEM_NAME.png``.

    ``max_memory`` (bytes, or text like ``2GB``) tiles the images whose decode would exceed it; ``tile``
    forces tiles of that many latent pixels. Every option, the output folder, every latent and every output
    name are checked before any image is written.
    """
    if tile is not None and max_memory is not None:  # --tile won and --max-memory went unchecked, without a word
        raise UsageError("--tile and --max-memory both choose how images are tiled: give --max-memory to have the "
                         "tile chosen for the budget, or --tile to set it")
    budget = parse_bytes(max_memory) if max_memory is not None else None
    if tile is not None and tile < 1:
        raise UsageError(f"--tile must be at least 1 latent pixel, got {tile}")
    check_device(device)
    with output_folder(out) as folder:  # a refused run leaves no empty --out behind
        source = Path(latents)
        named = read_latents(source)
        model = build_decoder(decoder, latent_space=latent_space, device=device, dtype=dtype,
                              random_weights=random_weights, channels_last=channels_last)
        require_image_decoder(model, decoder, "decode")
        check_all_latents(named, model, source)
        plan = plan_tiles(model, plan_images(named, model, folder, source, vae_space), tile, budget)
        return write_images(model, plan, decoder, progress=progress)

"""``fastdec decode``: latents in a file -> PNGs, tiled automatically when an image would exceed a memory budget."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoints import atomic_write

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


# measured: tae-64 at 87x87-latent tiles peaked at ~1580 B/px of RSS against 768 B/px of live tensors
_RUNTIME_OVERHEAD = 2.25


class DecodeError(ValueError):
    pass


def parse_bytes(text: str) -> int:
    """'2GB', '512MB', '1.5G', '1000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise DecodeError(f"cannot read memory size '{text}': write it like 2GB, 512MB or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def load_latents(path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """(name, latent (C, h, w)) for every latent in a .safetensors / .pt / .npy file (3-D or batched 4-D)."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"no latents file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        items: list[tuple[str, Any]] = list(load_file(str(path)).items())
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            items = [(str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(obj)]
        else:
            items = [("", obj)]
    elif suffix == ".npy":
        import numpy as np

        items = [("", torch.from_numpy(np.load(path)))]
    else:
        raise DecodeError(f"unsupported latents file '{path.name}': use .safetensors, .pt or .npy")
    latents: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise DecodeError(f"'{key}' in {path.name} is a {type(value).__name__}, not a tensor")
        if value.ndim == 3:
            latents.append((key, value))
        elif value.ndim == 4:
            latents += [(f"{key}_{i}" if key else str(i), v) for i, v in enumerate(value)] if len(value) > 1 \
                else [(key, value[0])]
        else:
            raise DecodeError(f"latent '{key or path.name}' has shape {tuple(value.shape)}: expected (C, h, w) or (N, C, h, w)")
    if not latents:
        raise DecodeError(f"{path} holds no tensors")
    return latents


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
    from .tiling import measure_receptive_field

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
            f"--max-memory {budget / 2**20:.0f}MB is too small for this {h * factor}x{w * factor} image: it needs at "
            f"least {(output_bytes + per_pixel * ((2 * overlap + 8) * factor) ** 2) / 2**20:.0f}MB (output image plus "
            f"one {2 * overlap + 8}-latent-pixel tile)"
        )
    return tile


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), suffix=".png")


def _cmd_decode(args: argparse.Namespace) -> int:
    try:
        return _decode_file(args)
    except DecodeError as e:
        print(f"error: {e}")
        return 2


def _decode_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .export import _load_any_decoder
    from .runtime import parse_dtype, to_channels_last
    from .tiling import decode_tiled

    budget = parse_bytes(args.max_memory) if args.max_memory else None
    latents = load_latents(args.latents)
    decoder = _load_any_decoder(args.decoder, args.latent_space).eval()
    decoder.to(device=args.device, dtype=parse_dtype(args.dtype) or torch.float32)
    if args.channels_last:
        to_channels_last(decoder)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.latents).stem
    for name, z in tqdm(latents, desc="decoding", unit="latent", disable=args.quiet):
        if args.vae_space:
            z = decoder.latent_space.vae_to_decoder(z[None])[0]
        h, w = z.shape[-2:]
        tile = args.tile or (choose_tile(decoder, h, w, budget) if budget else None)
        with torch.no_grad():
            image = decode_tiled(decoder, z[None], tile=tile) if tile else decoder(z[None])
        path = out_dir / (f"{stem}_{name}.png" if name else f"{stem}.png")
        _save_png(image[0], path)
        if not args.quiet:
            how = f"tiled, {tile}x{tile} latent px tiles" if tile else "untiled"
            tqdm.write(f"wrote {path} ({image.shape[-1]}x{image.shape[-2]}, {how})")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("decode", help="decode latents in a file to PNGs",
                              description="Decode the latents in a .safetensors/.pt/.npy file (one or a batch) to PNGs.")
    p.add_argument("latents", help="latents file: .safetensors (every tensor), .pt (tensor, list or dict) or .npy; "
                                   "each tensor (C, h, w) or (N, C, h, w), decoder space unless --vae-space")
    p.add_argument("--decoder", required=True, help="decoder checkpoint or preset name (presets have random weights)")
    p.add_argument("--latent-space", default=None, help="latent space, when the checkpoint does not record it")
    p.add_argument("--out", required=True, help="output folder for the PNGs (written atomically)")
    p.add_argument("--max-memory", default=None,
                   help="activation memory budget, e.g. 2GB: images that would exceed it are decoded in tiles")
    p.add_argument("--tile", type=int, default=None, help="force tiling with this tile size (latent pixels)")
    p.add_argument("--dtype", default="fp32",
                   help="fp32, fp16 or bf16 (bf16 is several times faster on CPUs with AMX/AVX512-BF16)")
    from .runtime import add_channels_last_argument

    add_channels_last_argument(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-space", action="store_true",
                   help="latents are raw VAE latents (what vae.decode takes): convert them to decoder space first")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_decode)

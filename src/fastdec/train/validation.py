"""Validation during training: the held-out crops encoded once, PSNR/SSIM of the EMA decoder on them, the
teacher decoder's own score as the target to beat, and a PNG grid (original | teacher | student | 4x error)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ..io.files import atomic_write
from ..io.images import to_uint8
from ..models.base import LatentDecoder


def frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (N, T, ...) as frames (N*T, ...); images unchanged."""
    return x.flatten(0, 1) if x.ndim == 5 else x


@torch.no_grad()
def prepare_val_set(val_set, teacher, count: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Center crops of the first ``count`` files: their pixels, the teacher's latents and, when the teacher
    has a decoder, its decoding of them."""
    pixels = torch.stack([val_set.load(crop) for crop in val_set.center_crops(count)])
    flat = torch.cat([teacher.encode(x).cpu() for x in frames(pixels).split(batch_size)])  # frame by frame
    val = {"pixels": pixels, "latents": flat.view(*pixels.shape[:-3], *flat.shape[1:])}
    if teacher.has_decoder:
        decoded = torch.cat([teacher.decode(z).cpu() for z in flat.split(batch_size)])
        val["teacher"] = decoded.view(pixels.shape)
    return val


def teacher_scores(val: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR/SSIM of the teacher's own decoder on the validation crops: what the student aims for."""
    from ..eval.metrics import psnr, ssim

    target, decoded = frames(val["pixels"]), frames(val["teacher"])
    return {"teacher_val_psnr": float(psnr(decoded, target).mean()),
            "teacher_val_ssim": float(ssim(decoded, target).mean())}


def error_grid(rows: list[list[torch.Tensor]]) -> bytes:
    """PNG of rows of (3, H, W) images in [0, 1]."""
    from PIL import Image

    tiles = torch.cat([torch.cat(row, dim=-1) for row in rows], dim=-2)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(tiles.clamp(0, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


def _grid_rows(pred: torch.Tensor, val: dict[str, torch.Tensor], count: int = 4) -> list[list[torch.Tensor]]:
    target = frames(val["pixels"])
    teacher = frames(val["teacher"]) if "teacher" in val else None
    rows = []
    for i in range(min(count, len(pred))):
        row = [target[i]] + ([teacher[i]] if teacher is not None else [])
        rows.append(row + [pred[i], ((pred[i] - target[i]).abs() * 4).clamp(0, 1)])
    return rows


@torch.no_grad()
def validate(decoder: LatentDecoder, val: dict[str, torch.Tensor], grid_path: Path | None,
             batch_size: int) -> dict[str, float]:
    """PSNR/SSIM of ``decoder`` on the validation crops; the grid PNG is written to ``grid_path`` (if given)."""
    from ..eval.metrics import psnr, ssim

    decoder.eval()  # a decoder whose output is NaN (a diverged run) raises NonFiniteOutputError: no score, no grid
    pred = frames(torch.cat([decoder(z).float().cpu() for z in val["latents"].split(batch_size)]))
    target = frames(val["pixels"])
    result = {"val_psnr": float(psnr(pred, target).mean()), "val_ssim": float(ssim(pred, target).mean())}
    if grid_path is not None:
        png = error_grid(_grid_rows(pred, val))
        atomic_write(grid_path, lambda tmp: Path(tmp).write_bytes(png), suffix=".png")
    return result

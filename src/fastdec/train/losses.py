"""Distillation losses: pixel (L1/MSE), 1 - MS-SSIM, LPIPS (local weights), teacher matching,
temporal consistency for video, and a hinge GAN with a small patch discriminator."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LossConfigError, MetricUnavailable, NonFiniteOutputError
from ..eval.metrics import SSIM_KERNEL

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in torchmetrics


@dataclass
class LossWeights:
    l1: float = 1.0
    mse: float = 0.0
    ms_ssim: float = 0.0
    lpips: float = 0.0
    teacher: float = 0.0      # match the teacher decoder's output instead of (in addition to) the pixels
    temporal: float = 0.0     # video: match frame-to-frame differences
    adversarial: float = 0.0


def ms_ssim_scales(size: int, kernel_size: int = SSIM_KERNEL) -> int:
    """How many MS-SSIM scales fit an image side: the window must fit after each halving (max 5)."""
    scales = 0
    while scales < 5 and (kernel_size - 1) * 2 ** scales + 1 <= size:
        scales += 1
    return scales


def ms_ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM (torchmetrics), with as many of the standard 5 scales as the crop size allows."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    scales = ms_ssim_scales(min(pred.shape[-2:]))
    if scales < 2:
        raise LossConfigError(f"MS-SSIM needs crops of at least {2 * (SSIM_KERNEL - 1) + 1} px, got "
                              f"{tuple(pred.shape[-2:])}: raise --resolution or drop --ms-ssim")
    # MS-SSIM multiplies per-scale contrast terms, which is unstable in low precision
    value = multiscale_structural_similarity_index_measure(
        pred.float(), target.float(), data_range=1.0, kernel_size=SSIM_KERNEL, betas=MS_SSIM_BETAS[:scales],
        normalize="relu",
    )
    return 1 - value


def load_lpips(weights: str | Path | None, device: torch.device | str = "cpu") -> nn.Module:
    """The LPIPS network (torchmetrics) with a local torchvision backbone; frozen, gradients flow to inputs.

    torchmetrics would download the backbone by itself; this never does. No weights = a clear error.
    """
    from ..eval.metrics import LPIPS

    if not weights:
        raise LossConfigError(
            "the LPIPS loss needs local backbone weights: pass --lpips-weights PATH to torchvision's AlexNet "
            "ImageNet weights (alexnet-owt-7be5be79.pth, downloaded on a connected machine), or drop --lpips"
        )
    try:
        model = LPIPS(weights, net="alex", device=device).model
    except MetricUnavailable as e:
        raise LossConfigError(str(e)) from e
    return model.eval().requires_grad_(False)


def temporal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between frame-to-frame differences of (N, T, 3, H, W) clips: penalises flicker the
    per-frame losses cannot see (a constant per-frame error gives zero)."""
    if pred.ndim != 5 or pred.shape[1] < 2:
        raise LossConfigError("the temporal loss needs clips of at least 2 frames (--frames >= 2, a video decoder)")
    return F.l1_loss(pred[:, 1:] - pred[:, :-1], target[:, 1:] - target[:, :-1])


class DistillLoss(nn.Module):
    """Weighted sum of the reconstruction losses. ``forward`` returns (total, {name: value})."""

    def __init__(self, weights: LossWeights, lpips_weights: str | Path | None = None):
        super().__init__()
        self.weights = weights
        self.lpips = load_lpips(lpips_weights) if weights.lpips > 0 else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                teacher_out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        video = pred.ndim == 5
        frames_pred = pred.flatten(0, 1) if video else pred
        frames_target = target.flatten(0, 1) if video else target
        parts: dict[str, torch.Tensor] = {}
        if w.l1:
            parts["l1"] = F.l1_loss(frames_pred, frames_target)
        if w.mse:
            parts["mse"] = F.mse_loss(frames_pred, frames_target)
        if w.ms_ssim:
            parts["ms_ssim"] = ms_ssim_loss(frames_pred, frames_target)
        if w.lpips:
            self.lpips.to(pred.device)
            parts["lpips"] = self.lpips(frames_pred.float() * 2 - 1, frames_target.float() * 2 - 1).mean()
        if w.teacher:
            if teacher_out is None:
                raise LossConfigError("the teacher-matching loss needs a teacher with a decoder")
            parts["teacher"] = F.l1_loss(pred, teacher_out)
        if w.temporal:
            parts["temporal"] = temporal_loss(pred, target)
        total = sum(getattr(w, name) * value for name, value in parts.items())
        values = {name: float(value.detach()) for name, value in parts.items()}
        if not all(math.isfinite(v) for v in values.values()):
            # stop before the optimizer spreads it into every weight and a NaN decoder is exported
            terms = ", ".join(f"{name} {value}" for name, value in values.items())
            raise NonFiniteOutputError(
                f"the student decoder's output gives a non-finite loss ({terms}): its weights hold NaN or inf (check "
                "the --decoder / --init checkpoint) or training diverged (lower --lr, or --mixed-precision no); "
                "nothing is exported"
            )
        return total, values


# ----------------------------------------------------------------------------- adversarial
class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided convs -> a map of real/fake logits, one per ~30 px patch."""

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1),
                       nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2)]
            channels *= 2
        blocks.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 5:
            images = images.flatten(0, 1)
        return self.net(images * 2 - 1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


__all__ = ["MS_SSIM_BETAS", "DistillLoss", "LossConfigError", "LossWeights", "PatchDiscriminator", "hinge_d_loss",
           "hinge_g_loss", "load_lpips", "ms_ssim_loss", "ms_ssim_scales", "temporal_loss"]

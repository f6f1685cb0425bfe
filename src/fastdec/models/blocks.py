"""Layers shared by the decoder families.

Every decoder in fastdec is assembled from these few pieces, so that fixes
(precision, memory format, receptive field) land in one place.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def conv1x1(n_in: int, n_out: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to [-3, 3] (TAESD): keeps outliers from blowing up the first conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class GroupNormBranch(nn.Sequential):
    """TAEF2's mid-block branch: 1x1 expand, GroupNorm (image-wide statistics), ReLU, 1x1 project.

    It gives the low-resolution blocks a view of global colour/brightness
    that 3x3 convs alone cannot see.
    """

    def __init__(self, channels: int, expansion: int = 4, groups: int = 4):
        hidden = channels * expansion
        super().__init__(
            conv1x1(channels, hidden),
            nn.GroupNorm(groups, hidden),
            nn.ReLU(inplace=True),
            conv1x1(hidden, channels),
        )


class ResBlock(nn.Module):
    """TAESD's residual block: three 3x3 convs, 1x1 skip when widths differ, ReLU after the sum.

    Attribute names (conv, skip, fuse, pool) match the original TAESD
    state dicts so their weights load strictly.
    """

    def __init__(self, n_in: int, n_out: int, use_gn_branch: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out)
        )
        self.skip = conv1x1(n_in, n_out) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = GroupNormBranch(n_in) if use_gn_branch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast (meta, used for FLOP counting)
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


class PixelRMSNorm(nn.Module):
    """RMS norm over the channels of each pixel, with affine weight and bias (DC-AE's ``trms2d``).

    The EfficientViT blocks use it instead of GroupNorm: GroupNorm(1, C) pools
    statistics over the whole image, so a pixel's value would depend on image
    size, content far away and tiling. Statistics are taken in fp32 because
    squares of fp16 activations overflow above 256.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.square().mean(1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)


class ReLULinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention, residual: x + attention(x).

    Per head, softmax(QK^T)V is replaced by relu(Q) (relu(K)^T V) / (relu(Q) relu(K)^T 1):
    the (d x d) matrix relu(K)^T V is summed over all pixels once, so cost and
    memory are linear in the number of pixels and every output pixel sees the
    whole image. Multi-scale: Q/K/V are also aggregated over k x k
    neighbourhoods (depthwise conv, then a per-head 1x1 mix) for each k in
    ``scales``; each scale adds its own set of heads.
    """

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,), eps: float = 1e-15):
        super().__init__()
        if channels % head_dim:
            raise UsageError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        if any(k < 1 or k % 2 == 0 for k in scales):
            raise UsageError(f"attention scales must be odd kernel sizes >= 1, got {tuple(scales)}")
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = conv1x1(channels, 3 * channels)
        self.aggregate = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * channels, 3 * channels, k, padding=k // 2, groups=3 * channels, bias=False),
                nn.Conv2d(3 * channels, 3 * channels, 1, groups=3 * channels // head_dim, bias=False),
            )
            for k in scales
        )
        self.proj = nn.Sequential(conv1x1(channels * (1 + len(scales)), channels), PixelRMSNorm(channels))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, heads*3*d, h, w), each head's channels ordered q, k, v -> (N, heads*d, h, w)."""
        n, _, h, w = qkv.shape
        # The sums over all pixels overflow fp16 (and lose bits in bf16): compute in fp32, also under
        # autocast, which would otherwise run the matmuls in half precision whatever their input dtype.
        with _autocast_off(qkv.device.type):
            q, k, v = qkv.float().reshape(n, -1, 3 * self.head_dim, h * w).chunk(3, dim=2)
            q, k = F.relu(q), F.relu(k)
            kv = k @ v.transpose(-1, -2)  # (N, heads, d, d): sum over pixels of k_i v_j
            num = kv.transpose(-1, -2) @ q  # (N, heads, d, hw)
            den = k.sum(-1, keepdim=True).transpose(-1, -2) @ q  # (N, heads, 1, hw)
            out = num / (den + self.eps)
        return out.to(qkv.dtype).reshape(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        heads = [self.attend(qkv)] + [self.attend(agg(qkv)) for agg in self.aggregate]
        return x + self.proj(torch.cat(heads, dim=1))


class GLUMBConv(nn.Module):
    """Gated inverted-residual conv (EfficientViT / DC-AE), residual: 1x1 expand to 2 x hidden, SiLU,
    depthwise 3x3, split into value and gate, value * SiLU(gate), 1x1 project, per-pixel norm."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project = conv1x1(hidden, channels)
        self.norm = PixelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(F.silu(self.expand(x)))
        value, gate = h.chunk(2, dim=1)
        return x + self.norm(self.project(value * F.silu(gate)))

"""Layers shared by the decoder families.

Every decoder in fastdec is assembled from these few pieces, so that fixes
(precision, memory format, receptive field) land in one place.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class ReLULinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention.

    Cost is linear in the number of pixels: softmax(QK^T)V is replaced by
    relu(Q)(relu(K)^T V) / (relu(Q) relu(K)^T 1). Multi-scale: Q/K/V are also
    aggregated with depthwise convs of the given kernel sizes, which gives the
    attention a local neighbourhood at every scale.
    """

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,), eps: float = 1e-6):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
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
        self.proj = nn.Sequential(conv1x1(channels * (1 + len(scales)), channels), nn.GroupNorm(1, channels))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        n, _, h, w = qkv.shape
        qkv = qkv.reshape(n, -1, 3 * self.head_dim, h * w)
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        # Accumulate in fp32: the sums over all pixels overflow fp16 at high resolution.
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k @ v.transpose(-1, -2)  # (n, heads, d, d)
        num = kv.transpose(-1, -2) @ q  # (n, heads, d, hw)
        den = k.sum(-1, keepdim=True).transpose(-1, -2) @ q  # (n, heads, 1, hw)
        out = num / (den + self.eps)
        return out.to(dtype).reshape(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        outs = [self._attend(qkv)] + [self._attend(agg(qkv)) for agg in self.aggregate]
        return x + self.proj(torch.cat(outs, dim=1))


class GLUMBConv(nn.Module):
    """Gated inverted-residual conv (EfficientViT / DC-AE): 1x1 expand to 2x, depthwise 3x3, GLU gate, 1x1 project."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(F.silu(self.expand(x)))
        value, gate = h.chunk(2, dim=1)
        return x + self.norm(self.project(value * F.silu(gate)))

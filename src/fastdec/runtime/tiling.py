"""Tiled decoding with an overlap computed from the decoder's receptive field.

The receptive field is measured, not guessed: a copy of the decoder
(float32, so the convs are fast) gets strictly positive weights (so every ReLU is active and no path cancels),
and the gradient of one latent cell's output block with respect to the
latents is non-zero exactly on the latent pixels that output depends on.
The result depends only on the architecture, so it is cached per config.

Each output pixel is then taken from the one tile whose core contains it,
i.e. the tile where it is at least ``overlap`` latent pixels from any inner
tile border. With ``overlap >= receptive field`` every tile sees the same
inputs as the untiled decode, so the results match to floating point
tolerance. Decoders with image-wide statistics (GroupNorm, global attention)
have no finite receptive field: tiling them is approximate and says so.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import GlobalReceptiveFieldError, InputTypeError, UsageError

__all__ = ["ApproximateTilingWarning", "GlobalReceptiveFieldError", "ReceptiveField", "decode_tiled",
           "measure_receptive_field", "receptive_field", "tile_count"]


class ApproximateTilingWarning(UserWarning):
    """Tiling a decoder with a global receptive field: tiles differ from the untiled decode."""


@dataclass(frozen=True)
class ReceptiveField:
    radius: int                 # latent pixels on each side an output pixel depends on (local part)
    is_global: bool             # some layer uses image-wide statistics
    global_layers: tuple[str, ...] = ()  # the layers that do (for the message)
    local_radius_known: bool = True      # False when the local part could not be isolated (attention)


_CACHE: dict[str, ReceptiveField] = {}
_PROBE_LENGTHS = (48, 96)  # latent pixels; a local field reaching the border of the longest is treated as global


def _torch_decoder(decoder: Any) -> nn.Module:
    # optimize() wraps; unwrap to probe the eager module
    inner = getattr(decoder, "decoder", None)
    return inner if isinstance(inner, nn.Module) else decoder


def _check_is_decoder(decoder: Any, doing: str) -> None:
    if not hasattr(_torch_decoder(decoder), "decode_layers"):  # a LatentDecoder, optimize()d or not, or an OnnxDecoder
        raise InputTypeError(f"{doing} {type(decoder).__name__}: expected a fastdec decoder (create_decoder, "
                             "load_decoder, fastdec.optimize or OnnxDecoder)")


def _cache_key(decoder: nn.Module) -> str:
    config = decoder.config_dict() if hasattr(decoder, "config_dict") else repr(getattr(decoder, "config", ""))
    factor = getattr(decoder, "upsample_factor", None)
    return json.dumps([type(decoder).__module__, type(decoder).__qualname__, config, factor], sort_keys=True, default=str)


def _global_layer_names(decoder: nn.Module) -> tuple[str, ...]:
    names = []
    for name, module in decoder.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) or "attention" in type(module).__name__.lower():
            names.append(f"{name} ({type(module).__name__})")
    return tuple(names)


class _DetachedStatsGroupNorm(nn.Module):
    """GroupNorm whose mean/std carry no gradient: isolates the local path of a GroupNorm layer for the probe."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.norm.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True).detach()
        std = (grouped.var(-1, unbiased=False, keepdim=True) + self.norm.eps).sqrt().detach()
        y = ((grouped - mean) / std).reshape_as(x)
        if self.norm.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * self.norm.weight.reshape(shape) + self.norm.bias.reshape(shape)
        return y


def _positive_probe_copy(decoder: nn.Module, detach_norm_stats: bool) -> nn.Module:
    probe = copy.deepcopy(decoder).to(device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        for module in probe.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)):
                    # a small positive scale and a large shift keep normalised activations positive (ReLUs active)
                    p.fill_(0.01 if name == "weight" else 1.0)
                elif p.ndim >= 2:
                    # taps of 1/(in_channels * sqrt(kernel area)): a 3x3 layer multiplies the centre by ~3 and a
                    # single far path by ~1/3, so both stay inside float32 for ~70 layers (no overflow, and far
                    # dependencies never underflow to an exact 0); 1x1 layers keep the scale
                    area = p[0, 0].numel()
                    p.fill_(1.0 / (p.shape[1] * area ** 0.5))
                else:
                    p.fill_(0.1)
    if detach_norm_stats:
        for parent in list(probe.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(parent, child_name, _DetachedStatsGroupNorm(child))
    return probe


_STRIP = 4  # latent pixels across a probe strip: radii are measured along one axis at a time, at a fraction of the cost


def _axis_radius(probe: nn.Module, length: int, axis: int) -> tuple[int, bool]:
    """(how far along ``axis`` (2 rows, 3 cols) the centre cell's output reaches, whether it hit the probe border)."""
    factor = probe.upsample_factor
    shape = [1, probe.latent_channels, _STRIP, _STRIP]
    shape[axis] = length
    generator = torch.Generator().manual_seed(0)
    # positive inputs away from zero: every activation stays positive, so no ReLU hides a dependency
    z = (torch.rand(*shape, generator=generator, dtype=torch.float32) + 0.5).requires_grad_(True)
    out = probe.decode_layers(z)
    c, s = length // 2, _STRIP // 2
    cy, cx = (c, s) if axis == 2 else (s, c)
    # all f x f pixels of latent cell (cy, cx): with a non-negative Jacobian the support of the sum is their union
    out[..., cy * factor:(cy + 1) * factor, cx * factor:(cx + 1) * factor].sum().backward()
    grad = z.grad[0].abs().sum(0).sum(1 if axis == 2 else 0)  # profile along the probed axis
    where = (grad != 0).nonzero().flatten()
    radius = int((where - c).abs().max())
    return radius, bool(where.min() == 0 or where.max() == length - 1)


def _probe(decoder: nn.Module, detach_norm_stats: bool, lengths: tuple[int, ...]) -> tuple[int, bool, int]:
    """(radius, reached the border of the longest probe, probe length used)."""
    # the probe differentiates: it must work when called under no_grad / inference_mode (e.g. an export there)
    with torch.inference_mode(False), torch.enable_grad():
        probe = _positive_probe_copy(decoder, detach_norm_stats)
        radius, touches, used = 0, True, lengths[0]
        for length in lengths:
            used = length
            rows, touches_rows = _axis_radius(probe, length, axis=2)
            cols, touches_cols = _axis_radius(probe, length, axis=3)
            radius, touches = max(rows, cols), touches_rows or touches_cols
            if not touches:
                break
    return radius, touches, used


def measure_receptive_field(decoder: Any) -> ReceptiveField:
    """Measure (once per architecture + config) how far an output pixel looks into the latents."""
    stored = getattr(decoder, "receptive_field_info", None)  # ONNX decoders carry it from export time
    if isinstance(stored, ReceptiveField):
        return stored
    decoder = _torch_decoder(decoder)
    if getattr(decoder, "is_video", False):
        raise UsageError("tiling supports image decoders; decode video latents frame-chunk by chunk with a video decoder")
    _check_is_decoder(decoder, "cannot measure the receptive field of")
    key = _cache_key(decoder)
    if key not in _CACHE:
        radius, unbounded, length = _probe(decoder, False, _PROBE_LENGTHS[:1])
        field = ReceptiveField(radius, False)
        attention = [n for n in _global_layer_names(decoder) if "attention" in n.lower()]
        if unbounded and attention:
            # attention mixes the whole image and has no local path to isolate: no further probing helps
            field = ReceptiveField(radius, True, _global_layer_names(decoder), False)
        elif unbounded:
            # either a large local field or image-wide mixing: measure the local (conv) path with GroupNorm
            # statistics detached, then check whether the real module reaches further at that probe length
            local_radius, local_unbounded, length = _probe(decoder, True, _PROBE_LENGTHS)
            if not local_unbounded:
                _, unbounded, _ = _probe(decoder, False, (length,))
            field = ReceptiveField(local_radius, unbounded, _global_layer_names(decoder) if unbounded else (),
                                   not local_unbounded)
        _CACHE[key] = field
    return _CACHE[key]


def receptive_field(decoder: Any) -> int:
    """Receptive-field radius in latent pixels: output pixels depend on latents at most this far from their own cell.

    Raises :class:`GlobalReceptiveFieldError` when the decoder uses image-wide
    statistics (GroupNorm branches as in TAEF2, global attention), where no
    finite radius exists.
    """
    field = measure_receptive_field(decoder)
    if field.is_global:
        raise GlobalReceptiveFieldError(_global_message(decoder, field))
    return field.radius


def _global_message(decoder: Any, field: ReceptiveField) -> str:
    layers = ", ".join(field.global_layers[:4]) + (" ..." if len(field.global_layers) > 4 else "")
    local = f"its convolutions reach {field.radius} latent pixels" if field.local_radius_known else \
        "its local part could not be isolated"
    return (
        f"{type(_torch_decoder(decoder)).__name__} has a global receptive field (image-wide statistics in {layers or 'some layer'}): "
        f"every output pixel depends on the whole latent, so tiled decoding is approximate (each tile normalises over "
        f"itself; {local}). Decode untiled if memory allows, or use larger tiles to make the difference smaller."
    )


def _starts(length: int, core: int) -> list[int]:
    return list(range(0, length, core))


def _overlap_for(decoder: Any, tile: int, overlap: int | None) -> int:
    """The overlap to use: the given one, else the measured receptive field (warning when it is not exact)."""
    if overlap is not None:
        return overlap
    field = measure_receptive_field(decoder)
    if field.is_global:
        warnings.warn(_global_message(decoder, field), ApproximateTilingWarning, stacklevel=3)
    return field.radius if field.local_radius_known else max(1, tile // 4)


def _check_tile(tile: int, overlap: int) -> int:
    """The core (pixels each tile keeps of its own) of a ``tile`` with ``overlap``, or a UsageError."""
    if tile < 1:
        raise UsageError(f"tile must be >= 1 latent pixel, got {tile}")
    if overlap < 0:
        raise UsageError(f"overlap must be >= 0, got {overlap}")
    core = tile - 2 * overlap
    if core < 1:
        raise UsageError(
            f"tile ({tile}) must be larger than 2 x overlap ({overlap}) latent pixels so each tile keeps some "
            f"pixels of its own: use tile >= {2 * overlap + 8}"
        )
    return core


def decode_tiled(decoder: Any, z: torch.Tensor, tile: int = 64, overlap: int | None = None) -> torch.Tensor:
    """Decode latents (N, C, h, w) in tiles of at most ``tile`` x ``tile`` latent pixels.

    ``overlap`` (latent pixels of context each tile gets beyond its own region)
    defaults to the measured receptive field, which makes the result equal the
    untiled decode; peak activation memory is that of one tile. Decoders with
    global statistics are tiled approximately with an :class:`ApproximateTilingWarning`.
    Latents that require grad (guidance through the decoder) get their gradient as untiled: every tile's
    graph is then kept, so memory grows with the image; other latents decode each tile without autograd.
    """
    if not isinstance(z, torch.Tensor):
        raise InputTypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
    _check_is_decoder(decoder, "decode_tiled cannot decode with")  # with overlap= given: AttributeError
    if getattr(_torch_decoder(decoder), "is_video", False):
        raise UsageError("decode_tiled supports image decoders (N, C, h, w); video decoders take (N, T, C, h, w)")
    if z.ndim != 4:
        # let the decoder's own check produce its usual, specific message
        return decoder(z)
    for name, value in (("tile", tile), ("overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputTypeError(f"{name} must be a whole number of latent pixels, got {value!r}")
    check = getattr(_torch_decoder(decoder), "check_latents", None)
    if check is not None:
        check(z)  # bad latents (channels, dtype, NaN) are named as such, not as a tile that does not fit
    overlap = _overlap_for(decoder, tile, overlap)
    core = _check_tile(tile, overlap)
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decoder(z)
    return _decode_tiles(decoder, z, core, overlap)


def _decode_tiles(decoder: Any, z: torch.Tensor, core: int, overlap: int) -> torch.Tensor:
    """Each tile decodes its ``core`` plus ``overlap`` of context and keeps only the core's pixels."""
    n, _, h, w = z.shape
    factor = int(getattr(decoder, "upsample_factor"))
    # no_grad keeps one tile's activations at a time; latents that ask for a gradient lost it silently
    keep_graph = torch.is_grad_enabled() and z.requires_grad
    out: torch.Tensor | None = None
    for top in _starts(h, core):
        bottom = min(top + core, h)
        y0, y1 = max(0, top - overlap), min(h, bottom + overlap)
        for left in _starts(w, core):
            right = min(left + core, w)
            x0, x1 = max(0, left - overlap), min(w, right + overlap)
            with torch.set_grad_enabled(keep_graph):
                piece = decoder(z[:, :, y0:y1, x0:x1])
            if out is None:
                out = piece.new_empty(n, piece.shape[1], h * factor, w * factor)
            out[:, :, top * factor:bottom * factor, left * factor:right * factor] = piece[
                :, :, (top - y0) * factor:(bottom - y0) * factor, (left - x0) * factor:(right - x0) * factor
            ]
            del piece
    assert out is not None
    return out


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
    """How many tiles decode_tiled uses for an (h, w) latent."""
    if h <= tile and w <= tile:
        return 1
    core = tile - 2 * overlap
    return math.ceil(h / core) * math.ceil(w / core)

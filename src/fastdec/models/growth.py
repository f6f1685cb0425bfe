"""Growing a trained TAE decoder into a wider and/or deeper one that starts with the same output.

``grow(decoder, target)`` builds ``target`` (a preset name, a config or a decoder) and copies ``decoder``'s
weights into it so that, before any training, the grown decoder decodes exactly as the source does:

* **wider stages**: every new channel gets fresh incoming weights (the target's own initialisation) and zero
  outgoing weights, so the old channels compute what they computed before and the new ones add nothing;
* **TAEF2's GroupNorm branch** (stage 0): its hidden channels are normalised per group, and a new channel in a
  group would change that group's mean and variance. So a wider GroupNorm stage must be an integer multiple of
  the source's width; each group then holds whole copies of its source group (same statistics) and only the
  first copy keeps the outgoing weights. A branch the source lacks starts with its output conv at zero;
* **more blocks**: a new residual block is appended after the last block of its stage and starts as the
  identity: its last conv (and GroupNorm branch output) is zero and its input is post-ReLU, so
  ``ReLU(x + 0) = x``. (A stage without blocks in the source has the conv after an upsampling as input, which
  can be negative: blocks cannot be added there.)
* **a conv head grown into a pixel-shuffle head** is not function-preserving (the last stage then runs at half
  resolution): every shared layer is copied and the new head starts as the source's output conv repeated for
  each sub-pixel, i.e. near the source decoded at half resolution and upsampled. ``grow`` warns.

A target that is not a superset (a narrower stage, fewer blocks, no GroupNorm branch where the source has one,
another latent space) is refused with a :class:`NotASupersetError` naming what shrinks.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputTypeError, UsageError
from .base import LatentDecoder
from .registry import PRESETS, create_decoder
from .tae import PIXEL_SHUFFLE, TAEConfig, TAEDecoder


class NotASupersetError(UsageError):
    """A growth target that would drop something the source decoder has (width, blocks, a branch, its space)."""


# =============================================================================== channel maps
@dataclass(frozen=True)
class ChannelMap:
    """How the channels along one tensor dimension of the target relate to the source's.

    ``index[t]``: the source channel target channel ``t`` copies, -1 for a new channel. ``primary[t]``: whether
    ``t`` carries that source channel's outgoing weights (a duplicate does not: its outgoing weights are zero)."""

    index: torch.Tensor
    primary: torch.Tensor

    @classmethod
    def widen(cls, n_source: int, n_target: int) -> "ChannelMap":
        """The first ``n_source`` channels are the source's, the rest are new."""
        index = torch.arange(n_target)
        index[n_source:] = -1
        return cls(index, index >= 0)

    @classmethod
    def grouped(cls, n_source: int, n_target: int, groups: int) -> "ChannelMap":
        """GroupNorm channels: each target group holds whole copies of its source group (``n_target`` a multiple
        of ``n_source``), so the group's mean and variance are the source's."""
        source_group, target_group = n_source // groups, n_target // groups
        t = torch.arange(n_target)
        offset = t % target_group
        index = (t // target_group) * source_group + offset % source_group
        return cls(index, offset < source_group)

    @classmethod
    def sub_pixels(cls, n_source: int, factor: int) -> "ChannelMap":
        """A pixel-shuffle head's output channels: channel ``t`` is RGB channel ``t // factor**2`` at one
        sub-pixel, so each starts as a copy of the source's output conv for that colour."""
        return cls(torch.arange(n_source * factor**2) // factor**2, torch.ones(n_source * factor**2, dtype=torch.bool))


def _copy_into(target: torch.Tensor, source: torch.Tensor, rows: ChannelMap, cols: ChannelMap | None = None) -> None:
    """Overwrite the rows of ``target`` that copy a source channel; new rows keep their fresh values.

    ``cols`` (weights only): copied from the source for primary input channels, zero for new or duplicate ones
    (their outgoing weights)."""
    device = source.device
    keep = rows.index >= 0
    picked = source[rows.index[keep].to(device)]
    if cols is not None:
        primary = cols.primary.to(device).view(1, -1, *([1] * (source.ndim - 2)))
        picked = torch.where(primary, picked[:, cols.index.clamp(min=0).to(device)], picked.new_zeros(()))
    target[keep.to(target.device)] = picked.to(target.dtype)


def _copy_conv(target: nn.Conv2d, source: nn.Conv2d, rows: ChannelMap, cols: ChannelMap) -> None:
    _copy_into(target.weight, source.weight, rows, cols)
    if target.bias is not None:
        _copy_into(target.bias, source.bias, rows)


# =============================================================================== layer roles
def layer_roles(config: TAEConfig) -> list[tuple | None]:
    """What each entry of ``tae_layers(config)`` is, in order: ("stem",), ("block", stage, j), ("conv", stage)
    (the conv after stage's upsampling), ("out",); None for parameterless layers. The final blocks are stage
    ``len(stage_blocks)`` (the final stage)."""
    roles: list[tuple | None] = [None, ("stem",), None]
    for stage, n_blocks in enumerate(config.stage_blocks):
        roles += [("block", stage, j) for j in range(n_blocks)] + [None, ("conv", stage)]
    roles += [("block", len(config.stage_blocks), j) for j in range(config.final_blocks)] + [("out",)]
    if config.head == "pixel_shuffle":
        roles.append(None)
    return roles


def _check_roles(decoder: TAEDecoder) -> list[tuple | None]:
    """The roles of ``decoder``'s layers, checked against its modules (a guard that they follow tae_layers)."""
    roles = layer_roles(decoder.config)
    has_weights = [any(True for _ in layer.parameters()) for layer in decoder.layers]
    if len(roles) != len(has_weights) or any((r is not None) != w for r, w in zip(roles, has_weights)):
        raise InputTypeError(f"{type(decoder).__name__}'s layers do not follow the TAE layout of its config: "
                             "grow works on decoders built by fastdec (TAEDecoder)")
    return roles


# =============================================================================== the superset rule
def _stage_name(stage: int, config: TAEConfig) -> str:
    return "the final stage" if stage == len(config.stage_blocks) else f"stage {stage}"


def _block_counts(config: TAEConfig) -> tuple[int, ...]:
    return config.stage_blocks + (config.final_blocks,)


def _space_problems(source: LatentDecoder, target: LatentDecoder) -> list[str]:
    s, t = source.latent_space, target.latent_space
    if (s.name, s.channels, s.spatial_factor) != (t.name, t.channels, t.spatial_factor):
        return [f"the latent space changes from '{s.name}' ({s.channels} channels, x{s.spatial_factor}) to "
                f"'{t.name}' ({t.channels} channels, x{t.spatial_factor})"]
    return []


def _stage_problems(src: TAEConfig, tgt: TAEConfig) -> list[str]:
    problems = []
    zipped = zip(src.stage_widths, tgt.stage_widths, _block_counts(src), _block_counts(tgt))
    for stage, (w_src, w_tgt, n_src, n_tgt) in enumerate(zipped):
        name = _stage_name(stage, src)
        if w_tgt < w_src:
            problems.append(f"{name} narrows from width {w_src} to {w_tgt}")
        if n_tgt < n_src:
            problems.append(f"{name} drops from {n_src} to {n_tgt} blocks")
        if n_src == 0 < n_tgt and stage > 0:
            problems.append(f"{name} has no blocks in the source: a new block there would take the conv after the "
                            "upsampling as input (not post-ReLU), so it cannot start as the identity")
        if stage == 0 and src.use_midblock_gn and w_tgt > w_src and w_tgt % w_src:
            problems.append(f"stage 0 holds TAEF2's GroupNorm branch: its width can only grow by an integer factor "
                            f"(GroupNorm statistics must stay equal), {w_src} -> {w_tgt} is not one")
    return problems


def superset_problems(source: LatentDecoder, target: LatentDecoder) -> list[str]:
    """Why ``target`` cannot start equal to ``source`` (empty: it is a superset). Both TAE image decoders."""
    src, tgt = source.config, target.config
    problems = _space_problems(source, target)
    if len(src.stage_blocks) != len(tgt.stage_blocks):
        problems.append(f"the number of stages changes from {len(src.stage_blocks)} to {len(tgt.stage_blocks)}")
        return problems
    problems += _stage_problems(src, tgt)
    if src.use_midblock_gn and not tgt.use_midblock_gn:
        problems.append("the target drops TAEF2's GroupNorm branch (use_midblock_gn)")
    if src.head == "pixel_shuffle" and tgt.head == "conv":
        problems.append("the pixel-shuffle head would become a conv head")
    return problems


def growth_changes(source: LatentDecoder, target: LatentDecoder) -> list[str]:
    """What growing ``source`` into ``target`` adds, in words (for logs): one entry per change."""
    src, tgt = source.config, target.config
    changes = []
    zipped = zip(src.stage_widths, tgt.stage_widths, _block_counts(src), _block_counts(tgt))
    for stage, (w_src, w_tgt, n_src, n_tgt) in enumerate(zipped):
        name = _stage_name(stage, src)
        if w_tgt != w_src:
            changes.append(f"{name} width {w_src} -> {w_tgt}")
        if n_tgt != n_src:
            changes.append(f"{name} {n_src} -> {n_tgt} blocks")
    if tgt.use_midblock_gn and not src.use_midblock_gn:
        changes.append("GroupNorm branch added (starts at zero)")
    if tgt.head != src.head:
        changes.append(f"head {src.head} -> {tgt.head} (not function-preserving)")
    return changes


# =============================================================================== building the target
def _target_decoder(source: TAEDecoder, target: Any) -> TAEDecoder:
    """A fresh decoder for ``target`` in the source's latent space (a decoder passed in is copied, not changed:
    its weights are the fresh ones the new channels start from)."""
    if isinstance(target, str):
        if target in PRESETS and PRESETS[target].architecture != "tae":
            raise InputTypeError(f"grow works within the TAE family; preset '{target}' is a "
                                 f"'{PRESETS[target].architecture}' decoder")
        target = create_decoder(target, source.latent_space)
    elif isinstance(target, dict):
        fields = {f.name for f in dataclasses.fields(TAEConfig)}
        unknown = sorted(set(target) - fields)
        if unknown:
            raise UsageError(f"grow's target config has unknown fields {unknown}; TAEConfig's are {sorted(fields)}")
        target = TAEDecoder(TAEConfig(**{"latent_channels": source.latent_channels, **target}), source.latent_space)
    elif isinstance(target, TAEConfig) and type(target) is TAEConfig:
        target = TAEDecoder(target, source.latent_space)
    elif isinstance(target, LatentDecoder):
        target = copy.deepcopy(target)
    else:
        raise InputTypeError(f"grow's target is a preset name, a TAEConfig (or dict of its fields) or a TAE decoder, "
                             f"got {type(target).__name__}")
    if type(target) is not TAEDecoder:
        raise InputTypeError(f"grow works within the TAE family of image decoders; the target is a "
                             f"{type(target).__name__} ('{target.architecture}')")
    return target.to(device=source.device, dtype=source.dtype)


def _check_source(decoder: Any) -> TAEDecoder:
    if type(decoder) is not TAEDecoder:
        architecture = getattr(decoder, "architecture", None)
        name = f"{type(decoder).__name__} '{architecture}'" if architecture else type(decoder).__name__
        # an optimize()d or exported TAE decoder reads as architecture 'tae', which grow seemed to refuse
        wrapped = "; an optimize()d or ONNX decoder: grow the torch decoder first, then optimize or export it" \
            if type(decoder).__name__ in ("OptimizedDecoder", "OnnxDecoder") else ""
        raise InputTypeError(f"grow needs a TAE image decoder (tae-64, TAEF2, a tae-* checkpoint), got {name}; "
                             f"for a video decoder, grow its image decoder and use from_image_decoder{wrapped}")
    return decoder


# =============================================================================== copying weights
def _width_maps(src: TAEConfig, tgt: TAEConfig) -> list[ChannelMap]:
    return [ChannelMap.widen(a, b) for a, b in zip(src.stage_widths, tgt.stage_widths)]


def _start_as_identity(block: nn.Module) -> None:
    """A new residual block: last conv (and GroupNorm branch output) at zero, so on post-ReLU input it is x."""
    nn.init.zeros_(block.conv[-1].weight)
    nn.init.zeros_(block.conv[-1].bias)
    if block.pool is not None:
        nn.init.zeros_(block.pool[-1].weight)


def _copy_branch(target: nn.Module, source: nn.Module | None, width: ChannelMap) -> None:
    """TAEF2's GroupNorm branch: hidden channels copied group by group; a branch the source lacks outputs zero."""
    if source is None:
        nn.init.zeros_(target[-1].weight)
        return
    norm = source[1]
    hidden = ChannelMap.grouped(norm.num_channels, target[1].num_channels, norm.num_groups)
    _copy_into(target[0].weight, source[0].weight, hidden, width)
    _copy_into(target[1].weight, norm.weight, hidden)
    _copy_into(target[1].bias, norm.bias, hidden)
    _copy_into(target[3].weight, source[3].weight, width, hidden)


def _copy_block(target: nn.Module, source: nn.Module, width: ChannelMap) -> None:
    for index in (0, 2, 4):
        _copy_conv(target.conv[index], source.conv[index], width, width)
    if target.pool is not None:
        _copy_branch(target.pool, source.pool, width)


def _out_rows(src: TAEConfig, tgt: TAEConfig) -> ChannelMap:
    if src.head == "conv" and tgt.head == "pixel_shuffle":
        return ChannelMap.sub_pixels(3, PIXEL_SHUFFLE)
    n = 3 * (PIXEL_SHUFFLE**2 if tgt.head == "pixel_shuffle" else 1)
    return ChannelMap.widen(n, n)


def _copy_layer(role: tuple, target: nn.Module, source: nn.Module | None, src: TAEConfig, tgt: TAEConfig,
                widths: list[ChannelMap]) -> None:
    kind = role[0]
    if kind == "stem":
        _copy_conv(target, source, widths[0], ChannelMap.widen(src.latent_channels, tgt.latent_channels))
    elif kind == "conv":
        _copy_conv(target, source, widths[role[1] + 1], widths[role[1]])
    elif kind == "out":
        _copy_conv(target, source, _out_rows(src, tgt), widths[-1])
    elif source is None:  # a block the source does not have: appended after its stage's blocks
        _start_as_identity(target)
    else:
        _copy_block(target, source, widths[role[1]])


@torch.no_grad()
def _copy_weights(source: TAEDecoder, target: TAEDecoder) -> None:
    source_layers = {role: layer for role, layer in zip(_check_roles(source), source.layers) if role is not None}
    widths = _width_maps(source.config, target.config)
    for role, layer in zip(_check_roles(target), target.layers):
        if role is not None:
            _copy_layer(role, layer, source_layers.get(role), source.config, target.config, widths)


def grow(decoder: LatentDecoder, target: str | TAEConfig | dict | LatentDecoder) -> TAEDecoder:
    """A wider and/or deeper TAE decoder that starts decoding exactly as ``decoder`` does.

    ``target``: a preset name (built in ``decoder``'s latent space), a :class:`TAEConfig` or a dict of its
    fields, or a decoder (copied; its weights are the fresh weights of the new channels). The result has
    ``decoder``'s latent space, device and dtype. Growing a conv head into a pixel-shuffle head copies every
    shared layer but changes the output (warned). Raises :class:`NotASupersetError` naming what would shrink."""
    source = _check_source(decoder)
    grown = _target_decoder(source, target)
    problems = superset_problems(source, grown)
    if problems:
        raise NotASupersetError(f"cannot grow the {_summary(source.config)} decoder into {_summary(grown.config)}: "
                                f"{'; '.join(problems)}. A grown decoder must keep everything its source has")
    _copy_weights(source, grown)
    if source.config.head != grown.config.head:
        warnings.warn(
            "growing a conv head into a pixel-shuffle head is not function-preserving: the last stage now runs at "
            "half resolution. Every shared layer was copied and the new head starts as the source's output conv "
            "repeated for each sub-pixel, so the grown decoder starts near the source, not equal to it: train it",
            stacklevel=2,
        )
    return grown.train(source.training)


def transfer_weights(decoder: LatentDecoder, target: str | TAEConfig | dict | LatentDecoder) -> TAEDecoder:
    """A warm start for a TAE decoder that is *not* a superset of ``decoder`` (a narrower or shallower one).

    Every layer both have is copied as :func:`grow` copies it, and a narrower stage keeps the source's first
    channels (its convs truncated). Unlike ``grow`` the output is not equal to the source's: the truncated
    stages lose what their dropped channels carried, so train it. A wider target is grown exactly where it is
    wider. Refused only where nothing can line up (another latent space or stage count, or a GroupNorm stage
    that narrows: its group statistics would change)."""
    source = _check_source(decoder)
    student = _target_decoder(source, target)
    blocking = _space_problems(source, student)
    src, tgt = source.config, student.config
    if len(src.stage_blocks) != len(tgt.stage_blocks):
        blocking.append(f"the number of stages changes from {len(src.stage_blocks)} to {len(tgt.stage_blocks)}")
    elif src.use_midblock_gn and tgt.use_midblock_gn and tgt.stage_widths[0] % src.stage_widths[0]:
        blocking.append(f"stage 0 holds TAEF2's GroupNorm branch: its width {src.stage_widths[0]} -> "
                        f"{tgt.stage_widths[0]} must stay an integer multiple")
    if blocking:
        raise NotASupersetError(f"cannot transfer the {_summary(src)} decoder into {_summary(tgt)}: "
                                f"{'; '.join(blocking)}")
    _copy_weights(source, student)
    return student.train(source.training)


def _summary(config: TAEConfig) -> str:
    return (f"TAE (widths {config.stage_widths}, stage_blocks {config.stage_blocks}, final_blocks "
            f"{config.final_blocks}, {config.head} head{', GroupNorm branch' if config.use_midblock_gn else ''})")


__all__ = ["grow", "transfer_weights", "NotASupersetError", "ChannelMap", "layer_roles", "superset_problems", "growth_changes"]

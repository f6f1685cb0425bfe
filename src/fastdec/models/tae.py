"""TAE family: the TAESD layout (Clamp, conv, residual blocks, nearest upsampling) at any width.

width 64 with 3 upsamplings is TAESD-compatible (TAESD/TAESDXL/TAESD3/TAEF1, and
TAEF2 with ``use_midblock_gn``); width 192 is the paper's TAE-192; 5 upsamplings
give the 32x variant for Sana's DC-AE space. Layer order matches the original
nn.Sequential, so original ``.pth`` state dicts load strictly without renaming.

Per-stage widths (``widths``) give TAEHV's (256, 128, 64, 64) and TAESana's
(256, 128, 64, 64, 64, 64) decoders: the conv after each upsampling maps one
stage's width to the next. The optional pixel-shuffle head (ESPCN) runs the last
stage at half resolution and ends in conv -> 3*s^2 channels + PixelShuffle(s),
so no conv runs at full resolution. Presets: tae-64, tae-192, tae-turbo (per-stage
widths and the pixel-shuffle head) and tae-large (capacity in the low-resolution
stages; a superset of tae-64, so ``fastdec.grow`` starts it equal to TAEF2).

The video decoders (temporal.py, causal.py) are this stack with a temporal part
added; the helpers at the end let them start from a trained image decoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import InputTypeError, UsageError, check_flags
from ..io.images import check_pixel_range
from ..latent_spaces import LatentSpace
from .base import LatentDecoder, _is_tracing, check_sizes, config_entries, doublings
from .blocks import Clamp, ResBlock, conv3x3
from .registry import register_architecture, register_preset


HEADS = ("conv", "pixel_shuffle")
# The pixel-shuffle head's factor: it does the last 2x upsampling (one stage's worth).
PIXEL_SHUFFLE = 2


@dataclass
class TAEConfig:
    latent_channels: int = 4
    # the width of every stage when ``widths`` is None (None: 64); with ``widths`` it is widths[0] (None: taken
    # from widths; another value is refused)
    width: int | None = None
    # residual blocks before each 2x upsampling, lowest resolution first; len() upsamplings
    stage_blocks: tuple[int, ...] = (3, 3, 3)
    final_blocks: int = 1
    # TAEF2's GroupNorm branch in the lowest-resolution stage
    use_midblock_gn: bool = False
    # One width per stage plus one for the final blocks: len(widths) == len(stage_blocks) + 1. Stage i's blocks
    # run at widths[i], the conv after its upsampling maps widths[i] -> widths[i + 1], the final blocks and the
    # output conv run at widths[-1]. None: ``width`` everywhere. Uniform widths are stored as None, so a layout
    # has one spelling (and uniform checkpoints written before this field load unchanged).
    widths: tuple[int, ...] | None = None
    # "conv": the TAESD output conv at full resolution; "pixel_shuffle": the last stage and the final blocks run
    # at half resolution, then conv -> 3 * PIXEL_SHUFFLE**2 channels and PixelShuffle (ESPCN)
    head: str = "conv"

    def __post_init__(self):
        self.stage_blocks = config_entries("TAE", "stage_blocks", self.stage_blocks)
        check_flags("TAE config", use_midblock_gn=self.use_midblock_gn)  # "no" built the GroupNorm branch
        check_sizes("TAE", {}, {"stage_blocks": self.stage_blocks, "final_blocks": self.final_blocks})
        if self.widths is not None:
            self._take_widths()
        elif self.width is None:
            self.width = 64
        check_sizes("TAE", {"width": self.width})
        if self.head not in HEADS:
            raise UsageError(f"TAE config: head={self.head!r}; choose one of {', '.join(HEADS)}")

    def _take_widths(self) -> None:
        self.widths = config_entries("TAE", "widths", self.widths)
        check_sizes("TAE", {"widths": self.widths})
        if len(self.widths) != len(self.stage_blocks) + 1:
            raise UsageError(
                f"TAE config: widths={self.widths} has {len(self.widths)} entries; it needs one per stage plus one "
                f"for the final blocks: {len(self.stage_blocks) + 1} for stage_blocks {self.stage_blocks}"
            )
        if self.width is not None and self.width != self.widths[0]:
            raise UsageError(
                f"TAE config: width={self.width} but widths={self.widths} starts at {self.widths[0]}; with per-stage "
                "widths, width is the first stage's: leave it out, or set widths=None for one width everywhere"
            )
        self.width = self.widths[0]
        if len(set(self.widths)) == 1:
            self.widths = None

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """The width of each stage and then of the final blocks: ``widths``, or ``width`` repeated."""
        return self.widths if self.widths is not None else (self.width,) * (len(self.stage_blocks) + 1)


class DeferredUpsample(nn.Identity):
    """Where the pixel-shuffle head's last stage would upsample: nothing runs here (the PixelShuffle at the end
    does that doubling), but the slot keeps the conv head's layer indices, so both heads share their
    state-dict keys up to the output conv."""


def tae_layers(config: TAEConfig, block: Callable[..., nn.Module] = ResBlock) -> nn.Sequential:
    """The TAESD decoder stack. Video decoders pass their own residual block and so keep the
    image decoder's layer names: a trained image decoder's weights load into them directly."""
    widths = config.stage_widths
    last = len(config.stage_blocks) - 1
    shuffle = config.head == "pixel_shuffle"
    layers: list[nn.Module] = [Clamp(), conv3x3(config.latent_channels, widths[0]), nn.ReLU()]
    for stage, n_blocks in enumerate(config.stage_blocks):
        w = widths[stage]
        # stage 0 works at the latent resolution: TAEF2's mid block, the one with the GroupNorm branch
        gn = config.use_midblock_gn and stage == 0
        layers += [block(w, w, use_gn_branch=gn) for _ in range(n_blocks)]
        up = DeferredUpsample() if shuffle and stage == last else nn.Upsample(scale_factor=2)
        layers += [up, conv3x3(w, widths[stage + 1], bias=False)]
    layers += [block(widths[-1], widths[-1]) for _ in range(config.final_blocks)]
    if shuffle:
        layers += [conv3x3(widths[-1], 3 * PIXEL_SHUFFLE**2), nn.PixelShuffle(PIXEL_SHUFFLE)]
    else:
        layers.append(conv3x3(widths[-1], 3))
    return nn.Sequential(*layers)


def mid_block_end(layers: nn.Sequential) -> int:
    """Index in a TAE stack just after the latent-resolution (mid) blocks: where its first upsampling sits.

    Read from the stack itself, so it follows the stem, ``stage_blocks``, the head and any block type."""
    return next(i for i, layer in enumerate(layers) if isinstance(layer, (nn.Upsample, DeferredUpsample)))


def tae_factor(config: TAEConfig) -> int:
    """How much a TAE stack upsamples: 2x per stage (what a TAESD .pth's latent space is guessed from)."""
    return 2 ** len(config.stage_blocks)


def check_tae_upsampling(decoder: LatentDecoder, config: TAEConfig) -> None:
    """The stack must upsample by the latent space's factor: the number of stages must match it."""
    needed = doublings(decoder.latent_space, "TAE")
    decoder.check_upsampling(
        tae_factor(config),
        f"stage_blocks {config.stage_blocks} has {len(config.stage_blocks)} stages, this space needs {needed}",
    )


class TAEDecoder(LatentDecoder):
    architecture = "tae"
    config_class = TAEConfig

    def __init__(self, config: TAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        check_tae_upsampling(self, config)
        self.layers = tae_layers(config)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


@dataclass
class TAEEncoderConfig:
    latent_channels: int = 4
    width: int = 64
    # TAESana starts with two strided convs (3 -> stem_width -> width) instead of one conv
    stem_width: int | None = None
    stage_blocks: tuple[int, ...] = (3, 3, 3)
    first_blocks: int = 1
    use_midblock_gn: bool = False

    def __post_init__(self):
        self.stage_blocks = config_entries("TAE encoder", "stage_blocks", self.stage_blocks)
        check_flags("TAE encoder config", use_midblock_gn=self.use_midblock_gn)
        check_sizes("TAE encoder", {"width": self.width}, {"stage_blocks": self.stage_blocks,
                                                           "first_blocks": self.first_blocks})


class TAEEncoder(nn.Module):
    """TAESD-family encoder: RGB in [0, 1] (N, 3, H, W) -> latents in decoder space.

    Used as a teacher (real latents for training and evaluation), never in pipelines.
    """

    def __init__(self, config: TAEEncoderConfig, latent_space: LatentSpace):
        super().__init__()
        self.config = config
        self.latent_space = latent_space
        w = config.width
        if config.stem_width:
            layers: list[nn.Module] = [
                conv3x3(3, config.stem_width, stride=2), nn.ReLU(),
                conv3x3(config.stem_width, w, stride=2), nn.ReLU(),
            ]
        else:
            layers = [conv3x3(3, w)]
        layers += [ResBlock(w, w) for _ in range(config.first_blocks)]
        last = len(config.stage_blocks) - 1
        for stage, n_blocks in enumerate(config.stage_blocks):
            gn = config.use_midblock_gn and stage == last
            layers.append(conv3x3(w, w, stride=2, bias=False))
            layers += [ResBlock(w, w, use_gn_branch=gn) for _ in range(n_blocks)]
        layers.append(conv3x3(w, config.latent_channels))
        self.layers = nn.Sequential(*layers)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.stage_blocks) + (2 if self.config.stem_width else 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"encoder expects RGB images shaped (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise UsageError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of {f}: crop or pad to a multiple of {f}"
            )
        if not _is_tracing():  # 0-255 or [-1, 1] images encoded to latents of no picture, without a word
            check_pixel_range(images, "the TAE encoder")
        p = next(self.parameters())
        return self.layers(images.to(device=p.device, dtype=p.dtype))


# =============================================================================== video decoders from image ones
# The layout fields a video decoder copies from the image decoder it starts from: all of TAEConfig's.
IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(TAEConfig))


def video_config_from_image(image_decoder: LatentDecoder, overrides: dict) -> dict:
    """The config fields of a TAE video decoder that starts as ``image_decoder`` (``overrides`` on top)."""
    if not isinstance(image_decoder, TAEDecoder):
        raise InputTypeError(
            f"from_image_decoder needs a TAE image decoder (tae-64, tae-192 or a TAESD-family checkpoint), "
            f"got {type(image_decoder).__name__}"
        )
    base = {name: getattr(image_decoder.config, name) for name in IMAGE_FIELDS}
    return {**base, **overrides}


def load_image_weights(video_decoder: nn.Module, image_decoder: TAEDecoder, temporal_parts: tuple[str, ...]) -> None:
    """Copy an image decoder's weights; only the (zero-initialised) temporal parts may stay unset."""
    result = video_decoder.load_state_dict(image_decoder.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not any(p in k for p in temporal_parts)]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"image decoder does not match this video decoder's layout (missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}): build it with from_image_decoder(image_decoder)"
        )


# =============================================================================== registry
register_architecture(TAEDecoder)


def tae_layout(space: LatentSpace, width: int | None, widths: tuple[int, ...] | None = None,
               stage_blocks: tuple[int, ...] = (3, 3, 3), head: str = "conv") -> dict:
    """A TAE preset's layout for ``space``, given for 8x spaces (3 stages; ``widths``: one per stage plus the final
    blocks'). 32x spaces (Sana) get two extra, cheap (1 block) stages at the highest resolutions, at the last
    width; FLUX.2 keeps TAEF2's GroupNorm branch."""
    extra_stages = doublings(space, "TAE") - 3
    layout = dict(width=width, stage_blocks=tuple(stage_blocks) + (1,) * extra_stages,
                  use_midblock_gn=space.name == "flux2")
    if widths is not None:  # width then follows widths[0], so an override of widths alone works
        layout.update(width=None, widths=tuple(widths) + (widths[-1],) * extra_stages)
    if head != "conv":
        layout["head"] = head
    return layout


@register_preset("tae-64", "tae", "TAESD layout, width 64 (TAESD/TAEF2-compatible weights), ~1.2M params; "
                 "142.3 GFLOPs at 512 px in the FLUX.2 space (TAEF2)")
def tae_64(space: LatentSpace) -> dict:
    return tae_layout(space, 64)


@register_preset("tae-192", "tae", "the paper's TAE-192: TAESD layout at width 192, ~11M params")
def tae_192(space: LatentSpace) -> dict:
    return tae_layout(space, 192)


# Figures measured with fastdec.bench.measure.count_flops, FLUX.2 space, one 512x512 image (latents 32x64x64):
# tae-64 (TAEF2's architecture) 142.3 GFLOPs, 1.34M params.
@register_preset("tae-turbo", "tae", "fast TAE: widths (128, 64, 48, 32), pixel-shuffle head (nothing runs at "
                 "full resolution); 61.7 GFLOPs at 512 px in the FLUX.2 space = 0.43x TAEF2's, 2.4M params")
def tae_turbo(space: LatentSpace) -> dict:
    # capacity where it is cheap: twice TAEF2's width at the latent resolution, narrower at high resolution
    return tae_layout(space, None, widths=(128, 64, 48, 32), head="pixel_shuffle")


@register_preset("tae-large", "tae", "large TAE: widths (256, 128, 64, 64), stage_blocks (5, 4, 3), capacity in the "
                 "low-resolution stages; 293.6 GFLOPs at 512 px in the FLUX.2 space = 2.06x TAEF2's, 14.2M params; "
                 "a superset of tae-64: fastdec.grow(taef2, 'tae-large') starts equal to TAEF2")
def tae_large(space: LatentSpace) -> dict:
    return tae_layout(space, None, widths=(256, 128, 64, 64), stage_blocks=(5, 4, 3))


__all__ = [
    "TAEConfig", "TAEDecoder", "TAEEncoderConfig", "TAEEncoder", "tae_layers", "mid_block_end", "tae_factor",
    "check_tae_upsampling", "tae_layout", "video_config_from_image", "load_image_weights", "DeferredUpsample",
    "HEADS", "PIXEL_SHUFFLE",
]

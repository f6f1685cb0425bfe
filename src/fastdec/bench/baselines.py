"""What the bench runs: the diffusers VAE decoders it compares with (SDXL, SVD, AutoencoderTiny) and the
fastdec decoders named on the command line.

Baselines are the real diffusers classes with their real configs and random weights (speed does not depend
on the weights), so the comparison needs no download. fastdec decoders go through
:func:`fastdec.resolve.resolve_decoder` like in every other command: presets (random weights, seeded),
checkpoints, pretrained names and Hub ids all work. Each is built once per run in this process; rows take
copies, and the memory probe's process resolves the same spec again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..dtypes import DTYPES
from ..errors import BenchError
from .measure import make_latents

# Verbatim from stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (diffusers AutoencoderKL).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Verbatim from stabilityai/stable-video-diffusion-img2vid(-xt) vae/config.json
# (diffusers AutoencoderKLTemporalDecoder).
SVD_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class Baseline:
    key: str            # --baselines value
    name: str           # row name
    kind: str           # "baseline" (speed-up reference candidates) or "reference" (for comparison only)
    diffusers_class: str
    config: dict[str, Any]
    latent_space: str   # decoder-space latents are converted to this VAE's raw space before decode
    source: str


BASELINES: dict[str, Baseline] = {
    "sdxl": Baseline("sdxl", "sdxl-vae", "baseline", "AutoencoderKL", SDXL_VAE_CONFIG, "sdxl",
                     "stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (decoder + post_quant_conv)"),
    "svd": Baseline("svd", "svd-vae", "baseline", "AutoencoderKLTemporalDecoder", SVD_VAE_CONFIG, "svd",
                    "stabilityai/stable-video-diffusion-img2vid vae/config.json (temporal decoder, num_frames=--frames)"),
    # TAESD as shipped in diffusers: what users compare tiny decoders with. Its default config is TAESD's.
    "tiny": Baseline("tiny", "autoencoder-tiny", "reference", "AutoencoderTiny", {}, "sd15",
                     "diffusers AutoencoderTiny() default config (TAESD layout, width 64)"),
}
DEFAULT_BASELINES = ("sdxl", "svd", "tiny")
VAE_FACTOR = 8  # all three VAEs upsample 8x (three 2x stages)


# ----------------------------------------------------------------------------- diffusers baselines
@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' to() warns about from_pretrained(torch_dtype=...): moot for a model built without weights."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def build_vae(key: str, seed: int = 0) -> nn.Module:
    """The diffusers VAE of baseline ``key`` (fp32, CPU, eval) with random weights from ``seed``."""
    import diffusers

    base = BASELINES[key]
    torch.manual_seed(seed)
    return getattr(diffusers, base.diffusers_class)(**base.config).eval()


def upcast_dtype(vae: nn.Module, dtype: str, upcast: bool = True) -> tuple[str, str]:
    """The dtype a diffusers pipeline really decodes in, and a note when it differs from ``dtype``.

    SDXL/SVD pipelines run an fp16 VAE with ``force_upcast=True`` in fp32 (it overflows in fp16).
    """
    if upcast and dtype == "fp16" and vae.config.get("force_upcast", False):
        return "fp32", "fp16 requested; force_upcast decodes in fp32 as diffusers pipelines do"
    return dtype, ""


def place_vae(vae: nn.Module, device: str | torch.device, dtype: str, channels_last: bool) -> nn.Module:
    """``vae`` on ``device`` in ``dtype``; ``channels_last`` converts its 2-D convolutions only (SVD's Conv3d
    weights are 5-D, which ``vae.to(memory_format=...)`` would reject)."""
    with _quiet_diffusers():
        vae = vae.to(device=device, dtype=DTYPES[dtype])
    if channels_last:
        from ..runtime import to_channels_last

        to_channels_last(vae)
    return vae


def decoder_modules(vae: nn.Module) -> list[nn.Module]:
    """The parts of a VAE that decoding runs: what its parameters and weights are counted on."""
    post = getattr(vae, "post_quant_conv", None)
    return [vae.decoder] + ([post] if post is not None else [])


def vae_latents(key: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The bench's decoder-space latents mapped to the raw space this baseline's ``decode()`` takes."""
    from ..latent_spaces import get_latent_space

    return get_latent_space(BASELINES[key].latent_space).decoder_to_vae(make_latents(shape, seed))


def decode_rgb(vae: nn.Module, raw: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """One ``vae.decode`` call, as RGB in [0, 1] like fastdec decoders return."""
    out = vae.decode(raw) if num_frames is None else vae.decode(raw, num_frames=num_frames)
    return out.sample.mul(0.5).add(0.5).clamp(0, 1)


# ----------------------------------------------------------------------------- fastdec decoders
@dataclass
class NamedDecoder:
    """A decoder named on the command line, built once for the whole run."""

    name: str            # row name: preset / pretrained name, a checkpoint's file stem, a Hub id
    kind: str            # "preset" | "checkpoint" | "pretrained" | "hub"
    source: str          # what the memory probe's process resolves again (checkpoints: an absolute path)
    decoder: nn.Module   # fp32, CPU, eval; rows work on copies


_ROW_KINDS = {"path": "checkpoint", "preset": "preset", "pretrained": "pretrained", "hub": "hub"}


def build_decoder(source: str, latent_space: str | None, seed: int = 0) -> nn.Module:
    """The decoder ``source`` names, through the one resolver; presets get random weights from ``seed``
    (the same weights in this process and in the memory probe's)."""
    from ..resolve import resolve_decoder

    torch.manual_seed(seed)
    return resolve_decoder(source, latent_space, random_weights=True).eval()


def describe_spec(spec: str) -> tuple[str, str, str]:
    """(row name, kind, source) of a ``--decoders`` value, as :func:`fastdec.resolve.locate` reads it."""
    from ..resolve import locate

    located = locate(spec)
    if located.kind == "path":
        path = Path(located.target)
        return path.stem, "checkpoint", str(path.resolve())
    return str(spec), _ROW_KINDS.get(located.kind, located.kind), str(spec)


def _check_modality(name: str, spec: str, decoder: nn.Module, video: bool) -> None:
    is_video = bool(getattr(decoder, "is_video", False))
    if is_video and not video:
        raise BenchError(f"'{name}' is a video decoder: benchmark it with `fastdec bench --video --decoders {spec}`")
    if video and not is_video:
        raise BenchError(f"'{name}' is an image decoder: benchmark it with `fastdec bench --decoders {spec}`")


def named_decoders(specs: Sequence[str], latent_space: str | None, seed: int, video: bool) -> list[NamedDecoder]:
    """Each ``--decoders`` value built once (``all``: every registered image or video preset), in order,
    without repeats; a decoder of the other modality is refused with the command that benchmarks it."""
    from ..models import list_decoders

    expanded = [name for spec in specs for name in (list_decoders(video=video) if spec == "all" else [spec])]
    decoders: dict[str, NamedDecoder] = {}
    for spec in expanded:
        name, kind, source = describe_spec(spec)
        if name in decoders:
            continue
        decoder = build_decoder(source, latent_space, seed)
        _check_modality(name, spec, decoder, video)
        decoders[name] = NamedDecoder(name, kind, source, decoder)
    return list(decoders.values())

"""The decoder being trained: how it is built (one construction path, :func:`fastdec.resolve_decoder`), the
checks that it fits the teacher and the options, the view the optimizer sees, and its EMA."""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ..errors import CheckpointError, TrainError
from ..models.base import LatentDecoder
from ..models.growth import NotASupersetError, grow, growth_changes, superset_problems, transfer_weights
from ..models.tae import TAEDecoder
from ..resolve import locate, resolve_in_space
from .config import TrainConfig


def _resolve(flag: str, spec: str, latent_space, random_weights: bool = False) -> LatentDecoder:
    """``resolve_decoder``, with the flag named in its error (``--decoder`` and ``--init`` both name decoders)."""
    try:  # the space is the teacher's (or --latent-space's)
        return resolve_in_space(spec, latent_space, "or a --teacher of that space", random_weights=random_weights)
    except CheckpointError as e:
        raise TrainError(f"{flag}: {e}") from e


def build_student(config: TrainConfig, space) -> LatentDecoder:
    """The decoder to train, in fp32. ``--decoder`` goes through ``resolve_decoder`` with random weights
    allowed: a preset is the architecture training starts from scratch (built in the teacher's space, the
    one place where a preset is legitimately random); a checkpoint or pretrained name continues from its
    weights. ``--init`` then loads trained weights (a preset there is refused: it has none)."""
    if config.init and isinstance(config.decoder, (str, os.PathLike)) and locate(config.decoder).kind != "preset":
        # a checkpoint names an architecture no preset has (grown, custom widths); its weights went without a word
        warnings.warn(f"--decoder '{config.decoder}' is a trained checkpoint: with --init only its architecture is "
                      f"used, and training starts from --init '{config.init}' (drop --init to continue from "
                      "its own weights)", stacklevel=2)
    decoder = _resolve("--decoder", config.decoder, space, random_weights=True)
    if config.init:
        decoder = _initialise(decoder, config)
    return decoder.float()


def _initialise(decoder: LatentDecoder, config: TrainConfig) -> LatentDecoder:
    """``decoder`` with the weights of ``--init``: the same architecture, a smaller TAE decoder that ``decoder``
    is grown from (:func:`fastdec.grow`: it starts equal to ``--init``), or an image decoder that a video
    decoder starts equal to (``from_image_decoder``)."""
    source = _resolve("--init", config.init, decoder.latent_space)
    if source.latent_space.channels != decoder.latent_space.channels:  # a decoder object passed in Python
        raise TrainError(f"--init '{config.init}' is a decoder for '{source.latent_space.name}' "
                         f"({source.latent_space.channels} channels), not '{decoder.latent_space.name}'")
    if source.architecture == decoder.architecture and source.config_dict() == decoder.config_dict():
        decoder.load_state_dict(source.state_dict())
        return decoder
    if type(source) is TAEDecoder and type(decoder) is TAEDecoder:
        return _grow(source, decoder, config)
    if decoder.is_video and not source.is_video and hasattr(type(decoder), "from_image_decoder"):
        return type(decoder).from_image_decoder(source)
    raise TrainError(f"--init '{config.init}' is {_kind(source)} and --decoder {config.decoder} {_kind(decoder)}: "
                     "--init starts an equal decoder, a wider or deeper TAE image decoder (grown; a narrower one with "
                     "--init-partial), or a video decoder from its image decoder, not this. Start "
                     f"--decoder {config.decoder} from a checkpoint of its own kind, or from random weights (no --init)")


def _kind(decoder: LatentDecoder) -> str:
    return f"a video decoder ({decoder.architecture})" if decoder.is_video else f"an image decoder ({decoder.architecture})"


def _grow(source: TAEDecoder, decoder: TAEDecoder, config: TrainConfig) -> TAEDecoder:
    """``--decoder`` grown from ``--init`` (``decoder``'s own weights are the fresh ones of the new channels)."""
    partial = config.init_partial and superset_problems(source, decoder)
    try:
        grown = transfer_weights(source, decoder) if partial else grow(source, decoder)
    except NotASupersetError as e:
        hint = "" if config.init_partial else (" (--init-partial copies what lines up instead: a warm start that "
                                               "does not decode equal to --init)")
        raise TrainError(f"--init '{config.init}' does not fit --decoder {config.decoder}: {e}{hint}") from e
    if int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per process
        how = "partly transferred (not equal to it)" if partial else "grown"
        print(f"student {how} from --init {config.init}: {', '.join(growth_changes(source, grown))}")
    return grown


def check_compatible(teacher, decoder: LatentDecoder) -> None:
    """The teacher's latents are what the decoder takes: channels, spatial factor and space name."""
    t, d = teacher.latent_space, decoder.latent_space
    if t.channels != d.channels:
        raise TrainError(
            f"teacher gives {t.channels}-channel '{t.name}' latents but the decoder takes {d.channels}-channel "
            f"'{d.name}' latents: {d.channel_mismatch_message(t.channels)}. Pick a decoder for '{t.name}' "
            "(a preset is built in the teacher's space automatically) or the matching teacher"
        )
    if teacher.spatial_factor != decoder.upsample_factor:
        raise TrainError(f"teacher downsamples {teacher.spatial_factor}x but the decoder upsamples "
                         f"{decoder.upsample_factor}x: they are for different latent spaces ('{t.name}' vs '{d.name}')")
    if t.name != d.name:
        raise TrainError(f"teacher latents are in '{t.name}' space but the decoder is for '{d.name}': "
                         "use a decoder for the teacher's space, or pass --latent-space if the detection is wrong")


def check_setup(config: TrainConfig, teacher, decoder: LatentDecoder) -> None:
    """Everything about teacher, decoder and options that cannot work together, before any data is touched."""
    check_compatible(teacher, decoder)
    if config.frames and not decoder.is_video:
        raise TrainError(f"--frames needs a video decoder; '{config.decoder}' is an image decoder")
    if decoder.is_video and not config.frames:
        raise TrainError(f"'{config.decoder}' is a video decoder: pass --frames T (clip length)")
    if config.teacher_weight and not teacher.has_decoder:
        raise TrainError("--teacher-weight needs a teacher decoder: pass --teacher-decoder (TAESD teachers)")
    if config.temporal and not decoder.is_video:
        raise TrainError("--temporal needs a video decoder and --frames")
    if config.temporal_lr is not None and not decoder.temporal_parameters():
        raise TrainError(f"--temporal-lr: '{config.decoder}' ({type(decoder).__name__}) has no temporal layers "
                         "(memory convs or temporal attention) to train at it; drop --temporal-lr")


class TrainView(nn.Module):
    """The decoder without its final clamp: a clamp has zero gradient outside [0, 1], so outputs
    that start out of range would never be pulled back. Validation and export use the decoder itself."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_layers(self.decoder.check_latents(z))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def ema_decay(step: int, decay: float) -> float:
    # warm-up: early on the average would be dominated by the random initialisation
    return min(decay, (1 + step) / (10 + step))

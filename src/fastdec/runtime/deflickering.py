"""Deflicker: steady a decoded video where the picture holds still, from its own previous output frame.

A denoiser's latents change from frame to frame while the picture holds still, and every decoder, temporal or
not, turns that jitter into flicker. This filter runs on the decoded frames, in order, and holds the previous
output where the new frame barely differs from it:

    F_0 = D_0,    F_t = D_t + s m_t (F_{t-1} - D_t),    m_t = exp(-(box(|D_t - F_{t-1}|) / tau)^2)

|.| is the mean over RGB and box a ``window`` x ``window`` mean, so a change well above ``threshold`` (tau, in
the [0, 1] pixel range: motion, a cut) passes through untouched and a change well below it is held back by the
strength ``s``. It needs no flow, no original and no training, and streams: :class:`Deflicker` keeps one
output frame per clip, so decoding in chunks gives the frames decoding at once gives.

What it trades (fastdec's held-out clips, 256 px; README "Latents that jitter"): on latents jittered like a
denoiser's (std 0.1) the defaults remove about a fifth of the flicker at 0-0.05 dB of PSNR; on an encoder's
latents of real footage, which do not jitter, it removes almost nothing and costs 0.15-0.3 dB (up to 0.75 dB on
a clip whose fine texture moves).
Use it for generated video, not for reconstructions.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputTypeError, NonFiniteOutputError, UsageError, is_number
from ..io.images import check_pixel_range

__all__ = ["DEFAULT_STRENGTH", "DEFAULT_THRESHOLD", "Deflicker", "DeflickerSettings", "add_deflicker_arguments",
           "as_deflicker_settings", "deflicker", "deflicker_from_args"]

DEFAULT_STRENGTH = 0.9
DEFAULT_THRESHOLD = 0.02
# Below this a threshold holds only pixels that did not change at all, and far below it fp32 rounds it to 0,
# where an unchanged pixel's 0/0 would be NaN: refused rather than met as a "decoder produced NaN" later.
MIN_THRESHOLD = 1e-6


@dataclass(frozen=True)
class DeflickerSettings:
    """How hard to hold (``strength`` in [0, 1): 0 is off), the change to let go at (``threshold``, pixels in
    [0, 1]) and the box (odd ``window``, px) the change is averaged over before it is compared."""

    strength: float = DEFAULT_STRENGTH
    threshold: float = DEFAULT_THRESHOLD
    window: int = 5

    def __post_init__(self) -> None:
        for name in ("strength", "threshold"):  # a 0-dim tensor (a strength computed in torch) is its number
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool \
                    and not value.is_complex():
                object.__setattr__(self, name, value.item())
        # 1 would never let go of the first frame where it matches; the flags named so a CLI user can act on it
        if not (is_number(self.strength) and 0 <= self.strength < 1):
            raise UsageError(f"deflicker strength (--deflicker-strength) must be in [0, 1) (0 is off; the flag takes "
                             f"(0, 1)), got {self.strength!r}")
        if not (is_number(self.threshold) and MIN_THRESHOLD <= self.threshold < math.inf):
            raise UsageError(f"deflicker threshold (--deflicker-threshold) must be a finite change of at least "
                             f"{MIN_THRESHOLD:g} in the [0, 1] pixel range (an 8-bit level is 0.004), got "
                             f"{self.threshold!r}")
        if not (isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1
                and self.window % 2 == 1):
            raise UsageError(f"deflicker window must be an odd number of pixels, got {self.window!r}")
        # plain floats: a numpy scalar times a tensor is a numpy object, and report.json could not hold one
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "threshold", float(self.threshold))


class Deflicker:
    """The filter over successive chunks of one video (or of N videos together): frames (k, 3, H, W) or
    (N, k, 3, H, W) in [0, 1], returned filtered in the same shape and dtype (computed in fp32)."""

    def __init__(self, settings: DeflickerSettings | None = None):
        if not (settings is None or isinstance(settings, DeflickerSettings)):
            raise InputTypeError(f"Deflicker takes DeflickerSettings (or None for the defaults), got {settings!r}")
        self.settings = settings or DeflickerSettings()
        self.previous: torch.Tensor | None = None  # (N, 3, H, W): the last output frame of each clip

    def reset(self) -> None:
        """Forget the previous frame: the next chunk starts a new video."""
        self.previous = None

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        clips = self._as_clips(frames)
        if self.settings.strength == 0 or clips.shape[1] == 0:  # an empty push (a stream's) stays empty
            return frames
        out = []
        for t in range(clips.shape[1]):
            current = clips[:, t].float()
            self.previous = current if self.previous is None else self._step(current, self.previous)
            out.append(self.previous)
        filtered = torch.stack(out, dim=1).to(frames.dtype)
        return filtered if frames.ndim == 5 else filtered[0]

    def _step(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        s = self.settings
        change = (current - previous).abs().mean(dim=1, keepdim=True)
        change = F.avg_pool2d(change, s.window, 1, s.window // 2, count_include_pad=False)
        hold = s.strength * torch.exp(-(change / s.threshold) ** 2)
        return current + hold * (previous - current)

    def _as_clips(self, frames: torch.Tensor) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor):
            raise InputTypeError(f"deflicker takes frames as a torch.Tensor, got {type(frames).__name__}")
        if not (frames.ndim in (4, 5) and frames.shape[-3] == 3):
            raise UsageError(f"deflicker takes RGB frames shaped (k, 3, H, W) or (N, k, 3, H, W), got "
                             f"{tuple(frames.shape)}")
        if not frames.is_floating_point():  # complex is not floating point either
            raise InputTypeError(f"deflicker takes float frames in [0, 1], got {frames.dtype} (uint8 frames: "
                                 "frames.float() / 255)")
        if frames.shape[-1] == 0 or frames.shape[-2] == 0:
            raise UsageError(f"deflicker got frames of zero size {tuple(frames.shape)}")
        if not torch.isfinite(frames).all():  # one NaN would spread through the box into every later frame
            raise NonFiniteOutputError(f"deflicker got frames holding NaN or inf {tuple(frames.shape)}: the decoder "
                                       "that made them is broken (check its weights, or an fp16 overflow)")
        check_pixel_range(frames, "deflicker")  # its motion threshold is in units of the [0, 1] range
        clips = frames if frames.ndim == 5 else frames[None]
        if self.previous is not None and (self.previous.shape[0], *self.previous.shape[-3:]) != (
                clips.shape[0], *clips.shape[-3:]):
            raise UsageError(f"deflicker got frames shaped {tuple(frames.shape)} after frames of "
                             f"{tuple(self.previous.shape)}: one Deflicker follows one video (call reset() between "
                             "videos)")
        return clips


def deflicker(frames: torch.Tensor, settings: DeflickerSettings | None = None) -> torch.Tensor:
    """A whole decoded video, (T, 3, H, W) or (N, T, 3, H, W) in [0, 1], filtered as the module says."""
    return Deflicker(settings)(frames)


def as_deflicker_settings(value: DeflickerSettings | bool | None) -> DeflickerSettings | None:
    """What a ``deflicker=`` argument may be: settings, True (the defaults), or False / None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return DeflickerSettings()
    if isinstance(value, DeflickerSettings):
        return value
    raise UsageError(f"deflicker must be a DeflickerSettings, True (the defaults) or None, got {value!r}")


DEFLICKER_HELP = ("steady the decoded frames where the picture holds still (for generated latents, which jitter; on "
                  "an encoder's latents of real footage it removes almost nothing)")


def add_deflicker_arguments(parser: argparse.ArgumentParser, help: str = DEFLICKER_HELP) -> None:
    """``--deflicker`` and its two settings, the same for every command that decodes video."""
    parser.add_argument("--deflicker", action="store_true", help=help)
    parser.add_argument("--deflicker-strength", type=float, default=None, metavar="S",
                        help=f"how hard to hold, in (0, 1) (default {DEFAULT_STRENGTH}; implies --deflicker)")
    parser.add_argument("--deflicker-threshold", type=float, default=None, metavar="TAU",
                        help=f"the frame-to-frame change (pixels in [0, 1], averaged over 5x5) to let go at: a change "
                             f"of TAU is held a third as hard as none, twice TAU hardly at all (default "
                             f"{DEFAULT_THRESHOLD}; implies --deflicker)")


def deflicker_from_args(args: argparse.Namespace) -> DeflickerSettings | None:
    """The settings :func:`add_deflicker_arguments`' flags ask for, or None when none was given."""
    strength, threshold = args.deflicker_strength, args.deflicker_threshold
    if not (args.deflicker or strength is not None or threshold is not None):
        return None
    if strength == 0:  # it implies --deflicker, then holds nothing: eval video scored NAME+deflicker rows equal to NAME's
        raise UsageError("--deflicker-strength 0 holds nothing, so the deflicker pass would change no frame: leave "
                         "the --deflicker flags out to decode without it, or give a strength in (0, 1)")
    return DeflickerSettings(strength=DEFAULT_STRENGTH if strength is None else strength,
                             threshold=DEFAULT_THRESHOLD if threshold is None else threshold)

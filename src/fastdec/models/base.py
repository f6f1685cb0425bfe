"""What every fastdec decoder shares: its config, its latent space, the input checks and the output rule.

The rules live here so that every architecture, every command and ``FastVAE`` get them alike:

* the upsampling factor is the latent space's spatial factor (each architecture checks in its
  constructor that its layers upsample by exactly that much);
* latents are checked (type, rank, channels, dtype, values) before any layer runs;
* an empty batch (N = 0) or a clip without frames (T = 0) decodes to an empty result of the right
  shape; latents of zero height or width are refused;
* an output holding NaN is an error naming the decoder, never a (black) picture.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..errors import DecoderOutputError, InputTypeError, NonFiniteOutputError, UsageError
from ..latent_spaces import LatentSpace


def _is_tracing() -> bool:
    # Data-dependent checks (NaN scans) cannot run inside torch.compile / ONNX export graphs.
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or (hasattr(torch.onnx, "is_in_onnx_export") and torch.onnx.is_in_onnx_export())
    )


# Far above any useful decoder (a 3x3 conv at this width holds 600M weights): a larger width is a typo or
# corrupt metadata, better refused with its field name than met with a raw allocation error.
MAX_WIDTH = 8192
# Likewise for block counts (presets use 1-4 per stage): a count of 100000 from corrupt metadata would spend
# minutes building modules before any shape check could refuse it.
MAX_COUNT = 1024


def config_entries(architecture: str, name: str, value: object) -> tuple:
    """A per-stage config field as a tuple: checkpoint metadata is JSON, so tuples come back as lists; anything
    else (a string such as '333', a number) is refused rather than coerced entry by entry."""
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{architecture} config: {name}={value!r}; {name} must list one entry per stage "
                         "(or per scale)")
    return tuple(value)


def check_sizes(architecture: str, widths: dict[str, Any], counts: dict[str, Any] | None = None) -> None:
    """Refuse config sizes that are not integers in range, naming the field: ``widths`` (field -> int or tuple)
    must lie in [1, MAX_WIDTH], ``counts`` (block counts) in [0, MAX_COUNT]."""
    fields = [(name, value, 1, MAX_WIDTH) for name, value in widths.items()]
    fields += [(name, value, 0, MAX_COUNT) for name, value in (counts or {}).items()]
    for name, value, low, high in fields:
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low or v > high for v in values):
            bound = f"in [{low}, {high}]"
            what = "hold integers" if isinstance(value, tuple) else "be an integer"
            raise UsageError(f"{architecture} config: {name}={value!r}; {name} must {what} {bound}")


def doublings(latent_space: LatentSpace, architecture: str) -> int:
    """How many 2x upsamplings take ``latent_space``'s latents to pixels (8x -> 3, Sana's 32x -> 5)."""
    factor = latent_space.spatial_factor
    steps = factor.bit_length() - 1 if isinstance(factor, int) and factor >= 1 else -1
    if steps < 0 or 2**steps != factor:
        raise UsageError(
            f"{architecture} decoders upsample by powers of 2; latent space '{latent_space.name}' has spatial "
            f"factor {factor!r}"
        )
    return steps


class LatentDecoder(nn.Module):
    """Base class: latents in decoder space (N, C, h, w) -> RGB in [0, 1] (N, 3, f*h, f*w).

    Subclasses set ``architecture`` (the registry key stored in checkpoints),
    ``config_class`` (a dataclass) and implement ``decode_layers`` (checked latents -> unclamped RGB).
    Video decoders set ``is_video = True`` and take (N, T, C, h, w); ``temporal_parts`` names (as parameter-name
    fragments) the layers a video decoder adds to its image decoder.
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    is_video: ClassVar[bool] = False
    temporal_parts: ClassVar[tuple[str, ...]] = ()

    def temporal_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the layers a video decoder adds to its image decoder; [] for image decoders."""
        return [(n, p) for n, p in self.named_parameters() if any(part in n for part in self.temporal_parts)]

    def __init__(self, config: Any, latent_space: LatentSpace):
        super().__init__()
        if config.latent_channels != latent_space.channels:
            raise UsageError(
                f"config has {config.latent_channels} latent channels but latent space "
                f"'{latent_space.name}' has {latent_space.channels}"
            )
        self.config = config
        self.latent_space = latent_space

    # -- properties -----------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def upsample_factor(self) -> int:
        """Output pixels per latent pixel along each side: the latent space's spatial factor.

        The one definition for every architecture; constructors refuse layouts that upsample by another
        factor (see :meth:`check_upsampling`)."""
        return self.latent_space.spatial_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def check_upsampling(self, layout_factor: int, fix: str) -> None:
        """Refuse a layout whose layers upsample by ``layout_factor`` instead of the latent space's factor."""
        if layout_factor != self.upsample_factor:
            raise UsageError(
                f"{type(self).__name__} layers upsample x{layout_factor} but latent space "
                f"'{self.latent_space.name}' latents are x{self.upsample_factor} smaller than the image: {fix}"
            )

    # -- input contract ---------------------------------------------------------------
    def _rank_error(self, z: torch.Tensor) -> UsageError:
        layout = "(N, T, C, h, w)" if self.is_video else "(N, C, h, w)"
        hint = ""
        if not self.is_video and z.ndim == 3:
            hint = ": add a batch dimension with z[None]"
        elif not self.is_video and z.ndim == 5:
            hint = ": this is a video; decode frames with z.flatten(0, 1) or use a video decoder"
        elif self.is_video and z.ndim == 4:
            hint = ": add a time dimension, e.g. z[None] for one clip of N frames"
        return UsageError(f"{type(self).__name__} expects latents shaped {layout}, got {tuple(z.shape)}{hint}")

    def check_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Validate shape/dtype/values and cast to the decoder's dtype and device."""
        if not isinstance(z, torch.Tensor):
            raise InputTypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != (5 if self.is_video else 4):
            raise self._rank_error(z)
        channels = z.shape[-3]
        if channels != self.latent_channels:
            raise UsageError(self.latent_space.channel_mismatch_message(channels))
        if 0 in z.shape[-2:]:
            raise UsageError(f"latents shaped {tuple(z.shape)} have zero height or width: there is nothing to decode")
        if not z.is_floating_point():
            raise InputTypeError(f"latents must be floating point, got {z.dtype}; convert with z.float()")
        if z.is_meta and self.device.type != "meta":  # meta: shapes with no data, for shape inference
            raise UsageError(
                f"latents on {z.device} for a decoder on {self.device}: meta tensors hold no values to decode; "
                "decode real latents, or move the decoder to the meta device too to infer output shapes"
            )
        if not _is_tracing() and not z.is_meta and not torch.isfinite(z).all():
            raise UsageError(
                "latents contain NaN or inf: the sampler diverged or the latents were corrupted "
                "(in fp16, try bf16 or fp32 for the denoiser)"
            )
        return z.to(device=self.device, dtype=self.dtype)

    # -- output contract --------------------------------------------------------------
    def is_empty(self, z: torch.Tensor) -> bool:
        """True for checked latents with no batch entries (or no frames): nothing for the layers to do."""
        return z.shape[0] == 0 or (self.is_video and z.shape[1] == 0)

    def empty_output(self, z: torch.Tensor) -> torch.Tensor:
        """The (empty) RGB result for empty checked latents: (N, [T,] 3, f*h, f*w) with N or T zero."""
        f = self.upsample_factor
        return z.new_zeros(*z.shape[:-3], 3, f * z.shape[-2], f * z.shape[-1])

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Unclamped layer output -> RGB in [0, 1]; NaN or inf (bad weights, an overflow) is an error.

        Checked before the clamp: a pixel value past fp16's 65504 is no saturated pixel but an overflow, and
        clamped it would be a white picture with no error."""
        if not _is_tracing() and not raw.is_meta and not torch.isfinite(raw).all():
            raise NonFiniteOutputError(self._non_finite_message())
        return raw.clamp(0, 1)

    def _non_finite_message(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        overflow = "" if self.dtype in (torch.float32, torch.float64) else f", or the input overflowed in {dtype} (try fp32)"
        return (
            f"decoder '{self.architecture or type(self).__name__}' for '{self.latent_space.name}' latents produced "
            f"NaN or inf: its weights are bad (NaN/inf in the checkpoint, or a diverged training){overflow}; "
            f"refusing to return it as a picture"
        )

    def decode_with(self, layers: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """The input and output contract around ``layers`` (checked latents -> unclamped RGB).

        ``forward`` passes :meth:`decode_layers`; a runtime wrapper passes its compiled version."""
        z = self.check_latents(z)
        if self.is_empty(z):
            return self.empty_output(z)
        raw = layers(z)
        if not _is_tracing():
            self.check_output_shape(z, raw)
        return self.finish(raw)

    def check_output_shape(self, z: torch.Tensor, raw: torch.Tensor) -> None:
        """Refuse layers whose output is not RGB ``upsample_factor`` times the latents' size: a decoder that
        upsampled x16 for x32 latents wrote half-size pictures without a word."""
        f = self.upsample_factor
        expected = (*z.shape[:-3], 3, z.shape[-2] * f, z.shape[-1] * f)
        if tuple(raw.shape) != expected:
            raise DecoderOutputError(
                f"decoder '{self.architecture or type(self).__name__}' returned {tuple(raw.shape)} for latents "
                f"{tuple(z.shape)}; '{self.latent_space.name}' latents decode to {expected} (RGB, x{f} per side): "
                "fix its layers (check_upsampling in the constructor refuses such a layout before any decode)")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_with(self.decode_layers, z)

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"latent_space={self.latent_space.name}"

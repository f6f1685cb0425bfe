"""Fast decoders inside diffusers pipelines.

* :class:`FastVAE` is a real diffusers component (``ModelMixin`` + ``ConfigMixin``): it
  decodes with a fastdec decoder and encodes with the pipeline's original VAE
  encoder, so img2img and Stable Video Diffusion's image conditioning keep working,
  and ``pipe.save_pretrained`` / ``from_pretrained`` round-trip it.
* :func:`swap_decoder` / :func:`restore_decoder` put it into a pipeline and take it out.
* :class:`PreviewCallback` decodes the current latents every few steps during sampling.

Latent views (see :mod:`fastdec.latent_spaces`): pipelines pass *raw VAE* latents to
``vae.decode``; fastdec decoders take *decoder-space* latents. ``FastVAE`` converts
with the original VAE's own scaling/shift (or per-channel mean/std), so pipeline
space == decoder space for every family except FLUX.2, whose pipeline latents are
patchified and batch-normalised with the VAE's ``bn`` statistics.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from .errors import InputTypeError, PipelineError, PipelineStateError, UsageError, check_count, check_flags
from .io.files import atomic_write, prepare_output_dir
from .io.images import to_uint8
from .resolve import resolve_decoder, resolve_in_space
from .runtime.deflickering import DeflickerSettings, deflicker
from .latent_spaces import PRESETS as SPACES, LatentSpace, get_latent_space
from .models.base import LatentDecoder
from .models.registry import build_decoder

try:  # absent from very old diffusers; the methods it provides are defined on FastVAE anyway
    from diffusers.models.autoencoders.vae import AutoencoderMixin
except ImportError:  # pragma: no cover
    class AutoencoderMixin:  # type: ignore[no-redef]
        pass

__all__ = ["FastVAE", "swap_decoder", "restore_decoder", "PreviewCallback", "detect_latent_space"]

# Submodules of diffusers VAEs that only the decode path (or the pipeline) uses: the encoder view drops them.
_DECODE_ONLY_MODULES = ("decoder", "post_quant_conv", "bn")
_SPACE_BY_VAE_CLASS = {"AutoencoderKLTemporalDecoder": "svd", "AutoencoderKLFlux2": "flux2", "AutoencoderDC": "sana"}
# Spaces with the same statistics, so one's decoders decode the other's latents.
_SAME_STATISTICS = {frozenset({"sd15", "svd"})}
_ORIGINAL_VAE_ATTR = "_fastdec_original_vae"


# ----------------------------------------------------------------------------- latent space detection
def _config_get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def detect_latent_space(vae: nn.Module) -> LatentSpace:
    """The latent space of a pipeline's VAE, with its own scaling/shift/mean/std applied.

    By class for the VAEs whose space is unique (SVD, FLUX.2, Sana), otherwise by
    channel count and the nearest preset scaling factor (SD1.5 vs SDXL, SD3 vs FLUX.1).
    """
    if isinstance(vae, FastVAE):
        return vae.latent_space
    config = getattr(vae, "config", None)
    class_name = type(vae).__name__
    if config is None:
        raise PipelineError(f"the pipeline's vae is a {class_name} with no config: fastdec swaps and reads diffusers "
                            "VAEs (AutoencoderKL, AutoencoderKLTemporalDecoder, AutoencoderKLFlux2, ...)")
    if class_name in _SPACE_BY_VAE_CLASS:
        return get_latent_space(_SPACE_BY_VAE_CLASS[class_name]).with_vae_config(config)
    channels = _config_get(config, "latent_channels")
    candidates = [s for s in SPACES.values() if s.channels == channels and s.name not in _SPACE_BY_VAE_CLASS.values()]
    if not candidates:
        raise PipelineError(
            f"cannot tell the latent space of this {class_name} ({channels} latent channels): fastdec knows "
            f"{', '.join(f'{s.name} ({s.channels} ch)' for s in SPACES.values())}"
        )
    scaling = _config_get(config, "scaling_factor")
    if scaling is not None and len(candidates) > 1:
        candidates.sort(key=lambda s: abs(math.log(s.scaling_factor / float(scaling))))
    return candidates[0].with_vae_config(config)


def _spaces_compatible(decoder_space: LatentSpace, vae_space: LatentSpace) -> bool:
    return decoder_space.name == vae_space.name or frozenset({decoder_space.name, vae_space.name}) in _SAME_STATISTICS


def check_decoder_fits(
    decoder: LatentDecoder, vae_space: LatentSpace, what: str = "pipeline VAE", allow_other_statistics: bool = False
) -> None:
    """Raise a ValueError naming the problem and the fix when ``decoder`` cannot decode ``vae_space`` latents.

    ``allow_other_statistics`` accepts a decoder of another space with the same shape (a fine-tuned VAE)."""
    ds = decoder.latent_space
    suggestion = f"use a {vae_space.name} decoder, e.g. fastdec.create_decoder('tae-64', '{vae_space.name}') or a checkpoint trained for it"
    if ds.channels != vae_space.channels:
        raise PipelineError(
            f"decoder expects {ds.channels} channels ({ds.name}), {what} has {vae_space.channels}: {suggestion}"
        )
    if ds.spatial_factor != vae_space.spatial_factor:
        raise PipelineError(
            f"decoder upsamples {ds.spatial_factor}x ({ds.name}), {what} is {vae_space.spatial_factor}x: {suggestion}"
        )
    if not allow_other_statistics and not _spaces_compatible(ds, vae_space):
        raise PipelineError(
            f"decoder was made for {ds.name} latents, {what} is {vae_space.name} (same channel count, different "
            f"statistics: the picture would be wrong): {suggestion}. If this VAE really shares the decoder's latent "
            "space (a fine-tune), pass force=True"
        )


# ----------------------------------------------------------------------------- encoder view
def _refuse_offloaded(vae: nn.Module) -> None:
    if hasattr(vae, "_hf_hook"):
        raise PipelineStateError(
            "the pipeline's VAE has accelerate offload hooks: call swap_decoder(pipe, ...) before "
            "pipe.enable_model_cpu_offload() / enable_sequential_cpu_offload()"
        )


def _encoder_view(vae: nn.Module) -> nn.Module:
    """A shallow copy of a diffusers VAE that shares its encoder weights and lacks its decoder.

    ``encode`` then runs the VAE's own code (real ``AutoencoderKLOutput`` with ``latent_dist``),
    while ``FastVAE``'s state dict and device moves carry only the encoder half.
    """
    _refuse_offloaded(vae)
    view = copy.copy(vae)
    view._modules = dict(vae._modules)
    view._parameters = dict(vae._parameters)
    view._buffers = dict(vae._buffers)
    for name in _DECODE_ONLY_MODULES:
        if name in view._modules:
            view._modules[name] = None
    return view


def _encoder_from_config(class_name: str, config: dict) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise PipelineError(f"FastVAE config names encoder class '{class_name}', which this diffusers version lacks")
    vae = cls.from_config(config)
    for name in _DECODE_ONLY_MODULES:
        if name in vae._modules:
            vae._modules[name] = None
    return vae


# ----------------------------------------------------------------------------- FastVAE
class FastVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""A diffusers VAE whose decoder is a fastdec decoder (and whose encoder is, by default, the original one).

    Build it with :meth:`from_decoder` or :func:`swap_decoder`; ``from_pretrained`` rebuilds
    it from ``config.json`` (decoder architecture, config and latent space, and the
    original encoder's class and config). ``decode`` takes raw VAE latents like any
    diffusers VAE and returns images in [-1, 1].
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        decoder_architecture: str = "tae",
        decoder_config: dict | None = None,
        latent_space: dict | str = "sdxl",
        encoder_class: str | None = None,
        encoder_config: dict | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (64, 64, 64, 64),
        encoder_block_out_channels: Sequence[int] | None = None,
        sample_size: Any = None,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = False,
        batch_norm_eps: float | None = None,
        batch_norm_momentum: float = 0.1,
        patch_size: Sequence[int] | None = None,
    ):
        super().__init__()
        space = get_latent_space(latent_space)
        config = dict(decoder_config or {"latent_channels": space.channels})
        self.decoder = build_decoder(decoder_architecture, config, space)
        self.encoder_vae = _encoder_from_config(encoder_class, encoder_config or {}) if encoder_class else None
        if batch_norm_eps is not None:
            # FLUX.2 pipelines read vae.bn.running_mean/var to (de)normalise their patchified latents
            patch = math.prod(patch_size or (1, 1))
            self.bn = nn.BatchNorm2d(
                patch * latent_channels, eps=batch_norm_eps, momentum=batch_norm_momentum, affine=False,
                track_running_stats=True,
            )
        else:
            self.bn = None
        self.use_slicing = False
        self.use_tiling = False
        self.tile_size = 64
        self.tile_overlap: int | None = None
        self.deflicker_settings: DeflickerSettings | None = None  # enable_deflicker

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_decoder(
        cls,
        decoder: LatentDecoder,
        vae: nn.Module | None = None,
        keep_encoder: bool = True,
        force: bool = False,
    ) -> "FastVAE":
        """Wrap ``decoder``; with ``vae`` (the pipeline's original VAE) take its config values and, if
        ``keep_encoder``, its encoder (shared weights, no copy). The decoder module itself is used, not copied.
        ``decoder`` must decode ``vae``'s latents as :func:`swap_decoder` checks them (``force=True`` accepts
        another space of the same shape: a fine-tuned VAE)."""
        if not isinstance(decoder, LatentDecoder):
            raise InputTypeError(f"FastVAE needs a fastdec LatentDecoder, got {type(decoder).__name__}")
        check_flags("FastVAE.from_decoder", keep_encoder=keep_encoder, force=force)
        space = decoder.latent_space
        levels = int(math.log2(space.spatial_factor)) + 1
        width = int(getattr(decoder.config, "width", 64))
        values: dict[str, Any] = dict(
            decoder_architecture=decoder.architecture,
            decoder_config=decoder.config_dict(),
            latent_space=space.to_dict(),
            latent_channels=space.channels,
            block_out_channels=[width] * levels,
            encoder_block_out_channels=[width] * levels,
            scaling_factor=space.scaling_factor,
            shift_factor=space.shift_factor or None,
            latents_mean=list(space.latents_mean) if space.latents_mean else None,
            latents_std=list(space.latents_std) if space.latents_std else None,
            batch_norm_eps=space.batch_norm_eps,
            patch_size=[space.patch_size] * 2 if space.batch_norm_eps is not None else None,
        )
        encoder = None
        bn_source = None
        if vae is not None:
            if not isinstance(vae, nn.Module):
                raise InputTypeError(f"vae must be the pipeline's diffusers VAE (pipe.vae), got {type(vae).__name__}")
            vae_space = detect_latent_space(vae)  # a module with no config: its error
            # channels alone were compared: an SDXL decoder over an SD 1.5 VAE decoded wrong pictures
            check_decoder_fits(decoder, vae_space, "the VAE", allow_other_statistics=force)
            vae_config = vae.config
            for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size",
                        "batch_norm_eps", "batch_norm_momentum", "patch_size", "in_channels"):
                value = _config_get(vae_config, key)
                if value is not None or key in ("shift_factor", "latents_mean", "latents_std"):
                    values[key] = list(value) if isinstance(value, tuple) else value
            if isinstance(vae, FastVAE):
                encoder = vae.encoder_vae if keep_encoder else None
                if encoder is not None:
                    values["encoder_class"] = vae.config.encoder_class
                    values["encoder_config"] = dict(vae.config.encoder_config)
            elif keep_encoder:
                encoder = _encoder_view(vae)
                values["encoder_class"] = type(vae).__name__
                values["encoder_config"] = {k: v for k, v in dict(vae.config).items()}
            bn_source = getattr(vae, "bn", None)
        if values.get("batch_norm_eps") is not None and not isinstance(bn_source, nn.BatchNorm2d):
            raise PipelineError(
                f"{space.name} pipelines normalise latents with the VAE's batch-norm statistics: pass the original "
                "VAE (FastVAE.from_decoder(decoder, vae=pipe.vae)) or use swap_decoder(pipe, decoder)"
            )
        fast = cls(**values)
        fast.decoder = decoder
        fast.encoder_vae = encoder
        if fast.bn is not None:
            fast.bn.load_state_dict(bn_source.state_dict())
            # statistics only: eval mode so that nothing can update them
            reference = next(iter(decoder.parameters()))
            fast.bn.to(device=reference.device, dtype=reference.dtype).eval()
        return fast

    # -- properties --------------------------------------------------------------------
    @property
    def latent_space(self) -> LatentSpace:
        """The decoder's latent space with the original VAE's scaling/shift/mean/std (what ``decode`` converts with)."""
        keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "batch_norm_eps")
        return self.decoder.latent_space.with_vae_config({k: self.config[k] for k in keys})

    @property
    def has_encoder(self) -> bool:
        return self.encoder_vae is not None

    # -- tiling / slicing --------------------------------------------------------------
    def enable_tiling(self, tile_size: int = 64, overlap: int | None = None) -> None:
        """Decode in overlapping tiles of ``tile_size`` latent pixels (``fastdec.runtime.tiling.decode_tiled``)."""
        if self.decoder.is_video:
            raise PipelineError(
                "tiling is for image decoders; a video decoder decodes whole frames: lower decode_chunk_size instead"
            )
        if tile_size is None:  # check_count reads None as "not given"; a tile needs a size
            raise UsageError("tile_size must be a whole number >= 1, got None")
        check_count("tile_size", tile_size)  # int("abc") raised, 64.9 became 64, and 0 failed at the first decode
        check_count("overlap", overlap, minimum=0)
        self.use_tiling = True
        self.tile_size = tile_size
        self.tile_overlap = overlap

    def enable_slicing(self) -> None:
        """Decode one sample (one clip for video decoders) at a time."""
        self.use_slicing = True

    # -- deflicker ---------------------------------------------------------------------
    def enable_deflicker(self, settings: DeflickerSettings | None = None) -> None:
        """Steady every decoded clip where the picture holds still (:mod:`fastdec.runtime.deflickering`):
        for generated video, whose latents jitter from frame to frame. It filters each ``decode(...,
        num_frames=T)`` call's clips on their own, so a pipeline decoding in chunks (Stable Video Diffusion's
        ``decode_chunk_size``) is filtered chunk by chunk: pass ``decode_chunk_size=num_frames`` for whole clips."""
        if not (settings is None or isinstance(settings, DeflickerSettings)):
            raise InputTypeError(f"enable_deflicker takes DeflickerSettings (or nothing for the defaults), got "
                                 f"{settings!r}")
        self.deflicker_settings = settings or DeflickerSettings()

    def disable_deflicker(self) -> None:
        self.deflicker_settings = None

    # -- encode ------------------------------------------------------------------------
    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        """The original VAE's ``encode`` (its ``AutoencoderKLOutput`` with ``latent_dist``)."""
        if self.encoder_vae is None:
            raise PipelineStateError(
                "this FastVAE has no encoder (made with keep_encoder=False), but the pipeline needs vae.encode "
                "(img2img, inpainting, SVD image conditioning): swap with keep_encoder=True"
            )
        if not isinstance(x, torch.Tensor):  # an AttributeError on .to before
            raise InputTypeError(f"FastVAE.encode takes images as a torch.Tensor (N, 3, H, W), got {type(x).__name__}")
        reference = next(iter(self.encoder_vae.parameters()))
        return self.encoder_vae.encode(x.to(device=reference.device, dtype=reference.dtype), return_dict=return_dict)

    # -- decode ------------------------------------------------------------------------
    def _decode_images(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling:
            from .runtime.tiling import decode_tiled

            return torch.cat([decode_tiled(self.decoder, s, tile=self.tile_size, overlap=self.tile_overlap)
                              for s in z.split(1)])
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self.decoder(s) for s in z.split(1)])
        return self.decoder(z)

    def _decode_video(self, z: torch.Tensor, num_frames: int | None) -> torch.Tensor:
        if self.use_tiling:
            raise PipelineError("tiling is for image decoders: disable_tiling() for a video decoder")
        clips = _as_clips(z, num_frames or 1)  # without a frame count every latent is a one-frame clip
        if self.use_slicing and clips.shape[0] > 1:
            out = torch.cat([self.decoder(c) for c in clips.split(1)])
        else:
            out = self.decoder(clips)
        return out.flatten(0, 1)

    def _deflickered(self, rgb: torch.Tensor, num_frames: int) -> torch.Tensor:
        return deflicker(_as_clips(rgb, num_frames), self.deflicker_settings).flatten(0, 1)

    @apply_forward_hook
    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Raw VAE latents (N, C, h, w) -> images in [-1, 1] (N, 3, H, W).

        For video, frames come flattened (clips*num_frames, C, h, w) as Stable Video Diffusion
        passes them: an image decoder decodes each frame, a video decoder each clip.
        ``generator`` is accepted for API compatibility (decoding is deterministic).
        """
        if not isinstance(z, torch.Tensor):
            raise InputTypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
        space = self.latent_space
        if z.ndim != 4:
            raise PipelineError(
                f"FastVAE.decode expects VAE latents shaped (N, C, h, w), got {tuple(z.shape)}; video frames go "
                "flattened as (clips*frames, C, h, w) with num_frames=frames"
            )
        if z.shape[1] != space.channels:
            raise PipelineError(space.channel_mismatch_message(z.shape[1]))
        if not z.is_floating_point():
            raise InputTypeError(f"latents must be a float tensor, got {z.dtype}")
        if num_frames is not None:
            check_count("num_frames", num_frames)
            _as_clips(z, num_frames)  # a frame count that cannot group the batch is refused before decoding
        filtering = self.deflicker_settings is not None and (num_frames or 1) > 1
        # convert in float32: bf16 (FLUX) loses visible precision in the shift/scale
        latents = space.vae_to_decoder(z.float())
        if self.decoder.is_video:
            rgb = self._decode_video(latents, num_frames)
        else:
            rgb = self._decode_images(latents)
        if filtering:
            rgb = self._deflickered(rgb, num_frames)
        sample = rgb * 2 - 1
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode with the original encoder, decode with the fast decoder (like ``AutoencoderKL.forward``)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict, num_frames=num_frames)


def _as_clips(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Frames flattened as diffusers video pipelines pass them, (clips*num_frames, ...), as (clips, num_frames, ...)."""
    if frames.shape[0] % num_frames:
        raise PipelineError(
            f"decode got {frames.shape[0]} latent frames with num_frames={num_frames}: the frame count must divide "
            "the batch (pass frames as (clips*num_frames, C, h, w))"
        )
    return frames.reshape(-1, num_frames, *frames.shape[1:])


# ----------------------------------------------------------------------------- swapping
def _as_decoder(decoder_or_path: LatentDecoder | str | os.PathLike, space: LatentSpace) -> LatentDecoder:
    if isinstance(decoder_or_path, nn.Module) and not isinstance(decoder_or_path, LatentDecoder):
        raise PipelineError(f"swap_decoder needs a fastdec decoder, a pretrained name, a checkpoint path or a Hub id, "
                            f"got a {type(decoder_or_path).__name__}")
    if isinstance(decoder_or_path, LatentDecoder):
        return decoder_or_path
    # the pipeline's space only picks between spaces a TAESD .pth cannot tell apart; check_decoder_fits judges
    if not _is_plain_file(decoder_or_path):
        return resolve_decoder(decoder_or_path)
    return resolve_in_space(decoder_or_path, space.name, "or a pipeline whose VAE has that space")


def _is_plain_file(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and Path(spec).expanduser().exists()


def _module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def swap_decoder(
    pipe: Any,
    decoder_or_path: LatentDecoder | str | os.PathLike,
    keep_encoder: bool = True,
    force: bool = False,
) -> Any:
    """Replace ``pipe.vae`` by a :class:`FastVAE` decoding with ``decoder_or_path`` (a decoder, a checkpoint
    path or a Hub id); returns the pipeline. The original VAE is kept for :func:`restore_decoder`; its decoder
    half is moved to the CPU meanwhile, so it holds no accelerator memory.

    ``keep_encoder=False`` drops the original encoder (text-to-image only). ``force=True`` accepts a decoder
    made for another latent space of the same shape (a fine-tuned VAE); channels and spatial factor must match.
    """
    check_flags("swap_decoder", keep_encoder=keep_encoder, force=force)
    current = getattr(pipe, "vae", None)
    if current is None:
        raise PipelineError(f"{type(pipe).__name__} has no vae component to swap")
    if not callable(getattr(pipe, "register_modules", None)):  # it failed after moving the VAE's decoder to the CPU
        raise PipelineError(f"swap_decoder takes a diffusers pipeline (a DiffusionPipeline, which registers its "
                            f"vae), got {type(pipe).__name__}")
    _refuse_offloaded(current)
    original = getattr(pipe, _ORIGINAL_VAE_ATTR, None)
    source = original if original is not None else current
    vae_space = detect_latent_space(source)
    decoder = _as_decoder(decoder_or_path, vae_space)
    check_decoder_fits(decoder, vae_space, allow_other_statistics=force)
    if not keep_encoder and type(pipe).__name__.startswith("StableVideoDiffusion"):
        raise PipelineError(
            "StableVideoDiffusionPipeline encodes its conditioning image with vae.encode: swap with keep_encoder=True"
        )
    device, dtype = _module_placement(current)
    if isinstance(current, FastVAE) and original is None:
        # a pipeline loaded with a FastVAE: reuse its encoder and config values
        fast = FastVAE.from_decoder(decoder, vae=current, keep_encoder=keep_encoder, force=force)
    else:
        fast = FastVAE.from_decoder(decoder, vae=source, keep_encoder=keep_encoder, force=force)
    nn.Module.to(fast, device=device, dtype=dtype)  # ModelMixin.to warns spuriously on every dtype cast
    if original is None and not isinstance(current, FastVAE):
        for name in ("decoder", "post_quant_conv"):
            module = getattr(current, name, None)
            if isinstance(module, nn.Module):
                module.to("cpu")
        setattr(pipe, _ORIGINAL_VAE_ATTR, current)
    pipe.register_modules(vae=fast)
    return pipe


def restore_decoder(pipe: Any) -> Any:
    """Put back the VAE that :func:`swap_decoder` replaced, on the FastVAE's current device and dtype."""
    original = getattr(pipe, _ORIGINAL_VAE_ATTR, None)
    if original is None:
        raise PipelineError(
            "this pipeline has no original VAE to restore: it was not swapped with swap_decoder in this session "
            "(a pipeline loaded from disk with a FastVAE has only its encoder; reload the original pipeline)"
        )
    device, dtype = _module_placement(pipe.vae)
    nn.Module.to(original, device=device, dtype=dtype)
    pipe.register_modules(vae=original)
    delattr(pipe, _ORIGINAL_VAE_ATTR)
    return pipe


# ----------------------------------------------------------------------------- previews
def _unpack_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed transformer latents (B, h/2*w/2, C*4) -> (B, C*4, h/2, w/2) (FLUX.1 and FLUX.2 share the layout)."""
    b, seq, d = tokens.shape
    if height * width != seq:
        raise PipelineError(f"packed latents have {seq} tokens, not {height}x{width}: pass the pipeline's height/width")
    return tokens.transpose(1, 2).reshape(b, d, height, width)


def _takes_args(fn: Callable, count: int) -> bool:
    try:
        return len(inspect.signature(fn).parameters) == count
    except (TypeError, ValueError):
        return False


def _to_pil(rgb: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(rgb)]


class PreviewCallback:
    """``callback_on_step_end`` that shows the image being sampled, decoded with a fast decoder every ``every`` steps.

    >>> preview = PreviewCallback(decoder, every=5, out_dir="previews")
    >>> pipe(prompt, callback_on_step_end=preview, callback_on_step_end_tensor_inputs=["latents"])

    ``on_preview(step, images)`` receives a list of PIL images (all frames of all clips for video
    pipelines); ``out_dir`` gets ``step_0004_0.png``-style files, written atomically. For packed
    transformer latents (FLUX.1, FLUX.2) pass the ``height``/``width`` given to the pipeline unless the
    image is square. The callback returns ``callback_kwargs`` unchanged: sampling is not affected.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        decoder: LatentDecoder | str | os.PathLike,
        every: int = 1,
        on_preview: Callable[[int, list], Any] | None = None,
        out_dir: str | os.PathLike | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        check_count("every (steps between previews)", every)
        if on_preview is None and out_dir is None:
            raise PipelineError("PreviewCallback needs somewhere to put previews: pass on_preview=fn or out_dir=...")
        # each of these failed at the first preview, after the sampling steps before it had run
        if on_preview is not None and not callable(on_preview):
            raise InputTypeError(f"on_preview must be a function of (step, images), got {type(on_preview).__name__}")
        for name, value in (("height", height), ("width", width)):
            check_count(name, value)
        if (height is None) != (width is None):  # one alone was dropped, and the grid taken as square
            raise PipelineError("PreviewCallback needs height and width together (as given to the pipeline), or "
                                "neither for a square image")
        self.decoder = resolve_decoder(decoder)
        self.out_dir = prepare_output_dir(out_dir, "out_dir") if out_dir is not None else None  # a file there
        self.every = every
        self.on_preview = on_preview
        self.height = height
        self.width = width
        self.steps_previewed: list[int] = []

    def _latent_grid(self, pipe: Any, n_tokens: int) -> tuple[int, int]:
        scale = 2 * int(getattr(pipe, "vae_scale_factor", 8))  # 2x2 packing on top of the VAE's factor
        if self.height and self.width:
            return self.height // scale, self.width // scale
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise PipelineError(
                f"the pipeline's latents are packed ({n_tokens} tokens) and the image is not square: pass "
                "height= and width= (as given to the pipeline) to PreviewCallback"
            )
        return side, side

    def decoder_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline-space latents (as in ``callback_kwargs``) -> the decoder's input."""
        space = self.decoder.latent_space
        if latents.ndim == 3:
            grid_h, grid_w = self._latent_grid(pipe, latents.shape[1])
            unpack = getattr(pipe, "_unpack_latents", None)
            if space.batch_norm_eps is None and unpack is not None and _takes_args(unpack, 4):
                # FLUX.1-family pipelines: their own unpacking, given the pixel size it implies
                scale = int(pipe.vae_scale_factor)
                return unpack(latents, grid_h * 2 * scale, grid_w * 2 * scale, scale)
            grid = _unpack_tokens(latents, grid_h, grid_w)
            bn = getattr(getattr(pipe, "vae", None), "bn", None)
            if space.batch_norm_eps is not None:
                if not isinstance(bn, nn.BatchNorm2d):
                    raise PipelineError("FLUX.2 previews need the pipeline VAE's bn statistics (pipe.vae.bn)")
                eps_space = space.with_vae_config({"batch_norm_eps": bn.eps})
                raw = eps_space.bn_denormalize(grid.float(), bn.running_mean, bn.running_var)
                return space.vae_to_decoder(raw)
            p = 2
            b, cpp, h, w = grid.shape
            return grid.view(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, -1, h * p, w * p)
        if latents.ndim == 5 and not self.decoder.is_video:
            return latents.flatten(0, 1)  # SVD: (B, F, C, h, w) frames
        return latents

    @torch.no_grad()
    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if (step + 1) % self.every:
            return callback_kwargs
        latents = callback_kwargs.get("latents")
        if latents is None:
            raise PipelineError(
                "PreviewCallback needs the latents: pass callback_on_step_end_tensor_inputs=['latents'] to the pipeline"
            )
        z = self.decoder_latents(pipe, latents)
        if self.decoder.is_video and z.ndim == 4:  # an image pipeline previewed by a video decoder: one-frame clips
            z = z[:, None]  # (the decoder's "add a time dimension" was no advice inside a callback)
        rgb = self.decoder(z)
        if rgb.ndim == 5:
            rgb = rgb.flatten(0, 1)
        images = _to_pil(rgb)
        self.steps_previewed.append(step)
        if self.out_dir is not None:
            for index, image in enumerate(images):
                atomic_write(self.out_dir / f"step_{step:04d}_{index}.png",
                             lambda tmp, im=image: im.save(tmp, format="PNG"), suffix=".png")
        if self.on_preview is not None:
            self.on_preview(step, images)
        return callback_kwargs

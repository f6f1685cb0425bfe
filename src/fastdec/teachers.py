"""Teachers: the encoder (and optionally the decoder) that define a latent space for distillation.

A teacher turns RGB images in [0, 1] into *decoder-space* latents (what fastdec decoders take,
see ``fastdec.latent_spaces``) and, when it has a decoder, latents back into RGB for
teacher-matching losses and validation grids.

Two kinds:

* a diffusers VAE (``AutoencoderKL``, ``AutoencoderKLTemporalDecoder``, ``AutoencoderDC``,
  ``AutoencoderKLFlux2``) from a ``from_pretrained`` folder (or a pipeline folder with ``vae/``),
  a single-file checkpoint, or a Hub id. The latent space is read from the class and config.
* a TAESD-family encoder ``.pth`` (e.g. ``taef2_encoder.pth`` for FLUX.2, ``taesana_encoder.pth``
  for Sana), optionally with a TAESD-family decoder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .dtypes import parse_dtype
from .errors import CheckpointError, DecoderSpecError, LatentSpaceMismatchError, TeacherError, UsageError
from .io.files import read_json_object
from .latent_spaces import PRESETS as SPACES, LatentSpace, get_latent_space
from .models.base import LatentDecoder
from .resolve import load_encoder, locate, resolve_in_space

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLTemporalDecoder", "AutoencoderDC", "AutoencoderKLFlux2")
_NOT_A_TEACHER = ("a diffusers VAE (folder with config.json, or a vae/ subfolder; single-file .safetensors) "
                  "nor a TAESD-family encoder")


class Teacher:
    """Common interface. ``encode``: (N, 3, H, W) RGB [0, 1] -> (N, C, H/f, W/f) decoder-space latents."""

    latent_space: LatentSpace
    spatial_factor: int
    has_decoder: bool = False
    # identifies weights + settings, so a latent cache built with another teacher is never reused
    fingerprint: str = ""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise TeacherError(
            f"teacher for '{self.latent_space.name}' has no decoder: pass a TAESD-family decoder "
            "(--teacher-decoder) or use a diffusers VAE as teacher"
        )

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"teacher expects RGB images shaped (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        f = self.spatial_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise UsageError(f"image size {tuple(images.shape[-2:])} is not a multiple of the teacher's factor {f}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(space={self.latent_space.name}, decoder={self.has_decoder})"


def _file_fingerprint(path: Path) -> str:
    """A hash of the teacher's bytes (every file of a folder, with its name), a part of the latent cache's key.

    The content rather than size and mtime: a re-trained encoder has the same size, and ``cp -p`` or ``rsync -t``
    keep the old mtime, and either would silently reuse latents from the old weights. Hashing costs a fraction
    of loading the weights (a 330 MB VAE folder hashes in well under a second)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}\0".encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- TAESD family
class TAETeacher(Teacher):
    """A TAESD-family encoder; latents come out in decoder space already."""

    def __init__(self, encoder: torch.nn.Module, decoder: LatentDecoder | None, fingerprint: str):
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder.eval().requires_grad_(False) if decoder is not None else None
        self.latent_space = encoder.latent_space
        self.spatial_factor = encoder.downsample_factor
        self.has_decoder = decoder is not None
        self.fingerprint = fingerprint

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self.encoder(images).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return super().decode(z)
        return self.decoder(z).float()

    def to(self, device: torch.device | str) -> "TAETeacher":
        self.encoder.to(device)
        if self.decoder is not None:
            self.decoder.to(device)
        return self


# ----------------------------------------------------------------------------- diffusers VAEs
def space_for_vae(class_name: str, config: dict[str, Any]) -> LatentSpace:
    """The latent space of a diffusers VAE, from its class and config (scaling/shift/mean/std applied)."""
    channels = int(config.get("latent_channels") or 4)
    if class_name == "AutoencoderKLFlux2":
        base = SPACES["flux2"]
    elif class_name == "AutoencoderKLTemporalDecoder":
        base = SPACES["svd"]
    elif class_name == "AutoencoderDC":
        base = SPACES["sana"]
        factor = 2 ** (len(config.get("encoder_block_out_channels") or (0,) * 6) - 1)
        if factor != base.spatial_factor or channels != base.channels:
            import dataclasses
            base = dataclasses.replace(base, name=f"dcae-f{factor}c{channels}", channels=channels, spatial_factor=factor)
    elif class_name == "AutoencoderKL":
        scaling = config.get("scaling_factor")
        shift = config.get("shift_factor")
        candidates = [s for s in SPACES.values() if s.channels == channels and not s.temporal and s.patch_size == 1
                      and s.spatial_factor == 8]
        if not candidates:
            raise TeacherError(
                f"AutoencoderKL with {channels} latent channels matches no known latent space; "
                "pass latent_space=... (--latent-space) to name it"
            )
        # the closest preset by scaling/shift; with_vae_config then takes the exact values from the config
        def distance(s: LatentSpace) -> float:
            return abs(s.scaling_factor - float(scaling or s.scaling_factor)) + abs(s.shift_factor - float(shift or 0.0))
        base = min(candidates, key=distance)
    else:
        raise TeacherError(f"unsupported VAE class '{class_name}': fastdec teachers are {', '.join(VAE_CLASSES)}")
    return base.with_vae_config(config)


class DiffusersTeacher(Teacher):
    """A diffusers VAE. Encoding takes the latent distribution's mode (its mean) unless ``sample``."""

    def __init__(self, vae: torch.nn.Module, latent_space: LatentSpace, fingerprint: str, sample: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        self.class_name = type(vae).__name__
        self.latent_space = latent_space
        self.spatial_factor = latent_space.spatial_factor
        self.has_decoder = True
        self.sample = sample
        self.fingerprint = f"{fingerprint}:{'sample' if sample else 'mode'}"

    @property
    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        p = self._param
        x = images.to(device=p.device, dtype=p.dtype) * 2 - 1
        out = self.vae.encode(x)
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            raw = dist.sample() if self.sample else dist.mode()
        else:  # AutoencoderDC is deterministic
            raw = out.latent
        return self.latent_space.vae_to_decoder(raw.float())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        p = self._param
        raw = self.latent_space.decoder_to_vae(z.float()).to(device=p.device, dtype=p.dtype)
        if self.class_name == "AutoencoderKLTemporalDecoder":
            # the temporal decoder mixes frames: treat the batch as one clip
            out = self.vae.decode(raw, num_frames=raw.shape[0]).sample
        else:
            out = self.vae.decode(raw).sample
        return ((out.float() + 1) / 2).clamp(0, 1)

    def to(self, device: torch.device | str) -> "DiffusersTeacher":
        self.vae.to(device)
        return self


def _vae_folder(path: Path) -> Path | None:
    """The folder holding a diffusers VAE config: the folder itself or its ``vae/`` subfolder."""
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if config.is_file():
            if read_json_object(config, TeacherError, "VAE config").get("_class_name") in VAE_CLASSES:
                return folder
    return None


def _load_vae_folder(folder: Path, dtype: torch.dtype | None) -> tuple[torch.nn.Module, str, dict]:
    import diffusers

    config = read_json_object(folder / "config.json", TeacherError, "VAE config")
    class_name = config["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise TeacherError(f"'{folder}' is a {class_name}, which this diffusers ({diffusers.__version__}) lacks: "
                           "pip install -U diffusers")
    try:
        vae = cls.from_pretrained(str(folder), torch_dtype=dtype) if dtype else cls.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as e:
        raise TeacherError(f"cannot load {class_name} from '{folder}': {e}") from e
    return vae, class_name, dict(vae.config)


def _load_vae_single_file(path: Path, latent_space: LatentSpace | None, dtype: torch.dtype | None):
    import diffusers

    if latent_space is not None and latent_space.name == "flux2":
        order = ["AutoencoderKLFlux2"]
    elif latent_space is not None and latent_space.name == "sana":
        order = ["AutoencoderDC"]
    elif latent_space is not None and latent_space.temporal:
        order = ["AutoencoderKLTemporalDecoder"]
    else:
        order = ["AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC"]
    errors = []
    for class_name in order:
        cls = getattr(diffusers, class_name, None)
        if cls is None or not hasattr(cls, "from_single_file"):
            continue
        try:
            vae = cls.from_single_file(str(path), torch_dtype=dtype, local_files_only=True)
            return vae, class_name, dict(vae.config)
        except Exception as e:  # diffusers raises many types for "not this architecture"
            errors.append(f"{class_name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise TeacherError(
        f"cannot load '{path}' as a single-file VAE ({'; '.join(errors) or 'no loader'}). "
        "Pass a diffusers folder (with config.json) instead, or --latent-space to pick the VAE class"
    )


def load_teacher(
    source: str | os.PathLike,
    decoder: str | os.PathLike | LatentDecoder | None = None,
    latent_space: LatentSpace | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    sample: bool = False,
) -> Teacher:
    """Load a teacher from a TAESD-family encoder file, a diffusers VAE folder / single file, or a Hub id.

    ``decoder`` (TAESD-family teachers only) is an optional decoder for teacher-matching losses and
    validation grids; diffusers VAEs bring their own. ``latent_space`` overrides detection.
    ``sample=True`` draws from the latent distribution instead of taking its mode. ``dtype``: a torch dtype
    or a name (``fp32|fp16|bf16``).
    """
    dtype = parse_dtype(dtype)
    space = get_latent_space(latent_space) if latent_space is not None else None
    path = Path(source).expanduser()
    if path.is_dir():
        folder = _vae_folder(path)
        if folder is not None:
            if decoder is not None:
                raise TeacherError("a diffusers VAE teacher brings its own decoder: drop the separate teacher decoder")
            vae, class_name, config = _load_vae_folder(folder, dtype)
            chosen = _vae_space(space, space_for_vae(class_name, config), f"'{folder}' is a {class_name}")
            return DiffusersTeacher(vae.to(device), chosen, f"{class_name}:{_file_fingerprint(folder)}", sample)
    is_vae_file = path.is_file() and path.suffix in (".safetensors", ".ckpt") and not _is_taesd_file(path)
    if is_vae_file:
        vae, class_name, config = _load_vae_single_file(path, space, dtype)
        chosen = _vae_space(space, space_for_vae(class_name, config), f"'{path}' is a {class_name}")
        return DiffusersTeacher(vae.to(device), chosen, f"{class_name}:{_file_fingerprint(path)}", sample)
    if path.exists():
        return _load_tae_teacher(path, decoder, space, device, dtype)
    if _is_hub_id(source):
        return _load_hub_teacher(str(source), space, device, dtype, sample)
    raise TeacherError(f"teacher '{source}' is neither {_NOT_A_TEACHER}: no such file or folder (relative paths "
                       f"start from {Path.cwd()}), and not a Hub id (owner/name)")


def _vae_space(asked: LatentSpace | None, detected: LatentSpace, what: str) -> LatentSpace:
    """The space a diffusers VAE teacher is used in: the one asked for, when its latents have the VAE's shape
    (channels and factor: a /32 DC-AE taken as /8 FLUX.2 would encode videos a quarter the size), else its own."""
    if asked is None:
        return detected
    if (asked.channels, asked.spatial_factor) != (detected.channels, detected.spatial_factor):
        raise TeacherError(f"{what} for {detected.channels}-channel latents at /{detected.spatial_factor}, not "
                           f"'{asked.name}' ({asked.channels} channels, /{asked.spatial_factor})")
    return asked


def _load_tae_teacher(path: Path, decoder, space: LatentSpace | None, device, dtype) -> TAETeacher:
    """A TAESD-family encoder file or AutoencoderTiny folder, with an optional decoder of the same space."""
    try:
        encoder = load_encoder(path, latent_space=space, device=device, dtype=dtype)
    except CheckpointError as e:
        raise TeacherError(f"'{path}' is neither {_NOT_A_TEACHER}: {e}") from e
    student = None
    if decoder is not None:
        # an object too is checked on the whole space: an SD 1.5 decoder object passed beside an SDXL encoder
        try:
            student = resolve_in_space(decoder, encoder.latent_space, "or the encoder of that space as --teacher",
                                       device=device, dtype=dtype)
        except LatentSpaceMismatchError as e:
            raise TeacherError(f"the teacher decoder does not fit the encoder: {e}") from e
    return TAETeacher(encoder, student, f"tae:{_file_fingerprint(path)}")


def _is_taesd_file(path: Path) -> bool:
    """True for a safetensors file holding a TAESD-family or AutoencoderTiny state dict."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (OSError, SafetensorError):  # not readable as safetensors: the VAE loader names the problem
        return False
    return "0.weight" in keys or any(k.startswith("encoder.layers.") for k in keys)


def _is_hub_id(source: str | os.PathLike) -> bool:
    """Whether a spec that is no local path reads as a Hub id, by fastdec.resolve's one rule."""
    try:
        return locate(source).kind == "hub"
    except DecoderSpecError:  # a missing file or an unknown name: not a Hub id either
        return False


def _hub_revision(downloaded: str) -> str:
    """The commit a Hub download came from (``.../snapshots/<commit>/...`` in the Hub cache): a repository
    updated on the Hub is a new teacher for the latent cache, not the old one's latents."""
    parts = Path(downloaded).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else "unknown"


def _load_hub_teacher(repo_id: str, space, device, dtype, sample) -> Teacher:
    import diffusers
    from huggingface_hub import hf_hub_download

    errors = []
    for subfolder in ("vae", None):
        try:
            config_path = hf_hub_download(repo_id, "config.json", subfolder=subfolder, etag_timeout=10)
        except Exception as e:  # offline, missing file: all mean "not here"
            errors.append(f"{subfolder or '.'}: {type(e).__name__}")
            continue
        config = read_json_object(Path(config_path), TeacherError, "VAE config")
        class_name = config.get("_class_name")
        if class_name not in VAE_CLASSES:
            continue
        cls = getattr(diffusers, class_name)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        vae = cls.from_pretrained(repo_id, torch_dtype=dtype, **kwargs)
        chosen = _vae_space(space, space_for_vae(class_name, dict(vae.config)), f"'{repo_id}' is a {class_name}")
        return DiffusersTeacher(vae.to(device), chosen,
                                f"{class_name}:hub:{repo_id}@{_hub_revision(config_path)}", sample)
    raise TeacherError(
        f"could not load a VAE teacher from the Hub id '{repo_id}' ({'; '.join(errors) or 'no VAE config found'}). "
        "If this machine is offline, download the repository elsewhere and pass its local folder"
    )

"""Saving and loading decoders.

Our format: one safetensors file whose metadata carries the architecture, its
config and the latent space, so ``load_decoder(path)`` needs nothing else.
Also read: original TAESD-family ``.pth`` state dicts (TAESD, TAESDXL, TAESD3,
TAEF1, TAEF2, TAESana), diffusers ``AutoencoderTiny`` folders and state dicts,
from local paths. Which spec means which source (name, file, folder, Hub id) is decided in one place,
:mod:`fastdec.resolve`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import CheckpointError, InputTypeError, LatentSpaceError, LatentSpaceMismatchError, UsageError
from ..latent_spaces import PRESETS as SPACES, LatentSpace, get_latent_space
from ..models.base import LatentDecoder
from ..models.registry import ARCHITECTURES, build_decoder
from ..models.tae import TAEConfig, TAEDecoder, TAEEncoder, TAEEncoderConfig, tae_factor
from .files import as_path, atomic_write, check_output_file, read_json_object
from .pickles import load_weights_only

FORMAT = "fastdec"
FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------- writing
def save_decoder(decoder: LatentDecoder, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``decoder`` to a self-describing safetensors file (atomically)."""
    if not isinstance(decoder, LatentDecoder):
        raise InputTypeError(f"save_decoder expects a fastdec decoder, got {type(decoder).__name__}")
    path = as_path(path, "save_decoder's path")  # expanded as load_decoder reads it: '~/d.safetensors' made a folder '~'
    if path.suffix != ".safetensors":
        raise UsageError(f"decoders are saved as .safetensors, got '{path}': name the file *.safetensors")
    check_output_file(path, "decoder file")  # a folder in its place or an unwritable parent, named as such
    if not isinstance(extra_metadata, (Mapping, type(None))):
        raise InputTypeError(f"extra_metadata is a mapping of strings, got {type(extra_metadata).__name__}")
    state = {k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}
    if not state:  # a file of no tensors was written, and failed to load as "67 tensor(s) missing"
        raise UsageError(f"this {type(decoder).__name__} holds no weights to save (an OnnxDecoder keeps them in its "
                         ".onnx file): save the PyTorch decoder it was exported from")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": decoder.architecture,
        "config": json.dumps(decoder.config_dict(), sort_keys=True),
        "latent_space": decoder.latent_space.to_json(),
    }
    extra = dict(extra_metadata or {})
    taken = sorted(set(extra) & set(metadata))  # they describe the weights: overwritten, the file would not load
    if taken:
        raise UsageError(f"extra_metadata may not set {taken}: fastdec writes those from the decoder itself")
    wrong = sorted(k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str)))
    if wrong:
        raise InputTypeError(f"extra_metadata keys and values must be strings (safetensors metadata), not for {wrong}")
    metadata.update(extra)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata), suffix=".safetensors")


# ----------------------------------------------------------------------------- reading
def _existing(source: str | os.PathLike, what: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} '{source}' not found: check the path")
    return path


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) metadata of one file, with errors that name the file."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        state = load_weights_only(path, CheckpointError, "checkpoint")
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, Exception) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"cannot read checkpoint '{path}': {type(e).__name__}: {e}. The file is truncated or corrupt, "
            "or not a weights file: download or export it again"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors")
    return state, {}


def _module_groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Classify the parameterised entries of a TAESD nn.Sequential: ('block'|'conv', index), in order."""
    indices = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    return [("block" if f"{i}.conv.0.weight" in state else "conv", i) for i in indices]


def _split_blocks(kinds: list[str]) -> list[int]:
    """Number of blocks between consecutive convs."""
    counts, current = [], None
    for kind in kinds:
        if kind == "conv":
            if current is not None:
                counts.append(current)
            current = 0
        else:
            current = (current or 0) + 1
    return counts


_NAME_HINTS = [("taesdxl", "sdxl"), ("taesd3", "sd3"), ("taef1", "flux1"), ("taef2", "flux2"),
               ("taesana", "sana"), ("taesdv", "svd"), ("taesd", "sd15")]


def _guess_space(channels: int, factor: int, name: str) -> LatentSpace:
    lowered = name.lower()
    for hint, space in _NAME_HINTS:
        if hint in lowered and SPACES[space].channels == channels:
            return SPACES[space]
    candidates = [s for s in SPACES.values() if s.channels == channels and s.spatial_factor == factor]
    if not candidates:
        raise CheckpointError(f"'{name}': no known latent space has {channels} channels at {factor}x")
    if len(candidates) > 1:
        warnings.warn(
            f"'{name}': {channels}-channel latents fit {', '.join(s.name for s in candidates)}; assuming "
            f"{candidates[0].name}. Pass latent_space=... to choose.",
            stacklevel=3,
        )
    return candidates[0]


def _taesd_decoder_config(state: Mapping[str, torch.Tensor], path: Path) -> TAEConfig:
    """The TAEConfig of a TAESD-family decoder state dict, read from its keys and layer shapes.

    Its convs are: the input conv, one after each upsampling, the output conv. Each conv but the last gives the
    width of the blocks after it, so per-stage widths (TAESana's 256, 128, 64, ...) are read one stage at a time."""
    groups = _module_groups(state)
    if not groups or groups[0] != ("conv", 1) or "1.weight" not in state:
        raise CheckpointError(f"'{path}' is not a TAESD-family decoder state dict (no '1.weight' input conv)")
    channels = int(state["1.weight"].shape[1])
    counts = _split_blocks([k for k, _ in groups])
    if len(counts) < 2:
        raise CheckpointError(f"'{path}': unexpected TAESD decoder layout")
    convs = [i for kind, i in groups if kind == "conv"]
    widths = tuple(int(state[f"{i}.weight"].shape[0]) for i in convs[:-1])
    rgb = int(state[f"{convs[-1]}.weight"].shape[0])
    if rgb != 3:
        raise CheckpointError(f"'{path}': the output conv ({convs[-1]}.weight) gives {rgb} channels, not RGB (3)")
    return TAEConfig(
        latent_channels=channels, widths=widths, stage_blocks=tuple(counts[:-1]), final_blocks=counts[-1],
        use_midblock_gn=any(".pool." in k for k in state),
    )


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"'{path}' does not match the {what} architecture: {e}") from e


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str, offset: int = 0) -> dict[str, torch.Tensor]:
    """Sub-dict under ``prefix`` with the leading Sequential index shifted by ``offset``."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out[f"{int(index) + offset}.{rest}"] = value
    return out


def _decoder_from_taesd_state(state, path: Path, latent_space) -> TAEDecoder:
    config = _taesd_decoder_config(state, path)
    factor = tae_factor(config)
    space = get_latent_space(latent_space) if latent_space else _guess_space(config.latent_channels, factor, path.name)
    if space.channels != config.latent_channels:
        raise CheckpointError(
            f"'{path}' decodes {config.latent_channels}-channel latents but latent space '{space.name}' "
            f"has {space.channels}"
        )
    if space.spatial_factor != factor:
        raise CheckpointError(
            f"'{path}' upsamples x{factor} but latent space '{space.name}' is x{space.spatial_factor}: "
            "pass the latent space this decoder was trained for"
        )
    decoder = TAEDecoder(config, space)
    state = {"layers." + k: v for k, v in state.items()}
    _load_strict(decoder, state, path, f"TAE decoder ({config})")
    return decoder


# what to do about metadata that does not hold together
_METADATA_FIX = ("its metadata is corrupt or was edited by hand: export the decoder again (save_decoder, or the "
                 "decoder.safetensors of its training run)")


def _check_format_version(metadata: Mapping[str, str], path: Path) -> None:
    """Refuse a file of a newer format than this fastdec reads: its metadata may mean something else."""
    version = metadata.get("format_version", FORMAT_VERSION)  # files are always written with one
    if not isinstance(version, str) or not version.isdigit():
        raise CheckpointError(f"'{path}': metadata field 'format_version' is {version!r}, not a version number; "
                              f"{_METADATA_FIX}")
    if int(version) > int(FORMAT_VERSION):
        from .. import __version__

        raise CheckpointError(
            f"'{path}' is in fastdec format version {version}, newer than this fastdec ({__version__}) reads "
            f"(format_version up to {FORMAT_VERSION}): upgrade fastdec (pip install -U fastdec) to load it"
        )


def _json_object(metadata: Mapping[str, str], key: str, path: Path) -> dict:
    if key not in metadata:
        raise CheckpointError(f"'{path}': fastdec metadata lacks the field '{key}'; {_METADATA_FIX}")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}': metadata field '{key}' is not valid JSON ({e}); {_METADATA_FIX}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}': metadata field '{key}' must be a JSON object, got {type(value).__name__} "
                              f"{value!r:.60}; {_METADATA_FIX}")
    return value


def _read_fastdec_metadata(metadata: Mapping[str, str], path: Path) -> tuple[str, dict, LatentSpace]:
    """Architecture, config and latent space of a fastdec file, each checked, or a CheckpointError naming the
    field and the fix."""
    _check_format_version(metadata, path)
    architecture = metadata.get("architecture")
    if not architecture:
        raise CheckpointError(f"'{path}': fastdec metadata lacks the field 'architecture'; {_METADATA_FIX}")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"'{path}': metadata field 'architecture' is '{architecture}', which this fastdec does not know (known: "
            f"{', '.join(sorted(ARCHITECTURES))}): load the plugin that defines it (--plugin) or upgrade fastdec"
        )
    config = _json_object(metadata, "config", path)
    try:
        space = LatentSpace.from_dict(_json_object(metadata, "latent_space", path))
    except LatentSpaceError as e:
        raise CheckpointError(f"'{path}': metadata field 'latent_space': {e}; {_METADATA_FIX}") from e
    return architecture, config, space


def _build_from_metadata(architecture: str, config: dict, space: LatentSpace, path: Path) -> LatentDecoder:
    try:
        return build_decoder(architecture, config, space)
    except (KeyError, ValueError, TypeError) as e:  # config fields out of range, of the wrong type, unknown
        raise CheckpointError(f"'{path}': metadata field 'config' does not make a '{architecture}' decoder: {e}; "
                              f"{_METADATA_FIX}") from e


def _shape_differences(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
    """Up to one example of each kind of difference between two {name: shape} maps, with counts."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. '{missing[0]}'")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'")
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape, e.g. '{key}' is {found[key]} in the file but the config "
                     f"makes {expected[key]}")
    return parts


def _check_weights_fit(architecture: str, config: dict, space: LatentSpace, state: Mapping[str, torch.Tensor],
                       path: Path) -> None:
    """The tensors the metadata's config makes against the file's, built on the meta device (nothing is
    allocated): a corrupt width or block count is named here, not met as an allocation error or a list of
    thousands of keys."""
    try:
        with torch.device("meta"):
            skeleton = _build_from_metadata(architecture, config, space, path)
    except (RuntimeError, NotImplementedError):  # a plugin that cannot be built on meta: the strict load compares
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    differences = _shape_differences(expected, {k: tuple(v.shape) for k, v in state.items()})
    if differences:
        raise CheckpointError(
            f"'{path}' does not match the '{architecture}' decoder that its metadata field 'config' describes "
            f"({'; '.join(differences)}): {_METADATA_FIX}"
        )


def _from_fastdec_file(state, metadata, path: Path, latent_space) -> LatentDecoder:
    architecture, config, space = _read_fastdec_metadata(metadata, path)
    want = get_latent_space(latent_space) if latent_space is not None else None
    differences = space.latent_differences(want) if want is not None else []
    if differences:  # only channels were compared: an SDXL checkpoint was returned for SD 1.5 latents
        raise LatentSpaceMismatchError(f"'{path}'", space.name, want.name, differences)
    _check_weights_fit(architecture, config, space, state, path)
    decoder = _build_from_metadata(architecture, config, space, path)
    _load_strict(decoder, state, path, f"'{architecture}'")
    return decoder


def _tiny_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.exists():
        return {}
    return read_json_object(config_file, CheckpointError, "decoder config")


def _weights_in(folder: Path, kind: str) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", f"{kind}.safetensors"):
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob(f"*{kind}*.safetensors")) + sorted(folder.glob(f"*{kind}*.pth"))
    if len(candidates) == 1:
        return candidates[0]
    if (folder / "vae").is_dir():  # a whole pipeline folder was given
        return _weights_in(folder / "vae", kind)
    raise CheckpointError(
        f"folder '{folder}' holds no single {kind} checkpoint (looked for diffusion_pytorch_model.safetensors, "
        f"*{kind}*.safetensors, *{kind}*.pth); pass the file itself"
    )


def _check_tiny_config(config: dict, path: Path) -> None:
    if config.get("_class_name") not in (None, "AutoencoderTiny"):
        raise CheckpointError(f"'{path}' is a {config['_class_name']}, not an AutoencoderTiny or fastdec decoder")
    for key, expected in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2)):
        if key in config and config[key] != expected:
            raise CheckpointError(f"'{path}': AutoencoderTiny with {key}={config[key]!r} is not supported (need {expected!r})")


def read_decoder(source: str | os.PathLike, latent_space: LatentSpace | str | None = None) -> LatentDecoder:
    """A decoder from a local file or folder: our safetensors format, a TAESD-family .pth, an AutoencoderTiny
    folder or state dict. ``latent_space`` picks the space when the file cannot tell (TAESD vs TAESDXL).

    Names and Hub ids are :func:`fastdec.resolve_decoder`'s job; this reads only what is on disk."""
    path = _existing(source, "checkpoint")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"'{path}' is an ONNX model: --decoder and load_decoder take the checkpoint it was "
                              "exported from; run the .onnx with fastdec.OnnxDecoder(path) in Python")
    tiny_config: dict = {}
    if path.is_dir():
        tiny_config = _tiny_config(path)
        _check_tiny_config(tiny_config, path)
        path = _weights_in(path, "decoder")
    state, metadata = _read_state(path)
    if metadata.get("format") == FORMAT:
        decoder = _from_fastdec_file(state, metadata, path, latent_space)
    elif any(k.startswith("decoder.layers.") for k in state):
        # diffusers AutoencoderTiny: DecoderTiny has no Clamp module, so its indices are one lower
        if latent_space is None and "scaling_factor" in tiny_config and tiny_config.get("scaling_factor") != 1.0:
            warnings.warn(f"'{path}': AutoencoderTiny with scaling_factor != 1 is unusual", stacklevel=2)
        decoder = _decoder_from_taesd_state(_prefixed(state, "decoder.layers.", offset=1), path, latent_space)
    elif "1.weight" in state:
        decoder = _decoder_from_taesd_state(state, path, latent_space)
    elif any(k.startswith("layers.") for k in state) or "0.weight" in state:
        raise CheckpointError(f"'{path}' looks like an encoder, not a decoder: give it where an encoder goes "
                              "(--teacher; load_encoder in Python), and a decoder file here (e.g. *_decoder.pth)")
    else:
        raise CheckpointError(
            f"'{path}' is not a decoder checkpoint fastdec knows (fastdec safetensors, TAESD .pth, AutoencoderTiny)"
        )
    return decoder


def _taesd_encoder_config(state: Mapping[str, torch.Tensor], path: Path) -> TAEEncoderConfig:
    if "0.weight" not in state:
        raise CheckpointError(f"'{path}' is not a TAESD-family encoder state dict (no '0.weight' input conv)")
    groups = _module_groups(state)
    stem_width = None
    if len(groups) > 1 and groups[1][0] == "conv" and state["0.weight"].shape[1] == 3:
        stem_width = int(state["0.weight"].shape[0])  # TAESana: two strided stem convs
        groups = groups[1:]
    kinds = [k for k, _ in groups]
    counts = _split_blocks(kinds + ["conv"])  # blocks after the input conv, after each strided conv
    width = int(state[f"{groups[0][1]}.weight"].shape[0])
    last = groups[-1][1]
    channels = int(state[f"{last}.weight"].shape[0])
    return TAEEncoderConfig(
        latent_channels=channels, width=width, stem_width=stem_width, first_blocks=counts[0],
        stage_blocks=tuple(counts[1:-1]), use_midblock_gn=any(".pool." in k for k in state),
    )


def read_encoder(source: str | os.PathLike, latent_space: LatentSpace | str | None = None) -> TAEEncoder:
    """A TAESD-family encoder from a local .pth or AutoencoderTiny folder/state dict: RGB [0, 1] -> latents."""
    path = _existing(source, "encoder checkpoint")
    if path.is_dir():
        _check_tiny_config(_tiny_config(path), path)
        path = _weights_in(path, "encoder")
    state, metadata = _read_state(path)
    if any(k.startswith("encoder.layers.") for k in state):
        state = _prefixed(state, "encoder.layers.")
    elif "1.weight" in state and "0.weight" not in state:
        raise CheckpointError(f"'{path}' looks like a decoder, not an encoder: give it where a decoder goes "
                              "(--decoder, --teacher-decoder; load_decoder in Python), and an encoder file here "
                              "(e.g. *_encoder.pth)")
    config = _taesd_encoder_config(state, path)
    factor = 2 ** (len(config.stage_blocks) + (2 if config.stem_width else 0))
    space = get_latent_space(latent_space) if latent_space else _guess_space(config.latent_channels, factor, path.name)
    if (space.channels, space.spatial_factor) != (config.latent_channels, factor):
        raise LatentSpaceError(  # not a CheckpointError: the file is fine, the space asked for is not its own
            f"'{path}' encodes {config.latent_channels}-channel latents at /{factor}, not '{space.name}' "
            f"({space.channels} channels, /{space.spatial_factor}), the latent space asked for (--latent-space, or the "
            "decoder's): use an encoder of that space, or name the encoder's own")
    encoder = TAEEncoder(config, space)
    _load_strict(encoder, {"layers." + k: v for k, v in state.items()}, path, f"TAE encoder ({config})")
    return encoder.eval()


def decoder_info(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture, config and latent space stored in a fastdec checkpoint, checked, without loading weights."""
    state_path = _existing(path, "checkpoint")
    try:
        with safe_open(str(state_path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {type(e).__name__}: {e}. The file is truncated or "
                              "corrupt, or not a .safetensors file") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a fastdec checkpoint")
    architecture, config, space = _read_fastdec_metadata(metadata, state_path)
    return {"architecture": architecture, "config": config, "latent_space": json.loads(space.to_json())}

"""What a training run is asked to do: :class:`TrainConfig`, read from defaults < a YAML/TOML file <
command-line flags, and checked before any work starts (a zero step count or batch size is a usage
error here, not a ``ZeroDivisionError`` after the latent cache was built)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainError, UsageError
from ..io.files import read_text_file
from .data import check_short_side
from .precision import CHANNELS_LAST

MIXED_PRECISION = ("auto", "no", "fp32", "fp16", "bf16")
# options that take one of a few words; YAML 1.1 reads a bare no/off/on as a boolean, so those map back
CHOICES = {"mixed_precision": MIXED_PRECISION, "channels_last": CHANNELS_LAST}
BOOLEAN_WORDS = {"mixed_precision": {False: "no"}, "channels_last": {True: "on", False: "off"}}


@dataclass
class TrainConfig:
    teacher: str = ""                       # TAESD-family encoder .pth, or diffusers VAE folder/file/Hub id
    teacher_decoder: str | None = None      # TAESD-family decoder for teacher matching / grids
    latent_space: str | None = None         # override the teacher's detected space
    decoder: str = "tae-192"                # preset name, or a fastdec checkpoint to continue from
    init: str | None = None                 # initialise weights from this decoder checkpoint
    init_partial: bool = False              # --init into a narrower TAE: copy what lines up (a warm start)
    data: str = ""
    exclude: str | None = None              # comma-separated files/folders under data to leave out (held out)
    val: str | None = None
    out: str = ""
    resolution: int = 256
    short_side: int | None = None           # resize files so the shorter side is this before cropping
    frames: int | None = None               # video decoders: clip length T
    max_frame_stride: int = 1               # video: each clip's stride is drawn from 1..this (1 = consecutive)
    steps: int = 10000
    batch_size: int = 8                     # per process, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    temporal_lr: float | None = None        # video: lr of the layers added to the image decoder (None: lr)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup: int = 200
    ema: float = 0.999
    clip_grad: float = 1.0
    l1: float = 1.0
    mse: float = 0.0
    ms_ssim: float = 0.0
    lpips: float = 0.0
    lpips_weights: str | None = None
    teacher_weight: float = 0.0
    temporal: float = 0.0
    latent_noise: float = 0.0               # largest std of the frame-independent noise added to the student's latents
    adversarial: float = 0.0
    adv_start: int = 2000                   # steps of reconstruction-only training before the GAN term
    disc_lr: float = 2e-4
    crops_per_image: int = 4
    cache_dir: str | None = None
    val_every: int = 500
    val_count: int = 16
    ckpt_every: int = 1000
    keep_checkpoints: int | None = None     # the newest N checkpoints are kept (default: all)
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"           # auto | no (= fp32) | fp32 | fp16 | bf16 (see train/precision.py)
    channels_last: str = "auto"             # auto | on | off: the memory layout of the convolutions
    workers: int = 2
    resume: bool = False
    stop_at: int | None = None              # stop (with a checkpoint) at this step; resume later
    log_samples: bool = False               # debug: each rank logs the sample ids it trained on
    cpu: bool = False
    device_batch_encode: int = 16           # teacher batch size while building the cache


HELP = {
    "teacher": "teacher: TAESD-family encoder .pth, or a diffusers VAE folder / single file / Hub id",
    "teacher_decoder": "TAESD-family decoder paired with a TAESD encoder teacher (teacher grids / --teacher-weight)",
    "latent_space": "latent space name, overriding detection from the teacher",
    "decoder": "decoder preset (see fastdec.list_decoders()) or a fastdec checkpoint to continue from (with "
               "--init: its architecture only, the weights are --init's)",
    "init": "initialise from a decoder checkpoint (same architecture, a smaller TAE decoder to grow, or an image "
            "decoder for a video decoder)",
    "init_partial": "with --init into a TAE decoder that is not a superset (narrower or shallower): copy every layer "
                    "and channel that lines up (fastdec.models.growth.transfer_weights), a warm start, not equal output",
    "data": "training folder (images, recursive; videos with --frames)",
    "exclude": "comma-separated file or folder names (or paths relative to --data) to leave out of training, "
               "e.g. held-out clips",
    "val": "held-out folder for validation (center crops)",
    "out": "run folder: checkpoints, metrics.csv, grids, decoder.safetensors",
    "short_side": "resize every image and video frame (antialiased, down or up) so its shorter side is this many "
                  "px before the --resolution crops are cut, e.g. the scale `fastdec eval --resolution` scores at "
                  "(default: native size; files smaller than --resolution are upscaled to it)",
    "frames": "clip length T for video decoders",
    "max_frame_stride": "video: each clip takes every k-th frame, k drawn per clip from 1 to this (random stride; "
                        "1 = consecutive frames); longer strides show faster motion",
    "temporal_lr": "video: learning rate of the layers a video decoder adds to its image decoder (memory convs, "
                   "temporal attention; they start at zero) while the rest trains at --lr (default: --lr)",
    "batch_size": "batch per process per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "warmup": "linear warm-up steps before the cosine decay",
    "ema": "EMA decay of the exported weights",
    "clip_grad": "gradient norm clip (0 = off)",
    "ms_ssim": "weight of 1 - MS-SSIM",
    "lpips": "weight of LPIPS (needs --lpips-weights)",
    "lpips_weights": "local torchvision AlexNet weights for LPIPS (nothing is downloaded)",
    "teacher_weight": "weight of L1 to the teacher decoder's output",
    "temporal": "weight of the temporal-consistency loss (video)",
    "latent_noise": "robustness to latents that jitter from frame to frame, as generated ones do: add Gaussian noise "
                    "to the student's input latents, independent per frame and element, with a std drawn per "
                    "sample uniformly from 0 to this (diffusion-space units, latents have std ~1); the targets stay "
                    "the clean pixels (and the teacher decodes the clean latents). 0 = off",
    "adversarial": "weight of the hinge GAN loss (patch discriminator)",
    "adv_start": "step at which the adversarial loss starts",
    "crops_per_image": "random crops per file encoded into the latent cache",
    "cache_dir": "latent cache root (default $FASTDEC_CACHE or ~/.cache/fastdec/latents)",
    "val_count": "validation images (first N files, center crops)",
    "mixed_precision": "auto: bf16 autocast on GPUs that support it and on CPUs with native bf16 (AVX512-BF16 or "
                       "AMX), else fp32 | no or fp32 | bf16 | fp16 (GPU only). Weights, optimizer and losses stay fp32",
    "channels_last": "channels_last (NHWC) for the student, discriminator and teacher decoder: auto (on with bf16 "
                     "on a CPU) | on | off",
    "workers": "DataLoader worker processes",
    "keep_checkpoints": "keep only the newest N checkpoints, deleting older ones as new ones are written (each holds "
                        "the model, EMA and optimizer state; default: keep all)",
    "resume": "continue from the latest checkpoint in --out",
    "stop_at": "stop with a checkpoint at this step (time-limited jobs); continue with --resume",
    "log_samples": "debug: log the sample ids each rank trained on to OUT/samples/",
    "cpu": "train on CPU even when a GPU is present",
}

REQUIRED = ("teacher", "data", "out")
# numbers that must be > 0: each is a count, a period or a size the loop divides by or iterates over
POSITIVE = ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "val_every", "resolution", "lr",
            "crops_per_image", "val_count", "device_batch_encode", "disc_lr", "frames", "stop_at",
            "max_frame_stride", "temporal_lr", "short_side", "keep_checkpoints")
NON_NEGATIVE = ("warmup", "weight_decay", "clip_grad", "l1", "mse", "ms_ssim", "lpips", "teacher_weight", "temporal",
                "latent_noise", "adversarial", "adv_start", "workers", "seed")
FRACTIONS = {"ema": (0.0, 1.0, "in [0, 1)"), "min_lr_ratio": (0.0, 1.0, "in [0, 1]")}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_kind(field: dataclasses.Field) -> str:
    """'int', 'float', 'str' or 'bool' for a TrainConfig field (annotations are strings here)."""
    annotation = field.type if isinstance(field.type, str) else field.type.__name__
    return annotation.split("|")[0].strip()


def _coerce(field: dataclasses.Field, value: Any, where: str) -> Any:
    """A config-file value as the field's type. YAML reads ``lr: 5e-4`` as the text '5e-4' (YAML 1.1 wants a
    dot), so numbers written as text are accepted; anything else that does not fit is named."""
    kind = field_kind(field)
    if value is None or kind == "str" and isinstance(value, str):
        return value
    if isinstance(value, bool) and value in BOOLEAN_WORDS.get(field.name, {}):
        return BOOLEAN_WORDS[field.name][value]
    try:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and not isinstance(value, bool):
            number = float(value)
            if number.is_integer():
                return int(number)
        if kind == "float" and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        pass
    raise UsageError(f"{where}: '{field.name.replace('_', '-')}' must be {kind}, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a YAML/TOML file, keys as the flag names (``batch-size`` or ``batch_size``)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise TrainError(f"config file '{path}' must be .yaml, .yml or .toml")
    values = _parse_config_text(read_text_file(path, TrainError, "config file"), path)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    spelled: dict[str, str] = {}
    for key in map(str, values):
        name = key.replace("-", "_")
        if name in spelled:  # batch-size and batch_size both: one would silently win
            raise TrainError(f"config file '{path}' gives {name} twice, as '{spelled[name]}' and '{key}': keep one")
        spelled[name] = key
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = set(values) - set(fields)
    if unknown:
        raise TrainError(f"config file '{path}' has unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return {name: _coerce(fields[name], value, f"config file '{path}'") for name, value in values.items()}


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load that refuses a key given twice (``steps: 2`` ... ``steps: 3000``), where YAML keeps the last."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _parse_config_text(text: str, path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        import tomllib

        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"config file '{path}' is not valid TOML: {e}") from e
    else:
        import yaml

        try:
            values = yaml.load(text, Loader=_unique_key_loader()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise TrainError(f"config file '{path}' must hold option: value pairs, got {type(values).__name__}")
    return values


def make_config(cli_values: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Defaults < config file < command-line flags; checked (:func:`validate_config`)."""
    values = load_config_file(config_file) if config_file else {}
    values.update(cli_values)
    return validate_config(TrainConfig(**values))


def validate_config(config: TrainConfig) -> TrainConfig:
    """Refuse a config that cannot train, before any work: required paths, counts and weights in range."""
    for name in REQUIRED:
        if not getattr(config, name):
            raise TrainError(f"{flag(name)} is required (on the command line or in --config)")
    for name in POSITIVE:
        value = getattr(config, name)
        if value is not None and not math.inf > _number(value) > 0:  # inf: no step size or count either
            raise UsageError(f"{flag(name)} must be a finite number greater than 0, got {value!r}")
    for name in NON_NEGATIVE:
        value = getattr(config, name)
        if not math.inf > _number(value) >= 0:
            raise UsageError(f"{flag(name)} must be a finite number, 0 or more, got {value!r}")
    for name, (low, high, text) in FRACTIONS.items():
        value = getattr(config, name)
        inside = low <= _number(value) < high if name == "ema" else low <= _number(value) <= high
        if not inside:
            raise UsageError(f"{flag(name)} must be {text}, got {value!r}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise UsageError(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    check_short_side(config.short_side, config.resolution)
    if config.temporal_lr is not None and not config.frames:
        raise UsageError("--temporal-lr trains a video decoder's temporal layers: it needs --frames (and a video "
                         "decoder)")
    if config.init_partial and not config.init:
        raise UsageError("--init-partial copies what fits from the --init checkpoint: pass --init CHECKPOINT too")
    if config.max_frame_stride != 1 and not config.frames:
        raise UsageError("--max-frame-stride samples video clips: it needs --frames (and a video decoder)")
    _check_options_have_their_term(config)
    if config.adversarial and config.adv_start >= config.steps:  # a discriminator was built and never used
        raise UsageError(f"--adversarial starts at --adv-start {config.adv_start}, but the run ends at --steps "
                         f"{config.steps}: the GAN term would never train; lower --adv-start or raise --steps")
    return config


# an option -> the loss term it tunes: set alone, it was accepted and did nothing (--val-every/--val-count
# without --val are left alone: a config file states them for the runs that validate)
TUNES = {"lpips_weights": "lpips", "disc_lr": "adversarial", "adv_start": "adversarial"}


def _check_options_have_their_term(config: TrainConfig) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, term in TUNES.items():
        if getattr(config, name) != defaults[name] and not getattr(config, term):
            raise UsageError(f"{flag(name)} tunes {flag(term)}, which is not given: it would do nothing; pass "
                             f"{flag(term)} too, or drop {flag(name)}")


def _number(value: Any) -> float:
    """``value`` as a number for range checks; NaN (and non-numbers) fail every comparison."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)

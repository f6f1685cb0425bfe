"""Every error fastdec raises on purpose derives from :class:`FastdecError`.

A ``FastdecError`` is a problem with what the user gave (a file, a flag, a decoder, data) and its message
names the problem and the fix. The ``fastdec`` command catches it once and prints it on stderr as
``fastdec <command>: error: <message>`` with exit status 2; anything else is a bug and keeps its traceback.

The subclasses also keep the builtin base they always had (``ValueError`` or ``RuntimeError``), so code
that caught those keeps working.
"""
from __future__ import annotations

import importlib
import numbers
from types import ModuleType


class FastdecError(Exception):
    """Root of every error fastdec raises on purpose."""


class UsageError(FastdecError, ValueError):
    """An argument or option that cannot work (a zero step count, an unknown dtype, an unwritable --out)."""


class CheckpointError(FastdecError, ValueError):
    """A checkpoint that cannot be read, or does not hold what was asked for."""


class DecoderSpecError(CheckpointError):
    """A ``--decoder`` / ``resolve_decoder`` spec that names nothing usable (or an untrained preset)."""


class LatentSpaceMismatchError(DecoderSpecError):
    """A decoder (a file, a pretrained name, an object) for other latents than the space asked for.

    ``what`` names the decoder, ``have`` and ``want`` the two spaces, ``differences`` the fields that differ;
    ``fix`` ends the message. The default fix fits a space the caller named; where the space comes from
    elsewhere (a teacher, a pipeline) :func:`fastdec.resolve.resolve_in_space` words its own."""

    def __init__(self, what: str, have: str, want: str, differences: list[str], fix: str | None = None):
        self.what, self.have, self.want, self.differences = what, have, want, differences
        super().__init__(self._message(fix or "or leave the latent space out to use the one it records"))

    def _message(self, fix: str) -> str:
        return (f"{self.what} decodes '{self.have}' latents, not '{self.want}' ({', '.join(self.differences)}): "
                f"pick a decoder for '{self.want}' (a preset is built in any space), {fix}")


class LatentFileError(FastdecError, ValueError):
    """A latent file that is missing, unreadable, or holds tensors no decoder can take."""


class NonFiniteOutputError(FastdecError, ValueError):
    """A decoder produced NaN or inf: never written as a picture nor scored."""


class DecoderOutputError(FastdecError, RuntimeError):
    """A decoder's layers returned another shape than its latents call for (a plugin's upsampling is off)."""


class DataError(FastdecError, ValueError):
    """A training or evaluation data folder that is missing, empty or unreadable."""


class VideoError(FastdecError, ValueError):
    """A video file or frame folder that cannot be read or written."""


class TeacherError(FastdecError, ValueError):
    """A teacher encoder/decoder that cannot be loaded or does not fit the latent space."""


class LossConfigError(FastdecError, ValueError):
    """A loss specification that names an unknown term or a bad weight."""


class TrainError(FastdecError, ValueError):
    """A training run that cannot start or resume."""


class EvalError(FastdecError, ValueError):
    """An evaluation that cannot run on what it was given."""


class BenchError(FastdecError, ValueError):
    """A benchmark that cannot run on what it was given."""


class DecodeError(FastdecError, ValueError):
    """``fastdec decode`` cannot decode what it was given."""


class DecodeVideoError(FastdecError, ValueError):
    """``fastdec decode-video`` cannot decode what it was given."""


class ManifestMismatchError(FastdecError, RuntimeError):
    """A ``decode-batch`` resume whose output folder was made by another decoder or settings."""


class GlobalReceptiveFieldError(FastdecError, ValueError):
    """A decoder whose output depends on the whole input: it cannot be tiled exactly."""


class OnnxExportError(FastdecError, RuntimeError):
    """An ONNX export that failed or does not match the torch decoder."""


class MetricUnavailable(FastdecError, RuntimeError):
    """A metric whose extra dependency or weights are not installed."""


class MissingDependencyError(FastdecError, ImportError):
    """An optional package a command needs is not installed (the message names the extra that has it)."""


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """``module``, or a :class:`MissingDependencyError` that says ``feature`` needs it and how to install it: a
    bare ModuleNotFoundError's traceback was what a wheel install without the extra printed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise MissingDependencyError(f"{feature} needs {package}, which could not be imported ({e}): "
                                     f'pip install "fastdec[{extra}]"') from e


class UnsafePathError(FastdecError, ValueError):
    """A name (a latent key, a file name, metadata) that would write outside the output folder."""


class PipelineError(FastdecError, ValueError):
    """A diffusers pipeline (or its VAE) that a fast decoder cannot be swapped into or decode for."""


class PipelineStateError(FastdecError, RuntimeError):
    """A pipeline whose state forbids the call (an offloaded VAE, no encoder kept)."""


class LatentSpaceError(FastdecError, ValueError):
    """A latent space name, shape or statistics that do not fit."""


class UnknownNameError(FastdecError, KeyError):
    """An unknown preset, architecture or latent-space name (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class InputTypeError(UsageError, TypeError):
    """A value of the wrong type: latents that are not a float tensor, an object that is not a fastdec decoder."""


def check_flags(where: str, **flags: object) -> None:
    """Each of ``flags`` is True or False: the string "no" is truthy, so it turned an option on. ``where`` names
    the function in the error ("swap_decoder's force must be True or False, got 'no'")."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InputTypeError(f"{where}'s {name} must be True or False, got {value!r}")


def is_number(value: object) -> bool:
    """A real number that is no bool: numpy scalars count (np.float32 is no float subclass, and was refused as
    out of range), True does not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(flag: str, value: int | None, minimum: int = 1) -> None:
    """``value`` is None (not given) or a whole number >= ``minimum`` (a bool is none); the error names ``flag``.
    The one count check of every command's options and of the Python API's counts."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise UsageError(f"{flag} must be a whole number >= {minimum}, got {value!r}")

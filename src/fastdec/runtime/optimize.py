"""Running decoders fast: dtype handling, fp16 headroom checks, channels_last and torch.compile.

``optimize(decoder)`` returns a wrapper whose ``__call__``, ``forward`` and
``decode`` all run the compiled graph (pipelines call ``decode``, not
``forward``), with the cheap input checks kept in eager so bad latents still
get a clear error instead of a silent wrong picture.
"""
from __future__ import annotations

import argparse
import inspect
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from ..dtypes import parse_dtype
from ..errors import InputTypeError, UsageError, check_flags
from ..models.base import LatentDecoder

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def activation_ranges(decoder: nn.Module, z: torch.Tensor) -> dict[str, float]:
    """Largest |activation| of every leaf layer while decoding ``z`` in fp32.

    Used to find layers that would overflow fp16 (max 65504) before they do:
    run it on extreme latents with trained weights.
    """
    decoder = _unwrap(decoder)
    ranges: dict[str, float] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                ranges[name] = max(ranges.get(name, 0.0), float(output.detach().abs().amax()))

        return hook

    original_dtype = decoder.dtype
    handles = [m.register_forward_hook(record(n)) for n, m in decoder.named_modules() if n and not list(m.children())]
    try:
        decoder.float()
        with torch.no_grad():
            decoder(z.float())
    finally:
        for h in handles:
            h.remove()
        decoder.to(original_dtype)
    return ranges


def fp16_headroom(decoder: nn.Module, z: torch.Tensor) -> tuple[float, str]:
    """(65504 / largest fp32 activation, the layer that has it): > 1 means no layer overflows fp16 on ``z``."""
    ranges = activation_ranges(decoder, z)
    layer, peak = max(ranges.items(), key=lambda kv: kv[1])
    return FP16_MAX / max(peak, 1e-30), layer


def add_channels_last_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--channels-last/--no-channels-last`` option of the decode commands (on by default)."""
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the convolutions in channels_last (NHWC) memory format (default on: faster on CPU "
                             "and GPU; same output to fp tolerance)")


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put every 2-D convolution weight of ``module`` in channels_last (NHWC) memory format, in place.

    On CPU a convolution's output takes its weight's memory format, so this alone makes oneDNN run NHWC
    kernels through the whole network, also for (N, T, C, h, w) video decoders whose inputs are 5-D.
    Unlike ``module.to(memory_format=torch.channels_last)`` it leaves 5-D weights alone, so it works on
    models with Conv3d layers too (SVD's temporal VAE decoder).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.ndim == 4:
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def _unwrap(decoder: Any) -> Any:
    return decoder.decoder if isinstance(decoder, OptimizedDecoder) else decoder


class _CompiledCall:
    """``fn`` through ``torch.compile``, or ``fn`` itself after one warning when compiling is unavailable or the
    compiled graph fails at its first call (inductor compiles lazily: a missing C++ compiler or a lowering bug
    only surfaces then)."""

    def __init__(self, fn: Callable, compile: bool, compile_kwargs: dict | None = None):
        self.eager = fn
        self.fn = fn
        self.compiled = False
        self._first_call_pending = False
        if compile:
            try:
                self.fn = torch.compile(fn, **(compile_kwargs or {}))
                self.compiled = True
                self._first_call_pending = True
            except Exception as e:  # e.g. a Python version dynamo does not support
                self._fall_back(e)

    def _fall_back(self, error: BaseException) -> None:
        warnings.warn(
            f"torch.compile is unavailable here ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "decoding in eager mode instead (still correct, just not compiled). On CPU, inductor needs a working "
            "C++ compiler (g++/clang); pass compile=False to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
        self.fn = self.eager
        self.compiled = False
        self._first_call_pending = False

    def __call__(self, *args: Any) -> Any:
        if self._first_call_pending:
            try:
                out = self.fn(*args)
            except Exception as e:
                self._fall_back(e)
                out = self.fn(*args)
            self._first_call_pending = False
            return out
        return self.fn(*args)


def _check_compile_kwargs(compile: bool, compile_kwargs: dict[str, Any]) -> None:
    """torch.compile's TypeError for an option it lacks was caught as "compile is unavailable here" and the
    decoder ran eagerly with a warning: a typo is the caller's error, named now."""
    if not compile_kwargs:
        return
    if not compile:
        raise UsageError(f"compile options {sorted(compile_kwargs)} need compile=True")
    known = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(compile_kwargs) - set(known))
    if unknown:
        raise UsageError(f"torch.compile takes no option {', '.join(map(repr, unknown))}; it takes {', '.join(known)}")


class OptimizedDecoder(nn.Module):
    """A decoder whose every call path (``__call__``, ``forward``, ``decode``) runs the compiled core.

    For a causal video decoder, ``stream()`` runs a compiled per-push step as well. Attributes it does not
    define (``latent_space``, ``upsample_factor``, ``config``, ...) are read from the wrapped decoder.
    """

    def __init__(self, decoder: LatentDecoder, channels_last: bool, compile: bool, compile_kwargs: dict | None = None):
        super().__init__()
        self.decoder = decoder
        self.channels_last = channels_last
        self.compile_requested = compile
        # fastdec's decoders share LatentDecoder.forward: its contract (input checks, the empty-batch rule, the
        # NaN-output check) stays in eager through decode_with and only the layers are compiled. A decoder that
        # overrides forward is compiled whole, after the eager input checks.
        self._whole = type(decoder).forward is not LatentDecoder.forward
        self._core = _CompiledCall(decoder.forward if self._whole else decoder.decode_layers, compile, compile_kwargs)
        # streaming pushes go through run_frames, not forward: compile it too (not again if compiling just failed)
        self._stream_step = _CompiledCall(decoder.run_frames, self._core.compiled, compile_kwargs) \
            if hasattr(decoder, "stream") else None

    @property
    def compiled(self) -> bool:
        return self._core.compiled

    def _layers(self, z: torch.Tensor) -> torch.Tensor:
        if self.channels_last and z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        return self._core(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self._whole:
            return self._layers(self.decoder.check_latents(z))
        return self.decoder.decode_with(self._layers, z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def _stream(self) -> Any:
        return self.decoder.stream(run_frames=self._stream_step)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            decoder = self._modules.get("decoder")
            if decoder is None:
                raise
            if name == "stream" and self.__dict__.get("_stream_step") is not None:
                return self._stream  # only causal decoders stream: hasattr(fast, "stream") stays truthful
            return getattr(decoder, name)

    def extra_repr(self) -> str:
        return f"compiled={self.compiled}, channels_last={self.channels_last}"


def optimize(
    decoder: LatentDecoder,
    channels_last: bool = True,
    compile: bool = True,
    dtype: str | torch.dtype | None = None,
    **compile_kwargs: Any,
) -> OptimizedDecoder:
    """Prepare a decoder for fast inference: eval mode, optional dtype, channels_last weights, torch.compile.

    The decoder is converted in place (like ``module.to``) and wrapped; the
    wrapper takes the same latents and returns the same RGB [0, 1]. When
    torch.compile is unavailable or fails at the first call (no C++ compiler,
    an inductor error), it warns and runs eagerly instead of crashing.
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    if isinstance(decoder, OptimizedDecoder):
        decoder = decoder.decoder
    if not isinstance(decoder, LatentDecoder):
        raise InputTypeError(f"optimize expects a fastdec LatentDecoder, got {type(decoder).__name__}")
    from .onnx import OnnxDecoder

    if isinstance(decoder, OnnxDecoder):
        raise UsageError("an OnnxDecoder already runs in onnxruntime: optimize the torch decoder it was exported from")
    check_flags("optimize", channels_last=channels_last, compile=compile)
    _check_compile_kwargs(compile, compile_kwargs)
    torch_dtype = parse_dtype(dtype)  # before any change: 'fp8' failed with the decoder already frozen in eval mode
    decoder.eval().requires_grad_(False)
    if torch_dtype is not None:
        decoder.to(torch_dtype)
    if channels_last:
        to_channels_last(decoder)
    return OptimizedDecoder(decoder, channels_last=channels_last, compile=compile, compile_kwargs=compile_kwargs)

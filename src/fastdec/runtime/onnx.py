"""ONNX export and an ONNX Runtime decoder with the same call interface as a torch decoder.

Exporter: the TorchScript exporter (``dynamo=False``) is the default because,
for these all-conv graphs, it gives a correct graph with dynamic batch,
height and width in one pass and runs as fast in onnxruntime; the dynamo
exporter (``exporter="dynamo"``) is kept as an option (it needs
``dynamic_shapes`` and rewrites nearest upsampling into a shape-computing
subgraph). Opset 17: fully implemented by every onnxruntime release since
1.14 (CPU and CUDA EPs), and it has every op these decoders use (Conv,
Resize, Tanh, Relu, GroupNormalization is decomposed).

The model's metadata_props carry the latent space, the upsample factor, the
architecture/config and the receptive field, so ``OnnxDecoder(path)`` needs
nothing else.

:func:`export_checked` also runs the exported graph in onnxruntime against the
torch decoder *before* the file gets its final name: a model that does not
match is never left behind (the temporary file is removed and
:class:`~fastdec.errors.OnnxExportError` raised).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import (CheckpointError, InputTypeError, MissingDependencyError, OnnxExportError, UsageError, check_count,
                      import_optional)
from ..io.files import as_path, atomic_write, check_output_file
from ..latent_spaces import LatentSpace
from ..models.base import LatentDecoder

DEFAULT_OPSET = 17
# the oldest opset both exporters can write these graphs in (torchscript: 7..20; opset 0 is no opset)
MIN_OPSET = 7
EXPORTERS = ("torchscript", "dynamo")
# The check decodes at a size other than the 8x8 export example, so a graph frozen to one shape cannot pass.
CHECK_SHAPE = (1, 12, 20)  # (batch, latent height, latent width)
# onnxruntime and torch run the same fp32 graph with different kernels: they agree to ~1e-7 per layer
# (README: ~5e-8 for tae-64). 1e-3 on [0, 1] RGB leaves room for deep decoders and still catches a wrong
# graph (a wrong op or a frozen shape is off by > 1e-2). fp16 models keep 11 mantissa bits: 1e-2.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}

__all__ = ["CHECK_SHAPE", "CHECK_TOLERANCE", "DEFAULT_OPSET", "EXPORTERS", "OnnxDecoder", "OnnxExport",
           "OnnxExportError", "export_checked", "export_onnx", "onnx_torch_difference"]


class _DecodeGraph(nn.Module):
    """What goes into the graph: layers and clamp; the input checks stay in Python (OnnxDecoder)."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_layers(z).clamp(0, 1)


def _as_image_decoder(decoder: Any) -> LatentDecoder:
    """The fastdec image decoder behind ``decoder`` (which may be an ``optimize()`` wrapper)."""
    if not isinstance(decoder, LatentDecoder):
        inner = getattr(decoder, "decoder", None)
        if not isinstance(inner, LatentDecoder):
            raise InputTypeError(f"export_onnx expects a fastdec decoder, got {type(decoder).__name__}")
        decoder = inner
    if isinstance(decoder, OnnxDecoder):
        raise UsageError(f"{decoder.path} is already an ONNX model: export the torch decoder it came from")
    if decoder.is_video:
        raise OnnxExportError("ONNX export supports image decoders; video decoders are not exportable yet")
    if decoder.dtype not in CHECK_TOLERANCE:  # a bf16 graph was written that onnxruntime cannot load
        raise OnnxExportError(f"ONNX export takes an fp32 or fp16 decoder, got {str(decoder.dtype).removeprefix('torch.')}"
                              " (onnxruntime has no bfloat16 or float64 convolutions): export decoder.float(), or "
                              "decoder.half() for an fp16 graph")
    return decoder


def _metadata(decoder: LatentDecoder) -> dict[str, str]:
    from .. import __version__
    from .tiling import measure_receptive_field

    meta = {
        "fastdec_version": __version__,
        "architecture": decoder.architecture,
        "config": json.dumps(decoder.config_dict()),
        "latent_space": decoder.latent_space.to_json(),
        "upsample_factor": str(decoder.upsample_factor),
    }
    try:
        field = measure_receptive_field(decoder)
        meta["receptive_field"] = json.dumps(
            {"radius": field.radius, "is_global": field.is_global, "global_layers": list(field.global_layers),
             "local_radius_known": field.local_radius_known})
    except Exception as e:  # metadata is a convenience; never fail an export over it
        warnings.warn(f"could not measure the receptive field for the ONNX metadata: {e}")
    return meta


def _export_graph(decoder: LatentDecoder, tmp_path: str, opset: int, exporter: str) -> None:
    graph = _DecodeGraph(decoder).eval()
    example = torch.randn(1, decoder.latent_channels, 8, 8, dtype=decoder.dtype, device=decoder.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; errors still raise
        if exporter == "torchscript":
            torch.onnx.export(
                graph, (example,), tmp_path, dynamo=False, opset_version=opset,
                input_names=["latents"], output_names=["images"],
                dynamic_axes={"latents": {0: "batch", 2: "height", 3: "width"},
                              "images": {0: "batch", 2: "out_height", 3: "out_width"}},
            )
        else:
            batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in ("batch", "height", "width"))
            program = torch.onnx.export(
                graph, (example,), dynamo=True, opset_version=opset, input_names=["latents"], output_names=["images"],
                dynamic_shapes={"z": {0: batch, 2: height, 3: width}}, optimize=True,
            )
            program.save(tmp_path, external_data=False)


def _write_model(decoder: LatentDecoder, tmp: str, opset: int, exporter: str, meta: dict[str, str]) -> None:
    """Export the graph to ``tmp``, add the metadata and run ``onnx.checker`` on it."""
    onnx = import_optional("onnx", "onnx", "ONNX export")

    try:
        _export_graph(decoder, tmp, opset, exporter)
        model = onnx.load(tmp)
        written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
    except Exception as e:  # exporters and the checker fail in many types; all mean "no valid graph"
        raise OnnxExportError(f"ONNX export ({exporter} exporter, opset {opset}) failed: {e}") from e
    if written != opset:  # the dynamo exporter falls back to its own opset (18) with a warning hidden above
        raise OnnxExportError(f"the {exporter} exporter wrote opset {written}, not the {opset} asked, so nothing was "
                              f"written: ask for opset {written}, or use the torchscript exporter for opset {opset}")
    onnx.save(model, tmp)


def check_export_target(path: str | os.PathLike, opset: int | None, out: str = "the ONNX output",
                        opset_name: str = "opset") -> None:
    """The file and opset an export is asked for, before any work (``out`` and ``opset_name`` name them: the
    command's flags, or the Python arguments): a folder is named as such, a model.txt would hold an ONNX graph."""
    check_output_file(path, out)
    if not os.fspath(path).lower().endswith(".onnx"):
        raise UsageError(f"{out} must end in .onnx, got '{os.fspath(path)}'")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise UsageError(f"{opset_name} must be a whole number >= {MIN_OPSET}, got {opset!r} (default {DEFAULT_OPSET})")


def _export(decoder: Any, path: str | os.PathLike, opset: int | None, exporter: str,
            check: Callable[[LatentDecoder, str], None] | None) -> Path:
    """Write the model to a temporary file, run ``check`` on it, and only then give it its name."""
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    decoder = _as_image_decoder(decoder)
    check_export_target(path, opset)
    import_optional("onnx", "onnx", "ONNX export")  # each extra the export needs is named before any work
    if exporter != "torchscript":
        import_optional("onnxscript", "onnx", "the dynamo ONNX exporter")
        missing = {"dynamo", "dynamic_shapes", "optimize"} - set(inspect.signature(torch.onnx.export).parameters)
        if missing:  # torch 2.4's export has dynamo= but not the others: a TypeError after the graph was traced
            raise OnnxExportError(f"the dynamo exporter needs a newer torch: this torch {torch.__version__}'s "
                                  f"torch.onnx.export takes no {', '.join(sorted(missing))}; upgrade torch, or use "
                                  "the torchscript exporter")
    if check is not None:
        import_optional("onnxruntime", "onnx", "checking the export against the torch decoder")
    opset = opset or DEFAULT_OPSET
    was_training = decoder.training
    decoder.eval()

    def write(tmp: str) -> None:
        _write_model(decoder, tmp, opset, exporter, _metadata(decoder))
        if check is not None:
            check(decoder, tmp)  # raising here makes atomic_write delete tmp: no unchecked model stays

    try:
        return atomic_write(path, write, suffix=".onnx")
    finally:
        decoder.train(was_training)


def export_onnx(decoder: LatentDecoder, path: str | os.PathLike, opset: int | None = None,
                exporter: str = "torchscript") -> Path:
    """Export an image decoder to ONNX (fp32 or the decoder's dtype) with dynamic batch, height and width.

    The file is written atomically and checked with ``onnx.checker``; :func:`export_checked` also
    compares it with the torch decoder in onnxruntime.
    """
    return _export(decoder, path, opset, exporter, check=None)


def onnx_torch_difference(decoder: LatentDecoder, onnx_path: str | os.PathLike,
                          shape: tuple[int, int, int] = CHECK_SHAPE) -> float:
    """Max |onnxruntime - torch| on [0, 1] RGB for random latents (batch, h, w) = ``shape``, on CPU.

    NaN when the graph outputs NaN where torch does not (the graph's raw output is compared, so a broken
    export reads as a difference, not as bad weights). Without onnxruntime: :class:`MissingDependencyError`."""
    batch, height, width = shape
    z = torch.randn(batch, decoder.latent_channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = decoder(z).float().cpu()  # bad weights fail here, with the decoder's own message
    try:
        onnx_decoder = OnnxDecoder(onnx_path, providers=["CPUExecutionProvider"])
        images = onnx_decoder.decode_layers(z.to(onnx_decoder.dtype))
    except MissingDependencyError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types when it cannot load or run a graph
        raise OnnxExportError(f"onnxruntime cannot run the exported model: {e}") from e
    return float((images.float() - reference).abs().max())


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_checked` wrote and how closely onnxruntime matched torch."""

    path: Path
    opset: int
    exporter: str
    latent_space: str
    upsample_factor: int
    max_difference: float
    check_shape: tuple[int, ...]

    def summary(self) -> str:
        size_mb = self.path.stat().st_size / 2**20
        return (f"wrote {self.path} ({size_mb:.1f} MB, opset {self.opset}, {self.exporter} exporter, "
                f"latent space {self.latent_space}, x{self.upsample_factor}); onnxruntime vs torch max |diff| "
                f"{self.max_difference:.2e} at {self.check_shape}")


def export_checked(decoder: LatentDecoder, path: str | os.PathLike, opset: int | None = None,
                   exporter: str = "torchscript", tolerance: float | None = None) -> OnnxExport:
    """:func:`export_onnx`, then onnxruntime vs torch on a shape other than the export's: the file gets its
    name only when they agree to ``tolerance`` (default by dtype, :data:`CHECK_TOLERANCE`); otherwise
    nothing is left at ``path`` and :class:`OnnxExportError` says by how much they differ."""
    measured: list[float] = []

    def check(image_decoder: LatentDecoder, tmp: str) -> None:
        bound = tolerance if tolerance is not None else CHECK_TOLERANCE.get(image_decoder.dtype, 1e-3)
        difference = onnx_torch_difference(image_decoder, tmp)
        if not math.isfinite(difference) or difference > bound:
            raise OnnxExportError(
                f"onnxruntime output differs from torch by {difference:.2e} (allowed {bound:.0e}) on latents of "
                f"shape {_check_shape(image_decoder)}: the exported graph is wrong, so nothing was written to "
                f"'{path}'. Try the other exporter (--exporter) or another opset"
            )
        measured.append(difference)

    written = _export(decoder, path, opset, exporter, check=check)
    image_decoder = _as_image_decoder(decoder)
    return OnnxExport(written, opset or DEFAULT_OPSET, exporter, image_decoder.latent_space.name,
                      image_decoder.upsample_factor, measured[0], _check_shape(image_decoder))


def _check_shape(decoder: LatentDecoder) -> tuple[int, ...]:
    batch, height, width = CHECK_SHAPE
    return batch, decoder.latent_channels, height, width


# ----------------------------------------------------------------------------- runtime
def _default_providers() -> list[str]:
    ort = import_optional("onnxruntime", "onnx", "running an ONNX decoder")

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session(path: Path, providers: Sequence[str] | None, intra_op_threads: int | None) -> Any:
    ort = import_optional("onnxruntime", "onnx", "running an ONNX decoder")

    check_count("intra_op_threads", intra_op_threads)  # "x" and 2.5 met pybind's TypeError, -1 was taken
    if isinstance(providers, str):  # list("CPUExecutionProvider") asked for providers 'C', 'P', 'U', ...
        providers = [providers]
    if providers is not None and not (isinstance(providers, Sequence) and all(isinstance(p, str) for p in providers)):
        raise InputTypeError(f"providers is a list of onnxruntime provider names (e.g. ['CPUExecutionProvider']), "
                             f"got {providers!r}")  # it was called a truncated or corrupt model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # same thread count torch uses (respects OMP_NUM_THREADS / torch.set_num_threads); one op at a time
    options.intra_op_num_threads = intra_op_threads or torch.get_num_threads()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle workers sleep instead of spinning: spinning threads starve torch and other processes on shared CPUs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or _default_providers()))
    except Exception as e:  # onnxruntime's own error types (InvalidProtobuf, InvalidArgument, ...)
        if "provider" in str(e).lower():
            raise
        raise CheckpointError(f"'{path}' is no ONNX model onnxruntime can load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}): it is truncated or corrupt; export it again with "
                              "`fastdec export onnx`") from e


def _read_metadata(path: Path, meta: dict[str, str]) -> tuple[LatentSpace, SimpleNamespace, Any]:
    """The latent space, config and receptive field an export recorded; metadata that is not what
    :func:`export_onnx` writes (edited, or another tool's) is an error naming the file and the key."""
    from .tiling import ReceptiveField

    key = "latent_space"
    try:
        latent_space = LatentSpace.from_dict(json.loads(meta[key]))
        key = "config"  # read like any decoder's config (config.latent_channels, config_dict())
        config = SimpleNamespace(**{"latent_channels": latent_space.channels, **json.loads(meta.get(key, "{}"))})
        key = "receptive_field"
        rf = json.loads(meta[key]) if key in meta else None
        field = None if rf is None else ReceptiveField(rf["radius"], rf["is_global"], tuple(rf["global_layers"]),
                                                       rf["local_radius_known"])
        if field is not None and not (type(field.radius) is int and field.radius >= 0  # sizes every tile's overlap
                                      and isinstance(field.is_global, bool)
                                      and isinstance(field.local_radius_known, bool)):
            raise ValueError(f"radius {field.radius!r}, is_global {field.is_global!r}: expected a whole number >= 0 "
                             "and True/False")
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError; LatentSpaceError too
        raise CheckpointError(f"{path}'s fastdec metadata '{key}' cannot be read ({type(e).__name__}: {e}): "
                              "export the decoder again with `fastdec export onnx`") from e
    return latent_space, config, field


class OnnxDecoder(LatentDecoder):
    """An exported decoder run by onnxruntime: a :class:`~fastdec.models.LatentDecoder` whose layers are the
    ONNX graph.

    ``OnnxDecoder(path)(z)`` takes decoder-space latents (N, C, h, w) as a torch tensor and returns RGB in
    [0, 1] as a torch tensor on the input's device. Being a LatentDecoder, it has the torch decoders'
    contract, inherited rather than copied: the same input checks and messages, the same empty-batch rule,
    NaN output as an error. Providers default to CUDA when onnxruntime-gpu has it, else CPU.
    """

    is_video = False

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None):
        path = as_path(path, "OnnxDecoder's path")
        if not path.is_file():
            raise CheckpointError(f"no ONNX model at {path}: export one with `fastdec export onnx`")
        session = _session(path, providers, intra_op_threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in ("latent_space", "upsample_factor") if k not in meta]
        if missing:
            raise CheckpointError(
                f"{path} has no fastdec metadata ({', '.join(missing)}): export it with `fastdec export onnx`")
        latent_space, config, receptive_field = _read_metadata(path, meta)
        super().__init__(config, latent_space)
        self.path, self.session, self.metadata = path, session, meta
        self.architecture = meta.get("architecture", "")
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self._dtype = {"tensor(float16)": torch.float16}.get(inp.type, torch.float32)
        if receptive_field is not None:
            self.receptive_field_info = receptive_field

    # onnxruntime holds the weights: the module has no parameters to read dtype and device from
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the session reads its numpy inputs from

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def config_dict(self) -> dict:
        return dict(vars(self.config))

    # the graph's dtype was fixed at export and it has no parameters to convert: .half() and .to(bf16) changed
    # nothing, and the output stayed fp32 with no word
    def to(self, *args: Any, **kwargs: Any) -> "OnnxDecoder":
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._refuse_move(dtype, device)
        return self

    def half(self) -> "OnnxDecoder":
        return self.to(torch.float16)

    def bfloat16(self) -> "OnnxDecoder":
        return self.to(torch.bfloat16)

    def float(self) -> "OnnxDecoder":
        return self.to(torch.float32)

    def double(self) -> "OnnxDecoder":
        return self.to(torch.float64)

    def _refuse_move(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        if dtype is not None and dtype != self._dtype:
            raise UsageError(f"this OnnxDecoder's graph runs in {str(self._dtype).removeprefix('torch.')}, fixed "
                             f"at export, not {str(dtype).removeprefix('torch.')}: export the torch decoder in the "
                             "dtype to run (fp32 or fp16)")
        if device is not None and torch.device(device).type != "cpu":
            raise UsageError("an OnnxDecoder runs where its onnxruntime providers run (providers=[...]), not on a "
                             f"torch device: got {device}")

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        (images,) = self.session.run(None, {self.input_name: z.detach().contiguous().numpy()})
        return torch.from_numpy(images)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        images = super().forward(z)
        return images.to(z.device) if isinstance(z, torch.Tensor) else images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def __repr__(self) -> str:
        return f"OnnxDecoder({str(self.path)!r}, latent_space={self.latent_space.name}, providers={self.providers})"

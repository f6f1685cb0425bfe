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
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .checkpoints import atomic_write
from .latent_spaces import LatentSpace
from .models.base import LatentDecoder

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")


class OnnxExportError(RuntimeError):
    pass


class _DecodeGraph(nn.Module):
    """What goes into the graph: layers and clamp; the input checks stay in Python (OnnxDecoder)."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_layers(z).clamp(0, 1)


def _metadata(decoder: LatentDecoder) -> dict[str, str]:
    from . import __version__
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
        elif exporter == "dynamo":
            batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in ("batch", "height", "width"))
            program = torch.onnx.export(
                graph, (example,), dynamo=True, opset_version=opset, input_names=["latents"], output_names=["images"],
                dynamic_shapes={"z": {0: batch, 2: height, 3: width}}, optimize=True,
            )
            program.save(tmp_path, external_data=False)
        else:
            raise ValueError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")


def export_onnx(decoder: LatentDecoder, path: str | os.PathLike, opset: int | None = None,
                exporter: str = "torchscript") -> Path:
    """Export an image decoder to ONNX (fp32 or the decoder's dtype) with dynamic batch, height and width.

    The file is written atomically and checked with ``onnx.checker``.
    """
    import onnx

    if not isinstance(decoder, LatentDecoder):
        inner = getattr(decoder, "decoder", None)  # an optimize() wrapper
        if not isinstance(inner, LatentDecoder):
            raise TypeError(f"export_onnx expects a fastdec decoder, got {type(decoder).__name__}")
        decoder = inner
    if decoder.is_video:
        raise OnnxExportError("ONNX export supports image decoders; video decoders are not exportable yet")
    opset = opset or DEFAULT_OPSET
    was_training = decoder.training
    decoder.eval()
    meta = _metadata(decoder)

    def write(tmp: str) -> None:
        try:
            _export_graph(decoder, tmp, opset, exporter)
        except Exception as e:
            raise OnnxExportError(f"ONNX export ({exporter} exporter, opset {opset}) failed: {e}") from e
        model = onnx.load(tmp)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        onnx.save(model, tmp)

    try:
        return atomic_write(path, write, suffix=".onnx")
    finally:
        decoder.train(was_training)


def _default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxDecoder:
    """Run an exported decoder with onnxruntime, called like a torch decoder.

    ``OnnxDecoder(path)(z)`` takes decoder-space latents (N, C, h, w) as a torch
    tensor and returns RGB in [0, 1] as a torch tensor on the input's device,
    with the same validation errors as :class:`~fastdec.models.LatentDecoder`.
    Providers default to CUDA when onnxruntime-gpu has it, else CPU.
    """

    is_video = False

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}: export one with `fastdec export onnx`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # same thread count torch uses (respects OMP_NUM_THREADS / torch.set_num_threads); one op at a time
        options.intra_op_num_threads = intra_op_threads or torch.get_num_threads()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # idle workers sleep instead of spinning: spinning threads starve torch and other processes on shared CPUs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=list(providers or _default_providers()))
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("latent_space", "upsample_factor") if k not in meta]
        if missing:
            raise ValueError(f"{self.path} has no fastdec metadata ({', '.join(missing)}): export it with `fastdec export onnx`")
        self.metadata = dict(meta)
        self.latent_space = LatentSpace.from_dict(json.loads(meta["latent_space"]))
        self.upsample_factor = int(meta["upsample_factor"])
        self.architecture = meta.get("architecture", "")
        self.config = json.loads(meta.get("config", "{}"))
        self.latent_channels = self.latent_space.channels
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = {"tensor(float16)": torch.float16}.get(inp.type, torch.float32)
        self.device = torch.device("cpu")
        if "receptive_field" in meta:
            from .tiling import ReceptiveField

            rf = json.loads(meta["receptive_field"])
            self.receptive_field_info = ReceptiveField(rf["radius"], rf["is_global"], tuple(rf["global_layers"]),
                                                       rf["local_radius_known"])

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def check_latents(self, z: torch.Tensor) -> torch.Tensor:
        return LatentDecoder.check_latents(self, z)  # type: ignore[arg-type]  # same checks and messages

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        device = z.device if isinstance(z, torch.Tensor) else torch.device("cpu")
        z = self.check_latents(z)
        (images,) = self.session.run(None, {self.input_name: z.detach().contiguous().numpy()})
        return torch.from_numpy(images).to(device)

    forward = __call__
    decode = __call__

    def __repr__(self) -> str:
        return f"OnnxDecoder({str(self.path)!r}, latent_space={self.latent_space.name}, providers={self.providers})"


# -- command line -----------------------------------------------------------------------


def _load_any_decoder(source: str, latent_space: str | None, quiet: bool = False) -> LatentDecoder:
    from .checkpoints import load_decoder
    from .models import create_decoder, list_decoders

    if source in list_decoders():
        if not quiet:
            print(f"note: '{source}' is a preset: using it with RANDOM weights (for benchmarking); "
                  "pass a trained checkpoint path for real images")
        return create_decoder(source, latent_space or "sdxl")
    return load_decoder(source, latent_space=latent_space)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import numpy as np

    decoder = _load_any_decoder(args.decoder, args.latent_space).eval()
    path = export_onnx(decoder, args.out, opset=args.opset, exporter=args.exporter)
    onnx_decoder = OnnxDecoder(path, providers=["CPUExecutionProvider"])
    # verify at a size other than the export example so a frozen shape cannot pass
    z = torch.randn(1, decoder.latent_channels, 12, 20)
    with torch.no_grad():
        err = float((onnx_decoder(z) - decoder(z)).abs().max())
    size_mb = Path(path).stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MB, opset {args.opset or DEFAULT_OPSET}, {args.exporter} exporter, "
          f"latent space {decoder.latent_space.name}, x{decoder.upsample_factor}); "
          f"onnxruntime vs torch max |diff| {err:.2e} at {tuple(z.shape)}")
    if not np.isfinite(err) or err > 1e-3:
        print(f"error: onnxruntime output differs from torch by {err:.2e}")
        return 1
    return 0


def add_commands(subparsers: Any) -> None:
    export = subparsers.add_parser("export", help="export a decoder to another runtime")
    formats = export.add_subparsers(dest="format", metavar="FORMAT")
    p = formats.add_parser("onnx", help="export to ONNX (dynamic batch/height/width) for onnxruntime",
                           description="Export a decoder to ONNX and check onnxruntime against PyTorch.")
    p.add_argument("--decoder", required=True, help="decoder checkpoint (.safetensors, TAESD .pth, folder) or a preset name")
    p.add_argument("--latent-space", default=None, help="latent space (sdxl, flux2, ...): needed for presets and "
                                                            "for checkpoints that do not record it")
    p.add_argument("--out", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch exporter: torchscript (default, fastest graph here) or dynamo")
    p.set_defaults(func=_cmd_export_onnx)
    export.set_defaults(func=lambda args: (export.print_help(), 2)[1])

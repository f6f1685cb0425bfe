"""``fastdec export onnx``: arguments in, :func:`fastdec.runtime.onnx.export_checked` out."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import NonFiniteOutputError
from ..resolve import check_random_weights, resolve_decoder
from .onnx import DEFAULT_OPSET, EXPORTERS, check_export_target, export_checked


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    check_export_target(args.out, args.opset, "--out", "--opset")  # before the decoder is read
    check_random_weights(args.decoder, args.random_weights)
    decoder = resolve_decoder(args.decoder, latent_space=args.latent_space, random_weights=args.random_weights)
    try:
        result = export_checked(decoder, args.out, opset=args.opset, exporter=args.exporter)
    except NonFiniteOutputError as e:  # name the file: the decoder's own message knows only its architecture
        raise NonFiniteOutputError(f"decoder '{args.decoder}' produced NaN or inf on the export's example latents, "
                                   f"so no ONNX file is written: {e}") from e
    print(result.summary())
    return 0


def _add_onnx_command(formats: Any) -> None:
    p = formats.add_parser("onnx", help="export to ONNX (dynamic batch/height/width) for onnxruntime",
                           description="Export a decoder to ONNX and check onnxruntime against PyTorch; the file "
                                       "is written only when they agree.")
    p.add_argument("--decoder", required=True,
                   help="decoder checkpoint (.safetensors, TAESD .pth, folder), pretrained name or Hub id; a preset "
                        "name needs --random-weights")
    p.add_argument("--random-weights", action="store_true",
                   help="build a preset with random weights: for benchmarks and tests")
    p.add_argument("--latent-space", default=None, help="latent space (sdxl, flux2, ...) a preset is built for "
                                                            "(default sdxl), and of checkpoints that do not record it")
    p.add_argument("--out", required=True, help="output .onnx path (written atomically, only after the check)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch exporter: torchscript (default, fastest graph here) or dynamo")
    p.set_defaults(func=_cmd_export_onnx)


def add_commands(subparsers: Any) -> None:
    export = subparsers.add_parser("export", help="export a decoder to another runtime")
    formats = export.add_subparsers(dest="format", metavar="FORMAT")
    _add_onnx_command(formats)

    def _no_format(args: argparse.Namespace) -> int:
        export.print_help(sys.stderr)
        return 2

    export.set_defaults(func=_no_format)

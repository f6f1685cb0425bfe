"""Running decoders fast: ``optimize`` (dtype, channels_last, torch.compile), ``tiling`` (measured
receptive field, tiled decoding), ``onnx`` (export and an onnxruntime decoder) and ``deflicker`` (steadying
decoded video where it holds still).

``fastdec.runtime`` was one module before it became this package: its names (``optimize``,
``to_channels_last``, ``parse_dtype``, ...) are re-exported here, along with the main names of the other two.
"""
from __future__ import annotations

from ..dtypes import parse_dtype
from .deflickering import Deflicker, DeflickerSettings, deflicker
from .onnx import OnnxDecoder, export_checked, export_onnx
from .optimize import (FP16_MAX, OptimizedDecoder, activation_ranges, add_channels_last_argument, fp16_headroom,
                       optimize, to_channels_last)
from .tiling import (ApproximateTilingWarning, ReceptiveField, decode_tiled, measure_receptive_field,
                     receptive_field, tile_count)

__all__ = [
    "FP16_MAX", "OptimizedDecoder", "activation_ranges", "add_channels_last_argument", "fp16_headroom", "optimize",
    "parse_dtype", "to_channels_last",
    "ApproximateTilingWarning", "ReceptiveField", "decode_tiled", "measure_receptive_field", "receptive_field",
    "tile_count",
    "OnnxDecoder", "export_checked", "export_onnx",
    "Deflicker", "DeflickerSettings", "deflicker",
]

"""Old path of :mod:`fastdec.runtime.onnx` (ONNX export and runtime) and of the ``fastdec export`` command
(:mod:`fastdec.runtime.cli`)."""
from .errors import OnnxExportError
from .runtime.cli import add_commands
from .runtime.onnx import DEFAULT_OPSET, EXPORTERS, OnnxDecoder, export_checked, export_onnx

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "OnnxDecoder", "OnnxExportError", "add_commands", "export_checked",
           "export_onnx"]

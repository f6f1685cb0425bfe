"""``fastdec bench``: decoders side by side in one run (time, speed-up, peak memory, parameters, GFLOPs).

The wing, one way down: ``measure`` (timing, the isolated memory probe, FLOPs/parameters, system info),
``baselines`` (the diffusers VAEs compared with, and the decoders named on the command line), ``report``
(tables, JSON, the speed-up plot); on top of them the three benches ``images`` (``fastdec bench``),
``video`` (``--video``) and ``pipeline`` (``--pipeline``), which never import each other; ``cli`` turns the
command's options into one call of one of them.

This package keeps the names the single ``fastdec.bench`` module had.
"""
from __future__ import annotations

from ..dtypes import DTYPES
from ..errors import BenchError
from .baselines import (
    BASELINES, DEFAULT_BASELINES, SDXL_VAE_CONFIG, SVD_VAE_CONFIG, Baseline, NamedDecoder, build_decoder,
    named_decoders,
)
from .cli import add_arguments, add_commands, bench_command, config_from_args
from .images import (
    BACKENDS, DEFAULT_DECODERS, DEFAULT_SIZES, BenchConfig, PreparedRow, RowSpec, Skip, bench_images,
    build_row_callable, plan_rows, prepare_row, run_bench,
)
from .measure import (
    RESULT_MARKER, MemoryStats, TimingStats, count_flops, count_parameters, make_latents, peak_memory, synchronize,
    system_info, tensor_bytes, time_callable,
)
from .pipeline import PipelineBenchConfig, run_pipeline_bench
from .report import TABLE_COLUMNS, plot_speedup, print_report, render_table, write_json
from .video import VideoBenchConfig, run_video_bench

__all__ = [
    "BACKENDS", "BASELINES", "DEFAULT_BASELINES", "DEFAULT_DECODERS", "DEFAULT_SIZES", "DTYPES", "RESULT_MARKER",
    "SDXL_VAE_CONFIG", "SVD_VAE_CONFIG", "TABLE_COLUMNS", "Baseline", "BenchConfig", "BenchError", "MemoryStats",
    "NamedDecoder", "PipelineBenchConfig", "PreparedRow", "RowSpec", "Skip", "TimingStats", "VideoBenchConfig",
    "add_arguments", "add_commands", "bench_command", "bench_images", "build_decoder", "build_row_callable",
    "config_from_args", "count_flops", "count_parameters", "make_latents", "named_decoders", "peak_memory",
    "plan_rows", "plot_speedup", "prepare_row", "print_report", "render_table", "run_bench", "run_pipeline_bench",
    "run_video_bench", "synchronize", "system_info", "tensor_bytes", "time_callable", "write_json",
]

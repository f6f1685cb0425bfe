"""Old path of ``fastdec bench --pipeline``: it lives in :mod:`fastdec.bench.pipeline` now."""
from .bench.cli import add_pipeline_arguments as add_bench_arguments
from .bench.pipeline import (
    DEFAULT_PIPELINE_DECODERS, PROMPT, SDXL_TEXT_ENCODERS, SDXL_UNET_CONFIG, TINY_TEXT_ENCODERS, TINY_UNET_CONFIG,
    DecodeTimer, PipelineBenchConfig, build_sdxl_pipeline, run_pipeline_bench, time_pipeline,
)

__all__ = ["DEFAULT_PIPELINE_DECODERS", "PROMPT", "SDXL_TEXT_ENCODERS", "SDXL_UNET_CONFIG", "TINY_TEXT_ENCODERS",
           "TINY_UNET_CONFIG", "DecodeTimer", "PipelineBenchConfig", "add_bench_arguments", "build_sdxl_pipeline",
           "run_pipeline_bench", "time_pipeline"]

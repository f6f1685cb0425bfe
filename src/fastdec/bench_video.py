"""Old path of ``fastdec bench --video``: it lives in :mod:`fastdec.bench.video` now."""
from .bench.cli import add_video_arguments as add_bench_arguments
from .bench.report import print_video_report
from .bench.video import (
    DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_VIDEO_DECODERS, VIDEO_BACKENDS, VideoBenchConfig, build_video_callable,
    decoder_modes, run_video_bench,
)

__all__ = ["DEFAULT_FRAMES", "DEFAULT_SIZE", "DEFAULT_VIDEO_DECODERS", "VIDEO_BACKENDS", "VideoBenchConfig",
           "add_bench_arguments", "build_video_callable", "decoder_modes", "print_video_report", "run_video_bench"]

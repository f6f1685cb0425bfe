"""Old import path of :mod:`fastdec.eval.metrics` (kept so existing imports keep working)."""
from .eval.metrics import (  # noqa: F401
    HIGHER_IS_BETTER, IMAGE_METRICS, LPIPS, MS_SSIM_SCALES, REFERENCES, SSIM_KERNEL, SSIM_SIGMA, VIDEO_METRICS,
    FeatureExtractor, FrechetStats, MeanCI, MetricUnavailable, TorchScriptExtractor, VideoMAEExtractor,
    flicker_score, frechet_distance, load_feature_extractor, mean_ci, ms_ssim, ms_ssim_min_size, psnr, ssim,
    summarize,
)

"""``fastdec train``: distil a fast decoder from a teacher VAE. One loop, top to bottom.

    fastdec train --teacher ../shared/weights/taef2_encoder.pth --decoder tae-192 \
        --data images/train --val images/val --resolution 256 --steps 20000 --out runs/taef2-192

Multi-GPU / multi-node: ``accelerate launch -m fastdec train ...`` (Hugging Face accelerate, DDP).

The wing, module by module:

- ``config``: :class:`TrainConfig`, defaults < YAML/TOML file < flags, checked before any work;
- ``data``: image and video folders, the crops cut from them, the global batch order;
- ``cache``: the latent cache (the crops encoded once by the teacher, resumable);
- ``losses``: L1/MSE, MS-SSIM, LPIPS, teacher matching, temporal, hinge GAN;
- ``student``: the decoder being trained (built through ``resolve_decoder``), its checks and EMA;
- ``validation``: PSNR/SSIM on held-out crops and the error grid;
- ``state``: checkpoints (tensors and plain values only, read without unpickling code) and metrics.csv;
- ``loop``: :func:`train`, build -> step -> validate-and-log -> checkpoint -> export;
- ``cli``: the ``fastdec train`` flags.

Data order is a seeded permutation per epoch consumed in global batches (rank r takes slice r of
each), so a resumed run sees exactly the samples the uninterrupted run would have seen.
"""
from ..errors import TrainError
from .cache import CachedCrops, LatentCache, build_cache
from .cli import add_commands
from .config import HELP, TrainConfig, load_config_file, make_config, validate_config
from .data import Crop, GlobalBatches, ImageFolder, VideoFolder, open_folder
from .loop import lr_factor, train
from .state import latest_checkpoint, load_resume_state, read_checkpoint, read_csv, rng_state, set_rng_state, write_csv
from .student import TrainView, build_student, check_compatible, ema_decay, update_ema
from .validation import error_grid, validate

__all__ = [
    "HELP", "CachedCrops", "Crop", "GlobalBatches", "ImageFolder", "LatentCache", "TrainConfig", "TrainError",
    "TrainView", "VideoFolder", "add_commands", "build_cache", "build_student", "check_compatible", "ema_decay",
    "error_grid", "latest_checkpoint", "load_config_file", "load_resume_state", "lr_factor", "make_config",
    "open_folder", "read_checkpoint", "read_csv", "rng_state", "set_rng_state", "train", "update_ema", "validate",
    "validate_config", "write_csv",
]

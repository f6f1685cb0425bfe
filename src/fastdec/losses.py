"""Old import path: the distillation losses now live in :mod:`fastdec.train.losses`."""
from .errors import LossConfigError
from .train.losses import (MS_SSIM_BETAS, DistillLoss, LossWeights, PatchDiscriminator, hinge_d_loss, hinge_g_loss,
                           load_lpips, ms_ssim_loss, ms_ssim_scales, temporal_loss)

__all__ = ["MS_SSIM_BETAS", "DistillLoss", "LossConfigError", "LossWeights", "PatchDiscriminator", "hinge_d_loss",
           "hinge_g_loss", "load_lpips", "ms_ssim_loss", "ms_ssim_scales", "temporal_loss"]

"""Old import path of the evaluation wing (:mod:`fastdec.eval`), kept so existing imports keep working."""
from .errors import EvalError  # noqa: F401
from .eval.cli import add_commands  # noqa: F401
from .eval.metrics import HIGHER_IS_BETTER, REFERENCES, summarize  # noqa: F401
from .eval.metrics import IMAGE_METRICS as METRICS  # noqa: F401
from .eval.report import write_frame_strip, write_image_grid, write_psnr_plot  # noqa: F401
from .eval.run import (  # noqa: F401
    TEACHER_NAME, center_crop, crop_to_factor, evaluate_images, evaluate_video, find_latent, list_videos,
    load_eval_teacher, read_frames, read_latent, resize_short_side,
)
from .io.images import IMAGE_SUFFIXES, load_image  # noqa: F401
from .io.latents import LATENT_SUFFIXES  # noqa: F401
from .io.video import VIDEO_SUFFIXES  # noqa: F401

"""Where a decoder's flicker is: in still parts of the picture, or where the content moves.

    python benchmarks/flicker_split.py --data ../shared/data/video/clips --clips 02_cups.mp4,04_coffee.mp4,cockatoo.mp4 \
        --teacher ../shared/weights/taef2_encoder.pth --decoder flux2-hifi --decoder flux2-video --frames 32 --resolution 256

The flicker score of ``fastdec eval video`` is mean |(D_t - D_{t-1}) - (O_t - O_{t-1})| over all pixels. This
script splits that sum by the original's motion: a pixel pair is *still* when the original changes by less than
``--threshold`` there (mean over RGB, box-averaged over ``--window`` px), else *moving*. In still pixels a temporal
decoder can only hold its output steady; the best it can do there is leave the original's own change (noise,
compression) as the residual, so

    still-pixel bound = (still flicker - the original's change in still pixels) / all flicker

is the most of the flicker score that steadying still pixels could remove. The rest is in moving pixels, where
the per-frame error moves with the content and only a more accurate decode of the moving parts lowers it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_clips import clip_parser, decoded_clips, write_rows  # noqa: E402


def motion_map(change: torch.Tensor, window: int = 9) -> torch.Tensor:
    """(T - 1, 1, H, W): the original's frame-to-frame ``change`` (O_t - O_{t-1}, (T - 1, 3, H, W)) in absolute
    value, RGB-averaged and box-averaged over ``window`` px."""
    return F.avg_pool2d(change.abs().mean(1, keepdim=True), window, 1, window // 2, count_include_pad=False)


def flicker_split(decoded: torch.Tensor, original: torch.Tensor, threshold: float = 0.01,
                  window: int = 9) -> dict[str, float]:
    """The flicker score of a (T, 3, H, W) decode split into still and moving pixels (see the module docstring)."""
    if decoded.shape != original.shape or decoded.ndim != 4 or decoded.shape[0] < 2:
        raise ValueError(f"need two clips of the same (T >= 2, 3, H, W) shape, got {tuple(decoded.shape)} "
                         f"and {tuple(original.shape)}")
    decoded, original = decoded.double(), original.double()
    original_change = original[1:] - original[:-1]
    residual = ((decoded[1:] - decoded[:-1]) - original_change).abs()
    still = (motion_map(original_change, window) < threshold).expand_as(residual)
    total = float(residual.sum())
    still_sum = float(residual[still].sum())
    own_change = float(original_change.abs()[still].sum())
    return {
        "flicker": total / residual.numel(),
        "still_pixels": float(still.double().mean()),
        "still_share": still_sum / total if total else 0.0,
        "still_bound": max(0.0, still_sum - own_change) / total if total else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = clip_parser(__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=float, default=0.01, help="original change below this = still pixel")
    p.add_argument("--window", type=int, default=9, help="box average of the motion map, px")
    args = p.parse_args(argv)
    rows = []
    for video, original, decoded in decoded_clips(args, "flicker_split.py"):
        for name, clip in decoded.items():
            split = flicker_split(clip, original, args.threshold, args.window)
            rows.append({"video": video, "decoder": name, **split})
            print(f"{video:16s} {name:18s} flicker {split['flicker']:.5f}  still pixels "
                  f"{split['still_pixels']:.0%}  flicker there {split['still_share']:.0%}  "
                  f"removable by steadying them <= {split['still_bound']:.1%}", flush=True)
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

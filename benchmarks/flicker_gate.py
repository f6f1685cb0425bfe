"""How much flicker a causal decoder could remove knowing only its own output: a flow-free gated filter.

    python benchmarks/flicker_gate.py --data ../shared/data/video/clips --clips 02_cups.mp4,04_coffee.mp4,cockatoo.mp4 \
        --teacher ../shared/weights/taef2_encoder.pth --decoder flux2-turbo --decoder flux2-hifi --frames 32 \
        --resolution 256 --latent-noise 0.1

``flicker_oracle.py`` asks what filtering along the *original's* motion could give, which no decoder knows.
This script asks the question a streaming decoder can act on: it holds its previous output frame, and nothing
else. It runs a recursive filter that keeps the previous output where the new decode barely differs from it
and takes the new decode where it differs a lot (motion, a cut):

    F_0 = D_0,    F_t = D_t + a m_t (F_{t-1} - D_t),    m_t = exp(-(box(|D_t - F_{t-1}|) / tau)^2)

with |.| the mean over RGB and box a ``--window`` x ``--window`` mean, so a change of about ``tau`` (in the [0, 1]
pixel range) is where the filter lets go. It needs no flow, no original and no training: a causal decoder
could compute it from its own last output, so where this filter meets a goal a decoder with it built in meets it
too, and where it does not the gain has to come from elsewhere. Every strength ``a`` and ``tau`` is scored as ``fastdec eval
video`` scores (PSNR, flicker), relative to the same decode unfiltered.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch

from fastdec.runtime.deflickering import DeflickerSettings, deflicker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_clips import clip_parser, decoded_clips, write_rows  # noqa: E402
from flicker_oracle import check_alpha, plot_tradeoff, print_means, refuse_bad_settings, score  # noqa: E402

ALPHAS = (0.0, 0.5, 0.7, 0.85)
TAUS = (0.01, 0.02, 0.04)
SETTING = ("alpha", "tau")


def check_gate(alpha: float, tau: float, window: int) -> None:
    check_alpha(alpha)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of pixels, got {window}")


def gated_filter(decoded: torch.Tensor, alpha: float, tau: float, window: int = 5) -> torch.Tensor:
    """The decode (T, 3, H, W) in [0, 1] filtered as the module docstring says; ``alpha`` 0 returns it as is.
    The filter is the package's (``fastdec.runtime.deflickering``, strength ``alpha``, threshold ``tau``): what
    ``--deflicker`` does in ``fastdec decode-video`` and ``fastdec eval video``."""
    if decoded.ndim != 4 or decoded.shape[1] != 3 or decoded.shape[0] < 1:
        raise ValueError(f"need an RGB clip shaped (T, 3, H, W), got {tuple(decoded.shape)}")
    check_gate(alpha, tau, window)
    return deflicker(decoded, DeflickerSettings(strength=alpha, threshold=tau, window=window))


def main(argv: Sequence[str] | None = None) -> int:
    p = clip_parser(__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, nargs="+", default=list(ALPHAS), help="filter strengths to score")
    p.add_argument("--tau", type=float, nargs="+", default=list(TAUS), help="changes (px in [0, 1]) to let go at")
    p.add_argument("--window", type=int, default=5, help="box size (px) the change is averaged over")
    p.add_argument("--plot", default=None, help="write a PNG of flicker ratio against PSNR change here")
    args = p.parse_args(argv)
    settings = [(0.0, 0.0)] + [(a, tau) for a in args.alpha if a != 0 for tau in args.tau]
    refuse_bad_settings(p, check_gate, [(a, tau, args.window) for a, tau in settings[1:]])
    rows = []
    for video, original, decoded in decoded_clips(args, "flicker_gate.py"):
        for name, clip in decoded.items():
            for alpha, tau in settings:
                filtered = gated_filter(clip, alpha, tau, args.window) if alpha else clip  # tau 0: unfiltered
                psnr_db, flicker = score(filtered, original)
                rows.append({"video": video, "decoder": name, "alpha": alpha, "tau": tau, "psnr": psnr_db,
                             "flicker": flicker})
                print(f"{video:16s} {name:18s} alpha {alpha:.2f}  tau {tau:.3f}  PSNR {psnr_db:6.2f}  "
                      f"flicker {flicker:.5f}", flush=True)
    print_means(rows, SETTING)
    if args.plot:
        jitter = f", latents + noise of std {args.latent_noise:g}" if args.latent_noise else ""
        plot_tradeoff(rows, Path(args.plot), f"gated filter on the decoder's own output (no flow{jitter}), "
                      "labels: strength a", keys=SETTING)
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

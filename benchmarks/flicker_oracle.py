"""How much of a per-frame decode's flicker any temporal decoder could remove, measured with an oracle.

    python benchmarks/flicker_oracle.py --data ../shared/data/video/clips --clips 02_cups.mp4,04_coffee.mp4,cockatoo.mp4 \
        --teacher ../shared/weights/taef2_encoder.pth --decoder flux2-turbo --decoder flux2-hifi --frames 32 --resolution 256

A temporal decoder can lower flicker in two ways: by being more accurate, or by carrying its output along the
motion so that errors independent from frame to frame average out. This script measures the most the second way
can give, with knowledge no decoder has: the motion and the occlusions of the *original* clip. It runs a
motion-compensated recursive filter over the per-frame decode,

    F_0 = D_0,    F_t = (1 - a m_t) D_t + a m_t warp(F_{t-1})

with the flow from O_t to O_{t-1} (scikit-image's ``optical_flow_ilk`` on the original's luminance, the flow tOF
uses, or with ``--flow tvl1`` its TV-L1 flow) and m_t = 1 where the warped original O_{t-1} matches O_t to
within ``--occlusion``, else 0, and scores every strength ``a`` as ``fastdec eval video`` does (PSNR, flicker).
It also reports how much the per-frame error travels with the content: the correlation between E_t = D_t - O_t
and warp(E_{t-1}). An error that travels with the content is consistent over time to a viewer, yet the
warping-free flicker score still counts it; filtering along the motion cannot remove it, only a more accurate
decode can.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_clips import clip_parser, decoded_clips, write_rows  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75)


def backward_flows(original: torch.Tensor, method: str = "ilk") -> np.ndarray:
    """(T - 1, 2, H, W): for each pixel of frame t, where it was in frame t - 1 (row, column offsets, px), by
    scikit-image's iterative Lucas-Kanade (``ilk``, what tOF uses) or TV-L1 (``tvl1``: slower, sharper at edges)."""
    from skimage.registration import optical_flow_ilk, optical_flow_tvl1

    from fastdec.eval.metrics import LUMA_WEIGHTS

    flow = {"ilk": optical_flow_ilk, "tvl1": optical_flow_tvl1}[method]
    luma = np.tensordot(np.asarray(LUMA_WEIGHTS), original.double().cpu().numpy(), axes=([0], [1]))
    return np.stack([flow(luma[t], luma[t - 1]) for t in range(1, luma.shape[0])])


def warp_previous(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Frame t - 1, (C, H, W), resampled at frame t's pixels moved by ``flow`` (bilinear, edges repeated)."""
    from skimage.transform import warp

    rows, cols = np.meshgrid(np.arange(frame.shape[1]), np.arange(frame.shape[2]), indexing="ij")
    coords = np.stack([rows + flow[0], cols + flow[1]])
    return np.stack([warp(channel, coords, order=1, mode="edge") for channel in frame])


def _check(decoded: torch.Tensor, original: torch.Tensor) -> None:
    if decoded.shape != original.shape or decoded.ndim != 4 or decoded.shape[0] < 2 or decoded.shape[1] != 3:
        raise ValueError(f"need two RGB clips of the same (T >= 2, 3, H, W) shape, got {tuple(decoded.shape)} "
                         f"and {tuple(original.shape)}")


def tracked_pixels(original: torch.Tensor, flows: np.ndarray, occlusion: float = 0.03) -> np.ndarray:
    """(T - 1, H, W) bool, m_t: where the original's frame t - 1, warped along ``flows``, matches frame t to within
    ``occlusion`` (mean over RGB); elsewhere the pixel was occluded or the flow is wrong."""
    o = original.double().cpu().numpy()
    return np.stack([np.abs(warp_previous(o[t - 1], flows[t - 1]) - o[t]).mean(0) < occlusion
                     for t in range(1, o.shape[0])])


def check_alpha(alpha: float) -> None:
    """A filter strength: the share of the previous output kept, in [0, 1) (1 would never take a new frame)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


def refuse_bad_settings(parser: argparse.ArgumentParser, check: Callable[..., None], settings: Iterable[tuple]) -> None:
    """``check(*setting)`` for every setting before any decoding; a bad one is a usage error naming its flag."""
    for setting in settings:
        try:
            check(*setting)
        except ValueError as e:
            parser.error(f"--{e}")


def oracle_filter(decoded: torch.Tensor, original: torch.Tensor, alpha: float, occlusion: float = 0.03,
                  flows: np.ndarray | None = None, tracked: np.ndarray | None = None) -> torch.Tensor:
    """The decode (T, 3, H, W) in [0, 1] filtered along the original's motion (see the module docstring).
    ``flows`` and ``tracked`` (:func:`tracked_pixels`) depend on the original only: pass them to score
    several decodes or strengths of one clip without recomputing them."""
    _check(decoded, original)
    check_alpha(alpha)
    flows = backward_flows(original) if flows is None else flows
    tracked = tracked_pixels(original, flows, occlusion) if tracked is None else tracked
    d = decoded.double().cpu().numpy()
    out = [d[0]]
    for t in range(1, d.shape[0]):
        weight = alpha * tracked[t - 1][None]
        out.append((1 - weight) * d[t] + weight * warp_previous(out[-1], flows[t - 1]))
    return torch.from_numpy(np.stack(out)).clamp(0, 1).to(decoded.dtype)


def error_travel(decoded: torch.Tensor, original: torch.Tensor, flows: np.ndarray | None = None) -> float:
    """Mean over frame pairs of corr(E_t, warp(E_{t-1})), E = decoded - original: 1 when the error moves with the
    content, 0 when it is new in every frame."""
    _check(decoded, original)
    flows = backward_flows(original) if flows is None else flows
    error = (decoded.double() - original.double()).cpu().numpy()
    return float(np.mean([np.corrcoef(error[t].ravel(), warp_previous(error[t - 1], flows[t - 1]).ravel())[0, 1]
                          for t in range(1, error.shape[0])]))


def score(clip: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB, the mean over frames as ``fastdec eval video`` reports it; flicker)."""
    from fastdec.eval.metrics import flicker_score, psnr

    return float(psnr(clip.float(), original.float()).mean()), flicker_score(clip, original)


def main(argv: Sequence[str] | None = None) -> int:
    p = clip_parser(__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, nargs="+", default=list(ALPHAS), help="filter strengths to score")
    p.add_argument("--flow", choices=("ilk", "tvl1"), default="ilk", help="optical flow of the original")
    p.add_argument("--occlusion", type=float, default=0.03, help="warped original off by more = occluded, px in [0, 1]")
    p.add_argument("--plot", default=None, help="write a PNG of flicker ratio against PSNR change here")
    args = p.parse_args(argv)
    refuse_bad_settings(p, check_alpha, [(a,) for a in args.alpha])
    rows = []
    for video, original, decoded in decoded_clips(args, "flicker_oracle.py"):
        flows = backward_flows(original, args.flow)
        tracked = tracked_pixels(original, flows, args.occlusion)
        for name, clip in decoded.items():
            travel = error_travel(clip, original, flows)
            for alpha in args.alpha:
                psnr_db, flicker = score(oracle_filter(clip, original, alpha, flows=flows, tracked=tracked), original)
                rows.append({"video": video, "decoder": name, "alpha": alpha, "psnr": psnr_db,
                             "flicker": flicker, "error_travel": travel})
                print(f"{video:16s} {name:18s} alpha {alpha:.2f}  PSNR {psnr_db:6.2f}  flicker {flicker:.5f}"
                      f"  error travels with the content: corr {travel:.2f}", flush=True)
    print_means(rows)
    if args.plot:
        write_plot(rows, Path(args.plot), args.flow, latent_noise=args.latent_noise)
    write_rows(rows, args.json)
    return 0


def means(rows: list[dict], keys: Sequence[str] = ("alpha",)) -> list[dict]:
    """Per decoder and setting (the values of ``keys``), the means over clips, with the ratio / difference to
    the same decoder unfiltered (its rows with alpha 0)."""
    out = []
    for name in dict.fromkeys(r["decoder"] for r in rows):
        mine = [r for r in rows if r["decoder"] == name]
        base = [r for r in mine if r["alpha"] == 0]
        for setting in dict.fromkeys(tuple(r[k] for k in keys) for r in mine):
            at = [r for r in mine if tuple(r[k] for k in keys) == setting]
            row = {"decoder": name, **dict(zip(keys, setting)), "psnr": float(np.mean([r["psnr"] for r in at])),
                   "flicker": float(np.mean([r["flicker"] for r in at]))}
            if base:
                row["flicker_ratio"] = row["flicker"] / float(np.mean([r["flicker"] for r in base]))
                row["psnr_change"] = row["psnr"] - float(np.mean([r["psnr"] for r in base]))
            out.append(row)
    return out


def print_means(rows: list[dict], keys: Sequence[str] = ("alpha",)) -> None:
    print("\nmeans over clips (vs the same decoder unfiltered):")
    for m in means(rows, keys):
        change = f"  ({m['flicker_ratio']:.3f}x, {m['psnr_change']:+.2f} dB)" if "flicker_ratio" in m else ""
        setting = "  ".join(f"{k} {m[k]:.2f}" for k in keys)
        print(f"{m['decoder']:18s} {setting}  PSNR {m['psnr']:6.2f}  flicker {m['flicker']:.5f}{change}")


def plot_limits(points: list[dict], goal: float, allowance: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """x and y ranges that hold every point and the goal region's corner, with a margin."""
    xs, ys = [m["flicker_ratio"] for m in points], [m["psnr_change"] for m in points]
    return ((min(*xs, goal) - 0.05, max(*xs, 1.0) + 0.03),
            (min(*ys, -allowance) - 0.15, max(*ys, 0.1) + 0.15))


def write_plot(rows: list[dict], path: Path, flow: str, goal: float = 0.8, allowance: float = 0.2,
               latent_noise: float = 0.0) -> Path:
    """Flicker ratio against PSNR change, one line per decoder over the filter strengths, and the region where
    a decoder would meet the goal (flicker <= ``goal`` x, PSNR at most ``allowance`` dB lower)."""
    jitter = f", latents + noise of std {latent_noise:g}" if latent_noise else ""
    return plot_tradeoff(rows, path, f"oracle filter along the original's motion ({flow} flow{jitter}), "
                         "labels: strength a", goal=goal, allowance=allowance)


def plot_tradeoff(rows: list[dict], path: Path, title: str, keys: Sequence[str] = ("alpha",), goal: float = 0.8,
                  allowance: float = 0.2) -> Path:
    """The plot of :func:`write_plot` for any filter: one line per decoder and value of ``keys[1:]`` (each
    starting at the unfiltered decode), over the values of ``keys[0]``, which label the points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdec.io.files import atomic_write

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    all_means = [m for m in means(rows, keys) if "flicker_ratio" in m]
    for name in dict.fromkeys(r["decoder"] for r in rows):
        unfiltered = [m for m in all_means if m["decoder"] == name and m["alpha"] == 0]
        filtered = [m for m in all_means if m["decoder"] == name and m["alpha"] != 0]
        for rest in dict.fromkeys(tuple(m[k] for k in keys[1:]) for m in filtered):
            points = unfiltered + [m for m in filtered if tuple(m[k] for k in keys[1:]) == rest]
            label = " ".join([name, *(f"{k} {v:g}" for k, v in zip(keys[1:], rest))])
            ax.plot([m["flicker_ratio"] for m in points], [m["psnr_change"] for m in points], marker="o",
                    label=label)
            for m in points:
                ax.annotate(f"{m[keys[0]]:g}", (m["flicker_ratio"], m["psnr_change"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    (x0, x1), (y0, y1) = plot_limits(all_means, goal, allowance)
    ax.fill_between([x0, goal], -allowance, y1, color="tab:green", alpha=0.12,
                    label=f"goal: flicker <= {goal}x at PSNR >= -{allowance} dB")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("flicker vs the same decode unfiltered (x)")
    ax.set_ylabel("PSNR change (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


if __name__ == "__main__":
    sys.exit(main())

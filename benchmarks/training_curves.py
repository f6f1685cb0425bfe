"""Training curves of `fastdec train` runs, one line per run, from their metrics.csv.

    python benchmarks/training_curves.py --run flux2-hifi=runs/hifi --run flux2-turbo=runs/turbo --out curves.png
    python benchmarks/training_curves.py --metric temporal --run flux2-video=runs/video --out video_curves.png

``--metric val_psnr`` (default) also draws the teacher decoder's validation PSNR on the same crops (measured
at step 0) as a dashed line, so each curve reads against TAEF2. Loss columns (l1, temporal, loss, ...) are
logged every --log-every steps and are noisy: ``--smooth N`` averages N logged points.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from fastdec.io.files import atomic_write


def read_curve(run: Path, metric: str) -> tuple[list[int], list[float], float | None]:
    """Steps and values of ``metric`` in ``run``'s metrics.csv, and the teacher's validation PSNR if logged."""
    path = run / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"training_curves.py: error: {path} not found: --run takes a fastdec train run folder")
    rows = list(csv.DictReader(path.open()))
    if rows and metric not in rows[0]:
        raise SystemExit(f"training_curves.py: error: {path} has no column '{metric}' (columns: {', '.join(rows[0])})")
    points = [(int(r["step"]), float(r[metric])) for r in rows if r.get(metric)]
    teacher = next((float(r["teacher_val_psnr"]) for r in rows if r.get("teacher_val_psnr")), None)
    return [p[0] for p in points], [p[1] for p in points], teacher


def smooth(values: list[float], n: int) -> np.ndarray:
    if n <= 1 or len(values) < n:
        return np.asarray(values)
    return np.convolve(values, np.ones(n) / n, mode="valid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a run folder (repeatable)")
    parser.add_argument("--metric", default="val_psnr", help="metrics.csv column (default val_psnr)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N logged points")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    teachers = set()
    for spec in args.run:
        label, _, folder = spec.rpartition("=")
        steps, values, teacher = read_curve(Path(folder), args.metric)
        ys = smooth(values, args.smooth)
        axes.plot(steps[len(steps) - len(ys):], ys, marker="o" if len(ys) < 20 else None, label=label or folder)
        print(f"{label or folder}: {args.metric} " + ", ".join(f"{s}: {v:.4g}" for s, v in zip(steps, values)))
        if teacher is not None and args.metric == "val_psnr":
            teachers.add(round(teacher, 2))
    for teacher in sorted(teachers):
        axes.axhline(teacher, linestyle="--", color="grey", label=f"TAEF2 (teacher decoder) {teacher:.2f} dB")
    axes.set_xlabel("step")
    axes.set_ylabel("validation PSNR (dB)" if args.metric == "val_psnr" else args.metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(Path(args.out), lambda tmp: figure.savefig(tmp, format="png"), suffix=".png")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

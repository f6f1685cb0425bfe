"""What ``fastdec eval`` writes and prints: report.json, report.md, CSV tables, figures, the terminal summary.

Everything is written through :mod:`fastdec.io.files` (atomic; JSON with its one rule: non-finite numbers
become ``null``). The report dict (built by :mod:`fastdec.eval.run`) is the single source for every format.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..io.files import atomic_write, write_csv, write_json, write_text
from .metrics import HIGHER_IS_BETTER, IMAGE_METRICS, REFERENCES, VIDEO_METRICS

ERROR_VMAX = 0.2  # error maps saturate at 20% of the pixel range so small errors stay visible
LABELS = {"ms_ssim": "MS-SSIM", "gradient_energy": "gradient energy"}  # the rest: the name in capitals
# a table written beside the report: file name, rows, columns
Table = tuple[str, Sequence[Mapping[str, Any]], Sequence[str]]


def metric_names(kind: str) -> tuple[str, ...]:
    return IMAGE_METRICS if kind == "images" else VIDEO_METRICS


# ----------------------------------------------------------------------------- numbers as text
def format_stat(stat: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``mean ± half-width`` of a :func:`~fastdec.eval.metrics.summarize` result; "—" when not measured."""
    if not stat:
        return "—"
    mean = stat["mean"]
    if not math.isfinite(mean):
        return "exact (inf)"
    low, high = stat.get("ci_low"), stat.get("ci_high")
    text = f"{mean:.{digits}f}"
    if low is not None and math.isfinite(low):
        text += f" ± {(high - low) / 2:.{digits}f}"
    return text


def _digits(metric: str) -> int:
    return 2 if metric in ("psnr", "fid", "fvd") else 5 if metric == "flicker" else 4


def metric_label(metric: str) -> str:
    """The row name: the metric and which way is better (↑, ↓, or → 1 for the gradient-energy ratio)."""
    better = HIGHER_IS_BETTER.get(metric, True)
    arrow = "→ 1" if better is None else "↑" if better else "↓"
    return f"{LABELS.get(metric, metric.upper())} {arrow}"


def markdown_table(summary: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """One row per measured metric, one column per reference (vs original, vs teacher decode)."""
    lines = ["| metric | vs original | vs teacher decode |", "|---|---|---|"]
    for metric in metrics:
        cells = [format_stat(summary.get(ref, {}).get(metric), _digits(metric)) for ref in REFERENCES]
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {metric_label(metric)} | {cells[0]} | {cells[1]} |")
    return lines


def _frechet_lines(entry: Mapping[str, Any], against: str = " vs originals") -> list[str]:
    return [f"{key.upper()}{against}: {entry[key]['value']:.3f} (n = {entry[key]['n']})"
            for key in ("fid", "fvd") if key in entry]


def _skipped_line(report: Mapping[str, Any]) -> list[str]:
    skipped = report.get("skipped") or {}
    if not skipped.get("count"):
        return []
    return [f"skipped {skipped['count']} unreadable {report['unit']}: {', '.join(skipped['files'])}"]


def _clip_table(clips: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["", "| clip | frames | PSNR vs original | SSIM | flicker |", "|---|---|---|---|---|"]
    for c in clips:
        flicker = f"{c['flicker']:.5f}" if c["flicker"] is not None else "—"
        lines.append(f"| {c['video']} | {c['frames']} | {c['psnr']:.2f} | {c['ssim']:.4f} | {flicker} |")
    return lines


def report_markdown(report: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    s = report["settings"]
    latents = f" (latents from `{s['latents']}`)" if s.get("latents") else ""
    lines = [f"# fastdec eval {report['kind']}", "",
             f"- data: `{s['data']}` ({report['count']} {report['unit']})",
             f"- teacher: `{s.get('teacher')}`{latents}",
             f"- crop: {s['crop']}",
             "- values: mean ± half-width of the 95% confidence interval (Student t over "
             f"{'images' if report['kind'] == 'images' else 'clips'})"]
    lines += [f"- {LABELS.get(key, key.upper())}: {s[key]}" for key in ("vif", "gradient_energy") if key in s]
    lines += [f"- {line}" for line in _skipped_line(report)] + [""]
    for name, entry in report["decoders"].items():
        lines += [f"## {name}", "", f"`{entry['source']}`", ""]
        lines += markdown_table(entry["metrics"], metric_names(report["kind"]))
        lines += [f"\n{line}" for line in _frechet_lines(entry)]
        if entry.get("clips"):
            lines += _clip_table(entry["clips"])
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def print_summary(report: Mapping[str, Any], out: str | Path | None = None) -> None:
    """The terminal summary: a table per decoder, Fréchet distances, skipped inputs, where the report is."""
    for name, entry in report["decoders"].items():
        print(f"\n{name}")
        print("\n".join(markdown_table(entry["metrics"], metric_names(report["kind"]))))
        for line in _frechet_lines(entry, against=""):
            print(line)
    for line in _skipped_line(report):
        print(f"\n{line}")
    if out is not None:
        print(f"\nreport written to {Path(out) / 'report.md'}")


def write_report(out: Path, report: dict[str, Any], tables: Mapping[str, Table], figures: Sequence[str]) -> None:
    """The CSV tables (``tables``: report key -> table), then report.json and report.md, all atomically.

    ``report["files"]`` records the file names; the figures are already written (``figures``: names in ``out``).
    """
    report["files"] = {**{key: name for key, (name, _, _) in tables.items()}, "figures": list(figures)}
    for name, rows, columns in tables.values():
        write_csv(out / name, rows, columns)
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report, figures))


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"),
                            suffix=path.suffix)
    finally:
        plt.close(fig)


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _error_map(pred: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (pred.float() - ref.float()).abs().mean(dim=0).cpu().numpy()


def write_image_grid(path: Path, samples: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]) -> Path:
    """Rows: images; columns: original | each decoder | each decoder's |error| vs the original."""
    plt = _pyplot()
    names = list(samples[0][2])
    cols = 1 + 2 * len(names)
    fig, axes = plt.subplots(len(samples), cols, figsize=(2.6 * cols, 2.6 * len(samples)), squeeze=False)
    for row, (label, original, decoded) in enumerate(samples):
        panels = [(f"{label}\noriginal", _to_hwc(original), None)]
        panels += [(name, _to_hwc(decoded[name]), None) for name in names]
        panels += [(f"|error| {name}", _error_map(decoded[name], original), "magma") for name in names]
        for ax, (title, image, cmap) in zip(axes[row], panels):
            ax.imshow(image, cmap=cmap, vmin=0, vmax=ERROR_VMAX if cmap else 1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"error maps: mean |error| over RGB, dark = 0, bright = {ERROR_VMAX:g} (saturated)", fontsize=9)
    return _save_figure(fig, path)


def write_frame_strip(path: Path, label: str, original: torch.Tensor, decoded: dict[str, torch.Tensor],
                      count: int = 6) -> Path:
    """Rows: original, each decoder, each decoder's |error|; columns: evenly spaced frames."""
    plt = _pyplot()
    t = original.shape[0]
    index = sorted(set(np.linspace(0, t - 1, min(count, t)).round().astype(int).tolist()))
    rows = [("original", original, None)] + [(n, d, None) for n, d in decoded.items()]
    rows += [(f"|error| {n}", d, "magma") for n, d in decoded.items()]
    fig, axes = plt.subplots(len(rows), len(index), figsize=(2.6 * len(index), 1.8 * len(rows)), squeeze=False)
    for r, (name, frames, cmap) in enumerate(rows):
        for c, i in enumerate(index):
            ax = axes[r][c]
            image = _error_map(frames[i], original[i]) if cmap else _to_hwc(frames[i])
            ax.imshow(image, cmap=cmap, vmin=0, vmax=ERROR_VMAX if cmap else 1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=8)
    fig.suptitle(f"{label}: error maps saturate at {ERROR_VMAX:g}", fontsize=9)
    return _save_figure(fig, path)


def _mean_over_clips(clips: Mapping[str, list[float]]) -> list[float]:
    """Per frame index, the mean of the clips' finite values (NaN where none is finite)."""
    length = max(len(v) for v in clips.values())
    return [float(np.mean([v[i] for v in clips.values() if i < len(v) and math.isfinite(v[i])] or [np.nan]))
            for i in range(length)]


def write_psnr_plot(path: Path, per_frame: dict[str, dict[str, list[float]]]) -> Path:
    """PSNR vs frame index: thin line per clip, thick line = mean over clips, one colour per decoder."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (name, clips) in enumerate(per_frame.items()):
        colour = f"C{k}"
        for values in clips.values():
            ax.plot(values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(_mean_over_clips(clips), color=colour, linewidth=2, label=f"{name} (mean over {len(clips)} clips)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs original (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)

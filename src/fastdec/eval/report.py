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
LABELS = {"ms_ssim": "MS-SSIM", "gradient_energy": "gradient energy", "temporal_energy": "temporal energy",
          "excess_motion": "excess motion", "frame_diff": "frame diff", "tof": "tOF"}  # the rest: in capitals
# the video settings report.md spells out: how each temporal metric is computed
TEMPORAL_KEYS = ("flicker", "frame_diff", "temporal_energy", "excess_motion", "tof")
MAX_DIFF_PANELS = 24  # frame_diff.png panels: beyond this a figure is unreadable (per_frame.csv has every clip)
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
    # flicker and excess motion are small fractions of the pixel range: 4 decimals would round them to 0
    return 2 if metric in ("psnr", "fid", "fvd") else 5 if metric in ("flicker", "excess_motion") else 4


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


def format_difference(stat: Mapping[str, Any] | None, digits: int = 4, count: int | None = None) -> str:
    """``+1.57 [+1.49, +1.65]``: a paired difference and its interval, signed so the direction is plain;
    "—" when not measured. ``(n = k)`` is added when fewer than the ``count`` inputs were paired (a metric
    not measured on some, or exact matches left out), so a cell never silently covers other images."""
    if not stat:
        return "—"
    mean, low, high = stat["mean"], stat.get("ci_low"), stat.get("ci_high")
    if mean is None or not math.isfinite(mean):  # NaN in memory, null once read back from report.json
        return "— (an exact match in every pair)"  # on either side: the decoder's or the baseline's
    text = f"{mean:+.{digits}f}"
    if low is not None and high is not None and math.isfinite(low):
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    if count is not None and stat["n"] != count:
        text += f" (n = {stat['n']})"
    return text


def difference_tables(report: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, markdown table) per reference with paired differences vs the baseline: a row per decoder,
    a column per metric. Empty with fewer than two decoders."""
    diffs = {name: e["vs_baseline"] for name, e in report["decoders"].items() if e.get("vs_baseline")}
    if not diffs:
        return []
    baseline, count = next(iter(diffs.values()))["baseline"], report["count"]
    tables = []
    for reference in REFERENCES:
        rows = {name: d[reference] for name, d in diffs.items() if d.get(reference)}
        metrics = [m for m in metric_names(report["kind"]) if any(m in stats for stats in rows.values())]
        if not metrics:
            continue
        against = "" if reference == "original" else ", both scored against the teacher decode"
        title = f"Difference vs {baseline}{against} (paired over the same {count} {report['unit']}, 95% CI)"
        lines = ["| decoder | " + " | ".join(metric_label(m) for m in metrics) + " |",
                 "|---|" + "---|" * len(metrics)]
        lines += [f"| {name} | " + " | ".join(format_difference(stats.get(m), _digits(m), count) for m in metrics)
                  + " |" for name, stats in rows.items()]
        tables.append((title, lines))
    return tables


def _difference_markdown(report: Mapping[str, Any]) -> list[str]:
    unit = "image" if report["kind"] == "images" else "clip"
    legend = (f"Each cell: the mean of the per-{unit} differences (decoder − baseline) [95% Student-t interval]; "
              "the arrows say which way the metric itself is better.")
    lines = []
    for title, table in difference_tables(report):
        lines += [f"## {title}", "", legend, "", *table, ""]
    return lines


def _frechet_lines(entry: Mapping[str, Any], against: str = " vs originals") -> list[str]:
    return [f"{key.upper()}{against}: {entry[key]['value']:.3f} (n = {entry[key]['n']})"
            for key in ("fid", "fvd") if key in entry]


def _skipped_line(report: Mapping[str, Any]) -> list[str]:
    skipped = report.get("skipped") or {}
    if not skipped.get("count"):
        return []
    return [f"skipped {skipped['count']} unreadable {report['unit']}: {', '.join(skipped['files'])}"]


def _cell(value: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if value is not None else "—"


def _clip_table(clips: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per clip vs the original: PSNR, SSIM and the temporal metrics measured (tOF only with --tof)."""
    temporal = [m for m in ("flicker", "temporal_energy", "excess_motion", "tof") if m in clips[0]]
    header = " | ".join(LABELS.get(m, m) for m in temporal)
    lines = ["", f"| clip | frames | PSNR vs original | SSIM | {header} |", "|---|---|---|---|" + "---|" * len(temporal)]
    for c in clips:
        cells = " | ".join(_cell(c[m], _digits(m)) for m in temporal)
        lines.append(f"| {c['video']} | {c['frames']} | {c['psnr']:.2f} | {c['ssim']:.4f} | {cells} |")
    return lines


def report_markdown(report: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    s = report["settings"]
    latents = f" (latents from `{s['latents']}`)" if s.get("latents") else ""
    lines = [f"# fastdec eval {report['kind']}", "",
             f"- data: `{s['data']}` ({report['count']} {report['unit']})",
             f"- teacher: `{s.get('teacher')}`{latents}",
             f"- crop: {s['crop']}",
             *([f"- latents jittered: + Gaussian noise of std {s['latent_noise']:g}, independent per element and "
                "frame, seeded by the input's name (the same for every decoder)"] if s.get("latent_noise") else []),
             *([f"- NAME+deflicker: NAME's decode deflickered (fastdec.runtime.deflickering: strength "
                f"{s['deflicker']['strength']:g}, threshold {s['deflicker']['threshold']:g}, "
                f"{s['deflicker']['window']} px window)"] if s.get("deflicker") else []),
             "- values: mean ± half-width of the 95% confidence interval (Student t over "
             f"{'images' if report['kind'] == 'images' else 'clips'})"]
    lines += [f"- {LABELS.get(key, key.upper())}: {s[key]}" for key in ("vif", "gradient_energy", *TEMPORAL_KEYS)
              if key in s]
    lines += [f"- {line}" for line in _skipped_line(report)] + [""]
    for name, entry in report["decoders"].items():
        lines += [f"## {name}", "", f"`{entry['source']}`", ""]
        lines += markdown_table(entry["metrics"], metric_names(report["kind"]))
        lines += [f"\n{line}" for line in _frechet_lines(entry)]
        if entry.get("clips"):
            lines += _clip_table(entry["clips"])
        lines.append("")
    lines += _difference_markdown(report)
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def print_summary(report: Mapping[str, Any], out: str | Path | None = None) -> None:
    """The terminal summary: a table per decoder, Fréchet distances, the paired differences vs the baseline,
    skipped inputs, where the report is."""
    for name, entry in report["decoders"].items():
        print(f"\n{name}")
        print("\n".join(markdown_table(entry["metrics"], metric_names(report["kind"]))))
        for line in _frechet_lines(entry, against=""):
            print(line)
    for title, table in difference_tables(report):
        print(f"\n{title}")
        print("\n".join(table))
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


def _plot_clip_diffs(ax, clip: str, per_frame_diff: Mapping[str, Mapping[str, list[float]]]) -> None:
    """One panel of frame_diff.png: a line per decoder (the same colour in every panel)."""
    from matplotlib.ticker import MaxNLocator

    for k, (name, series) in enumerate(per_frame_diff.items()):
        if clip in series:  # every decoder is scored on every clip; kept safe for partial inputs
            values = series[clip]
            ax.plot(range(1, len(values) + 1), values, color=f"C{k}", marker="." if len(values) <= 32 else None,
                    linewidth=1.2, label=name)
    ax.set_title(clip, fontsize=8)
    ax.set_xlabel("frame t", fontsize=8)
    ax.set_ylim(bottom=0)  # from 0, so a flat line near 0 reads as "no flicker", not as noise
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def write_frame_diff_plot(path: Path, per_frame_diff: dict[str, dict[str, list[float]]]) -> Path:
    """frame_diff vs frame index t (the pair t-1 -> t): a panel per clip, a line per decoder (vs the original).

    Only the first ``MAX_DIFF_PANELS`` clips get a panel (the title says so); per_frame.csv holds them all.
    """
    plt = _pyplot()
    clips = list(dict.fromkeys(clip for series in per_frame_diff.values() for clip in series))
    shown = clips[:MAX_DIFF_PANELS]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    # constrained layout: the suptitle and the panel titles and labels would overlap otherwise
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, constrained_layout=True)
    for ax, clip in zip(axes.flat, shown):
        _plot_clip_diffs(ax, clip, per_frame_diff)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("frame_diff", fontsize=8)
    axes[0][0].legend(fontsize=7)
    title = "frame_diff_t = mean_px |(D_t - D_{t-1}) - (O_t - O_{t-1})| vs the original (0 = moves like it)"
    if len(shown) < len(clips):
        title += f"\nfirst {len(shown)} of {len(clips)} clips (all of them in per_frame.csv)"
    fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)

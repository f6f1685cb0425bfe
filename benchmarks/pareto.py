"""Quality per FLOP: PSNR of each decoder (a ``fastdec eval images`` report) against its cost (a ``fastdec bench``
JSON), in one PNG with two panels and a markdown table.

Left panel: PSNR vs original (mean, 95% CI error bars) against GFLOPs per image at 512 px; right panel: the same
PSNR against the measured median ms per 512 px image of one bench setting (dtype/backend, default fp32/eager).
The dashed step line joins the Pareto-optimal decoders (no other is both cheaper and better).

    python benchmarks/pareto.py --eval EVAL/report.json --bench bench.json --out pareto.png \\
        --name teacher=taef2 --label teacher=TAEF2 --table pareto.md
    python benchmarks/pareto.py ... --setting bf16/channels_last

The eval report names decoders by file stem ("teacher", "flux2-hifi"), the bench by its ``--decoders`` value
(preset, checkpoint stem, Hub id): ``--name EVAL=BENCH`` maps one to the other where they differ.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fastdec.errors import FastdecError, UsageError
from fastdec.io.files import atomic_write, check_output_file, write_text

DEFAULT_SETTING = "fp32/eager"
METRIC, REFERENCE = "psnr", "original"  # report["decoders"][name]["metrics"][REFERENCE][METRIC]


@dataclass
class Point:
    """One decoder: its quality from the eval report and its cost from the matching bench row."""

    name: str        # the eval report's name
    label: str       # legend / table text
    bench_name: str  # the bench row it was matched with
    gflops: float    # per image
    ms: float        # median per image
    psnr: float
    ci_low: float | None   # None: no interval (a single image)
    ci_high: float | None
    n: int


# ----------------------------------------------------------------------------- inputs
def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict, split at the first '=': keys are eval names (file stems), so an '=' in a
    value (a bench name, a label) survives."""
    pairs: dict[str, str] = {}
    for value in values or ():
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise UsageError(f"{flag} {value!r}: expected EVAL=VALUE, e.g. {flag} teacher=taef2")
        pairs[key] = rest
    return pairs


def load_json(path: str | Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{what} '{path}' is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} '{path}' holds no JSON object")
    return data


def eval_summaries(report: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """Eval name -> the PSNR-vs-original summary {"mean", "ci_low", "ci_high", "n"}, in report order."""
    if report.get("kind") != "images" or not isinstance(report.get("decoders"), dict):
        raise UsageError(f"--eval '{path}' is not a `fastdec eval images` report.json (kind "
                         f"{report.get('kind')!r}, needs a 'decoders' table)")
    out = {}
    for name, entry in report["decoders"].items():
        summary = (entry.get("metrics") or {}).get(REFERENCE, {}).get(METRIC)
        # mean is null in the JSON when every image was an exact match (inf): nothing to place on an axis
        if not summary or summary.get("mean") is None:
            raise UsageError(f"--eval '{path}': decoder '{name}' has no finite {METRIC} vs {REFERENCE}")
        out[name] = summary
    return out


def row_setting(row: dict[str, Any]) -> str:
    # the requested dtype, not the run dtype: an fp16 request may run a force_upcast VAE in fp32
    return f"{row.get('requested_dtype') or row.get('dtype')}/{row.get('backend', 'eager')}"


def bench_rows(payload: dict[str, Any], path: str, size: int, setting: str) -> dict[str, dict[str, Any]]:
    """Bench name -> its row at ``size`` px in ``setting``; errors list the sizes or settings there are."""
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise UsageError(f"--bench '{path}' is not a `fastdec bench --json` result (no 'rows' list)")
    at_size = [r for r in rows if r.get("size") == size]
    if not at_size:
        sizes = sorted({r.get("size") for r in rows if r.get("size") is not None})
        raise UsageError(f"--bench '{path}' has no row at {size} px (sizes: {', '.join(map(str, sizes)) or 'none'}): "
                         f"rerun `fastdec bench --sizes {size}` or pass --size")
    chosen = [r for r in at_size if row_setting(r) == setting]
    if not chosen:
        settings = sorted({row_setting(r) for r in at_size})
        raise UsageError(f"--setting {setting}: no {size} px row in '{path}' with it; settings there: "
                         f"{', '.join(settings)}")
    by_name: dict[str, dict[str, Any]] = {}
    for row in chosen:
        if row["name"] in by_name:  # one run has one row per name, size and setting; two files merged would not
            raise UsageError(f"--bench '{path}': two {size} px {setting} rows named '{row['name']}'")
        by_name[row["name"]] = row
    return by_name


# ----------------------------------------------------------------------------- matching
def check_keys(options: dict[str, str], flag: str, names: Sequence[str]) -> None:
    """A --name/--label for a decoder the eval report lacks is a typo: say so instead of ignoring it."""
    unknown = [k for k in options if k not in names]
    if unknown:
        raise UsageError(f"{flag}: no decoder {', '.join(map(repr, unknown))} in the eval report "
                         f"(it has: {', '.join(names)})")


def match_points(summaries: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]], names: dict[str, str],
                 labels: dict[str, str], where: str) -> list[Point]:
    """One :class:`Point` per eval decoder; every one must find its bench row (``names`` maps where they differ)."""
    check_keys(names, "--name", list(summaries))
    check_keys(labels, "--label", list(summaries))
    missing = [f"'{e}'" + (f" (as '{names[e]}')" if e in names else "") for e in summaries
               if names.get(e, e) not in rows]
    if missing:
        raise UsageError(f"no bench row {where} for eval decoder(s) {', '.join(missing)}. The eval report has: "
                         f"{', '.join(summaries)}; the bench JSON has {where}: {', '.join(rows)}. "
                         "Map names with --name EVAL=BENCH (or leave decoders out with --decoders)")
    points = []
    for name, s in summaries.items():
        row = rows[names.get(name, name)]
        if not row.get("gflops"):
            raise UsageError(f"bench row '{row['name']}' has no FLOP count, so it cannot go on the GFLOPs axis")
        images = max(1, row.get("images") or 1)  # gflops is per call; a call may decode a batch
        points.append(Point(name, labels.get(name, name), row["name"], row["gflops"] / images,
                            row["per_image_s"] * 1e3, s["mean"], s.get("ci_low"), s.get("ci_high"), s.get("n", 0)))
    return points


def select(summaries: dict[str, dict[str, Any]], wanted: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    if not wanted:
        return summaries
    check_keys({w: "" for w in wanted}, "--decoders", list(summaries))
    return {w: summaries[w] for w in dict.fromkeys(wanted)}


# ----------------------------------------------------------------------------- outputs
def pareto_front(points: Sequence[Point], cost: str) -> list[Point]:
    """The non-dominated points, cheapest first: each is better than every cheaper one."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (getattr(p, cost), -p.psnr)):
        if not front or p.psnr > front[-1].psnr:
            front.append(p)
    return front


def fmt_ci(p: Point) -> str:
    if p.ci_low is None or p.ci_high is None or not (math.isfinite(p.ci_low) and math.isfinite(p.ci_high)):
        return f"{p.psnr:.2f} [—]"
    return f"{p.psnr:.2f} [{p.ci_low:.2f}, {p.ci_high:.2f}]"


def markdown_table(points: Sequence[Point], size: int, setting: str) -> str:
    lines = [f"| decoder | GFLOPs@{size} | ms@{size} ({setting}) | PSNR [95% CI] |", "|---|---:|---:|---:|"]
    lines += [f"| {p.label} | {p.gflops:.1f} | {p.ms:.1f} | {fmt_ci(p)} |" for p in points]
    return "\n".join(lines) + "\n"


def error_bars(points: Sequence[Point]) -> list[list[float]]:
    """Asymmetric y errors for errorbar(); 0 where the report has no interval (n = 1)."""
    has = [p.ci_low is not None and p.ci_high is not None for p in points]
    return [[p.psnr - p.ci_low if h else 0.0 for p, h in zip(points, has)],
            [p.ci_high - p.psnr if h else 0.0 for p, h in zip(points, has)]]


def set_xscale(ax: Any, xscale: str) -> None:
    """Log axes with plain numbers (2, 5, 10, 20, ...): matplotlib's default writes 9.6x10^2 within a decade."""
    ax.set_xscale(xscale)
    if xscale == "log":
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def draw_panel(ax: Any, points: Sequence[Point], cost: str, xlabel: str, xscale: str) -> None:
    """One panel: a point with CI bars per decoder (colour i = decoder i in both panels), its label, the front."""
    for i, p in enumerate(points):
        yerr = [[v] for v in (col[i] for col in error_bars(points))]
        ax.errorbar([getattr(p, cost)], [p.psnr], yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=4,
                    markersize=7, label=p.label, zorder=3)
        ax.annotate(p.label, (getattr(p, cost), p.psnr), xytext=(6, 6), textcoords="offset points", fontsize=8)
    front = pareto_front(points, cost)
    if len(front) > 1:
        ax.step([getattr(p, cost) for p in front], [p.psnr for p in front], where="post", color="grey",
                ls="--", lw=1, zorder=1, label="Pareto front")
    set_xscale(ax, xscale)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)


def write_plot(points: Sequence[Point], path: Path, size: int, setting: str, device: str, caption: str,
               data_label: str, xscale: str) -> Path:
    """The two-panel PNG, written atomically (a reader never sees half a file)."""
    # the Figure API with an Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    draw_panel(left, points, "gflops", f"GFLOPs per {size} px image", xscale)
    where = "CPU" if device.startswith("cpu") else device
    draw_panel(right, points, "ms", f"measured {where} ms per {size} px image (median, {setting})", xscale)
    left.set_ylabel(f"PSNR vs original on {data_label} (dB, mean ± 95% CI)")
    left.set_title("quality per FLOP")
    right.set_title("quality per millisecond")
    handles, labels = left.get_legend_handles_labels()
    left.legend(handles, labels, fontsize=8, loc="best")
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03 if caption else 0, 1, 1))
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


def bench_caption(payload: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> str:
    """Where the timings come from (CPU model, threads) and how many images the PSNR is over."""
    s = payload.get("system") or {}
    n = sorted({int(v.get("n", 0)) for v in summaries.values()})
    parts = [s.get("gpu") or s.get("cpu"), f"{s['torch_threads']} torch threads" if s.get("torch_threads") else None,
             f"torch {s['torch']}" if s.get("torch") else None,
             f"PSNR over {'/'.join(map(str, n))} images" if n else None]
    return " | ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- command
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True, metavar="REPORT_JSON", help="a `fastdec eval images` report.json")
    p.add_argument("--bench", required=True, metavar="BENCH_JSON", help="a `fastdec bench --json` result")
    p.add_argument("--out", required=True, metavar="PNG", help="the two-panel figure")
    p.add_argument("--table", default=None, metavar="PATH", help="also write the markdown table here")
    p.add_argument("--setting", default=DEFAULT_SETTING, metavar="DTYPE/BACKEND",
                   help=f"bench rows to time, e.g. bf16/channels_last (default {DEFAULT_SETTING})")
    p.add_argument("--size", type=int, default=512, help="bench image size in px (default 512)")
    p.add_argument("--name", action="append", metavar="EVAL=BENCH",
                   help="eval decoder EVAL is the bench row BENCH (repeatable), e.g. teacher=taef2")
    p.add_argument("--label", action="append", metavar="EVAL=TEXT",
                   help="legend/table text for eval decoder EVAL (repeatable), e.g. teacher=TAEF2")
    p.add_argument("--decoders", nargs="+", default=None, metavar="EVAL",
                   help="plot only these eval decoders (default: all in the report)")
    p.add_argument("--data-label", default="BSDS val", help="what the PSNR was measured on (default 'BSDS val')")
    p.add_argument("--xscale", choices=["log", "linear"], default="log", help="x axes (default log)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Everything but the error handling; returns the markdown table."""
    out = check_output_file(args.out, "--out")  # fail before reading anything when it cannot be written
    if args.table:
        check_output_file(args.table, "--table")
    names, labels = parse_pairs(args.name, "--name"), parse_pairs(args.label, "--label")
    summaries = select(eval_summaries(load_json(args.eval, "--eval"), args.eval), args.decoders)
    payload = load_json(args.bench, "--bench")
    rows = bench_rows(payload, args.bench, args.size, args.setting)
    points = match_points(summaries, rows, names, labels, f"at {args.size} px {args.setting}")
    device = next(iter(rows.values())).get("device") or "cpu"
    write_plot(points, out, args.size, args.setting, device, bench_caption(payload, summaries), args.data_label,
               args.xscale)
    table = markdown_table(points, args.size, args.setting)
    if args.table:
        write_text(args.table, table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table = run(args)
    except FastdecError as e:  # a problem with the inputs: one line naming it, no traceback
        print(f"pareto.py: error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {args.out}" + (f" and {args.table}" if args.table else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

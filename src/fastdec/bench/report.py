"""How bench results are shown and written: rich tables for the image, video and pipeline benches, the
speed-up plot (PNG), and JSON through :func:`fastdec.io.files.write_json` (non-finite numbers as null).

Everything here reads result rows (plain dicts) and knows nothing about how they were measured.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BenchError
from ..io.files import atomic_write, write_json

__all__ = ["TABLE_COLUMNS", "console_out", "plot_speedup", "print_pipeline_report", "print_report",
           "print_video_report", "render_table", "write_json"]


# ----------------------------------------------------------------------------- formatting
def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}" if v < 10 else f"{v * 1e3:,.0f}"


def _fmt_range(row: dict) -> str:
    if row.get("p10_s") is None:
        return "-"
    return f"{_fmt_ms(row['p10_s'])}–{_fmt_ms(row['p90_s'])}"


def _fmt_num(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "-"
    x = v / scale
    return f"{x:,.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"


def _fmt_speedup(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}x"


# key, header, formatter (row -> str), justify
TABLE_COLUMNS: list[tuple[str, str, Callable[[dict], str], str]] = [
    ("name", "decoder", lambda r: str(r["name"]), "left"),
    ("kind", "kind", lambda r: str(r["kind"]), "left"),
    ("backend", "backend", lambda r: str(r["backend"]), "left"),
    ("size", "px", lambda r: str(r["size"]), "right"),
    ("batch", "batch", lambda r: str(r["batch"]), "right"),
    ("frames", "frames", lambda r: str(r["frames"]), "right"),
    ("dtype", "dtype", lambda r: str(r["dtype"]), "left"),
    ("median_s", "median ms", lambda r: _fmt_ms(r["median_s"]), "right"),
    ("p10_s", "p10–p90 ms", _fmt_range, "right"),
    ("per_image_s", "ms/image", lambda r: _fmt_ms(r["per_image_s"]), "right"),
    ("speedup", "speed-up", lambda r: _fmt_speedup(r["speedup"]), "right"),
    ("speedup_same_dtype", "same-dtype speed-up", lambda r: _fmt_speedup(r.get("speedup_same_dtype")), "right"),
    ("peak_mem_mb", "peak MB", lambda r: _fmt_num(r["peak_mem_mb"], digits=1), "right"),
    ("params", "params M", lambda r: _fmt_num(r["params"], 1e6), "right"),
    ("gflops", "GFLOPs", lambda r: _fmt_num(r["gflops"], digits=1), "right"),
]


def _cell(row: dict, key: str, known: dict) -> str:
    if key not in row:
        return ""
    if key in known:
        return known[key][1](row)
    return "-" if row[key] is None else str(row[key])


def render_table(rows: Sequence[dict], title: str, columns: Sequence[str] | None = None, caption: str | None = None):
    """A ``rich.table.Table`` of result rows (dicts). Shows the standard columns present in any row, or
    exactly ``columns`` (keys; unknown keys are shown with ``str``). Print it with a rich Console."""
    from rich.table import Table

    known = {key: (header, fmt, justify) for key, header, fmt, justify in TABLE_COLUMNS}
    if columns is None:
        columns = [key for key, *_ in TABLE_COLUMNS if any(key in r for r in rows)]
    table = Table(title=title, caption=caption, caption_justify="left")
    for key in columns:
        header, _, justify = known.get(key, (key, None, "right"))
        table.add_column(header, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row, key, known) for key in columns))
    return table


def console_out(width: int | None = None):
    """The console results are printed on: stdout; files and pipes get a width where tables never wrap."""
    from rich.console import Console

    if width is not None:
        return Console(width=width)
    console = Console()
    return console if console.is_terminal else Console(width=200)


# ----------------------------------------------------------------------------- the speed-up plot
def _row_dtype(row: dict) -> str | None:
    return row.get("requested_dtype") or row.get("dtype")


def _plot_points(rows: Sequence[dict], x: str) -> list[tuple[float, float, dict]]:
    """(x, speed-up, row) of every row that has both; refuses an empty plot."""
    def x_value(r: dict) -> float | None:
        if x == "params":
            return r["params"] / 1e6 if r.get("params") else None
        return r["gflops"] / max(1, r.get("images") or 1) if r.get("gflops") else None

    points = [(x_value(r), r["speedup"], r) for r in rows if r.get("speedup")]
    points = [p for p in points if p[0] and p[0] > 0 and p[1] > 0]
    if not points:
        raise BenchError("nothing to plot: no row has both a speed-up and a "
                         f"{'parameter' if x == 'params' else 'FLOP'} count (are there baselines in the run?)")
    return points


def _scatter(ax: Any, points: list[tuple[float, float, dict]]) -> tuple[list, list]:
    """One series per (size, dtype): marker = image size, colour = dtype."""
    sizes = sorted({r.get("size") for *_, r in points}, key=lambda s: (s is None, s))
    dtypes = list(dict.fromkeys(_row_dtype(r) for *_, r in points))
    markers, colours = "osD^v<>p*h", ["tab:blue", "tab:orange", "tab:green"]
    for i, size in enumerate(sizes):
        for j, dtype in enumerate(dtypes):
            pts = [(xv, yv) for xv, yv, r in points if r.get("size") == size and _row_dtype(r) == dtype]
            parts = [f"{size} px" if size is not None else None, dtype if len(dtypes) > 1 else None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], s=40,
                       color=colours[j % len(colours)], label=", ".join(t for t in parts if t) or None, zorder=3)
    return sizes, dtypes


def _label_fastest(ax: Any, points: list[tuple[float, float, dict]]) -> None:
    # Many backend rows per decoder would bury the labels: name the fastest row of each (decoder, size, dtype)
    # and leave the others as unlabelled points of the same colour.
    fastest: dict[tuple, tuple[float, float, dict]] = {}
    for xv, yv, r in points:
        key = (r["name"], r.get("size"), _row_dtype(r))
        if key not in fastest or yv > fastest[key][1]:
            fastest[key] = (xv, yv, r)
    for xv, yv, r in fastest.values():
        backend = r.get("backend", "eager")
        label = r["name"] if backend == "eager" else f"{r['name']} ({backend})"
        ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)


def _log_axes(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20 and 0.5, not 2x10^1 and 5x10^-1
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels even within one decade
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.grid(True, which="both", alpha=0.3)


def plot_speedup(rows: Sequence[dict], path: str | os.PathLike, x: str = "gflops", title: str | None = None) -> Path:
    """Scatter of speed-up (y) against GFLOPs per image or parameters (x), log-log, one point per row.

    Marker = image size, colour = dtype; the fastest row of each decoder (per size and dtype) is labelled.
    Rows need ``speedup`` and ``gflops`` (per call; divided by ``images``) or ``params``; others are left out.
    Written with matplotlib's Agg canvas (no display needed), atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in ("gflops", "params"):
        raise BenchError(f"plot x axis must be 'gflops' or 'params', got '{x}'")
    points = _plot_points(rows, x)
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sizes, dtypes = _scatter(ax, points)
    _label_fastest(ax, points)
    _log_axes(ax)
    ax.set_xlabel("GFLOPs per image" if x == "gflops" else "parameters (M)")
    reference = next((r.get("reference") for *_, r in points if r.get("reference")), "baseline")
    ax.set_ylabel(f"speed-up vs {reference} (same run)")
    ax.set_title(title or "fastdec bench")
    if len(sizes) > 1 or sizes[0] is not None or len(dtypes) > 1:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


# ----------------------------------------------------------------------------- the image bench
def _image_columns(rows: Sequence[dict]) -> tuple[list[str], bool]:
    """The table's columns (frames only when a row has them; the like-for-like speed-up only when it
    differs from the stock one somewhere) and whether the like-for-like column is shown."""
    columns = [key for key, *_ in TABLE_COLUMNS]
    if all(r.get("frames", 1) == 1 for r in rows):
        columns.remove("frames")
    like_for_like = any(r.get("speedup_same_dtype") is not None and r["speedup_same_dtype"] != r["speedup"]
                        for r in rows)
    if not like_for_like:
        columns.remove("speedup_same_dtype")
    return columns, like_for_like


def _print_definitions(payload: dict[str, Any], like_for_like: bool, console: Any) -> None:
    s, cfg = payload["system"], payload["settings"]
    if payload.get("reference"):
        reference = f"{payload['reference']} (eager, {payload.get('reference_dtype') or cfg['dtypes'][0]})"
        same = (f"; same-dtype speed-up = the fastest {payload['reference']} row in the row's dtype / row time"
                if like_for_like else "")
        console.print(f"speed-up = {reference} time per image / row time per image (same size, same run, "
                      f"same latents){same}. peak MB = working memory of one decode beyond the weights "
                      + ("(CUDA max allocated)" if s["device"].startswith("cuda") else "(peak RSS, isolated process)")
                      + ". GFLOPs per call from torch.utils.flop_counter.")
    loads = [x for x in (s.get("load_avg_1m_start"), s.get("load_avg_1m")) if x is not None]
    if s["device"].startswith("cpu") and loads and max(loads) > (s["cpu_count"] or 1):
        console.print(f"warning: the machine was busy (1-min load average up to {max(loads):.1f} on {s['cpu_count']} "
                      "CPUs): other processes slowed these rows, unequally; rerun on a quiet machine before quoting "
                      "numbers", style="yellow", markup=False)


def _print_notes(payload: dict[str, Any], console: Any) -> None:
    for r in payload["rows"]:
        if r.get("note"):
            console.print(f"note: {r['name']} ({r['backend']}, {r['dtype']}) {r['size']}px: {r['note']}", markup=False)
    for skip in payload["skipped"]:
        console.print(f"skipped: {skip['name']} ({skip['backend']}): {skip['reason']}", markup=False)
    for fail in payload.get("failed", []):
        console.print(f"FAILED: {fail['name']} ({fail['backend']}): {fail['reason']}", markup=False, style="red")


def print_report(payload: dict[str, Any], console: Any = None) -> None:
    """The image bench's final table, what its numbers mean, the system line, and skipped/failed rows."""
    console = console or console_out()
    s, cfg = payload["system"], payload["settings"]
    sizes = ", ".join(str(x) for x in cfg["sizes"])
    threads = f", {s['torch_threads']} torch threads" if s["device"].startswith("cpu") else ""
    title = f"fastdec bench: {sizes} px, batch {cfg['batch']}, {'/'.join(cfg['dtypes'])}, {s['device']}{threads}"
    caption = (f"{s.get('gpu') or s['cpu']} ({s['cpu_count']} logical CPUs) | torch {s['torch']} | "
               f"diffusers {s['diffusers']} | fastdec {s['fastdec']} | dtype {s['dtype']} | "
               f"channels_last {cfg['channels_last']} | median of {cfg['repeats']} after {cfg['warmup']} warm-up")
    columns, like_for_like = _image_columns(payload["rows"])
    console.print(render_table(payload["rows"], title, columns=columns, caption=caption))
    _print_definitions(payload, like_for_like, console)
    _print_notes(payload, console)


# ----------------------------------------------------------------------------- the video bench
def _video_display_row(r: dict[str, Any], several_dtypes: bool) -> dict[str, str]:
    mem, same = r["peak_mem_mb"], r.get("speedup_same_dtype")
    vs = "" if r["speedup_vs_frames"] in (None, r["frames"]) else f" (vs {r['speedup_vs_frames']})"
    return {
        "decoder": r["name"], "mode": r["mode"] + (f", {r['push_frames']}/push" if r.get("push_frames") else ""),
        "dtype": r.get("dtype", "fp32"),
        "backend": r.get("backend", "eager"), "layout": "channels_last" if r.get("channels_last") else "NCHW",
        "px": str(r["size"]), "frames": str(r["frames"]), "runs": str(r["runs"]), "clip s": f"{r['median_s']:.2f}",
        "ms/frame": f"{r['per_frame_s'] * 1e3:,.1f}",
        "speed-up": "-" if r["speedup"] is None else f"{r['speedup']:.1f}x{vs}",
        **({"same-dtype speed-up": _fmt_speedup(same)} if several_dtypes else {}),
        "peak MB": "-" if mem is None else f"{mem:,.0f}",
        "MB/frame": "-" if mem is None else f"{mem / r['frames']:,.1f}",
        "params M": f"{r['params'] / 1e6:.1f}",
    }


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times (median)"


def print_video_report(payload: dict[str, Any], console: Any = None) -> None:
    """The video bench's table (one row per decoder, mode, dtype, size and clip length) and its notes."""
    console = console or console_out()
    s, settings = payload["system"], payload["settings"]
    dtypes = settings.get("dtypes", ["fp32"])
    display = [_video_display_row(r, len(dtypes) > 1) for r in payload["rows"]]
    backends = "/".join(settings.get("backends", ["eager"]))
    title = (f"fastdec bench --video: {', '.join(map(str, settings['sizes']))} px, {'/'.join(dtypes)}, {backends}, "
             f"cpu, {s['torch_threads']} torch threads")
    caption = f"{s['cpu']} ({s['cpu_count']} logical CPUs) | torch {s['torch']} | diffusers {s['diffusers']}"
    console.print(render_table(display, title, columns=list(display[0]) if display else [], caption=caption))
    same = "; same-dtype speed-up: against SVD in the row's dtype" if len(dtypes) > 1 else ""
    console.print(
        f"speed-up = SVD decoder ({dtypes[0]}, faster layout) time per frame / row time per frame (same size, same "
        f"frame count, same latents){same}. "
        f"SVD decodes in chunks of {settings['svd_chunk']} frames (decode_chunk_size) and is timed "
        f"{_times(settings.get('svd_repeats', 1))} (no warm-up). peak MB = working memory of one whole-clip decode "
        "beyond the weights (peak RSS, isolated process). streaming = latent frames pushed k at a time (k/push), "
        "frames dropped after decoding."
    )
    for r in payload["rows"]:
        if r.get("memory_error"):
            console.print(f"memory probe failed for {r['name']} {r['mode']} {r['frames']} frames: {r['memory_error']}")
    console.print(f"total wall time {payload['wall_s']:.0f} s")


# ----------------------------------------------------------------------------- the pipeline bench
_PIPELINE_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("decoder", lambda r: r["name"]), ("px", lambda r: str(r["size"])),
    ("pipeline s", lambda r: f"{r['total_s']:.2f}"), ("decode s", lambda r: f"{r['decode_s']:.2f}"),
    ("decoder share", lambda r: f"{100 * r['decoder_share']:.1f}%"),
    ("pipeline speed-up", lambda r: f"{r['speedup']:.2f}x"),
    ("speed-up, rest fixed", lambda r: f"{r['speedup_decode_only']:.2f}x"),
    ("decode speed-up", lambda r: f"{r['decode_speedup']:.1f}x"),
]
# CPU seconds of this process: a second view when other jobs share the cores
_PIPELINE_CPU_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("CPU s", lambda r: f"{r['total_cpu_s']:.2f}"),
    ("decoder share (CPU)", lambda r: f"{100 * r['decoder_share_cpu']:.1f}%"),
    ("speed-up (CPU)", lambda r: f"{r['speedup_cpu']:.2f}x"),
]


def print_pipeline_report(payload: dict[str, Any], console: Any = None) -> None:
    """The pipeline bench's table (whole-run and decode times per decoder) and what its columns mean."""
    from rich.table import Table

    console = console or console_out(width=140)
    on_cpu = payload["system"]["device"].startswith("cpu")
    table = Table(title=f"whole-pipeline time, SDXL ({payload['pipeline_config']}), {payload['steps']} steps, "
                        f"median of {payload['repeats']}")
    columns = _PIPELINE_COLUMNS + (_PIPELINE_CPU_COLUMNS if on_cpu else [])
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "decoder" else "right")
    for r in payload["rows"]:
        table.add_row(*(fmt(r) for _, fmt in columns))
    console.print(table)
    if any(r["nonfinite_latents"] for r in payload["rows"]):
        console.print("note: the random-weight denoiser produced NaN/inf latents (fp16 overflow); they were replaced "
                      "by finite values before every decode, the same for every row: timings stand, images are noise")
    console.print("'speed-up, rest fixed' = original pipeline time / (original time without its decode + this "
                  "decode): the decoder's effect alone; 'pipeline speed-up' also carries run-to-run noise of the rest"
                  + ("; CPU columns: this process's CPU time (all threads)" if on_cpu else ""))
    if payload["illustrative"]:
        console.print("note: the UNet is a tiny stand-in, so the decoder's share (and the speed-up) is illustrative; "
                      "run on a GPU (--device cuda, real SDXL configs) for representative numbers")

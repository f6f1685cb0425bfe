"""``fastdec eval images|video``: decode a folder with one or more decoders, measure fidelity
against the originals and the teacher's own decode, and write a report people can look at.

Outputs under ``--out``: ``report.json`` (settings, per-decoder means with 95% confidence
intervals, notes on omitted metrics), ``report.md`` (a table per decoder), a per-image (or
per-frame) CSV, and PNGs (a comparison grid, or a frame strip and a per-frame PSNR plot).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .checkpoints import atomic_write, load_decoder
from .latent_spaces import get_latent_space

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
LATENT_SUFFIXES = (".safetensors", ".pt", ".npy")
TEACHER_NAME = "teacher"


class EvalError(ValueError):
    """Bad evaluation input; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- teacher and decoders
def load_eval_teacher(source: str, decoder: str | None = None, latent_space: str | None = None, device: str = "cpu"):
    """The teacher (``fastdec.teachers.load_teacher``): ``.encode`` RGB -> decoder-space latents, ``.decode``."""
    from .teachers import load_teacher

    return load_teacher(source, decoder=decoder, latent_space=latent_space, device=device)


@dataclass
class _Decoder:
    name: str
    source: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    is_video: bool = False
    is_teacher: bool = False  # the teacher's own decoder: "vs teacher decode" would compare it with itself


def _decoder_names(sources: Sequence[str]) -> list[str]:
    names = []
    for source in sources:
        base = TEACHER_NAME if source == TEACHER_NAME else Path(source).name.split(".")[0] or source
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _load_decoders(sources: Sequence[str], teacher, latent_space, factor: int | None, device: str) -> list[_Decoder]:
    if not sources:
        raise EvalError("no decoder to evaluate: pass --decoder PATH (repeatable) or --decoder teacher")
    decoders = []
    for name, source in zip(_decoder_names(sources), sources):
        if source == TEACHER_NAME:
            if teacher is None or not teacher.has_decoder:
                raise EvalError(
                    "--decoder teacher needs a teacher with a decoder: pass --teacher (and --teacher-decoder "
                    "for a TAESD-family encoder .pth)"
                )
            decoders.append(_Decoder(name, f"{TEACHER_NAME} decoder", teacher.decode, is_teacher=True))
            continue
        decoder = load_decoder(source, latent_space=latent_space, device=device).eval()
        if factor is not None and decoder.upsample_factor != factor:
            raise EvalError(
                f"decoder '{source}' upsamples x{decoder.upsample_factor} but the teacher's latents are /{factor}: "
                "evaluate it with a teacher of its own latent space"
            )
        if latent_space is not None and decoder.latent_channels != latent_space.channels:
            raise EvalError(f"decoder '{source}': {latent_space.channel_mismatch_message(decoder.latent_channels)}")
        decoders.append(_Decoder(name, str(source), decoder, bool(decoder.is_video)))
    return decoders


# ----------------------------------------------------------------------------- inputs
def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--data '{folder}' is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise EvalError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{folder}'")
    return files[:limit] if limit else files


def load_image(path: Path) -> torch.Tensor:
    """RGB in [0, 1], (1, 3, H, W), EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise EvalError(f"cannot crop {height}x{width} from a {h}x{w} image: use a smaller --resolution")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def crop_to_factor(x: torch.Tensor, factor: int, resolution: int | None = None) -> torch.Tensor:
    """Centre crop to ``resolution`` x ``resolution`` or, without it, to the largest multiples of ``factor``."""
    if resolution:
        if resolution % factor:
            raise EvalError(f"--resolution {resolution} is not a multiple of the latent factor {factor}")
        return center_crop(x, resolution, resolution)
    h, w = x.shape[-2:]
    if h < factor or w < factor:
        raise EvalError(f"image of {h}x{w} px is smaller than one latent pixel ({factor} px)")
    return center_crop(x, h - h % factor, w - w % factor)


def read_latent(path: Path) -> torch.Tensor:
    """A latent (1, C, h, w) from .safetensors (its one tensor, or key 'latents'), .pt or .npy."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
            z = state["latents"] if "latents" in state else (next(iter(state.values())) if len(state) == 1 else None)
            if z is None:
                raise EvalError(f"'{path}' holds {sorted(state)}: store one tensor, or name it 'latents'")
        elif path.suffix == ".pt":
            z = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(z, dict):
                z = z.get("latents")
        else:
            z = torch.from_numpy(np.load(path))
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"cannot read latents '{path}': {type(e).__name__}: {e}") from e
    if not isinstance(z, torch.Tensor):
        raise EvalError(f"'{path}' does not hold a latent tensor (or a dict with key 'latents')")
    if z.ndim == 3:
        z = z[None]
    if z.ndim != 4 or z.shape[0] != 1:
        raise EvalError(f"latents in '{path}' are shaped {tuple(z.shape)}; expected (C, h, w) or (1, C, h, w)")
    return z.float()


def find_latent(folder: Path, image: Path) -> Path:
    for suffix in LATENT_SUFFIXES:
        candidate = folder / (image.stem + suffix)
        if candidate.is_file():
            return candidate
    raise EvalError(
        f"no latents for '{image.name}' in '{folder}': expected {image.stem}{{{','.join(LATENT_SUFFIXES)}}}"
    )


def list_videos(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Video files and frame folders directly under ``folder`` (or ``folder`` itself if it holds frames)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--data '{folder}' is not a folder of videos or frame folders")

    def has_frames(d: Path) -> bool:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())

    items = sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and ((p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (p.is_dir() and has_frames(p)))
    )
    if not items and has_frames(folder):
        items = [folder]
    if not items:
        raise EvalError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) or frame folders in '{folder}'")
    return items[:limit] if limit else items


def read_frames(path: Path, num_frames: int | None) -> torch.Tensor:
    """The first ``num_frames`` frames, uint8 (T, 3, H, W) (``fastdec.video.read_video``: files or frame folders)."""
    from .video import read_video

    return read_video(path, start=0, num_frames=num_frames)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return x
    return F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------- metric bookkeeping
METRICS = ("psnr", "ssim", "ms_ssim", "lpips")
REFERENCES = ("original", "teacher")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ms_ssim": True, "lpips": False, "flicker": False, "fid": False, "fvd": False}


@dataclass
class _Notes:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)
            print(f"note: {text}", file=sys.stderr)


def _pair_metrics(pred: torch.Tensor, ref: torch.Tensor, lpips: M.LPIPS | None, notes: _Notes) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "psnr": float(M.psnr(pred, ref)[0]),
        "ssim": float(M.ssim(pred, ref)[0]),
        "ms_ssim": None,
        "lpips": float(lpips(pred, ref)[0]) if lpips is not None else None,
    }
    try:
        out["ms_ssim"] = float(M.ms_ssim(pred, ref)[0])
    except M.MetricUnavailable as e:
        notes.add(f"MS-SSIM omitted for some images: {e}")
    return out


def summarize(values: Iterable[float | None], confidence: float = 0.95) -> dict[str, Any] | None:
    """Mean and t-interval of the finite values; exact matches (PSNR = inf) are counted, not averaged."""
    xs = [v for v in values if v is not None]
    finite = [v for v in xs if math.isfinite(v)]
    if not finite:
        return {"mean": float("inf"), "n": len(xs), "n_infinite": len(xs)} if xs else None
    result = M.mean_ci(finite, confidence).to_dict()
    if len(finite) < len(xs):
        result["n_infinite"] = len(xs) - len(finite)
    return result


def _fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
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


# ----------------------------------------------------------------------------- writing
def _atomic(path: Path, write: Callable[[str], Any]) -> Path:
    return atomic_write(path, write, suffix=path.suffix)


def _write_text(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return _atomic(path, write)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return _write_text(path, buffer.getvalue())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep the information as a string
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _error_map(pred: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (pred.float() - ref.float()).abs().mean(dim=0).cpu().numpy()


ERROR_VMAX = 0.2  # error maps saturate at 20% of the pixel range so small errors stay visible


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


def _markdown_table(summary: dict[str, dict[str, Any]], metric_names: Sequence[str]) -> list[str]:
    lines = ["| metric | vs original | vs teacher decode |", "|---|---|---|"]
    for metric in metric_names:
        cells = [_fmt(summary.get(ref, {}).get(metric), _digits(metric)) for ref in REFERENCES]
        if all(c == "—" for c in cells):
            continue
        arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
        lines.append(f"| {metric.upper().replace('_', '-')} {arrow} | {cells[0]} | {cells[1]} |")
    return lines


def _report_markdown(report: dict[str, Any], metric_names: Sequence[str], images: Sequence[str]) -> str:
    s = report["settings"]
    lines = [f"# fastdec eval {report['kind']}", ""]
    lines += [f"- data: `{s['data']}` ({report['count']} {report['unit']})",
              f"- teacher: `{s.get('teacher')}`" + (f" (latents from `{s['latents']}`)" if s.get("latents") else ""),
              f"- crop: {s['crop']}",
              "- values: mean ± half-width of the 95% confidence interval (Student t over "
              f"{'images' if report['kind'] == 'images' else 'clips'})", ""]
    for name, entry in report["decoders"].items():
        lines += [f"## {name}", "", f"`{entry['source']}`", ""]
        lines += _markdown_table(entry["metrics"], metric_names)
        for key in ("fid", "fvd"):
            if key in entry:
                lines.append(f"\n{key.upper()} vs originals: {entry[key]['value']:.3f} (n = {entry[key]['n']})")
        if entry.get("clips"):
            lines += ["", "| clip | frames | PSNR vs original | SSIM | flicker |", "|---|---|---|---|---|"]
            lines += [f"| {c['video']} | {c['frames']} | {c['psnr']:.2f} | {c['ssim']:.4f} | "
                      + (f"{c['flicker']:.5f} |" if c["flicker"] is not None else "— |") for c in entry["clips"]]
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if images:
        lines += ["## Figures", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    return "\n".join(lines)


def _print_summary(report: dict[str, Any], metric_names: Sequence[str]) -> None:
    for name, entry in report["decoders"].items():
        print(f"\n{name}")
        print("\n".join(_markdown_table(entry["metrics"], metric_names)))
        for key in ("fid", "fvd"):
            if key in entry:
                print(f"{key.upper()}: {entry[key]['value']:.3f} (n = {entry[key]['n']})")


def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img" if desc.startswith("image") else "clip", file=sys.stderr)


# ----------------------------------------------------------------------------- images
@torch.no_grad()
def evaluate_images(
    data: str | Path,
    decoders: Sequence[str],
    out: str | Path | None = None,
    teacher: str | None = None,
    teacher_decoder: str | None = None,
    latents: str | Path | None = None,
    latent_space: str | None = None,
    resolution: int | None = None,
    limit: int | None = None,
    lpips_weights: str | None = None,
    lpips_net: str = "alex",
    fid_weights: str | None = None,
    grid: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate image decoders on a folder of originals; returns the report dict (and writes it to ``out``)."""
    notes = _Notes()
    if teacher is None and latents is None:
        raise EvalError("nothing to decode: pass --teacher ENCODER (images are encoded) or --latents DIR")
    if latents is not None and resolution:
        raise EvalError("--resolution cannot be combined with --latents: the latents fix the crop (their size x factor)")
    files = list_images(data, limit)
    teach = load_eval_teacher(teacher, teacher_decoder, latent_space, device) if teacher else None
    space = teach.latent_space if teach else (get_latent_space(latent_space) if latent_space else None)
    factor = teach.spatial_factor if teach else None
    decs = _load_decoders(decoders, teach, space, factor, device)
    if factor is None:
        factor = next((d.fn.upsample_factor for d in decs if hasattr(d.fn, "upsample_factor")), None)
    has_teacher_ref = teach is not None and teach.has_decoder
    if not has_teacher_ref:
        notes.add("'vs teacher decode' omitted: the teacher has no decoder (pass --teacher-decoder)" if teach
                  else "'vs teacher decode' omitted: no --teacher given")

    lpips = None
    if lpips_weights:
        try:
            lpips = M.LPIPS(lpips_weights, net=lpips_net, device=device)
        except M.MetricUnavailable as e:
            notes.add(f"LPIPS omitted: {e}")
    else:
        notes.add("LPIPS omitted: pass --lpips-weights with a local torchvision AlexNet/VGG16 state dict "
                  "(e.g. alexnet-owt-7be5be79.pth) to compute it")
    fid_extractor = None
    fid_stats: dict[str, M.FrechetStats] = {}
    if fid_weights:
        fid_extractor = M.TorchScriptExtractor(fid_weights, kind="inception", device=device)
        fid_stats = {"__original__": M.FrechetStats(), **{d.name: M.FrechetStats() for d in decs}}

    rows: list[dict[str, Any]] = []
    samples: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]] = []
    sizes: set[tuple[int, int]] = set()
    for path in _progress(files, len(files), "images"):
        image = load_image(path)
        if latents is not None:
            z = read_latent(find_latent(Path(latents), path))
            size = (z.shape[-2] * factor, z.shape[-1] * factor)
            original = center_crop(image, *size).to(device)
        else:
            original = crop_to_factor(image, factor, resolution).to(device)
            z = teach.encode(original)
        sizes.add(tuple(original.shape[-2:]))
        reference = teach.decode(z).float() if has_teacher_ref else None
        decoded_all = {}
        for dec in decs:
            decoded = dec.fn(z).float()
            decoded_all[dec.name] = decoded
            refs = [("original", original)]
            if reference is not None and not dec.is_teacher:
                refs.append(("teacher", reference))
            for ref_name, ref in refs:
                rows.append({"image": path.name, "decoder": dec.name, "reference": ref_name,
                             "height": original.shape[-2], "width": original.shape[-1],
                             **_pair_metrics(decoded, ref, lpips, notes)})
            if fid_extractor is not None:
                fid_stats[dec.name].update(fid_extractor(decoded[:, None]))
        if fid_extractor is not None:
            fid_stats["__original__"].update(fid_extractor(original[:, None]))
        if len(samples) < grid:
            samples.append((path.stem, original[0].cpu(), {k: v[0].cpu() for k, v in decoded_all.items()}))

    report: dict[str, Any] = {
        "kind": "images", "count": len(files), "unit": "images",
        "settings": {"data": str(data), "teacher": teacher, "teacher_decoder": teacher_decoder,
                     "latents": str(latents) if latents else None, "resolution": resolution,
                     "latent_space": getattr(space, "name", space), "spatial_factor": factor,
                     "crop": (f"centre {resolution}x{resolution}" if resolution else
                              f"full frame, centre-cropped to multiples of {factor}"),
                     "sizes": sorted(f"{h}x{w}" for h, w in sizes), "confidence": "95% Student t over images"},
        "decoders": {}, "notes": notes.items,
    }
    for dec in decs:
        per_ref = {}
        for ref_name in REFERENCES:
            sel = [r for r in rows if r["decoder"] == dec.name and r["reference"] == ref_name]
            if sel:
                per_ref[ref_name] = {m: s for m in METRICS if (s := summarize(r[m] for r in sel)) is not None}
        entry: dict[str, Any] = {"source": dec.source, "metrics": per_ref}
        if fid_extractor is not None:
            if len(files) < 2:
                notes.add("FID omitted: it needs at least 2 images")
            else:
                entry["fid"] = {"value": fid_stats["__original__"].frechet_distance(fid_stats[dec.name]), "n": len(files)}
        report["decoders"][dec.name] = entry

    if out is not None:
        out = Path(out)
        figures = []
        if samples:
            figures.append(write_image_grid(out / "grid.png", samples).name)
        report["files"] = {"csv": "per_image.csv", "figures": figures}
        _write_csv(out / "per_image.csv", rows, ["image", "decoder", "reference", "height", "width", *METRICS])
        _write_text(out / "report.json", json.dumps(_json_safe(report), indent=2) + "\n")
        _write_text(out / "report.md", _report_markdown(report, METRICS, figures))
    return report


# ----------------------------------------------------------------------------- video
def _decode_frames(dec: _Decoder, z: torch.Tensor, batch: int) -> torch.Tensor:
    """Latents (T, C, h, w) -> frames (T, 3, H, W): whole clip for video decoders, else in chunks."""
    if dec.is_video:
        return dec.fn(z[None])[0].float()
    return torch.cat([dec.fn(z[i:i + batch]).float() for i in range(0, z.shape[0], batch)])


def write_frame_strip(path: Path, label: str, original: torch.Tensor, decoded: dict[str, torch.Tensor], count: int = 6) -> Path:
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


def write_psnr_plot(path: Path, per_frame: dict[str, dict[str, list[float]]]) -> Path:
    """PSNR vs frame index: thin line per clip, thick line = mean over clips, one colour per decoder."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (name, clips) in enumerate(per_frame.items()):
        colour = f"C{k}"
        for values in clips.values():
            ax.plot(values, color=colour, alpha=0.25, linewidth=0.8)
        length = max(len(v) for v in clips.values())
        mean = [np.mean([v[i] for v in clips.values() if i < len(v) and math.isfinite(v[i])] or [np.nan]) for i in range(length)]
        ax.plot(mean, color=colour, linewidth=2, label=f"{name} (mean over {len(clips)} clips)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs original (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


@torch.no_grad()
def evaluate_video(
    data: str | Path,
    decoders: Sequence[str],
    out: str | Path | None = None,
    teacher: str | None = None,
    teacher_decoder: str | None = None,
    latent_space: str | None = None,
    frames: int | None = 32,
    resolution: int | None = None,
    limit: int | None = None,
    fvd_extractor: str | None = None,
    clip_frames: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate decoders on videos: per-frame PSNR/SSIM, flicker, optional FVD; returns the report dict."""
    notes = _Notes()
    if teacher is None:
        raise EvalError("video evaluation encodes the frames: pass --teacher ENCODER")
    items = list_videos(data, limit)
    teach = load_eval_teacher(teacher, teacher_decoder, latent_space, device)
    factor = teach.spatial_factor
    decs = _load_decoders(decoders, teach, teach.latent_space, factor, device)
    has_teacher_ref = teach.has_decoder
    if not has_teacher_ref:
        notes.add("'vs teacher decode' omitted: the teacher has no decoder (pass --teacher-decoder)")
    extractor = M.load_feature_extractor(fvd_extractor, device=device) if fvd_extractor else None
    window = clip_frames or (extractor.num_frames if extractor is not None else None) or 16
    fvd_stats = {"__original__": M.FrechetStats(), **{d.name: M.FrechetStats() for d in decs}} if extractor else {}

    rows: list[dict[str, Any]] = []
    clip_rows: list[dict[str, Any]] = []
    per_frame_psnr: dict[str, dict[str, list[float]]] = {d.name: {} for d in decs}
    strip_written = None
    shapes = set()
    for item in _progress(items, len(items), "videos"):
        clip = read_frames(item, frames).float() / 255
        if frames and clip.shape[0] < frames:
            notes.add(f"'{item.name}' has {clip.shape[0]} frames (< --frames {frames}): all of them were used")
        if resolution:
            clip = resize_short_side(clip, resolution)
        original = crop_to_factor(clip, factor, resolution).to(device)
        shapes.add((original.shape[0], *original.shape[-2:]))
        z = torch.cat([teach.encode(original[i:i + batch_size]) for i in range(0, original.shape[0], batch_size)])
        reference = (torch.cat([teach.decode(z[i:i + batch_size]).float() for i in range(0, z.shape[0], batch_size)])
                     if has_teacher_ref else None)
        decoded_all = {}
        for dec in decs:
            decoded = _decode_frames(dec, z, batch_size)
            decoded_all[dec.name] = decoded
            refs = [("original", original)]
            if reference is not None and not dec.is_teacher:
                refs.append(("teacher", reference))
            for ref_name, ref in refs:
                psnrs = M.psnr(decoded, ref).tolist()
                ssims = M.ssim(decoded, ref).tolist()
                flicker = M.flicker_score(decoded, ref) if decoded.shape[0] > 1 else None
                if ref_name == "original":
                    per_frame_psnr[dec.name][item.name] = psnrs
                rows += [{"video": item.name, "frame": i, "decoder": dec.name, "reference": ref_name,
                          "psnr": p, "ssim": s} for i, (p, s) in enumerate(zip(psnrs, ssims))]
                finite = [p for p in psnrs if math.isfinite(p)]
                clip_rows.append({"video": item.name, "decoder": dec.name, "reference": ref_name,
                                  "frames": decoded.shape[0],
                                  "psnr": float(np.mean(finite)) if finite else float("inf"),
                                  "ssim": float(np.mean(ssims)), "flicker": flicker})
        if extractor is not None:
            starts = range(0, original.shape[0] - window + 1, window)
            if not starts:
                notes.add(f"'{item.name}' is shorter than the {window}-frame FVD window: not in FVD")
            for s in starts:
                fvd_stats["__original__"].update(extractor(original[None, s:s + window].cpu()))
                for name, decoded in decoded_all.items():
                    fvd_stats[name].update(extractor(decoded[None, s:s + window].cpu()))
        if out is not None and strip_written is None:
            strip_written = write_frame_strip(Path(out) / "frames.png", item.name, original.cpu(),
                                              {k: v.cpu() for k, v in decoded_all.items()})

    video_metrics = ("psnr", "ssim", "flicker")
    report: dict[str, Any] = {
        "kind": "video", "count": len(items), "unit": "clips",
        "settings": {"data": str(data), "teacher": teacher, "teacher_decoder": teacher_decoder,
                     "latent_space": teach.latent_space.name, "spatial_factor": factor,
                     "frames": frames, "resolution": resolution,
                     "crop": (f"resized (antialiased bilinear) so the short side is {resolution} px, then centre "
                              f"{resolution}x{resolution}" if resolution else
                              f"full frame centre-cropped to multiples of {factor}"),
                     "shapes": sorted(f"{t}x{h}x{w}" for t, h, w in shapes),
                     "confidence": "95% Student t over clips (per-clip means)",
                     "flicker": "mean_t mean_px |(D[t+1]-D[t]) - (O[t+1]-O[t])|, pixels in [0, 1]"},
        "decoders": {}, "notes": notes.items,
    }
    for dec in decs:
        per_ref = {}
        for ref_name in REFERENCES:
            sel = [r for r in clip_rows if r["decoder"] == dec.name and r["reference"] == ref_name]
            if sel:
                per_ref[ref_name] = {m: s for m in video_metrics if (s := summarize(r[m] for r in sel)) is not None}
        entry = {"source": dec.source, "metrics": per_ref,
                 "clips": [{k: r[k] for k in ("video", "frames", "psnr", "ssim", "flicker")}
                           for r in clip_rows if r["decoder"] == dec.name and r["reference"] == "original"],
                 "per_frame_psnr": per_frame_psnr[dec.name]}
        if extractor is not None:
            if fvd_stats[dec.name].count < 2:
                notes.add(f"FVD omitted: it needs at least 2 clips of {window} frames")
            else:
                entry["fvd"] = {"value": fvd_stats["__original__"].frechet_distance(fvd_stats[dec.name]),
                                "n": fvd_stats[dec.name].count, "extractor": fvd_extractor, "clip_frames": window}
        report["decoders"][dec.name] = entry

    if out is not None:
        out = Path(out)
        figures = [strip_written.name] if strip_written else []
        figures.append(write_psnr_plot(out / "psnr_per_frame.png", per_frame_psnr).name)
        report["files"] = {"csv": "per_frame.csv", "clips_csv": "per_clip.csv", "figures": figures}
        _write_csv(out / "per_frame.csv", rows, ["video", "frame", "decoder", "reference", "psnr", "ssim"])
        _write_csv(out / "per_clip.csv", clip_rows, ["video", "decoder", "reference", "frames", "psnr", "ssim", "flicker"])
        _write_text(out / "report.json", json.dumps(_json_safe(report), indent=2) + "\n")
        _write_text(out / "report.md", _report_markdown(report, video_metrics, figures))
    return report


# ----------------------------------------------------------------------------- CLI
def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of originals")
    p.add_argument("--teacher", help="teacher encoder: TAESD-family .pth, or a diffusers VAE folder/file/hub id")
    p.add_argument("--teacher-decoder", help="the teacher's decoder .pth, for a TAESD-family encoder")
    p.add_argument("--decoder", action="append", default=[], metavar="PATH",
                   help="decoder to evaluate (repeatable): a load_decoder path or hub id, or 'teacher'")
    p.add_argument("--latent-space", help="latent space preset when files cannot tell (sd15, sdxl, flux2, ...)")
    p.add_argument("--out", help="report folder: report.json, report.md, CSV and PNGs")
    p.add_argument("--limit", type=int, help="evaluate only the first N (sorted by name)")
    p.add_argument("--device", default="cpu")


def _run(fn: Callable[..., dict[str, Any]], metric_names: Sequence[str], **kwargs) -> int:
    try:
        report = fn(**kwargs)
    except (ValueError, FileNotFoundError, M.MetricUnavailable) as e:  # our errors say what to fix
        print(f"fastdec eval: error: {e}", file=sys.stderr)
        return 2
    _print_summary(report, metric_names)
    if kwargs.get("out"):
        print(f"\nreport written to {Path(kwargs['out']) / 'report.md'}")
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    return _run(evaluate_images, METRICS, data=args.data, decoders=args.decoder, out=args.out, teacher=args.teacher,
                teacher_decoder=args.teacher_decoder, latents=args.latents, latent_space=args.latent_space,
                resolution=args.resolution, limit=args.limit, lpips_weights=args.lpips_weights,
                lpips_net=args.lpips_net, fid_weights=args.fid_weights, grid=args.grid, device=args.device)


def _cmd_video(args: argparse.Namespace) -> int:
    return _run(evaluate_video, ("psnr", "ssim", "flicker"), data=args.data, decoders=args.decoder, out=args.out,
                teacher=args.teacher, teacher_decoder=args.teacher_decoder, latent_space=args.latent_space,
                frames=args.frames, resolution=args.resolution, limit=args.limit, fvd_extractor=args.fvd_extractor,
                clip_frames=args.clip_frames, batch_size=args.batch_size, device=args.device)


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="fidelity metrics and reports for decoders (images, video)")
    kinds = parser.add_subparsers(dest="eval_kind", metavar="KIND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    images = kinds.add_parser("images", help="PSNR/SSIM/MS-SSIM/LPIPS(/FID) on a folder of images",
                              description="Encode (or read latents), decode with each --decoder, compare with the "
                                          "originals and the teacher's decode. Means with 95%% t-intervals.")
    _common_arguments(images)
    images.add_argument("--latents", help="folder of precomputed decoder-space latents named like the images "
                                          "(.safetensors/.pt/.npy) instead of encoding")
    images.add_argument("--resolution", type=int, help="centre crop R x R (default: full frame cropped to multiples of the factor)")
    images.add_argument("--lpips-weights", help="local torchvision backbone state dict for LPIPS (alexnet-owt-7be5be79.pth)")
    images.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    images.add_argument("--fid-weights", help="local TorchScript Inception (inception-2015-12-05.pt) to compute FID")
    images.add_argument("--grid", type=int, default=4, help="images in grid.png (0: none)")
    images.set_defaults(func=_cmd_images)

    video = kinds.add_parser("video", help="per-frame PSNR/SSIM, flicker and FVD on videos",
                             description="Encode the first --frames frames of each video, decode each frame with "
                                         "each --decoder (video decoders: the whole clip), compare with the originals.")
    _common_arguments(video)
    video.add_argument("--frames", type=int, default=32, help="first N frames of each video (default 32)")
    video.add_argument("--resolution", type=int,
                       help="resize so the short side is R px (antialiased), then centre crop R x R "
                            "(default: full frames cropped to multiples of the factor)")
    video.add_argument("--fvd-extractor", help="features for FVD: videomae:DIR (VideoMAEModel folder), i3d:FILE.pt")
    video.add_argument("--clip-frames", type=int, help="frames per FVD clip (default: the extractor's, else 16)")
    video.add_argument("--batch-size", type=int, default=4, help="frames per encode/decode call")
    video.set_defaults(func=_cmd_video)

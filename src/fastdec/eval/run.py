"""The evaluation behind ``fastdec eval images|video``: one skeleton, two kinds of input.

:func:`run_evaluation` is the whole procedure, written once: for each input (with a progress bar) get the
original and its latents, decode them with every decoder (a non-finite output is an error, never a score),
score each decode against the original and the teacher's own decode, then aggregate means with confidence
intervals and write the report. :class:`ImageEvaluation` and :class:`VideoEvaluation` plug in what differs:
how an input becomes (original, latents), what one score row holds, the Fréchet features and the figures.
"""
from __future__ import annotations

import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import check_device
from ..errors import (DataError, EvalError, InputTypeError, LatentFileError, MetricUnavailable, NonFiniteOutputError,
                      UsageError, VideoError, check_count, check_flags)
from ..io.files import display_name, drop_excluded, output_folder
from ..io.images import IMAGE_SUFFIXES, list_images, load_image
from ..io.latents import LATENT_SUFFIXES, check_latent, read_latents
from ..io.video import VIDEO_SUFFIXES, read_video
from ..latent_spaces import get_latent_space
from ..resolve import resolve_in_space
from ..runtime.deflickering import DeflickerSettings, as_deflicker_settings, deflicker
from . import metrics as M
from .metrics import IMAGE_METRICS, REFERENCES, VIDEO_METRICS, summarize
from .report import Table, write_frame_diff_plot, write_frame_strip, write_image_grid, write_psnr_plot, write_report

TEACHER_NAME = "teacher"  # the --decoder value that evaluates the teacher's own decoder
# how the two less common image metrics are computed (fastdec.eval.metrics.vif / gradient_energy_ratio)
IMAGE_METRIC_NOTES = {
    "vif": f"VIF-P (torchmetrics visual_information_fidelity) per RGB channel, averaged; pixels scaled to 0-255 "
           f"(sigma_n^2 = {M.VIF_NOISE_VARIANCE:g} in 8-bit units); images of at least {M.VIF_MIN_SIZE} px per side",
    "gradient_energy": "sum of squared 3x3 Sobel gradients (RGB, valid positions) of the decode / of the "
                       "reference: < 1 blurrier, > 1 more edges than the reference",
}
ORIGINAL = "__original__"  # Fréchet statistics of the originals (no decoder is named like this)
# how the temporal video metrics are computed (fastdec.eval.metrics), for report.json and report.md
VIDEO_METRIC_NOTES = {
    "flicker": "mean_t mean_px |(D[t+1]-D[t]) - (O[t+1]-O[t])|, pixels in [0, 1] (per_frame.csv: frame_diff)",
    "frame_diff": "per frame t >= 1: mean_px |(D[t]-D[t-1]) - (O[t]-O[t-1])|; its clip mean is the flicker score",
    "temporal_energy": "sum_t mean_px |D[t]-D[t-1]| / sum_t mean_px |O[t]-O[t-1]|: 1 = moves as much as the "
                       "reference, > 1 added flicker/boiling, < 1 temporally smoothed; none (left out of the "
                       "means, with a note) when the reference clip is static",
    "excess_motion": "mean_t max(0, mean_px |D[t]-D[t-1]| - mean_px |O[t]-O[t-1]|), pixels in [0, 1]: "
                     "the frame-to-frame change the decode adds; 0 for a static clip decoded static",
    "tof": "TecoGAN tOF: mean_t mean_px ||flow(D[t-1], D[t]) - flow(O[t-1], O[t])||_2 in pixels of flow; "
           "flow = scikit-image optical_flow_ilk (default settings) on Rec. 709 luminance",
}
TOF_OFF = "not computed: pass --tof (one optical flow per frame pair and clip: CPU time)"


# ----------------------------------------------------------------------------- teacher and decoders
def load_eval_teacher(source: str, decoder: str | None = None, latent_space: str | None = None, device: str = "cpu"):
    """The teacher (``fastdec.teachers.load_teacher``): ``.encode`` RGB -> decoder-space latents, ``.decode``."""
    from ..teachers import load_teacher

    return load_teacher(source, decoder=decoder, latent_space=latent_space, device=device)


@dataclass
class EvalDecoder:
    name: str
    source: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    is_video: bool = False
    is_teacher: bool = False  # the teacher's own decoder: "vs teacher decode" would compare it with itself
    filters: str | None = None  # the decoder whose decode ``fn`` filters (deflicker) instead of decoding latents


DEFLICKER_SUFFIX = "+deflicker"  # report name of a decoder's deflickered decode (--deflicker)


def decoder_specs(decoders: Any) -> list[str]:
    """The decoders to evaluate as a list of specs: one spec alone is a list of one ("flux2-turbo" was read as the
    decoders 'f', 'l', 'u', ...), paths become strings, anything else is named."""
    if isinstance(decoders, (str, os.PathLike)):
        decoders = [decoders]
    if not isinstance(decoders, (list, tuple)) or not all(isinstance(d, (str, os.PathLike)) for d in decoders):
        raise InputTypeError(f"decoders is a list of specs (pretrained names, checkpoint paths, Hub ids or "
                             f"'teacher'), got {decoders!r}")
    return [os.fspath(d) for d in decoders]


def decoder_names(sources: Sequence[str]) -> list[str]:
    """Report names: the file name without suffixes (or the Hub repo name), made unique with -2, -3, ..."""
    names: list[str] = []
    for source in sources:
        base = TEACHER_NAME if source == TEACHER_NAME else Path(source).name.split(".")[0] or source
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def pick_baseline(sources: Sequence[str], baseline: str | None = None, deflickered: bool = False) -> str | None:
    """The report name the other decoders' paired differences are taken against: ``baseline``, else the
    first decoder's; None with fewer than two decoders (nothing to compare). ``deflickered``: every decoder is
    also scored deflickered (``NAME+deflicker``, which may be the baseline too).

    Checked from the names alone, before any decoder is loaded or image read, so a typo costs nothing.
    """
    names = decoder_names(sources)
    if deflickered:
        taken = [name for name in names if name.endswith(DEFLICKER_SUFFIX)]
        if taken:  # its deflickered twin would get the same report name and overwrite its scores
            raise UsageError(f"with --deflicker, report names ending in '{DEFLICKER_SUFFIX}' are taken by the "
                             f"deflickered decodes: rename {', '.join(repr(n) for n in taken)}")
        names += [name + DEFLICKER_SUFFIX for name in names]
    if baseline is not None and baseline not in names:
        valid = ", ".join(f"'{n}'" for n in names) or "none (no --decoder given)"
        raise UsageError(f"--baseline '{baseline}' is not one of the decoders evaluated; use a report name: {valid}")
    if len(names) < 2:
        return None
    return baseline if baseline is not None else names[0]


def _teacher_decoder(teacher, name: str = TEACHER_NAME) -> EvalDecoder:
    if teacher is None or not teacher.has_decoder:
        raise EvalError("--decoder teacher needs a teacher with a decoder: pass --teacher (and --teacher-decoder "
                        "for a TAESD-family encoder .pth)")
    return EvalDecoder(name, f"{TEACHER_NAME} decoder", teacher.decode, is_teacher=True)


def _student_decoder(name: str, source: str, space, factor: int | None, device: str) -> EvalDecoder:
    decoder = resolve_in_space(source, space, "or a --teacher of that space", device=device).eval()
    if factor is not None and decoder.upsample_factor != factor:
        raise EvalError(f"decoder '{source}' upsamples x{decoder.upsample_factor} but the teacher's latents are "
                        f"/{factor}: evaluate it with a teacher of its own latent space")
    if space is not None and decoder.latent_channels != space.channels:
        raise EvalError(f"decoder '{source}': {space.channel_mismatch_message(decoder.latent_channels)}")
    return EvalDecoder(name, str(source), decoder, bool(decoder.is_video))


def deflickered_decoders(decoders: Sequence[EvalDecoder], settings: DeflickerSettings) -> list[EvalDecoder]:
    """For each decoder, one that scores its decode deflickered (the same decode, not a second one)."""
    how = f"deflicker strength {settings.strength:g}, threshold {settings.threshold:g}"
    return [EvalDecoder(d.name + DEFLICKER_SUFFIX, f"{d.source} + {how}", partial(deflicker, settings=settings),
                        is_video=True, filters=d.name) for d in decoders]


def load_decoders(sources: Sequence[str], teacher, latent_space, factor: int | None, device: str) -> list[EvalDecoder]:
    """Each ``--decoder``: 'teacher', or any spec :func:`fastdec.resolve_decoder` takes."""
    if not sources:
        raise EvalError("no decoder to evaluate: pass --decoder PATH (repeatable) or --decoder teacher")
    return [_teacher_decoder(teacher, name) if source == TEACHER_NAME
            else _student_decoder(name, source, latent_space, factor, device)
            for name, source in zip(decoder_names(sources), sources)]


# ----------------------------------------------------------------------------- inputs
def image_inputs(data: str | Path, limit: int | None = None) -> list[Path]:
    """The images directly in ``data``, sorted by name, the first ``limit`` of them."""
    files = list_images(data)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{data}'")
    return files[:limit] if limit else files


def _has_frames(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def list_videos(data: str | Path, limit: int | None = None, exclude: Sequence[str] = ()) -> list[Path]:
    """Video files and frame folders directly under ``data`` (or ``data`` itself if it holds frames), less
    those named in ``exclude`` (the training clips, when a folder holds both)."""
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data '{folder}' is not a folder of videos or frame folders")
    items = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
        (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (p.is_dir() and _has_frames(p))))
    if not items and _has_frames(folder):
        items = [folder]
    if not items:
        raise DataError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders in '{folder}'")
    items = drop_excluded(items, folder, exclude)
    return items[:limit] if limit else items


def read_frames(path: Path, num_frames: int | None) -> torch.Tensor:
    """The first ``num_frames`` frames, uint8 (T, 3, H, W) (``fastdec.io.video.read_video``)."""
    return read_video(path, start=0, num_frames=num_frames)


def find_latent(folder: Path, image: Path) -> Path:
    """The latent file named like ``image`` in ``folder``; two of them (X.pt and X.npy) are ambiguous."""
    found = [folder / (image.stem + suffix) for suffix in LATENT_SUFFIXES if (folder / (image.stem + suffix)).is_file()]
    if len(found) > 1:  # the first suffix won silently, perhaps the stale one
        raise LatentFileError(f"several latent files for '{image.name}' in '{folder}': "
                              f"{', '.join(p.name for p in found)}; keep one")
    if found:
        return found[0]
    raise LatentFileError(f"no latents for '{image.name}' in '{folder}': expected "
                          f"{image.stem}{{{','.join(LATENT_SUFFIXES)}}}")


def read_latent(path: Path, channels: int | None = None) -> torch.Tensor:
    """The one latent of an image's file, (1, C, h, w) float32, checked (``fastdec.io.latents``)."""
    entries = read_latents(path)
    if len(entries) > 1:  # several tensors: the one named 'latents'
        entries = [(name, z) for name, z in entries if name == "latents"]
    if len(entries) != 1:
        raise LatentFileError(f"'{path}' holds several latents: store one per image, or name it 'latents'")
    return check_latent(entries[0][1], path.name, channels)[None].float()


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


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return x
    return F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def load_clip(path: Path, frames: int | None, resolution: int | None, factor: int) -> torch.Tensor:
    """The clip ``fastdec eval video`` scores: the first ``frames`` frames as float (T, 3, H, W) in [0, 1],
    short side resized to ``resolution`` and centre-cropped (or cropped to multiples of ``factor``).
    Raises ``VideoError`` for an unreadable video."""
    clip = read_frames(path, frames).float() / 255
    if resolution:
        clip = resize_short_side(clip, resolution)
    return crop_to_factor(clip, factor, resolution)


# ----------------------------------------------------------------------------- checks
def check_latent_noise(std: float) -> None:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.inf > std >= 0:
        raise UsageError(f"--latent-noise must be a finite std >= 0 (0 = clean latents), got {std!r}")


def jitter_latents(z: torch.Tensor, std: float, name: str) -> torch.Tensor:
    """``z`` plus Gaussian noise of ``std``, independent per element and so per frame: latents that jitter from
    frame to frame as a denoiser's do while the picture holds still. Seeded by the input's name and drawn on
    the CPU in fp32, so every decoder, every run and every device sees the same noise for the same input."""
    if not std:
        return z
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32)
    return z + (std * noise).to(device=z.device, dtype=z.dtype)


def checked_output(who: str, item: str, produce: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``produce()``, refused when it holds NaN or inf: one error naming who produced it and on which input.

    fastdec decoders refuse a non-finite output themselves (without knowing the input); other decoders and
    teachers are checked here.
    """
    advice = "check its weights (NaN/inf in the checkpoint, a diverged training) or an fp16 overflow"
    try:
        x = produce()
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(f"{who} produced NaN or inf on '{item}', which is never scored: {e}") from e
    if not torch.isfinite(x).all():
        raise NonFiniteOutputError(f"{who} produced NaN or inf on '{item}', which is never scored: {advice}")
    return x


@dataclass
class Notes:
    """Notes for the report (omitted metrics, short inputs), each printed once to stderr when first added."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)
            print(f"note: {text}", file=sys.stderr)


def _note_missing_reference(teacher, notes: Notes) -> None:
    if teacher is None:
        notes.add("'vs teacher decode' omitted: no --teacher given")
    elif not teacher.has_decoder:
        notes.add("'vs teacher decode' omitted: the teacher has no decoder (pass --teacher-decoder)")


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]).float() for i in range(0, x.shape[0], batch)])


def decode_frames(dec: EvalDecoder, z: torch.Tensor, batch: int) -> torch.Tensor:
    """Latents (T, C, h, w) -> frames (T, 3, H, W): the whole clip for video decoders, else in chunks.

    An image is a one-frame clip, so image evaluation decodes through here too.
    """
    if dec.is_video:
        return dec.fn(z[None])[0].float()
    return _in_chunks(dec.fn, z, batch)


class FrechetTracker:
    """Streamed Fréchet statistics of the originals and of each decoder's output, from one extractor."""

    def __init__(self, extractor: M.FeatureExtractor, decoders: Sequence[EvalDecoder]):
        self.extractor = extractor
        self.stats = {ORIGINAL: M.FrechetStats(), **{d.name: M.FrechetStats() for d in decoders}}

    def add(self, name: str, clips: torch.Tensor) -> None:
        """Features of clips (N, T, 3, H, W) (images: T = 1); extractors normalise on the CPU."""
        self.stats[name].update(self.extractor(clips.cpu()))

    def distance(self, name: str) -> dict[str, Any] | None:
        """Fréchet distance of ``name``'s outputs to the originals, or None below 2 samples."""
        if self.stats[name].count < 2:
            return None
        return {"value": self.stats[ORIGINAL].frechet_distance(self.stats[name]), "n": self.stats[name].count}


# ----------------------------------------------------------------------------- the skeleton
@dataclass
class Sample:
    """One input, ready to decode."""

    name: str  # the input's file name: rows, notes and error messages use it
    original: torch.Tensor  # (N, 3, H, W) on the device: one image (N = 1) or a clip's frames
    z: torch.Tensor  # its latents (N, C, h, w)


class Evaluation:
    """What both kinds share; subclasses set the class attributes and plug in ``load``, ``score``,
    ``observe``, ``decoder_extras``, ``settings``, ``tables`` and ``write_figures``."""

    kind = unit = ""
    key = ""  # the row column naming the input: what paired differences are matched on
    metrics: tuple[str, ...] = ()

    def __init__(self, *, data: str | Path, items: list[Path], teacher, decoders: list[EvalDecoder], space,
                 factor: int, device: str, notes: Notes, options: dict[str, Any], batch_size: int = 1,
                 baseline: str | None = None, latent_noise: float = 0.0):
        self.data, self.items, self.teacher, self.decoders = data, items, teacher, decoders
        self.space, self.factor, self.device, self.notes, self.batch_size = space, factor, device, notes, batch_size
        self.baseline = baseline  # report name (pick_baseline), None: no paired differences
        self.latent_noise = latent_noise  # every decoder decodes the same jittered latents (jitter_latents)
        self.options = {"data": str(data), **options, "baseline": baseline, "latent_noise": latent_noise}
        self.reference = _teacher_decoder(teacher) if teacher is not None and teacher.has_decoder else None
        self.rows: list[dict[str, Any]] = []  # one per input x decoder x reference: what the means are over
        self.skipped: dict[str, str] = {}
        self.count = 0

    def encode(self, original: torch.Tensor, name: str) -> torch.Tensor:
        z = checked_output("the teacher encoder", name,
                           lambda: _in_chunks(self.teacher.encode, original, self.batch_size))
        return self.jitter(z, name)

    def jitter(self, z: torch.Tensor, name: str) -> torch.Tensor:
        return jitter_latents(z, self.latent_noise, name)

    def decode(self, dec: EvalDecoder, sample: Sample, decoded: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``dec``'s output on ``sample``; a filter (``dec.filters``) takes its decoder's entry in ``decoded``."""
        if dec.filters is not None:
            return checked_output(f"'{dec.name}' ({dec.source})", sample.name, lambda: dec.fn(decoded[dec.filters]))
        return checked_output(f"decoder '{dec.name}' ({dec.source})", sample.name,
                              lambda: decode_frames(dec, sample.z, self.batch_size))

    def skip(self, item: Path, error: Exception) -> None:
        print(f"warning: skipping '{display_name(item)}': {error}", file=sys.stderr)
        self.skipped[display_name(item)] = str(error)

    def load(self, item: Path) -> Sample | None:
        raise NotImplementedError

    def score(self, sample: Sample, dec: EvalDecoder, reference: str, decoded: torch.Tensor,
              ref: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def observe(self, sample: Sample, decoded: dict[str, torch.Tensor]) -> None:
        """Everything beyond the score rows: Fréchet features, figure samples, sizes seen."""

    def decoder_extras(self, dec: EvalDecoder) -> dict[str, Any]:
        return {}

    def settings(self) -> dict[str, Any]:
        return dict(self.options)

    def tables(self) -> dict[str, Table]:
        return {}

    def write_figures(self, out: Path) -> list[str]:
        return []


def _progress(items: Sequence[Path], unit: str) -> Iterable[Path]:
    from tqdm.auto import tqdm

    images = unit == "images"
    return tqdm(items, total=len(items), desc="images" if images else "videos", unit="img" if images else "clip",
                file=sys.stderr)


def _references(original: torch.Tensor, teacher_decode: torch.Tensor | None,
                dec: EvalDecoder) -> Iterator[tuple[str, torch.Tensor]]:
    yield "original", original
    if teacher_decode is not None and not dec.is_teacher:
        yield "teacher", teacher_decode


def _teacher_decode(task: Evaluation, sample: Sample, decoded: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if task.reference is None:
        return None
    same = next((decoded[d.name] for d in task.decoders if d.is_teacher), None)
    return same if same is not None else task.decode(task.reference, sample)


def aggregate(rows: Sequence[dict[str, Any]], decoder: str, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """reference -> metric -> mean with its confidence interval, over ``decoder``'s rows."""
    summary = {}
    for reference in REFERENCES:
        chosen = [r for r in rows if r["decoder"] == decoder and r["reference"] == reference]
        if chosen:
            summary[reference] = {m: s for m in metrics if (s := summarize(r[m] for r in chosen)) is not None}
    return summary


def paired_aggregate(rows: Sequence[dict[str, Any]], decoder: str, baseline: str, metrics: Sequence[str],
                     key: str) -> dict[str, Any]:
    """reference -> metric -> mean and t-interval of ``decoder`` - ``baseline``, per input (``row[key]``).

    Only inputs both were scored on against the same reference are paired; a reference one of them lacks
    (the teacher's decoder is never scored against its own decode) is left out.
    """
    summary: dict[str, Any] = {"baseline": baseline}
    for reference in REFERENCES:
        base = {r[key]: r for r in rows if r["decoder"] == baseline and r["reference"] == reference}
        pairs = [(r, base[r[key]]) for r in rows
                 if r["decoder"] == decoder and r["reference"] == reference and r[key] in base]
        if not pairs:
            continue
        stats = {m: M.summarize_paired([r[m] for r, _ in pairs], [b[m] for _, b in pairs]) for m in metrics}
        summary[reference] = {m: s for m, s in stats.items() if s is not None}
    return summary


def build_report(task: Evaluation) -> dict[str, Any]:
    report: dict[str, Any] = {
        "kind": task.kind, "count": task.count, "unit": task.unit, "settings": task.settings(), "decoders": {},
        "notes": task.notes.items, "skipped": {"count": len(task.skipped), "files": task.skipped},
    }
    for dec in task.decoders:
        entry = {"source": dec.source, "metrics": aggregate(task.rows, dec.name, task.metrics)}
        if task.baseline is not None and dec.name != task.baseline:
            entry["vs_baseline"] = paired_aggregate(task.rows, dec.name, task.baseline, task.metrics, task.key)
        report["decoders"][dec.name] = {**entry, **task.decoder_extras(dec)}
    return report


def run_evaluation(task: Evaluation, out: Path | None = None) -> dict[str, Any]:
    """The one evaluation procedure (module docstring); returns the report and writes it to ``out``."""
    for item in _progress(task.items, task.unit):
        sample = task.load(item)
        if sample is None:  # skipped, with a warning
            continue
        decoded: dict[str, torch.Tensor] = {}
        for dec in task.decoders:  # in order: a filter comes after the decoder it filters
            decoded[dec.name] = task.decode(dec, sample, decoded)
        teacher_decode = _teacher_decode(task, sample, decoded)
        for dec in task.decoders:
            for reference, ref in _references(sample.original, teacher_decode, dec):
                task.rows.append(task.score(sample, dec, reference, decoded[dec.name], ref))
        task.observe(sample, decoded)
        task.count += 1
    if not task.count:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(task.skipped.items())[:3])
        more = f" (and {len(task.skipped) - 3} more)" if len(task.skipped) > 3 else ""
        raise DataError(f"none of the {len(task.items)} {task.unit} in '{task.data}' could be read: {reasons}{more}")
    report = build_report(task)
    if out is not None:
        write_report(out, report, task.tables(), task.write_figures(out))
    return report


# ----------------------------------------------------------------------------- images
class ImageEvaluation(Evaluation):
    kind, unit, key, metrics = "images", "images", "image", IMAGE_METRICS

    def __init__(self, *, latents: str | Path | None, resolution: int | None, lpips: M.LPIPS | None,
                 fid: FrechetTracker | None, grid: int, **common: Any):
        super().__init__(**common)
        if resolution and resolution % self.factor:  # the whole run's setting: refused, not skipped image by image
            raise EvalError(f"--resolution {resolution} is not a multiple of the latent factor {self.factor}")
        self.latents = Path(latents) if latents is not None else None
        self.resolution, self.lpips, self.fid, self.grid = resolution, lpips, fid, grid
        self.channels = self.space.channels if self.space is not None else self.decoders[0].fn.latent_channels
        self.samples: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.sizes: set[tuple[int, int]] = set()

    def load(self, path: Path) -> Sample | None:
        try:
            image = load_image(path)
        except DataError as e:  # one unreadable file does not end the evaluation
            return self.skip(path, e)
        if self.latents is None:
            try:
                original = crop_to_factor(image, self.factor, self.resolution).to(self.device)
            except EvalError as e:  # an image smaller than one latent pixel, or than --resolution
                return self.skip(path, e)
            return Sample(display_name(path), original, self.encode(original, display_name(path)))
        source = find_latent(self.latents, path)
        z = self.jitter(read_latent(source, self.channels).to(self.device), display_name(path))
        (h, w), f = image.shape[-2:], self.factor
        if tuple(z.shape[-2:]) != (h // f, w // f):  # made from another image, or another size of it
            return self.skip(path, LatentFileError(
                f"its latents '{source.name}' are {z.shape[-2]}x{z.shape[-1]}, but a {h}x{w} px image encodes to "
                f"{h // f}x{w // f} at /{f}"))
        original = center_crop(image, h - h % f, w - w % f).to(self.device)
        return Sample(display_name(path), original, z)

    def score(self, sample, dec, reference, decoded, ref):
        height, width = sample.original.shape[-2:]
        scores: dict[str, float | None] = {
            "psnr": float(M.psnr(decoded, ref)[0]), "ssim": float(M.ssim(decoded, ref)[0]),
            "ms_ssim": self._optional("MS-SSIM", M.ms_ssim, decoded, ref),
            "vif": self._optional("VIF", M.vif, decoded, ref),
            "gradient_energy": self._gradient_energy(decoded, ref),
            "lpips": float(self.lpips(decoded, ref)[0]) if self.lpips is not None else None,
        }
        return {"image": sample.name, "decoder": dec.name, "reference": reference, "height": height,
                "width": width, **scores}

    def _optional(self, label: str, metric: Callable, decoded: torch.Tensor, ref: torch.Tensor) -> float | None:
        """A metric with a minimum image size: None (left out of the means, with a note) below it, and where it
        is undefined (VIF of a flat reference is NaN: no signal to keep)."""
        try:
            value = float(metric(decoded, ref)[0])
        except MetricUnavailable as e:
            self.notes.add(f"{label} omitted for some images: {e}")
            return None
        if math.isnan(value):
            self.notes.add(f"{label} omitted for some images: it is undefined there (the reference is flat)")
            return None
        return value

    def _gradient_energy(self, decoded: torch.Tensor, ref: torch.Tensor) -> float | None:
        ratio = float(M.gradient_energy_ratio(decoded, ref)[0])
        if math.isnan(ratio):
            self.notes.add("gradient-energy ratio omitted for some images: the reference has no edges (flat)")
            return None
        return ratio

    def observe(self, sample, decoded):
        self.sizes.add(tuple(sample.original.shape[-2:]))
        if self.fid is not None:
            self.fid.add(ORIGINAL, sample.original[:, None])
            for name, images in decoded.items():
                self.fid.add(name, images[:, None])
        if len(self.samples) < self.grid:
            self.samples.append((Path(sample.name).stem, sample.original[0].cpu(),
                                 {name: images[0].cpu() for name, images in decoded.items()}))

    def decoder_extras(self, dec):
        fid = self.fid.distance(dec.name) if self.fid is not None else None
        if self.fid is not None and fid is None:
            self.notes.add("FID omitted: it needs at least 2 images")
        return {"fid": fid} if fid is not None else {}

    def settings(self):
        crop = (f"centre {self.resolution}x{self.resolution}" if self.resolution
                else f"full frame, centre-cropped to multiples of {self.factor}")
        return {**self.options, "latent_space": getattr(self.space, "name", None), "spatial_factor": self.factor,
                "crop": crop, "sizes": sorted(f"{h}x{w}" for h, w in self.sizes),
                "confidence": "95% Student t over images", **IMAGE_METRIC_NOTES}

    def tables(self):
        return {"csv": ("per_image.csv", self.rows, ["image", "decoder", "reference", "height", "width",
                                                     *IMAGE_METRICS])}

    def write_figures(self, out):
        return [write_image_grid(out / "grid.png", self.samples).name] if self.samples else []


def _check_image_options(teacher, latents, resolution, limit, grid) -> None:
    if teacher is None and latents is None:
        raise EvalError("nothing to decode: pass --teacher ENCODER (images are encoded) or --latents DIR")
    if latents is not None and resolution:
        raise EvalError("--resolution cannot be combined with --latents: the latents fix the crop (their size x factor)")
    check_count("--resolution", resolution)
    check_count("--limit", limit)
    check_count("--grid", grid, minimum=0)


def _lpips_or_note(weights: str | None, net: str, device: str, notes: Notes) -> M.LPIPS | None:
    if not weights:
        notes.add("LPIPS omitted: pass --lpips-weights with a local torchvision AlexNet/VGG16 state dict "
                  "(e.g. alexnet-owt-7be5be79.pth) to compute it")
        return None
    try:
        return M.LPIPS(weights, net=net, device=device)
    except MetricUnavailable as e:
        notes.add(f"LPIPS omitted: {e}")
        return None


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
    baseline: str | None = None,
    latent_noise: float = 0.0,
) -> dict[str, Any]:
    """Evaluate image decoders on a folder of originals; returns the report dict (and writes it to ``out``).

    Unreadable images are skipped with a warning and counted in ``report["skipped"]``. With two or more
    decoders, each one but the baseline (``baseline``, a report name; default the first) gets
    ``vs_baseline``: paired per-image differences against it.
    """
    _check_image_options(teacher, latents, resolution, limit, grid)
    decoders = decoder_specs(decoders)
    if lpips_weights and not Path(lpips_weights).expanduser().is_file():  # a typo: an error, not an omitted metric
        raise EvalError(f"--lpips-weights '{lpips_weights}' is not a file: pass a local torchvision {lpips_net} "
                        "state dict")
    check_latent_noise(latent_noise)
    base = pick_baseline(decoders, baseline)
    check_device(device)
    items = image_inputs(data, limit)
    with output_folder(out) as out_dir:  # a run refused before its report leaves no empty folder
        notes = Notes()
        teach = load_eval_teacher(teacher, teacher_decoder, latent_space, device) if teacher else None
        space = teach.latent_space if teach else (get_latent_space(latent_space) if latent_space else None)
        decs = load_decoders(decoders, teach, space, teach.spatial_factor if teach else None, device)
        _note_missing_reference(teach, notes)
        lpips = _lpips_or_note(lpips_weights, lpips_net, device, notes)
        fid = (FrechetTracker(M.TorchScriptExtractor(fid_weights, kind="inception", device=device), decs)
               if fid_weights else None)
        task = ImageEvaluation(
            data=data, items=items, teacher=teach, decoders=decs, space=space, device=device, notes=notes,
            factor=teach.spatial_factor if teach else decs[0].fn.upsample_factor,
            options={"teacher": teacher, "teacher_decoder": teacher_decoder,
                     "latents": str(latents) if latents else None, "resolution": resolution},
            latents=latents, resolution=resolution, lpips=lpips, fid=fid, grid=grid, baseline=base,
            latent_noise=latent_noise)
        return run_evaluation(task, out_dir)


# ----------------------------------------------------------------------------- video
class VideoEvaluation(Evaluation):
    kind, unit, key, metrics = "video", "clips", "video", VIDEO_METRICS

    def __init__(self, *, frames: int | None, resolution: int | None, fvd: FrechetTracker | None,
                 fvd_extractor: str | None, window: int, tof: bool = False, **common: Any):
        super().__init__(**common)
        self.frames, self.resolution, self.fvd, self.fvd_extractor, self.window = (
            frames, resolution, fvd, fvd_extractor, window)
        self.tof = tof
        self.frame_rows: list[dict[str, Any]] = []
        self.per_frame_psnr: dict[str, dict[str, list[float]]] = {d.name: {} for d in self.decoders}
        self.per_frame_diff: dict[str, dict[str, list[float]]] = {d.name: {} for d in self.decoders}
        # id(clip) -> (clip, its flows), for the current sample only (cleared in observe); see _flows
        self.flow_cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.strip: tuple[str, torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.shapes: set[tuple[int, int, int]] = set()

    def load(self, item: Path) -> Sample | None:
        try:
            original = load_clip(item, self.frames, self.resolution, self.factor).to(self.device)
        except VideoError as e:  # one unreadable video does not end the evaluation (as for images)
            return self.skip(item, e)
        if self.frames and original.shape[0] < self.frames:
            self.notes.add(f"'{item.name}' has {original.shape[0]} frames (< --frames {self.frames}): all of them "
                           "were used")
        return Sample(display_name(item), original, self.encode(original, display_name(item)))

    def score(self, sample, dec, reference, decoded, ref):
        psnrs, ssims = M.psnr(decoded, ref).tolist(), M.ssim(decoded, ref).tolist()
        diffs = M.frame_diff(decoded, ref) if decoded.shape[0] > 1 else []
        if reference == "original":
            self.per_frame_psnr[dec.name][sample.name] = psnrs
            if diffs:
                self.per_frame_diff[dec.name][sample.name] = diffs
        # frame 0 has no previous frame: its frame_diff is empty, not 0 (which would read as "no flicker")
        self.frame_rows += [{"video": sample.name, "frame": i, "decoder": dec.name, "reference": reference,
                             "psnr": p, "ssim": s, "frame_diff": diffs[i - 1] if i else None}
                            for i, (p, s) in enumerate(zip(psnrs, ssims))]
        finite = [p for p in psnrs if math.isfinite(p)]
        return {"video": sample.name, "decoder": dec.name, "reference": reference, "frames": decoded.shape[0],
                "psnr": float(np.mean(finite)) if finite else float("inf"), "ssim": float(np.mean(ssims)),
                **self._temporal(sample, reference, decoded, ref, diffs)}

    def _temporal(self, sample: Sample, reference: str, decoded: torch.Tensor, ref: torch.Tensor,
                  diffs: list[float]) -> dict[str, Any]:
        """flicker (the mean of ``diffs``, the per-pair frame_diff), temporal_energy, excess_motion and (with
        --tof) tOF of one decode; None below 2 frames."""
        if not diffs:
            return dict.fromkeys(("flicker", "temporal_energy", "excess_motion", "tof"))
        energy, excess = M.motion_metrics(decoded, ref)
        if energy is None:
            self.notes.add(f"temporal_energy of '{sample.name}' vs {reference} not reported: the {reference} clip "
                           "does not change from frame to frame, so the ratio is undefined "
                           "(excess_motion covers it)")
        return {"flicker": float(np.mean(diffs)), "temporal_energy": energy,
                "excess_motion": excess,
                "tof": M.tof(self._flows(decoded), self._flows(ref)) if self.tof else None}

    def _flows(self, clip: torch.Tensor) -> np.ndarray:
        """The clip's optical flows, each clip flowed once: the original (and the teacher decode) serve every
        decoder, and a decode serves both references. Keyed by the tensor's id while the entry holds the tensor
        itself, so the id cannot be reused by another clip while cached."""
        entry = self.flow_cache.get(id(clip))
        if entry is None:
            entry = self.flow_cache[id(clip)] = (clip, M.clip_flows(clip))
        return entry[1]

    def observe(self, sample, decoded):
        self.flow_cache.clear()  # every score of this sample is done: its flows are not needed again
        self.shapes.add((sample.original.shape[0], *sample.original.shape[-2:]))
        if self.fvd is not None:
            self._add_fvd_windows(sample, decoded)
        if self.strip is None:
            self.strip = (sample.name, sample.original.cpu(), {k: v.cpu() for k, v in decoded.items()})

    def _add_fvd_windows(self, sample: Sample, decoded: dict[str, torch.Tensor]) -> None:
        starts = range(0, sample.original.shape[0] - self.window + 1, self.window)
        if not starts:
            self.notes.add(f"'{sample.name}' is shorter than the {self.window}-frame FVD window: not in FVD")
        for s in starts:
            self.fvd.add(ORIGINAL, sample.original[None, s:s + self.window])
            for name, frames in decoded.items():
                self.fvd.add(name, frames[None, s:s + self.window])

    def decoder_extras(self, dec):
        clips = [{k: r[k] for k in ("video", "frames", *self.clip_metrics())}
                 for r in self.rows if r["decoder"] == dec.name and r["reference"] == "original"]
        extras: dict[str, Any] = {"clips": clips, "per_frame_psnr": self.per_frame_psnr[dec.name]}
        fvd = self.fvd.distance(dec.name) if self.fvd is not None else None
        if self.fvd is not None and fvd is None:
            self.notes.add(f"FVD omitted: it needs at least 2 clips of {self.window} frames")
        if fvd is not None:
            extras["fvd"] = {**fvd, "extractor": self.fvd_extractor, "clip_frames": self.window}
        return extras

    def settings(self):
        crop = (f"resized (antialiased bilinear) so the short side is {self.resolution} px, then centre "
                f"{self.resolution}x{self.resolution}" if self.resolution
                else f"full frame centre-cropped to multiples of {self.factor}")
        return {**self.options, "latent_space": self.space.name, "spatial_factor": self.factor,
                "frames": self.frames, "resolution": self.resolution, "crop": crop,
                "shapes": sorted(f"{t}x{h}x{w}" for t, h, w in self.shapes),
                "confidence": "95% Student t over clips (per-clip means)",
                **VIDEO_METRIC_NOTES, **({} if self.tof else {"tof": TOF_OFF})}

    def clip_metrics(self) -> tuple[str, ...]:
        """The per-clip metrics this run measures: tOF only with --tof (an always-empty column says nothing)."""
        return tuple(m for m in self.metrics if m != "tof" or self.tof)

    def tables(self):
        return {"csv": ("per_frame.csv", self.frame_rows,
                        ["video", "frame", "decoder", "reference", "psnr", "ssim", "frame_diff"]),
                "clips_csv": ("per_clip.csv", self.rows, ["video", "decoder", "reference", "frames",
                                                          *self.clip_metrics()])}

    def write_figures(self, out):
        figures = [write_frame_strip(out / "frames.png", *self.strip).name] if self.strip else []
        figures.append(write_psnr_plot(out / "psnr_per_frame.png", self.per_frame_psnr).name)
        if any(self.per_frame_diff.values()):  # some clip has >= 2 frames: a frame difference to plot
            figures.append(write_frame_diff_plot(out / "frame_diff.png", self.per_frame_diff).name)
        return figures


def _check_video_options(teacher, frames, resolution, limit, clip_frames, batch_size) -> None:
    if teacher is None:
        raise EvalError("video evaluation encodes the frames: pass --teacher ENCODER")
    for flag, value in (("--frames", frames), ("--resolution", resolution), ("--limit", limit),
                        ("--clip-frames", clip_frames), ("--batch-size", batch_size)):
        check_count(flag, value)
    if frames is not None and frames < 2:
        raise UsageError(f"--frames {frames}: the temporal metrics (flicker, temporal energy, excess motion) compare "
                         "successive frames, so a clip needs at least 2")


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
    baseline: str | None = None,
    tof: bool = False,
    exclude: Sequence[str] = (),
    latent_noise: float = 0.0,
    deflicker: DeflickerSettings | bool | None = None,
) -> dict[str, Any]:
    """Evaluate decoders on videos: per-frame PSNR/SSIM and frame-difference error, per-clip flicker, temporal
    energy, excess motion, optional tOF and FVD; returns the report dict.

    ``deflicker`` (settings, or True for the defaults): each decoder is also scored with its decode
    deflickered (:mod:`fastdec.runtime.deflickering`), as ``NAME+deflicker``, beside the unfiltered one.

    As for images, ``vs_baseline`` holds paired per-clip differences against ``baseline`` (default: the first).
    ``tof``: TecoGAN's tOF with scikit-image's optical flow (``VIDEO_METRIC_NOTES``); opt-in for its CPU cost.
    ``exclude``: names of videos or frame folders under ``data`` to leave out (e.g. the training clips).
    """
    _check_video_options(teacher, frames, resolution, limit, clip_frames, batch_size)
    decoders = decoder_specs(decoders)
    check_flags("evaluate_video", tof=tof)  # "no" is truthy: tOF was computed and the report said tof_enabled 'no'
    if clip_frames is not None and not fvd_extractor:  # it was dropped with no note: only FVD cuts clips
        raise UsageError("--clip-frames sets the FVD window, and no --fvd-extractor is given: add one, or drop "
                         "--clip-frames")
    check_latent_noise(latent_noise)
    steady = as_deflicker_settings(deflicker)
    if steady is not None and steady.strength == 0:  # NAME+deflicker rows would be NAME's, scored twice
        raise UsageError("deflicker strength 0 holds nothing, so each NAME+deflicker row would equal NAME's: pass "
                         "deflicker=None to score without it, or a strength in (0, 1)")
    if tof:  # a missing scikit-image is refused before any decoder is loaded or clip read
        M.optical_flow_ilk()
    base = pick_baseline(decoders, baseline, deflickered=steady is not None)
    check_device(device)
    items = list_videos(data, limit, exclude)
    with output_folder(out) as out_dir:  # a run refused before its report leaves no empty folder
        notes = Notes()
        teach = load_eval_teacher(teacher, teacher_decoder, latent_space, device)
        decs = load_decoders(decoders, teach, teach.latent_space, teach.spatial_factor, device)
        if steady is not None:
            decs += deflickered_decoders(decs, steady)
        _note_missing_reference(teach, notes)
        fvd = FrechetTracker(M.load_feature_extractor(fvd_extractor, device=device), decs) if fvd_extractor else None
        window = clip_frames or (fvd.extractor.num_frames if fvd is not None else None) or 16
        task = VideoEvaluation(
            data=data, items=items, teacher=teach, decoders=decs, space=teach.latent_space, factor=teach.spatial_factor,
            device=device, notes=notes, batch_size=batch_size,
            options={"teacher": teacher, "teacher_decoder": teacher_decoder, "tof_enabled": tof,
                     "deflicker": None if steady is None else asdict(steady)},
            frames=frames, resolution=resolution, fvd=fvd, fvd_extractor=fvd_extractor, window=window, baseline=base,
            tof=tof, latent_noise=latent_noise)
        return run_evaluation(task, out_dir)

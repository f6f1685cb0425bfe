"""Training throughput, side by side: images per second of ``fastdec train`` steps for each preset,
resolution and precision, in one run on one machine (issue 13, item 3: fp32 against ``--mixed-precision
auto``, which is bf16 autocast + channels_last on CPUs with native bf16).

Every row is a real run of the training loop: the run is built by ``fastdec.train.loop.build_run`` (teacher,
student, latent cache, AdamW, EMA, data loader, exactly as ``fastdec train`` builds it) and each timed step
is ``fastdec.train.loop.train_step`` (data loading, forward under the run's autocast, fp32 loss, backward,
clipping, AdamW, schedule, EMA). The data are real photos (``../shared/data/images/train``) encoded once
per resolution with the real TAEF2 encoder (FLUX.2 latent space). Reported: the median step time over
``--steps`` steps after ``--warmup`` untimed ones, images/s = batch / median, and auto / fp32 per row pair.

    python benchmarks/train_throughput.py                              # all image presets, 128 and 256 px
    python benchmarks/train_throughput.py --presets tae-64 --resolutions 128 --steps 3 --json tp.json
    python benchmarks/train_throughput.py --device cuda --precisions fp32 auto bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastdec.bench.measure import system_info
from fastdec.errors import FastdecError
from fastdec.io.files import write_json
from fastdec.models.registry import list_decoders
from fastdec.train.config import TrainConfig, validate_config
from fastdec.train.loop import build_run, close_logs, train_step
from fastdec.train.precision import cpu_bf16_flags

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRECISIONS = {"fp32": "no", "auto": "auto", "bf16": "bf16"}  # row label -> --mixed-precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["all"],
                   help="decoder presets, or 'all' (every image preset, tae-64 first; default)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[128, 256], help="training crop sizes (px)")
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "auto"],
                   help="fp32 (--mixed-precision no), auto, bf16; default fp32 auto")
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (oneDNN picks its kernels)")
    p.add_argument("--images", type=int, default=16, help="shared photos encoded into the latent cache")
    p.add_argument("--encoder", default=str(SHARED / "weights" / "taef2_encoder.pth"), help="teacher (TAEF2)")
    p.add_argument("--data", default=str(SHARED / "data" / "images" / "train"), help="folder of photos")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="write every row and the machine to this file")
    return p.parse_args(argv)


def presets(names: list[str]) -> list[str]:
    if names != ["all"]:
        return names
    image = list_decoders(video=False)
    return ["tae-64"] + [n for n in image if n != "tae-64"]


def photo_folder(source: Path, count: int, root: Path) -> Path:
    """A folder of links to the first ``count`` photos of ``source`` (sorted by name): the training data."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if not photos:
        sys.exit(f"no photos in {source}")
    folder = root / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    return folder


def make_config(args: argparse.Namespace, preset: str, resolution: int, precision: str, data: Path,
                root: Path, index: int) -> TrainConfig:
    """The run's options: everything ``fastdec train`` would use, minus validation, logging and checkpoints."""
    steps = args.warmup + args.steps
    return TrainConfig(
        teacher=args.encoder, decoder=preset, data=str(data), out=str(root / f"run{index}"),
        cache_dir=str(root / "cache"), resolution=resolution, batch_size=args.batch, steps=steps,
        warmup=max(1, steps // 2), crops_per_image=1, workers=0, log_every=10**6, val_every=10**6,
        ckpt_every=10**6, mixed_precision=PRECISIONS[precision], cpu=args.device == "cpu",
    )


def time_steps(run, warmup: int, steps: int) -> list[float]:
    """Seconds per ``train_step`` (the loop's own step function), after ``warmup`` untimed steps."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        train_step(run)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, config: TrainConfig) -> dict[str, Any]:
    run = build_run(validate_config(config))
    try:
        times = time_steps(run, args.warmup, args.steps)
    finally:
        close_logs(run)
    median = statistics.median(times)
    return {"precision_resolved": run.precision.to_dict(), "params": sum(p.numel() for p in run.student.parameters()),
            "step_s": times, "median_step_s": median, "images_per_s": config.batch_size / median}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's images/s over the fp32 row of the same preset and resolution."""
    base = {(r["preset"], r["resolution"]): r["images_per_s"] for r in rows
            if r["precision"] == "fp32" and "images_per_s" in r}
    for row in rows:
        reference = base.get((row["preset"], row["resolution"]))
        if reference and "images_per_s" in row:
            row["vs_fp32"] = row["images_per_s"] / reference


def print_table(rows: list[dict[str, Any]], info: dict[str, Any], batch: int) -> None:
    flags = ", ".join(info["native_bf16_flags"]) or "none"
    print(f"\ntraining throughput on {info['cpu']} ({info['torch_threads']} threads, native bf16: {flags}; "
          f"{info.get('gpu', info['device'])}), batch {batch}, torch {info['torch']}")
    print(f"{'preset':<14} {'px':>4} {'precision':<10} {'runs as':<28} {'ms/step':>9} {'img/s':>7} {'vs fp32':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<14} {r['resolution']:>4} {r['precision']:<10} skipped: {r['error']}")
            continue
        p = r["precision_resolved"]
        runs_as = f"{p['mixed_precision']} {'channels_last' if p['channels_last'] else 'NCHW'}"
        ratio = f"{r['vs_fp32']:.2f}x" if "vs_fp32" in r else "—"
        print(f"{r['preset']:<14} {r['resolution']:>4} {r['precision']:<10} {runs_as:<28} "
              f"{r['median_step_s'] * 1000:>9.1f} {r['images_per_s']:>7.2f} {ratio:>8}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastdec-throughput-") as tmp:
        root = Path(tmp)
        data = photo_folder(Path(args.data), args.images, root)
        for preset in presets(args.presets):
            for resolution in args.resolutions:
                for precision in args.precisions:
                    row: dict[str, Any] = {"preset": preset, "resolution": resolution, "precision": precision}
                    try:
                        row |= measure(args, make_config(args, preset, resolution, precision, data, root, len(rows)))
                    except FastdecError as e:  # a preset that does not fit the latent space, say: the rest go on
                        row["error"] = str(e)
                    rows.append(row)
    add_ratios(rows)
    info = {**system_info(args.device), "native_bf16_flags": list(cpu_bf16_flags())}
    print_table(rows, info, args.batch)
    if args.json:
        write_json(args.json, {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "rows": rows})
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

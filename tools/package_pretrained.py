"""Package a training run as one of fastdec's pretrained decoders, with its model card.

    python tools/package_pretrained.py flux2-hifi --run runs/flux2-hifi --started-from TAEF2 \
        [--eval EVAL/report.json --eval-name flux2-hifi --bench BENCH.json --bench-name flux2-hifi]

writes ``src/fastdec/pretrained/<name>.safetensors``: the run's (EMA) weights in fp16, and the model card as
JSON in the file's ``model_card`` metadata. Run it once to get the file that is evaluated and benchmarked (so
the figures are of the shipped fp16 weights), then again with ``--eval``/``--bench`` to put those figures in
the card. ``--cards`` regenerates ``MODEL_CARDS.md`` from the cards of every shipped file.

A maintainer's tool: it is not installed with the package.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import fastdec
from fastdec.bench.measure import count_flops, cpu_name
from fastdec.pretrained import PRETRAINED

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fastdec" / "pretrained"
METRICS = ("psnr", "ssim", "ms_ssim", "vif", "gradient_energy")
DATA = [
    {"name": "BSDS500 train (400 photos)", "licence": "research use (Berkeley Segmentation Dataset terms)",
     "used_for": "training"},
    {"name": "BSDS500 val (100 photos)", "licence": "research use", "used_for": "validation and evaluation only"},
]
VIDEO_DATA = [
    {"name": "SAM 2 demo gallery clips 01_dog, 03_blocks, 05_default_juggle (1280x720)",
     "licence": "Apache-2.0 (facebookresearch/sam2 repository)", "used_for": "training"},
    {"name": "imageio test clip realshort.mp4", "licence": "BSD-2 (imageio project)", "used_for": "training"},
    {"name": "DAVIS 2017 'tennis' (70 frames)", "licence": "research use", "used_for": "training"},
    {"name": "held out: SAM 2 02_cups, 04_coffee; imageio cockatoo", "licence": "Apache-2.0; BSD-2",
     "used_for": "evaluation only (fastdec eval video --exclude the training clips)"},
]
LATENTS_NOTE = ("Latents come from TAEF2's encoder (taef2_encoder.pth), a stand-in for the FLUX.2 VAE's own "
                "encoder: TAEF2 was trained to match the FLUX.2 VAE latent space, but the real VAE's latents differ "
                "somewhat. With the real FLUX.2 VAE, fine-tune on its latents: fastdec train --teacher "
                "<FLUX.2 VAE folder or file> --init {name} --decoder {preset} --data <photos> --out <run> "
                "(the YAML's other settings are a good start).")


def gflops_at_512(decoder: fastdec.LatentDecoder) -> float:
    """Per 512x512 image (per frame for a video decoder: one frame of one clip)."""
    side = 512 // decoder.upsample_factor
    z = torch.zeros(1, 1, decoder.latent_channels, side, side) if decoder.is_video else \
        torch.zeros(1, decoder.latent_channels, side, side)
    with torch.no_grad():
        return count_flops(lambda: decoder.float()(z)) / 1e9


def training_facts(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Steps, wall time and settings of a run folder (``config``: its config.json), from what the trainer wrote."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    # config.json is written when the run starts and decoder.safetensors when it ends: the wall time between
    # them includes encoding the latent cache (when it was not cached yet) and validation
    wall_s = (run / "decoder.safetensors").stat().st_mtime - (run / "config.json").stat().st_mtime
    curve = [{"step": int(r["step"]), "val_psnr": float(r["val_psnr"])} for r in rows if r.get("val_psnr")]
    precision = config.get("precision", {})
    return {
        "steps": config["steps"], "batch_size": config["batch_size"], "resolution": config["resolution"],
        "wall_time_min": round(wall_s / 60, 1),
        # the runs were made on the machine that packages them (fastdec's 2-core dev CPU), with torch's default
        # of one thread per core
        "hardware": f"{cpu_name()}, {os.cpu_count()} logical CPUs, no GPU",
        "precision": f"{precision.get('mixed_precision', 'fp32')} autocast"
                     f"{', channels_last' if precision.get('channels_last') else ''}",
        "losses": {k: config[k] for k in ("l1", "mse", "ms_ssim", "lpips", "teacher_weight", "temporal", "adversarial")
                   if config.get(k)},
        "lr": config.get("lr"), **({"temporal_lr": config["temporal_lr"]} if config.get("temporal_lr") else {}),
        **({"short_side": config["short_side"]} if config.get("short_side") else {}),
        **({"latent_noise": config["latent_noise"]} if config.get("latent_noise") else {}),
        **({"clips": {"frames": config["frames"], "max_frame_stride": config.get("max_frame_stride", 1)}}
           if config.get("frames") else {}),
        "validation_curve": curve,
    }


def eval_facts(report_path: Path, name: str) -> dict[str, Any]:
    """The decoder's metrics and its paired differences against the run's baseline (TAEF2)."""
    report = json.loads(report_path.read_text())
    entry = report["decoders"][name]
    versus = entry.get("vs_baseline", {})
    return {
        "set": f"BSDS500 val, {report['count']} photos, full frames ({report['settings'].get('crop')})",
        "confidence": "95% Student t over images; differences are paired (same images, same run)",
        "metrics": {m: entry["metrics"]["original"][m] for m in METRICS if m in entry["metrics"]["original"]},
        "baseline": versus.get("baseline"),
        "vs_baseline": {m: versus["original"][m] for m in METRICS if m in versus.get("original", {})},
    }


def bench_facts(bench_paths: list[Path], name: str, baseline: str) -> list[dict[str, Any]]:
    """Median ms per 512 px image of the decoder and of the baseline, from each bench run (one per setting)."""
    readings = []
    for path in bench_paths:
        result = json.loads(path.read_text())
        rows = [r for r in result["rows"] if r.get("size") == 512 and r.get("median_s")]
        ours = [r for r in rows if r["name"] == name]
        theirs = [r for r in rows if r["name"] == baseline]
        if not ours or not theirs:
            names = sorted({r["name"] for r in rows})
            raise SystemExit(f"{path}: no 512 px rows for '{name}' and '{baseline}' (rows: {names})")
        for row in ours:
            ref = next(r for r in theirs if (r["backend"], r["dtype"]) == (row["backend"], row["dtype"]))
            readings.append({"setting": describe_setting(result, row), "ms": round(row["per_image_s"] * 1e3, 1),
                             "baseline_ms": round(ref["per_image_s"] * 1e3, 1),
                             "speedup": round(ref["per_image_s"] / row["per_image_s"], 2)})
    return readings


def describe_setting(result: dict, row: dict) -> str:
    """e.g. 'fp32 eager, 512 px, batch 1, 2 threads' (the bench's backend names the memory layout)."""
    threads = result.get("settings", {}).get("threads")
    return f"{row['dtype']} {row['backend']}, {row['size']} px, batch {row['batch']}, {threads} threads"


def read_card(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["model_card"])


def package(args: argparse.Namespace) -> Path:
    run = Path(args.run)
    decoder = fastdec.load_decoder(run / "decoder.safetensors")
    config = json.loads((run / "config.json").read_text())
    entry = PRETRAINED.get(args.name)
    card = {
        "name": args.name,
        "description": entry.description if entry else "",
        "architecture": f"{decoder.architecture} {decoder.config_dict()}",
        "started_from": args.started_from,
        "config": f"{args.name}.yaml (fastdec train --config src/fastdec/pretrained/{args.name}.yaml)",
        "params": sum(p.numel() for p in decoder.parameters()),
        "gflops_512": round(gflops_at_512(decoder), 1),
        "weights": "fp16 safetensors (EMA of the trained weights)",
        "data": VIDEO_DATA if decoder.is_video else DATA,
        "latents": LATENTS_NOTE.format(name=args.name, preset=config["decoder"]),
        "training": training_facts(run, config),
        "trades": args.trades or "",
    }
    if config.get("exclude"):
        card["held_out"] = config["exclude"].split(",")
    if args.eval:
        card["evaluation"] = eval_facts(Path(args.eval), args.eval_name or args.name)
    if args.bench:
        card["speed"] = bench_facts([Path(p) for p in args.bench], args.bench_name or args.name, args.bench_baseline)
    path = PACKAGE / f"{args.name}.safetensors"
    fastdec.save_decoder(decoder.half(), path, extra_metadata={"model_card": json.dumps(card)})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def _ci(entry: dict, decimals: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{entry['mean']:{sign}.{decimals}f} [{entry['ci_low']:{sign}.{decimals}f}, "
            f"{entry['ci_high']:{sign}.{decimals}f}]")


DECIMALS = {"psnr": 2, "ssim": 4, "ms_ssim": 4, "vif": 4, "gradient_energy": 3}


def render_card(card: dict[str, Any]) -> str:
    """One decoder's section of MODEL_CARDS.md."""
    t, e = card["training"], card.get("evaluation", {})
    lines = [f"## {card['name']}", "", card["description"], "",
             f"- **Architecture:** {card['architecture']}; {card['params']:,} parameters, "
             f"{card['gflops_512']} GFLOPs per 512x512 image",
             f"- **Started from:** {card['started_from']}",
             f"- **Config:** `{card['config']}`",
             f"- **Training:** {t['steps']} steps, batch {t['batch_size']}, {t['resolution']} px crops{_clips(t)}"
             f"{_inputs_note(t)}, losses {t['losses']}{_rates(t)}, {t['precision']}; {t['wall_time_min']} min on "
             f"{t['hardware']}",
             "- **Data:** " + "; ".join(f"{d['name']} ({d['licence']}; {d['used_for']})" for d in card["data"]),
             f"- **Latents:** {card['latents']}",
             f"- **Weights:** {card['weights']}"]
    if card.get("trades"):
        lines.append(f"- **What it trades:** {card['trades']}")
    if e:
        lines += ["", f"Evaluation: {e['set']}; {e['confidence']}.", "",
                  "| metric | " + card["name"] + " | difference vs TAEF2 |", "|---|---|---|"]
        for metric, entry in e["metrics"].items():
            diff = e["vs_baseline"].get(metric)
            d = DECIMALS.get(metric, 4)
            lines.append(f"| {metric} | {_ci(entry, d)} | {_ci(diff, d, signed=True) if diff else '—'} |")
    if card.get("speed"):
        lines += ["", "| setting | ms per 512 px image | TAEF2 ms | speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['ms']} | {r['baseline_ms']} | {r['speedup']}x |" for r in card["speed"]]
    curve = ", ".join(f"{p['step']}: {p['val_psnr']:.2f}" for p in t["validation_curve"])
    if curve:  # the video runs had no --val set: their held-out clips are scored by fastdec eval video
        lines += ["", f"Validation PSNR (16 BSDS val centre crops, {t['resolution']} px) by step: {curve}"]
    return "\n".join([*lines, ""])


def _inputs_note(training: dict[str, Any]) -> str:
    side, noise = training.get("short_side"), training.get("latent_noise")
    return (f" of files resized to a {side} px short side" if side else "") + \
        (f", latents + noise of std up to {noise:g}" if noise else "")


def _rates(training: dict[str, Any]) -> str:
    if training.get("lr") is None:  # cards packaged before the rates were recorded
        return ""
    temporal = training.get("temporal_lr")
    return f", lr {training['lr']:g}" + (f" (temporal layers {temporal:g})" if temporal else "")


def _clips(training: dict[str, Any]) -> str:
    clips = training.get("clips")
    if not clips:
        return ""
    stride = clips["max_frame_stride"]
    return f" of {clips['frames']}-frame clips ({'stride 1' if stride == 1 else f'random stride 1-{stride}'})"


def write_cards(grid: str | None) -> Path:
    names = sorted(n for n in PRETRAINED if (PACKAGE / PRETRAINED[n].file).is_file())
    header = ["# fastdec's pretrained decoders: model cards", "",
              "Generated by `tools/package_pretrained.py --cards` from the cards stored in each weights file "
              "(`fastdec pretrained --card NAME` prints one). All figures are of the shipped fp16 files; "
              "differences against TAEF2 are paired over the same photos in the same eval run.", "",
              "**Licence:** the weights are MIT, like fastdec. Each derives from TAEF2 (madebyollin/taesd, MIT, "
              "Copyright (c) 2023 Ollin Boer Bohan), whose notice is in `LICENSE.taesd` beside them. The training "
              "data's terms are in each card.", "",
              "**Configs:** each card's YAML is shipped beside its weights (`fastdec/pretrained/` in an installed "
              "package). Its data paths (`../shared/...`) are those of the machine that trained it: point them at "
              "your own data.", ""]
    if grid:
        header += [f"![crops]({grid})", "", "Full-resolution crops: original, TAEF2, the three, the plain-L1 "
                   "blur reference, and each one's error x4.", ""]
    text = "\n".join(header + [render_card(read_card(PACKAGE / PRETRAINED[n].file)) for n in names])
    path = PACKAGE / "MODEL_CARDS.md"
    path.write_text(text)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--cards":
        write_cards(argv[1] if len(argv) > 1 else None)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--run", required=True, help="the training run folder")
    parser.add_argument("--started-from", required=True, help="what --init was, in words")
    parser.add_argument("--trades", help="what this decoder gives up, in words (softer than TAEF2, ...)")
    parser.add_argument("--eval", help="fastdec eval images report.json with this decoder and TAEF2")
    parser.add_argument("--eval-name", help="the decoder's name in that report (default: NAME)")
    parser.add_argument("--bench", nargs="+", help="fastdec bench --json files, one per setting")
    parser.add_argument("--bench-name", help="the decoder's row name in the bench JSON (default: NAME)")
    parser.add_argument("--bench-baseline", default="taef2", help="TAEF2's row name in the bench JSON")
    package(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

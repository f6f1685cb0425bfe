"""What the flicker scripts share: their command-line arguments, and the clips ``fastdec eval video`` scores,
decoded as it decodes them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import torch


def clip_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="folder of videos")
    p.add_argument("--clips", default=None, help="comma-separated video names to use (default: all)")
    p.add_argument("--teacher", required=True, help="encoder that makes the latents (frame by frame)")
    p.add_argument("--decoder", action="append", required=True, help="decoder name or file (repeatable)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--latent-noise", type=float, default=0.0, metavar="STD",
                   help="jitter the latents as `fastdec eval video --latent-noise` does (the same noise per clip)")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def decoded_clips(args: argparse.Namespace, script: str) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    """Per clip: its file name, the original (T, 3, H, W) in [0, 1] and each ``--decoder``'s decode of the
    teacher's frame-by-frame latents (plus ``--latent-noise``), computed under ``torch.inference_mode``."""
    import fastdec
    from fastdec.eval.run import (EvalDecoder, check_latent_noise, decode_frames, jitter_latents, list_videos,
                                  load_clip, load_eval_teacher)

    check_latent_noise(args.latent_noise)
    wanted = set(args.clips.split(",")) if args.clips else None
    videos = [v for v in list_videos(args.data) if wanted is None or v.name in wanted]
    if not videos:
        raise SystemExit(f"{script}: error: no videos in '{args.data}' match --clips {args.clips}")
    teacher = load_eval_teacher(args.teacher)
    decoders = []
    for name in args.decoder:
        decoder = fastdec.load_decoder(name).float().eval()
        decoders.append(EvalDecoder(name, name, decoder, decoder.is_video))
    for video in videos:
        with torch.inference_mode():
            original = load_clip(video, args.frames, args.resolution, teacher.spatial_factor)
            z = jitter_latents(teacher.encode(original), args.latent_noise, video.name)
            decoded = {dec.name: decode_frames(dec, z, batch=4) for dec in decoders}
        yield video.name, original, decoded


def write_rows(rows: list[dict], path: str | None) -> None:
    if path:
        from fastdec.io.files import atomic_write

        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))

"""Side-by-side full-resolution crops: original | each decoder | each decoder's error x4.

    python benchmarks/crop_grid.py --data ../shared/data/images/val --teacher ../shared/weights/taef2_encoder.pth \
        --decoder TAEF2=../shared/weights/taef2_decoder.pth --decoder flux2-hifi ... --out grid.png

Each row is one photo: a crop at full resolution (no resampling, so blur and ringing show as they are), the
decoders in the order given, then |decoded - original| x4 for each (black: exact). A table of means hides
where a decoder is softer; this shows it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import fastdec
from fastdec.io.files import atomic_write
from fastdec.io.images import list_images, load_image, to_uint8

LABEL_HEIGHT = 18


def crop_box(height: int, width: int, size: int, factor: int) -> tuple[int, int]:
    """Top-left corner of a centred ``size`` crop, on the latent grid (so the crop's latents are exact)."""
    top = max(0, (height - size) // 2) // factor * factor
    left = max(0, (width - size) // 2) // factor * factor
    return top, left


def decode_crops(photo: Path, encoder, decoders: dict, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The original crop and each decoder's decode of the crop's latents (full frame encoded, then cropped in
    latent space: the decoders see what they see in a pipeline, not a border-padded crop)."""
    image = load_image(photo)
    factor = encoder.downsample_factor
    h, w = image.shape[-2] // factor * factor, image.shape[-1] // factor * factor
    image = image[..., :h, :w]
    with torch.no_grad():
        z = encoder(image)
        top, left = crop_box(h, w, size, factor)
        # a margin of 4 latents around the crop keeps the decoders' receptive field inside real content
        m = 4
        zt, zl = max(0, top // factor - m), max(0, left // factor - m)
        zc = z[..., zt: (top + size) // factor + m, zl: (left + size) // factor + m]
        dy, dx = top - zt * factor, left - zl * factor
        decoded = {name: d(zc)[..., dy: dy + size, dx: dx + size] for name, d in decoders.items()}
    return image[..., top: top + size, left: left + size], decoded


def tile(images: list[torch.Tensor], labels: list[str]) -> Image.Image:
    size = images[0].shape[-1]
    canvas = Image.new("RGB", (size * len(images), size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        canvas.paste(Image.fromarray(to_uint8(img[0])), (i * size, LABEL_HEIGHT))
        draw.text((i * size + 3, 3), label, fill="black")
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder of photos")
    parser.add_argument("--teacher", required=True, help="encoder giving the latents")
    parser.add_argument("--decoder", action="append", required=True, metavar="[LABEL=]SPEC",
                        help="decoder (repeatable): a path or pretrained name, optionally labelled")
    parser.add_argument("--photos", type=int, default=3, help="rows (photos, sorted by name, evenly spaced)")
    parser.add_argument("--size", type=int, default=160, help="crop side in pixels (default 160)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    encoder = fastdec.load_encoder(args.teacher).eval()
    decoders = {}
    for spec in args.decoder:
        label, _, source = spec.rpartition("=")
        decoders[label or Path(source).stem] = fastdec.load_decoder(source, latent_space=encoder.latent_space).eval()
    photos = list_images(Path(args.data))
    picked = [photos[i] for i in np.linspace(0, len(photos) - 1, args.photos).round().astype(int)]
    rows = []
    for photo in picked:
        original, decoded = decode_crops(photo, encoder, decoders, args.size)
        errors = [((d - original).abs() * 4).clamp(0, 1) for d in decoded.values()]
        rows.append(tile([original, *decoded.values(), *errors],
                         [f"original {photo.name}", *decoded, *(f"{n} error x4" for n in decoded)]))
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * row.height))
    atomic_write(Path(args.out), lambda tmp: grid.save(tmp, format="PNG"), suffix=".png")
    print(f"wrote {args.out}: {len(rows)} photos x {len(decoders)} decoders, {args.size} px crops")
    return 0


if __name__ == "__main__":
    sys.exit(main())

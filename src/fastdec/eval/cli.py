"""``fastdec eval images|video``: the argument definitions; each command is one call of :mod:`fastdec.eval.run`."""
from __future__ import annotations

import argparse
import sys

from ..runtime.deflickering import add_deflicker_arguments, deflicker_from_args
from .report import print_summary
from .run import evaluate_images, evaluate_video


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of originals")
    p.add_argument("--teacher", help="teacher encoder: TAESD-family .pth, or a diffusers VAE folder/file/hub id")
    p.add_argument("--teacher-decoder", help="the teacher's decoder .pth, for a TAESD-family encoder")
    p.add_argument("--decoder", action="append", default=[], metavar="SPEC",
                   help="decoder to evaluate (repeatable): a checkpoint file or folder, a pretrained name, a hub id, "
                        "or 'teacher' for the teacher's own decoder")
    p.add_argument("--baseline", metavar="NAME",
                   help="report name of the decoder the others are compared with (paired per-input differences "
                        "with 95%% t-intervals; default: the first --decoder)")
    p.add_argument("--latent-space", help="latent space preset when files cannot tell (sd15, sdxl, flux2, ...)")
    p.add_argument("--out", help="report folder: report.json, report.md, CSV and PNGs")
    p.add_argument("--limit", type=int, help="evaluate only the first N (sorted by name; N >= 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent-noise", type=float, default=0.0, metavar="STD",
                   help="decode latents plus Gaussian noise of this std (diffusion-space units; latents have std ~1), "
                        "independent per frame and element and seeded by the input's name, the same for every "
                        "decoder: how each copes with latents that jitter from frame to frame, as generated ones do "
                        "(default 0: the encoder's latents)")


def _cmd_images(args: argparse.Namespace) -> int:
    report = evaluate_images(
        data=args.data, decoders=args.decoder, out=args.out, teacher=args.teacher,
        teacher_decoder=args.teacher_decoder, latents=args.latents, latent_space=args.latent_space,
        resolution=args.resolution, limit=args.limit, lpips_weights=args.lpips_weights, lpips_net=args.lpips_net,
        fid_weights=args.fid_weights, grid=args.grid, device=args.device, baseline=args.baseline,
        latent_noise=args.latent_noise)
    print_summary(report, args.out)
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    report = evaluate_video(
        data=args.data, decoders=args.decoder, out=args.out, teacher=args.teacher,
        teacher_decoder=args.teacher_decoder, latent_space=args.latent_space, frames=args.frames,
        resolution=args.resolution, limit=args.limit, fvd_extractor=args.fvd_extractor,
        clip_frames=args.clip_frames, batch_size=args.batch_size, device=args.device, baseline=args.baseline,
        tof=args.tof, exclude=(args.exclude or "").split(","), latent_noise=args.latent_noise,
        deflicker=deflicker_from_args(args))
    print_summary(report, args.out)
    return 0


def _add_images(kinds) -> None:
    images = kinds.add_parser("images",
                              help="PSNR/SSIM/MS-SSIM/VIF/gradient energy/LPIPS(/FID) on a folder of images",
                              description="Encode (or read latents), decode with each --decoder, compare with the "
                                          "originals and the teacher's decode: PSNR, SSIM, MS-SSIM, VIF (VIF-P, "
                                          "torchmetrics, in 8-bit units), the gradient-energy ratio (Sobel; < 1 = "
                                          "blurrier than the reference), LPIPS and FID when their weights are given. "
                                          "Means with 95% t-intervals. Unreadable images are skipped with a "
                                          "warning and counted.")
    _common_arguments(images)
    images.add_argument("--latents", help="folder of precomputed decoder-space latents named like the images "
                                          "(.safetensors/.pt/.pth/.npy) instead of encoding")
    images.add_argument("--resolution", type=int,
                        help="centre crop R x R (default: full frame cropped to multiples of the factor)")
    images.add_argument("--lpips-weights", help="local torchvision backbone state dict for LPIPS (alexnet-owt-7be5be79.pth)")
    images.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    images.add_argument("--fid-weights", help="local TorchScript Inception (inception-2015-12-05.pt) to compute FID; TorchScript "
                        "runs as code, so pass only the released file or one you trust")
    images.add_argument("--grid", type=int, default=4, help="images in grid.png (0: none)")
    images.set_defaults(func=_cmd_images)


def _add_video(kinds) -> None:
    video = kinds.add_parser("video", help="per-frame PSNR/SSIM, flicker, temporal metrics (tOF) and FVD on videos",
                             description="Encode the first --frames frames of each video, decode each frame with "
                                         "each --decoder (video decoders: the whole clip), compare with the originals: "
                                         "PSNR, SSIM, per-frame frame-difference error, and per clip flicker, "
                                         "temporal energy (decoded / original frame-to-frame change), excess motion, "
                                         "optionally TecoGAN's tOF and FVD. Means with 95% t-intervals.")
    _common_arguments(video)
    video.add_argument("--frames", type=int, default=32, help="first N frames of each video, at least 2 (default 32)")
    video.add_argument("--resolution", type=int,
                       help="resize so the short side is R px (antialiased), then centre crop R x R "
                            "(default: full frames cropped to multiples of the factor)")
    video.add_argument("--fvd-extractor", help="features for FVD: videomae:DIR (VideoMAEModel folder), i3d:FILE.pt (TorchScript, "
                       "which runs as code: pass only the released file or one you trust)")
    video.add_argument("--clip-frames", type=int, help="frames per FVD clip (default: the extractor's, else 16)")
    video.add_argument("--batch-size", type=int, default=4, help="frames per encode/decode call")
    video.add_argument("--tof", action="store_true",
                       help="also TecoGAN's tOF: distance between the decoded and original optical flows (pixels), "
                            "scikit-image's optical_flow_ilk per frame pair; costs CPU time, needs scikit-image")
    video.add_argument("--exclude", metavar="NAMES",
                       help="comma-separated videos or frame folders under --data to leave out (e.g. the clips a "
                            "decoder was trained on, so only held-out clips are scored)")
    add_deflicker_arguments(video, help="also score every decoder with its decode deflickered (NAME+deflicker), "
                                        "beside the unfiltered decode: see fastdec.runtime.deflickering")
    video.set_defaults(func=_cmd_video)


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="fidelity metrics and reports for decoders (images, video)")
    kinds = parser.add_subparsers(dest="eval_kind", metavar="KIND")
    # `fastdec eval` alone names no kind: show what there is, as a usage error
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
    _add_images(kinds)
    _add_video(kinds)

"""What a live preview costs next to a sampling step.

One SDXL-base denoising step (UNet with classifier-free guidance, batch 2, random
weights: speed does not depend on the values) against one ``PreviewCallback``
call (fast decode + copy to the CPU + PIL conversion) on the same latents.
The target in issue 3: a tae-64 preview every step costs < 5% of a step at
1024 px on a GPU.

    python benchmarks/preview_cost.py --device cuda --dtype fp16 --size 1024
    python benchmarks/preview_cost.py --device cuda --every 5 --json preview_cost.json

``--unet-config`` takes another UNet2DConditionModel ``config.json`` (an SD1.5 or
SDXL-like UNet); the built-in one is stabilityai/stable-diffusion-xl-base-1.0's
unet/config.json, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastdec.bench.measure import system_info, time_callable
from fastdec.dtypes import DTYPES, add_dtype_argument
from fastdec.io.files import write_json
from fastdec.pipelines import PreviewCallback
from fastdec.resolve import resolve_decoder

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (architecture fields)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}


def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # initialise on the device: the SDXL UNet is 2.6B parameters
        unet = UNet2DConditionModel(**config)
    return torch.nn.Module.to(unet, dtype=dtype).eval()  # ModelMixin.to warns spuriously on dtype casts


def step_inputs(unet, batch: int, latent_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = unet.config
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    inputs = {
        "sample": randn(batch, cfg.in_channels, latent_size, latent_size),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, 77, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": randn(batch, 6)}
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dtype_argument(parser, default="fp16")
    parser.add_argument("--size", type=int, default=1024, help="image size in pixels (square)")
    parser.add_argument("--decoder", default="tae-64",
                        help="preset (random weights), checkpoint, pretrained name or Hub id (default tae-64)")
    parser.add_argument("--space", default=None, help="latent space presets are built for (default sdxl)")
    parser.add_argument("--unet-config", type=Path, help="UNet2DConditionModel config.json (default: SDXL base)")
    parser.add_argument("--every", type=int, default=1, help="preview every k steps (amortised cost)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu" and args.size >= 512:
        print("note: a full-size UNet step on the CPU takes minutes; this benchmark is meant for a GPU", file=sys.stderr)
    # speed does not depend on the weights: a preset is built with random ones
    decoder = resolve_decoder(args.decoder, args.space, device=device, dtype=dtype, random_weights=True).eval()
    factor = decoder.latent_space.spatial_factor
    latent_size = args.size // factor

    config = json.loads(args.unet_config.read_text()) if args.unet_config else SDXL_UNET
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = build_unet(config, device, dtype)
    inputs = step_inputs(unet, 2, latent_size, device, dtype)  # batch 2: classifier-free guidance
    latents = inputs["sample"][:1]
    preview = PreviewCallback(decoder, every=1, on_preview=lambda step, images: None)

    step = time_callable(lambda: unet(**inputs), warmup=args.warmup, repeats=args.repeats, device=device)
    decode = time_callable(lambda: decoder(latents), warmup=args.warmup, repeats=args.repeats, device=device)
    full = time_callable(lambda: preview(None, 0, 0, {"latents": latents}), warmup=args.warmup,
                         repeats=args.repeats, device=device)

    ratio = full.median_s / step.median_s
    result = {
        "system": system_info(device, args.dtype),
        "size": args.size, "decoder": args.decoder, "space": decoder.latent_space.name, "every": args.every,
        "unet": "sdxl-base" if args.unet_config is None else str(args.unet_config),
        "step_ms": step.median_s * 1e3, "decode_ms": decode.median_s * 1e3, "preview_ms": full.median_s * 1e3,
        "preview_over_step": ratio, "amortised_over_step": ratio / args.every,
        "repeats": args.repeats, "warmup": args.warmup,
    }
    print(f"{args.size}px {args.dtype} on {result['system'].get('gpu', result['system']['cpu'])}")
    print(f"  UNet step (CFG, batch 2): {result['step_ms']:8.2f} ms (median of {args.repeats})")
    print(f"  {args.decoder} decode:       {result['decode_ms']:8.2f} ms")
    print(f"  full preview (+PIL):      {result['preview_ms']:8.2f} ms")
    print(f"  preview / step:           {100 * ratio:8.2f} %  (every {args.every}: "
          f"{100 * result['amortised_over_step']:.2f} % per step)")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fastdec bench --pipeline``: what a fast decoder changes for a whole diffusers pipeline run.

The same SDXL pipeline (same seed, same steps, same denoised latents) runs with its
own VAE decoder and then with each fast decoder swapped in (``fastdec.swap_decoder``).
Each run is timed end to end, and ``vae.decode`` separately (wrapped with a timer),
giving the overall speed-up and the decoder's share of the total.

Pipelines are built from configs with random weights, offline (timing does not depend
on the weights; tokenizers are small local vocabularies, prompts are padded to the
tokenizer's length as usual):

* ``--pipeline-config tiny`` (the default on CPU): a narrow SDXL-structured UNet and
  small text encoders, but the real SDXL VAE architecture. The decoder's share is
  therefore much larger than in real SDXL: illustrative only.
* ``--pipeline-config real`` (the default on CUDA): the published SDXL-base UNet, CLIP-L /
  OpenCLIP-bigG text encoder and VAE configs: representative numbers (needs a GPU).
"""
from __future__ import annotations

import argparse
import hashlib
import string
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .bench import SDXL_VAE_CONFIG, BenchError, synchronize, system_info, write_json

DEFAULT_PIPELINE_DECODERS = ("tae-64", "tae-192")
_LETTERS = string.ascii_lowercase
PROMPT = "a photo of an astronaut riding a horse"

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14) configs of the same repository
SDXL_TEXT_ENCODERS: tuple[dict[str, Any], dict[str, Any]] = (
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
     "projection_dim": 768, "hidden_act": "quick_gelu"},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
     "projection_dim": 1280, "hidden_act": "gelu"},
)
# CPU stand-in: SDXL's block structure and conditioning at a width that runs in seconds
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG, "layers_per_block": 1, "block_out_channels": (32, 64, 64), "attention_head_dim": (2, 4, 4),
    "transformer_layers_per_block": (1, 1, 1), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "norm_num_groups": 16,
}
TINY_TEXT_ENCODERS = (
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
)


# ----------------------------------------------------------------------------- building the pipeline offline
def _tokenizer():
    """A CLIP tokenizer over single letters: no download, and prompts still pad to 77 tokens as in SDXL."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in _LETTERS:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(config: dict[str, Any], vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **config))


def build_sdxl_pipeline(config: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """An SDXL pipeline with random weights: ``tiny`` (CPU stand-in, real VAE) or ``real`` (published configs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if config not in ("tiny", "real"):
        raise BenchError(f"--pipeline-config must be 'tiny' or 'real', got '{config}'")
    unet_config, encoders = (TINY_UNET_CONFIG, TINY_TEXT_ENCODERS) if config == "tiny" else (SDXL_UNET_CONFIG, SDXL_TEXT_ENCODERS)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE_CONFIG),
        text_encoder=_text_encoder(encoders[0], len(tokenizer), with_projection=False), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(encoders[1], len(tokenizer_2), with_projection=True), tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**unet_config), scheduler=EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # built in float32; a no-op cast would only make diffusers warn about keeping modules in float32
    return pipe.to(device=device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- timing
class DecodeTimer:
    """Wraps ``pipe.vae.decode`` (whatever VAE is in place) to time it and fingerprint the latents it receives."""

    def __init__(self, device: str | torch.device):
        self.device = device
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # process CPU time (all threads), a second view on a shared host
        self.latent_digests: list[str] = []
        self.nonfinite_latents = False

    def install(self, vae: Any) -> None:
        original: Callable = vae.decode

        def timed_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.latent_digests.append(hashlib.sha256(z.detach().float().cpu().numpy().tobytes()).hexdigest()[:16])
            if not torch.isfinite(z).all():
                # random weights in fp16 can overflow; fast decoders refuse NaN latents, so every row gets the
                # same cleaned latents (outside the timed region) and the result says so
                self.nonfinite_latents = True
                z = torch.nan_to_num(z, nan=0.0, posinf=1e3, neginf=-1e3)
            synchronize(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = original(z, *args, **kwargs)
            synchronize(self.device)
            self.seconds.append(time.perf_counter() - start)
            self.cpu_seconds.append(time.process_time() - cpu_start)
            return out

        vae.decode = timed_decode  # instance attribute: the class and other pipelines are untouched

    def remove(self, vae: Any) -> None:
        vae.__dict__.pop("decode", None)


def time_pipeline(pipe: Any, size: int, steps: int, seed: int, warmup: int, repeats: int, device: str) -> dict[str, Any]:
    """Median end-to-end and decode seconds of ``repeats`` runs (after ``warmup``), same seed every run."""
    timer = DecodeTimer(device)
    timer.install(pipe.vae)
    totals: list[float] = []
    cpu_totals: list[float] = []
    try:
        with torch.inference_mode():
            for run in range(warmup + repeats):
                generator = torch.Generator("cpu").manual_seed(seed)
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                image = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator,
                             output_type="pil").images[0]
                synchronize(device)
                if run >= warmup:
                    totals.append(time.perf_counter() - start)
                    cpu_totals.append(time.process_time() - cpu_start)
    finally:
        timer.remove(pipe.vae)
    if len(timer.seconds) != warmup + repeats:
        raise RuntimeError(f"vae.decode ran {len(timer.seconds)} times in {warmup + repeats} pipeline runs")
    decodes = timer.seconds[warmup:]
    return {
        "total_s": float(np.median(totals)), "decode_s": float(np.median(decodes)),
        "total_runs_s": totals, "decode_runs_s": decodes, "image_size": list(image.size),
        "total_cpu_s": float(np.median(cpu_totals)), "decode_cpu_s": float(np.median(timer.cpu_seconds[warmup:])),
        "latent_digest": timer.latent_digests[-1], "same_latents_every_run": len(set(timer.latent_digests)) == 1,
        "nonfinite_latents": timer.nonfinite_latents,
    }


# ----------------------------------------------------------------------------- the command
def _decoders(names: list[str] | None) -> list[tuple[str, Any]]:
    from .checkpoints import load_decoder
    from .models import create_decoder, list_decoders

    out = []
    requested = names or list(DEFAULT_PIPELINE_DECODERS)
    if "all" in requested:
        requested = [n for n in requested if n != "all"] + list_decoders(video=False)
    for name in dict.fromkeys(requested):
        if Path(name).is_file():
            out.append((Path(name).stem, load_decoder(name, latent_space="sdxl")))
        elif name in list_decoders(video=False):
            out.append((name, create_decoder(name, "sdxl")))
        else:
            raise BenchError(f"unknown decoder '{name}': pass presets ({', '.join(list_decoders(video=False))}) "
                             "or .safetensors checkpoints for the SDXL latent space")
    return out


def _swap(pipe: Any, decoder: Any) -> tuple[Callable, str]:
    """Swap the decoder in; the restore function; how it was done."""
    from .pipelines import restore_decoder, swap_decoder

    swap_decoder(pipe, decoder)
    return restore_decoder, "fastdec.swap_decoder"


def run_pipeline_bench(args: argparse.Namespace) -> int:
    """``fastdec bench --pipeline``: original VAE decoder vs each fast decoder, whole pipeline runs."""
    from rich.console import Console

    console = Console(file=sys.stdout, width=140)
    device = args.device or "cpu"
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available; use --device cpu")
        config = args.pipeline_config or ("real" if torch.device(device).type == "cuda" else "tiny")
        if config == "real" and torch.device(device).type != "cuda":
            raise BenchError("--pipeline-config real builds the 2.6B-parameter SDXL UNet: it needs --device cuda "
                             "(on CPU use the default tiny stand-in)")
        # 128 px keeps the CPU run near a minute (the SDXL VAE decoder dominates it)
        sizes = args.sizes or ([1024] if config == "real" else [128])
        steps = args.steps or (30 if config == "real" else 10)
        repeats = args.repeats if args.repeats is not None else 5
        for size in sizes:
            if size <= 0 or size % 8:
                raise BenchError(f"size {size} must be a positive multiple of 8")
        if steps < 1 or repeats < 1 or args.warmup < 0:
            raise BenchError("--steps and --repeats must be >= 1 and --warmup >= 0")
        decoders = _decoders(args.decoders)
        dtypes = [args.dtype] if isinstance(args.dtype, str) else list(args.dtype)
        if len(dtypes) != 1:
            raise BenchError(f"--pipeline runs one dtype at a time, got --dtype {' '.join(dtypes)}: pick one")
        dtype_name = dtypes[0]
    except BenchError as e:
        print(f"fastdec bench --pipeline: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

    note = ("tiny random SDXL-like pipeline (narrow SDXL-structured UNet, small text encoders, real SDXL VAE "
            "architecture; random weights): the decoder's share here is illustrative, much larger than in real SDXL"
            if config == "tiny" else
            "SDXL-base configs (UNet, both text encoders, VAE) with random weights: timing as the released model")
    console.print(f"fastdec bench --pipeline: {note}. {steps} steps, {device}, {dtype_name}, "
                  f"{repeats} timed round(s) after {args.warmup} warm-up, every decoder once per round (interleaved); "
                  "swapped with fastdec.swap_decoder")
    start_wall = time.perf_counter()
    pipe = build_sdxl_pipeline(config, device=device, dtype=dtype, seed=args.seed)
    rows: list[dict[str, Any]] = []
    variants: list[tuple[str, Any]] = [("SDXL VAE (original)", None)]
    variants += [(name, decoder.to(device=device, dtype=dtype).eval()) for name, decoder in decoders]
    for size in sizes:
        # Round-robin: each round runs every variant once, so a machine that gets busier or quieter during the
        # benchmark shifts all rows alike instead of whichever variant happened to run then.
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for _ in range(args.warmup + repeats):
            for name, decoder in variants:
                restore = None
                if decoder is not None:
                    restore, _how = _swap(pipe, decoder)
                try:
                    runs[name].append(time_pipeline(pipe, size, steps, args.seed, 0, 1, device))
                finally:
                    if restore is not None:
                        restore(pipe)
        base_digest = runs[variants[0][0]][-1]["latent_digest"]
        for name, decoder in variants:
            timed = runs[name][args.warmup:]
            digests = {r["latent_digest"] for r in runs[name]}
            if digests != {base_digest}:
                raise RuntimeError(f"{name}: the pipeline produced different latents than with its own VAE: "
                                   "the comparison would not be like for like")
            totals = [r["total_runs_s"][0] for r in timed]
            decodes = [r["decode_runs_s"][0] for r in timed]
            cpu_totals = [r["total_cpu_s"] for r in timed]
            cpu_decodes = [r["decode_cpu_s"] for r in timed]
            rows.append({
                "name": name, "size": size, "swap": None if decoder is None else "fastdec.swap_decoder",
                "total_s": float(np.median(totals)), "decode_s": float(np.median(decodes)),
                "total_runs_s": totals, "decode_runs_s": decodes, "image_size": timed[-1]["image_size"],
                "total_cpu_s": float(np.median(cpu_totals)), "decode_cpu_s": float(np.median(cpu_decodes)),
                "latent_digest": base_digest, "nonfinite_latents": any(r["nonfinite_latents"] for r in runs[name]),
            })
    for row in rows:
        row["rest_s"] = row["total_s"] - row["decode_s"]
        row["decoder_share"] = row["decode_s"] / row["total_s"]
        row["decoder_share_cpu"] = row["decode_cpu_s"] / row["total_cpu_s"]
    for row in rows:
        reference = next(r for r in rows if r["size"] == row["size"])
        row["speedup"] = reference["total_s"] / row["total_s"]
        row["decode_speedup"] = reference["decode_s"] / row["decode_s"]
        row["saved_pct"] = 100 * (1 - row["total_s"] / reference["total_s"])
        row["speedup_cpu"] = reference["total_cpu_s"] / row["total_cpu_s"]
        # the speed-up with everything but the decode held at the original run's time: on a busy machine the
        # denoising time of separate runs wanders, and this isolates what the decoder changed
        row["speedup_decode_only"] = reference["total_s"] / (reference["rest_s"] + row["decode_s"])

    from rich.table import Table

    table = Table(title=f"whole-pipeline time, SDXL ({config}), {steps} steps, median of {repeats}")
    on_cpu = torch.device(device).type == "cpu"
    columns = [("decoder", lambda r: r["name"]), ("px", lambda r: str(r["size"])),
               ("pipeline s", lambda r: f"{r['total_s']:.2f}"), ("decode s", lambda r: f"{r['decode_s']:.2f}"),
               ("decoder share", lambda r: f"{100 * r['decoder_share']:.1f}%"),
               ("pipeline speed-up", lambda r: f"{r['speedup']:.2f}x"),
               ("speed-up, rest fixed", lambda r: f"{r['speedup_decode_only']:.2f}x"),
               ("decode speed-up", lambda r: f"{r['decode_speedup']:.1f}x")]
    if on_cpu:  # CPU seconds of this process: a second view when other jobs share the cores
        columns += [("CPU s", lambda r: f"{r['total_cpu_s']:.2f}"),
                    ("decoder share (CPU)", lambda r: f"{100 * r['decoder_share_cpu']:.1f}%"),
                    ("speed-up (CPU)", lambda r: f"{r['speedup_cpu']:.2f}x")]
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "decoder" else "right")
    for r in rows:
        table.add_row(*(fmt(r) for _, fmt in columns))
    console.print(table)
    if any(r["nonfinite_latents"] for r in rows):
        console.print("note: the random-weight denoiser produced NaN/inf latents (fp16 overflow); they were replaced "
                      "by finite values before every decode, the same for every row: timings stand, images are noise")
    console.print("'speed-up, rest fixed' = original pipeline time / (original time without its decode + this "
                  "decode): the decoder's effect alone; 'pipeline speed-up' also carries run-to-run noise of the rest"
                  + ("; CPU columns: this process's CPU time (all threads)" if on_cpu else ""))
    if config == "tiny":
        console.print("note: the UNet is a tiny stand-in, so the decoder's share (and the speed-up) is illustrative; "
                      "run on a GPU (--device cuda, real SDXL configs) for representative numbers")
    payload = {
        "kind": "pipeline", "pipeline": "sdxl", "pipeline_config": config, "illustrative": config == "tiny",
        "note": note, "steps": steps, "repeats": repeats, "warmup": args.warmup, "sizes": sizes,
        "system": system_info(device, dtype_name), "rows": rows, "wall_s": time.perf_counter() - start_wall,
    }
    if args.json:
        write_json(args.json, payload)
        console.print(f"wrote json: {args.json}")
    console.print(f"total wall time {payload['wall_s']:.0f} s")
    return 0


def add_bench_arguments(group: argparse._ArgumentGroup) -> None:
    """Options of ``fastdec bench`` that only ``--pipeline`` reads (bench.py adds them to its parser)."""
    group.add_argument("--steps", type=int, default=None,
                       help="--pipeline: denoising steps, the same for every decoder (default 10 tiny / 30 real)")
    group.add_argument("--pipeline-config", choices=["tiny", "real"], default=None,
                       help="--pipeline: tiny SDXL-like stand-in (CPU default) or the real SDXL configs (CUDA default)")


"""``fastdec bench --pipeline``: what a fast decoder changes for a whole diffusers pipeline run.

The same SDXL pipeline (same seed, same steps, same denoised latents) runs with its own VAE decoder and
then with each fast decoder swapped in (``fastdec.swap_decoder``). Each run is timed end to end, and
``vae.decode`` separately (wrapped with a timer), giving the overall speed-up and the decoder's share of
the total.

Pipelines are built from configs with random weights, offline (timing does not depend on the weights;
tokenizers are small local vocabularies, prompts are padded to the tokenizer's length as usual):

* ``--pipeline-config tiny`` (the default on CPU): a narrow SDXL-structured UNet and small text encoders,
  but the real SDXL VAE architecture. The decoder's share is therefore much larger than in real SDXL:
  illustrative only.
* ``--pipeline-config real`` (the default on CUDA): the published SDXL-base UNet, CLIP-L / OpenCLIP-bigG
  text encoder and VAE configs: representative numbers (needs a GPU).
"""
from __future__ import annotations

import dataclasses
import hashlib
import string
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..devices import check_device
from ..dtypes import DTYPES, dtype_name
from ..errors import BenchError, import_optional
from .baselines import SDXL_VAE_CONFIG, named_decoders
from .measure import synchronize, system_info
from .report import console_out, print_pipeline_report, write_json

DEFAULT_PIPELINE_DECODERS = ("tae-64", "tae-192")
ORIGINAL = "SDXL VAE (original)"
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
        raise BenchError(f"vae.decode ran {len(timer.seconds)} times in {warmup + repeats} pipeline runs: this "
                         "pipeline does not decode through pipe.vae.decode once per run, so it cannot be timed here")
    decodes = timer.seconds[warmup:]
    return {
        "total_s": float(np.median(totals)), "decode_s": float(np.median(decodes)),
        "total_runs_s": totals, "decode_runs_s": decodes, "image_size": list(image.size),
        "total_cpu_s": float(np.median(cpu_totals)), "decode_cpu_s": float(np.median(timer.cpu_seconds[warmup:])),
        "latent_digest": timer.latent_digests[-1], "same_latents_every_run": len(set(timer.latent_digests)) == 1,
        "nonfinite_latents": timer.nonfinite_latents,
    }


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class PipelineBenchConfig:
    sizes: list[int] | None = None          # None: 1024 (real) / 128 (tiny: keeps the CPU run near a minute)
    steps: int | None = None                # None: 30 (real) / 10 (tiny)
    repeats: int = 5
    warmup: int = 1
    decoders: list[str] | None = None       # None: DEFAULT_PIPELINE_DECODERS
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])  # exactly one
    device: str = "cpu"
    config: str | None = None               # "tiny" | "real"; None: real on CUDA, tiny elsewhere
    seed: int = 0
    threads: int | None = None
    json: str | None = None


def validate_pipeline_config(cfg: PipelineBenchConfig) -> PipelineBenchConfig:
    """``cfg`` checked before any work, with the device-dependent defaults filled in."""
    on_cuda = check_device(cfg.device).type == "cuda"  # an unknown name or a device this machine lacks
    config = cfg.config or ("real" if on_cuda else "tiny")
    if config == "real" and not on_cuda:
        raise BenchError("--pipeline-config real builds the 2.6B-parameter SDXL UNet: it needs --device cuda "
                         "(on CPU use the default tiny stand-in)")
    sizes = cfg.sizes or ([1024] if config == "real" else [128])
    steps = cfg.steps if cfg.steps is not None else 30 if config == "real" else 10
    for size in sizes:
        if size <= 0 or size % 8:
            raise BenchError(f"size {size} must be a positive multiple of 8")
    if steps < 1 or cfg.repeats < 1 or cfg.warmup < 0 or (cfg.threads is not None and cfg.threads < 0):
        raise BenchError("--steps and --repeats must be >= 1, --warmup >= 0 and --threads >= 0")
    if len(cfg.dtypes) != 1:
        raise BenchError(f"--pipeline runs one dtype at a time, got --dtype {' '.join(cfg.dtypes)}: pick one")
    if dtype_name(cfg.dtypes[0]) == "fp16" and cfg.device == "cpu":
        # diffusers does not support fp16 pipelines on CPU (it warns that they "cannot run"); here the sampled
        # latents then differ between the VAE's run and the swapped one, and the like-for-like check blamed
        # the decoder
        raise BenchError("--pipeline --dtype fp16 needs a GPU (--device cuda): diffusers runs no fp16 pipeline "
                         "on CPU; use bf16 or fp32 there")
    return dataclasses.replace(cfg, config=config, sizes=list(sizes), steps=steps, dtypes=[dtype_name(cfg.dtypes[0])])


def _round_robin(pipe: Any, variants: list[tuple[str, Any]], size: int, cfg: PipelineBenchConfig) -> dict[str, list]:
    """Every variant's runs at one size. Each round runs every variant once, so a machine that gets busier
    or quieter during the benchmark shifts all rows alike instead of whichever variant happened to run then."""
    from ..pipelines import restore_decoder, swap_decoder

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for _ in range(cfg.warmup + cfg.repeats):
        for name, decoder in variants:
            if decoder is not None:
                swap_decoder(pipe, decoder)
            try:
                runs[name].append(time_pipeline(pipe, size, cfg.steps, cfg.seed, 0, 1, cfg.device))
            finally:
                if decoder is not None:
                    restore_decoder(pipe)
    return runs


def _summarise(name: str, swapped: bool, runs: list[dict[str, Any]], base_digest: str, size: int,
               warmup: int) -> dict[str, Any]:
    if {r["latent_digest"] for r in runs} != {base_digest}:
        raise BenchError(f"{name}: the pipeline produced different latents than with its own VAE: the comparison "
                         "would not be like for like")
    timed = runs[warmup:]
    totals = [r["total_runs_s"][0] for r in timed]
    decodes = [r["decode_runs_s"][0] for r in timed]
    total_cpu, decode_cpu = float(np.median([r["total_cpu_s"] for r in timed])), \
        float(np.median([r["decode_cpu_s"] for r in timed]))
    total, decode = float(np.median(totals)), float(np.median(decodes))
    return {
        "name": name, "size": size, "swap": "fastdec.swap_decoder" if swapped else None,
        "total_s": total, "decode_s": decode, "total_runs_s": totals, "decode_runs_s": decodes,
        "image_size": timed[-1]["image_size"], "total_cpu_s": total_cpu, "decode_cpu_s": decode_cpu,
        "latent_digest": base_digest, "nonfinite_latents": any(r["nonfinite_latents"] for r in runs),
        "rest_s": total - decode, "decoder_share": decode / total, "decoder_share_cpu": decode_cpu / total_cpu,
    }


def _add_pipeline_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-ups against the original VAE's row at the same size (the first row of each size)."""
    for row in rows:
        reference = next(r for r in rows if r["size"] == row["size"])
        row["speedup"] = reference["total_s"] / row["total_s"]
        row["decode_speedup"] = reference["decode_s"] / row["decode_s"]
        row["saved_pct"] = 100 * (1 - row["total_s"] / reference["total_s"])
        row["speedup_cpu"] = reference["total_cpu_s"] / row["total_cpu_s"]
        # the speed-up with everything but the decode held at the original run's time: on a busy machine the
        # denoising time of separate runs wanders, and this isolates what the decoder changed
        row["speedup_decode_only"] = reference["total_s"] / (reference["rest_s"] + row["decode_s"])


def _describe(cfg: PipelineBenchConfig) -> str:
    if cfg.config == "tiny":
        return ("tiny random SDXL-like pipeline (narrow SDXL-structured UNet, small text encoders, real SDXL VAE "
                "architecture; random weights): the decoder's share here is illustrative, much larger than in real SDXL")
    return "SDXL-base configs (UNet, both text encoders, VAE) with random weights: timing as the released model"


def run_pipeline_bench(cfg: PipelineBenchConfig, console: Any = None) -> dict[str, Any]:
    """Original VAE decoder vs each fast decoder, whole pipeline runs; returns the payload."""
    console = console or console_out(width=140)
    cfg = validate_pipeline_config(cfg)
    import_optional("transformers", "pipelines", "bench --pipeline (its SDXL pipeline's text encoders)")
    dtype = DTYPES[cfg.dtypes[0]]
    specs = DEFAULT_PIPELINE_DECODERS if cfg.decoders is None else cfg.decoders
    decoders = named_decoders(specs, "sdxl", cfg.seed, video=False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    note = _describe(cfg)
    console.print(f"fastdec bench --pipeline: {note}. {cfg.steps} steps, {cfg.device}, {cfg.dtypes[0]}, "
                  f"{cfg.repeats} timed round(s) after {cfg.warmup} warm-up, every decoder once per round "
                  "(interleaved); swapped with fastdec.swap_decoder")
    started = time.perf_counter()
    pipe = build_sdxl_pipeline(cfg.config, device=cfg.device, dtype=dtype, seed=cfg.seed)
    variants: list[tuple[str, Any]] = [(ORIGINAL, None)]
    variants += [(d.name, d.decoder.to(device=cfg.device, dtype=dtype).eval()) for d in decoders]
    rows = []
    for size in cfg.sizes:
        runs = _round_robin(pipe, variants, size, cfg)
        base_digest = runs[ORIGINAL][-1]["latent_digest"]
        rows += [_summarise(name, decoder is not None, runs[name], base_digest, size, cfg.warmup)
                 for name, decoder in variants]
    _add_pipeline_speedups(rows)
    return {
        "kind": "pipeline", "pipeline": "sdxl", "pipeline_config": cfg.config, "illustrative": cfg.config == "tiny",
        "note": note, "steps": cfg.steps, "repeats": cfg.repeats, "warmup": cfg.warmup, "sizes": cfg.sizes,
        "system": system_info(cfg.device, cfg.dtypes[0]), "rows": rows, "wall_s": time.perf_counter() - started,
    }


def bench_pipeline(cfg: PipelineBenchConfig) -> int:
    """The ``fastdec bench --pipeline`` command: run, print the table, write the JSON."""
    console = console_out(width=140)
    payload = run_pipeline_bench(cfg, console)
    print_pipeline_report(payload, console)
    if cfg.json:
        write_json(cfg.json, payload)
        console.print(f"wrote json: {cfg.json}")
    console.print(f"total wall time {payload['wall_s']:.0f} s")
    return 0

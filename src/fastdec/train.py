"""``fastdec train``: distil a fast decoder from a teacher VAE. One loop, top to bottom.

    fastdec train --teacher ../shared/weights/taef2_encoder.pth --decoder tae-192 \
        --data images/train --val images/val --resolution 256 --steps 20000 --out runs/taef2-192

Multi-GPU / multi-node: ``accelerate launch -m fastdec train ...`` (Hugging Face accelerate, DDP).

What happens, in order:
1. the teacher and the student decoder are built and checked against each other (latent channels,
   spatial factor, space) before any data is touched;
2. the training crops are encoded once into the latent cache (``fastdec.cache``; rank 0 builds it,
   the other ranks wait and read it);
3. the loop: AdamW, linear warm-up + cosine decay, gradient accumulation, clipping, EMA of the
   weights, optional adversarial loss, validation (PSNR/SSIM + a PNG grid) and atomic checkpoints;
4. the EMA weights are exported with ``save_decoder`` to ``RUN_DIR/decoder.safetensors``.

Data order is a seeded permutation per epoch consumed in global batches (rank r takes slice r of
each), so a resumed run sees exactly the samples the uninterrupted run would have seen.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import atomic_write, load_decoder, save_decoder
from .models.base import LatentDecoder


@dataclass
class TrainConfig:
    teacher: str = ""                       # TAESD-family encoder .pth, or diffusers VAE folder/file/Hub id
    teacher_decoder: str | None = None      # TAESD-family decoder for teacher matching / grids
    latent_space: str | None = None         # override the teacher's detected space
    decoder: str = "tae-192"                # preset name, or a fastdec checkpoint to continue from
    init: str | None = None                 # initialise weights from this decoder checkpoint
    data: str = ""
    val: str | None = None
    out: str = ""
    resolution: int = 256
    frames: int | None = None               # video decoders: clip length T
    steps: int = 10000
    batch_size: int = 8                     # per process, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup: int = 200
    ema: float = 0.999
    clip_grad: float = 1.0
    l1: float = 1.0
    mse: float = 0.0
    ms_ssim: float = 0.0
    lpips: float = 0.0
    lpips_weights: str | None = None
    teacher_weight: float = 0.0
    temporal: float = 0.0
    adversarial: float = 0.0
    adv_start: int = 2000                   # steps of reconstruction-only training before the GAN term
    disc_lr: float = 2e-4
    crops_per_image: int = 4
    cache_dir: str | None = None
    val_every: int = 500
    val_count: int = 16
    ckpt_every: int = 1000
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"           # auto | no | fp16 | bf16
    workers: int = 2
    resume: bool = False
    stop_at: int | None = None              # stop (with a checkpoint) at this step; resume later
    log_samples: bool = False               # debug: each rank logs the sample ids it trained on
    cpu: bool = False
    device_batch_encode: int = 16           # teacher batch size while building the cache


HELP = {
    "teacher": "teacher: TAESD-family encoder .pth, or a diffusers VAE folder / single file / Hub id",
    "teacher_decoder": "TAESD-family decoder paired with a TAESD encoder teacher (teacher grids / --teacher-weight)",
    "latent_space": "latent space name, overriding detection from the teacher",
    "decoder": "decoder preset (see fastdec.list_decoders()) or a fastdec checkpoint to continue from",
    "init": "initialise from a decoder checkpoint (same architecture, or an image decoder for a video decoder)",
    "data": "training folder (images, recursive; videos with --frames)",
    "val": "held-out folder for validation (center crops)",
    "out": "run folder: checkpoints, metrics.csv, grids, decoder.safetensors",
    "frames": "clip length T for video decoders",
    "batch_size": "batch per process per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "warmup": "linear warm-up steps before the cosine decay",
    "ema": "EMA decay of the exported weights",
    "clip_grad": "gradient norm clip (0 = off)",
    "ms_ssim": "weight of 1 - MS-SSIM",
    "lpips": "weight of LPIPS (needs --lpips-weights)",
    "lpips_weights": "local torchvision AlexNet weights for LPIPS (nothing is downloaded)",
    "teacher_weight": "weight of L1 to the teacher decoder's output",
    "temporal": "weight of the temporal-consistency loss (video)",
    "adversarial": "weight of the hinge GAN loss (patch discriminator)",
    "adv_start": "step at which the adversarial loss starts",
    "crops_per_image": "random crops per file encoded into the latent cache",
    "cache_dir": "latent cache root (default $FASTDEC_CACHE or ~/.cache/fastdec/latents)",
    "val_count": "validation images (first N files, center crops)",
    "mixed_precision": "auto (bf16 on GPUs that have it, else fp32) | no | fp16 | bf16",
    "workers": "DataLoader worker processes",
    "resume": "continue from the latest checkpoint in --out",
    "stop_at": "stop with a checkpoint at this step (time-limited jobs); continue with --resume",
    "log_samples": "debug: log the sample ids each rank trained on to OUT/samples/",
    "cpu": "train on CPU even when a GPU is present",
}


class TrainError(ValueError):
    """A training setup that cannot work; raised before any work starts."""


# ----------------------------------------------------------------------------- config
def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        import tomllib

        values = tomllib.loads(text)
    else:
        raise TrainError(f"config file '{path}' must be .yaml, .yml or .toml")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = set(values) - known
    if unknown:
        raise TrainError(f"config file '{path}' has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return values


def make_config(cli_values: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Defaults < config file < command-line flags."""
    values = load_config_file(config_file) if config_file else {}
    values.update(cli_values)
    config = TrainConfig(**values)
    for name in ("teacher", "data", "out"):
        if not getattr(config, name):
            raise TrainError(f"--{name} is required (on the command line or in --config)")
    return config


# ----------------------------------------------------------------------------- pieces of the loop
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def ema_decay(step: int, decay: float) -> float:
    # warm-up: early on the average would be dominated by the random initialisation
    return min(decay, (1 + step) / (10 + step))


class TrainView(nn.Module):
    """The decoder without its final clamp: a clamp has zero gradient outside [0, 1], so outputs
    that start out of range would never be pulled back. Validation and export use the decoder itself."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_layers(self.decoder.check_latents(z))


class GlobalBatches:
    """Batches of sample ids for one rank: epoch-seeded permutations consumed in global batches of
    ``batch_size * world`` (rank r takes the r-th slice), starting at global batch ``start``."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = num_samples, batch_size, rank, world, seed, start

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        epoch, order = -1, None
        while True:
            first = (g * self.world + self.rank) * self.batch
            ids = []
            for position in range(first, first + self.batch):
                if position // self.n != epoch:
                    epoch = position // self.n
                    order = self._order(epoch)
                ids.append(int(order[position % self.n]))
            yield ids
            g += 1


def check_compatible(teacher, decoder: LatentDecoder) -> None:
    t, d = teacher.latent_space, decoder.latent_space
    if t.channels != d.channels:
        raise TrainError(
            f"teacher gives {t.channels}-channel '{t.name}' latents but the decoder takes {d.channels}-channel "
            f"'{d.name}' latents: {d.channel_mismatch_message(t.channels)}. Pick a decoder for '{t.name}' "
            "(a preset is built in the teacher's space automatically) or the matching teacher"
        )
    if teacher.spatial_factor != decoder.upsample_factor:
        raise TrainError(f"teacher downsamples {teacher.spatial_factor}x but the decoder upsamples "
                         f"{decoder.upsample_factor}x: they are for different latent spaces ('{t.name}' vs '{d.name}')")
    if t.name != d.name:
        raise TrainError(f"teacher latents are in '{t.name}' space but the decoder is for '{d.name}': "
                         "use a decoder for the teacher's space, or pass --latent-space if the detection is wrong")


def build_student(config: TrainConfig, space) -> LatentDecoder:
    from .models import create_decoder, list_decoders

    if Path(config.decoder).suffix in (".safetensors", ".pth") or Path(config.decoder).exists():
        decoder = load_decoder(config.decoder)
    elif config.decoder in list_decoders():
        decoder = create_decoder(config.decoder, space)
    else:
        raise TrainError(f"--decoder '{config.decoder}' is neither a preset ({', '.join(list_decoders())}) "
                         "nor an existing checkpoint file")
    if config.init:
        source = load_decoder(config.init)
        if source.latent_space.channels != decoder.latent_space.channels:
            raise TrainError(f"--init '{config.init}' is a decoder for '{source.latent_space.name}' "
                             f"({source.latent_space.channels} channels), not '{decoder.latent_space.name}'")
        if source.architecture == decoder.architecture and source.config_dict() == decoder.config_dict():
            decoder.load_state_dict(source.state_dict())
        elif decoder.is_video and not source.is_video and hasattr(type(decoder), "from_image_decoder"):
            decoder = type(decoder).from_image_decoder(source)
        else:
            raise TrainError(f"--init '{config.init}' ({source.architecture} {source.config_dict()}) does not fit "
                             f"--decoder {config.decoder} ({decoder.architecture} {decoder.config_dict()})")
    return decoder.float()


def error_grid(rows: list[list[torch.Tensor]]) -> bytes:
    """PNG of rows of (3, H, W) images in [0, 1]."""
    from PIL import Image

    tiles = torch.cat([torch.cat(row, dim=-1) for row in rows], dim=-2)
    array = (tiles.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def validate(decoder: LatentDecoder, val: dict[str, torch.Tensor], grid_path: Path | None,
             batch_size: int) -> dict[str, float]:
    from .metrics import psnr, ssim

    decoder.eval()
    preds = torch.cat([decoder(z).float().cpu() for z in val["latents"].split(batch_size)])
    target = val["pixels"]
    flat_pred = preds.flatten(0, 1) if preds.ndim == 5 else preds
    flat_target = target.flatten(0, 1) if target.ndim == 5 else target
    result = {"val_psnr": float(psnr(flat_pred, flat_target).mean()),
              "val_ssim": float(ssim(flat_pred, flat_target).mean())}
    if grid_path is not None:
        rows = []
        for i in range(min(4, len(flat_pred))):
            row = [flat_target[i]]
            if "teacher" in val:
                row.append(val["teacher"].flatten(0, 1)[i] if val["teacher"].ndim == 5 else val["teacher"][i])
            error = ((flat_pred[i] - flat_target[i]).abs() * 4).clamp(0, 1)
            rows.append(row + [flat_pred[i], error])
        atomic_write(grid_path, lambda tmp: Path(tmp).write_bytes(error_grid(rows)), suffix=".png")
    return result


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    checkpoints = sorted((out / "checkpoints").glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write, suffix=".csv")


def read_csv(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]


# ----------------------------------------------------------------------------- the loop
def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the exported decoder path (rank 0) or the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from .cache import CachedCrops, build_cache
    from .data import open_folder
    from .losses import DistillLoss, LossWeights, PatchDiscriminator, hinge_d_loss, hinge_g_loss
    from .teachers import load_teacher

    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        on_gpu = torch.cuda.is_available() and not config.cpu
        mixed_precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=config.cpu)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    out = Path(config.out)
    set_seed(config.seed)

    # 1. teacher and student, checked against each other before any work ---------------------------
    teacher = load_teacher(config.teacher, decoder=config.teacher_decoder, latent_space=config.latent_space)
    set_seed(config.seed)  # the student's initialisation must not depend on what the teacher loading drew
    decoder = build_student(config, teacher.latent_space)
    check_compatible(teacher, decoder)
    if config.frames and not decoder.is_video:
        raise TrainError(f"--frames needs a video decoder; '{config.decoder}' is an image decoder")
    if decoder.is_video and not config.frames:
        raise TrainError(f"'{config.decoder}' is a video decoder: pass --frames T (clip length)")
    if config.teacher_weight and not teacher.has_decoder:
        raise TrainError("--teacher-weight needs a teacher decoder: pass --teacher-decoder (TAESD teachers)")
    weights = LossWeights(l1=config.l1, mse=config.mse, ms_ssim=config.ms_ssim, lpips=config.lpips,
                          teacher=config.teacher_weight, temporal=config.temporal, adversarial=config.adversarial)
    if config.temporal and not decoder.is_video:
        raise TrainError("--temporal needs a video decoder and --frames")
    criterion = DistillLoss(weights, config.lpips_weights)
    resume_from = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise TrainError(f"--resume: no checkpoint in '{out / 'checkpoints'}'")

    # 2. data and latent cache ---------------------------------------------------------------------
    with warnings.catch_warnings():
        if not is_main:  # one warning per bad file, not one per process
            warnings.simplefilter("ignore")
        dataset = open_folder(config.data, config.resolution, teacher.spatial_factor, config.frames)
        val_set = open_folder(config.val, config.resolution, teacher.spatial_factor, config.frames) if config.val else None
    cache_root = Path(config.cache_dir or os.environ.get("FASTDEC_CACHE") or Path.home() / ".cache/fastdec/latents")
    teacher.to(device)
    with accelerator.main_process_first():
        cache = build_cache(dataset, teacher, cache_root, per_file=config.crops_per_image, seed=config.seed,
                            batch_size=config.device_batch_encode, num_workers=config.workers, progress=is_main)
    if is_main and dataset.skipped:
        print(f"skipped {len(dataset.skipped)} unreadable file(s) in {dataset.root}")
    val: dict[str, torch.Tensor] = {}
    if val_set is not None and is_main:
        crops = val_set.center_crops(config.val_count)
        val["pixels"] = torch.stack([val_set.load(c) for c in crops])
        flat = val["pixels"].flatten(0, 1) if config.frames else val["pixels"]
        latents = torch.cat([teacher.encode(x.to(device)).cpu() for x in flat.split(config.device_batch_encode)])
        val["latents"] = latents.view(*val["pixels"].shape[:2], *latents.shape[1:]) if config.frames else latents
        if teacher.has_decoder:
            decoded = torch.cat([teacher.decode(z.to(device)).cpu() for z in latents.split(config.device_batch_encode)])
            val["teacher"] = decoded.view(val["pixels"].shape) if config.frames else decoded

    # 3. model, EMA, optimizers, schedule -----------------------------------------------------------
    ema = copy.deepcopy(decoder).requires_grad_(False)
    model = TrainView(decoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.min_lr_ratio))
    discriminator = disc_optimizer = None
    if config.adversarial:
        discriminator = PatchDiscriminator()
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.99))
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)
    step, rows = 0, []
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=False)
        accelerator.unwrap_model(model).decoder.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if discriminator is not None:
            accelerator.unwrap_model(discriminator).load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        step = state["step"]
        if state.get("cache_key") != cache.key:
            warnings.warn(f"{resume_from} was trained on other data or crops (latent cache {state.get('cache_key')}, "
                          f"now {cache.key}): weights and optimizer resume, the data order starts afresh", stacklevel=2)
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        rows = read_csv(out / "metrics.csv", step)
        if is_main:
            print(f"resumed from {resume_from} at step {step}")
    loader = torch.utils.data.DataLoader(
        CachedCrops(cache, dataset),
        batch_sampler=GlobalBatches(len(cache), config.batch_size, rank, world, config.seed,
                                    start=step * config.grad_accum),
        num_workers=config.workers, pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
    )
    batches = iter(loader)
    tensorboard = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(config), indent=2)))
        try:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
    sample_log = None
    if config.log_samples:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        sample_log = open(out / "samples" / f"rank{rank}.jsonl", "a")

    def save_checkpoint() -> list[str]:
        """Rank 0 writes; every rank gathers its RNG state first (collective)."""
        states = gather_object([rng_state()]) if world > 1 else [rng_state()]
        if not is_main:
            return []
        state = {
            "model": accelerator.unwrap_model(model).decoder.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "rng": states, "config": dataclasses.asdict(config), "cache_key": cache.key,
        }
        if discriminator is not None:
            state["discriminator"] = accelerator.unwrap_model(discriminator).state_dict()
            state["disc_optimizer"] = disc_optimizer.state_dict()
        path = out / "checkpoints" / f"step_{step:08d}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp), suffix=".pt")
        return [str(path)]

    def run_validation() -> dict[str, float]:
        if not val:
            return {}
        grid = out / "grids" / f"step_{step:08d}.png"
        return validate(ema, val, grid, config.device_batch_encode)

    # 4. the loop -------------------------------------------------------------------------------------
    if is_main and step == 0 and val:
        metrics = run_validation()
        message = f"step 0 (untrained): val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}"
        if "teacher" in val:  # the target to beat: the teacher's own decoder on the same crops
            from .metrics import psnr, ssim

            flat = (lambda x: x.flatten(0, 1) if x.ndim == 5 else x)
            metrics["teacher_val_psnr"] = float(psnr(flat(val["teacher"]), flat(val["pixels"])).mean())
            metrics["teacher_val_ssim"] = float(ssim(flat(val["teacher"]), flat(val["pixels"])).mean())
            message += f"; teacher decoder: {metrics['teacher_val_psnr']:.2f} dB, SSIM {metrics['teacher_val_ssim']:.4f}"
        rows.append({"step": 0, **metrics})
        write_csv(out / "metrics.csv", rows)
        print(message)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not is_main)
    images_per_step = config.batch_size * config.grad_accum * world * (config.frames or 1)
    last_time, last_step = time.perf_counter(), step
    stop = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
    while step < stop:
        model.train()
        use_gan = discriminator is not None and step >= config.adv_start
        seen_ids: list[int] = []
        for micro in range(config.grad_accum):
            pixels, latents, ids = next(batches)
            seen_ids += ids.tolist()
            pixels, latents = pixels.to(device, non_blocking=True), latents.to(device, non_blocking=True)
            last_micro = micro == config.grad_accum - 1
            with accelerator.no_sync(model) if not last_micro else nullcontext():
                with accelerator.autocast():
                    pred = model(latents)
                    teacher_out = teacher.decode(latents.flatten(0, 1) if config.frames else latents).view(
                        pred.shape) if weights.teacher else None
                    loss, parts = criterion(pred.float(), pixels, teacher_out)
                    if use_gan:
                        g_loss = hinge_g_loss(discriminator(pred.float()))
                        parts["gan_g"] = float(g_loss.detach())
                        loss = loss + weights.adversarial * g_loss
                accelerator.backward(loss / config.grad_accum)
        if config.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if use_gan:  # the discriminator learns on the last micro-batch, after the generator step
            disc_optimizer.zero_grad(set_to_none=True)
            with accelerator.autocast():
                d_loss = hinge_d_loss(discriminator(pixels), discriminator(pred.detach().float()))
            accelerator.backward(d_loss)
            disc_optimizer.step()
            parts["gan_d"] = float(d_loss.detach())
        update_ema(ema, accelerator.unwrap_model(model).decoder, ema_decay(step, config.ema))
        step += 1
        bar.update(1)

        row: dict[str, Any] = {}
        if step % config.log_every == 0 or step == stop:
            now = time.perf_counter()
            speed = (step - last_step) * images_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            row = {"step": step, "loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0], "images_per_s": speed}
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{speed:.1f}")
        if val and (step % config.val_every == 0 or step == config.steps):
            row = {"step": step, **row, **run_validation()}
            bar.write(f"step {step}: val PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.4f}")
        if row and is_main:
            rows.append(row)
            write_csv(out / "metrics.csv", rows)
            if tensorboard is not None:
                for key, value in row.items():
                    if key != "step":
                        tensorboard.add_scalar(key, value, step)
        wrote = save_checkpoint() if step % config.ckpt_every == 0 or step == stop else []
        if sample_log is not None:
            sample_log.write(json.dumps({"step": step, "rank": rank, "ids": seen_ids, "wrote": wrote}) + "\n")
            sample_log.flush()
    bar.close()
    if sample_log is not None:
        sample_log.close()
    if tensorboard is not None:
        tensorboard.close()

    # 5. export the EMA weights -------------------------------------------------------------------
    accelerator.wait_for_everyone()
    result = out
    if is_main and step >= config.steps:
        result = save_decoder(ema.cpu(), out / "decoder.safetensors",
                              extra_metadata={"trained_steps": str(step), "teacher": str(config.teacher)})
        print(f"exported {result} (EMA weights, {step} steps)")
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------- CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML/TOML file with these options (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        help_text = HELP.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        default = f" (default: {f.default})" if f.default not in (None, "") else ""
        choices = ["auto", "no", "fp16", "bf16"] if f.name == "mixed_precision" else None
        parser.add_argument(flag, type=convert, default=argparse.SUPPRESS, choices=choices,
                            help=f"{help_text}{default}".strip())


def _run(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    try:
        config = make_config(values, args.config)
        train(config)
    except (TrainError, ValueError, OSError) as e:
        from .data import DataError

        if not isinstance(e, (TrainError, DataError)) and type(e).__name__ not in (
                "TeacherError", "CheckpointError", "LossConfigError"):
            raise
        print(f"fastdec train: error: {e}")
        return 2
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="distil a fast decoder from a teacher VAE",
        description=(__doc__ or "").split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run)

"""The training loop, top to bottom: build the run, then step, validate-and-log, checkpoint; export at the end.

1. build: the precision and memory layout (``train/precision.py``: bf16 autocast + channels_last on CPUs
   with native bf16); the teacher and the student decoder, checked against each other and the options
   before any data is touched; the checkpoint to resume from, read safely; the data folders and the latent
   cache (rank 0 builds it, the other ranks wait and read it); the validation crops; AdamW with warm-up +
   cosine decay, the EMA copy, the optional discriminator; the data loader;
2. one train step: the forward passes under autocast, the loss terms in fp32; gradient accumulation,
   clipping, the optimizer and schedule, the discriminator's step, the EMA update;
3. validate-and-log: loss terms, lr and speed every ``--log-every`` steps, validation PSNR/SSIM and a grid
   every ``--val-every``, into metrics.csv (and TensorBoard when installed);
4. checkpoint every ``--ckpt-every`` steps (atomic; every rank's RNG state gathered);
5. export the EMA weights with ``save_decoder`` to ``OUT/decoder.safetensors``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..devices import check_launch_environment
from ..errors import TrainError
from ..io.checkpoints import save_decoder
from ..io.files import check_subfolder, output_folder, output_path, output_subfolder, write_json, write_text
from ..models.base import LatentDecoder
from ..runtime.optimize import to_channels_last
from .cache import CachedCrops, LatentCache, build_cache
from .config import TrainConfig, flag, validate_config
from .data import GlobalBatches, add_latent_noise, open_folder
from .losses import DistillLoss, LossWeights, PatchDiscriminator, hinge_d_loss, hinge_g_loss
from .precision import Precision, resolve_precision
from .state import (checkpoint_path, latest_checkpoint, load_resume_state, prune_checkpoints, read_csv, rng_state,
                    save_checkpoint_file, set_rng_state, write_csv)
from .student import TrainView, build_student, check_setup, ema_decay, update_ema
from .validation import prepare_val_set, teacher_scores, validate


@dataclass
class Run:
    """Everything one training run holds: filled in by the build steps, advanced by :func:`train_step`."""

    config: TrainConfig
    accelerator: Any
    out: Path
    precision: Precision
    teacher: Any = None
    criterion: DistillLoss | None = None
    dataset: Any = None
    cache: LatentCache | None = None
    val: dict[str, torch.Tensor] = field(default_factory=dict)  # rank 0 only
    model: nn.Module | None = None          # TrainView of the student, prepared by accelerate
    ema: LatentDecoder | None = None
    optimizer: Any = None
    scheduler: Any = None
    discriminator: nn.Module | None = None
    disc_optimizer: Any = None
    batches: Iterator | None = None
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    tensorboard: Any = None
    sample_log: Any = None
    clock: tuple[float, int] = (0.0, 0)     # (time, step) of the last speed measurement

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def stop(self) -> int:
        """The step this invocation ends at: ``--steps``, or ``--stop-at`` for a time-limited job."""
        return self.config.steps if self.config.stop_at is None else min(self.config.steps, self.config.stop_at)

    @property
    def student(self) -> LatentDecoder:
        return self.accelerator.unwrap_model(self.model).decoder

    def autocast(self):
        """The context every forward pass of a train step runs under (none in fp32)."""
        return self.precision.autocast(self.accelerator)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the run's memory layout: images and latents (4-D) as channels_last when the convolutions are."""
        return x.contiguous(memory_format=torch.channels_last) if self.precision.channels_last and x.ndim == 4 else x


@dataclass
class StepResult:
    loss: torch.Tensor
    parts: dict[str, float]
    ids: list[int]  # the samples this rank trained on


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the exported decoder path (rank 0) or the run folder."""
    from tqdm.auto import tqdm

    run = build_run(validate_config(config))
    validate_untrained(run)
    run.clock = (time.perf_counter(), run.step)  # the speed counts training steps only
    with tqdm(total=config.steps, initial=run.step, desc="training", unit="step", disable=not run.is_main) as bar:
        while run.step < run.stop:
            result = train_step(run)
            bar.update(1)
            log_and_validate(run, result, bar)
            checkpoint(run, result)
    close_logs(run)
    return export(run)


# ----------------------------------------------------------------------------- 1. build
def build_run(config: TrainConfig) -> Run:
    """Models first (so a mismatch fails before any data is read), then the resume state, data, optimizers."""
    from accelerate.utils import set_seed

    precision = resolve_precision(config.mixed_precision, config.channels_last, training_device(config).type)
    run = Run(config, make_accelerator(precision, config), Path(config.out), precision)
    set_seed(config.seed)
    decoder = build_models(run)
    resume = _resume_state(run)
    if resume is not None:
        check_resumable(*resume, decoder, config)  # before the latent cache is encoded
    build_data(run)
    build_optimization(run, decoder)
    # the draws training makes (--latent-noise) start from the seed, whether the latent cache was just built
    # (which draws) or reused; one stream per process, so ranks draw different noise
    set_seed(config.seed, device_specific=True)
    if resume is not None:
        restore(run, *resume)
    run.batches = iter(make_loader(run))
    open_logs(run)
    return run


def training_device(config: TrainConfig) -> torch.device:
    """The device accelerate will train this process on (its process state, which holds no precision)."""
    from accelerate import PartialState

    return PartialState(cpu=config.cpu).device


def make_accelerator(precision: Precision, config: TrainConfig):
    """The accelerate ``Accelerator`` (devices, DDP). Only fp16 is left to accelerate's mixed precision (it needs
    its GradScaler); bf16 is torch's autocast, entered by :meth:`Run.autocast`, so runs of either precision can
    follow one another in one process (accelerate fixes its own precision once per process)."""
    from accelerate import Accelerator

    check_launch_environment()
    return Accelerator(mixed_precision="fp16" if precision.mixed_precision == "fp16" else "no", cpu=config.cpu)


def build_models(run: Run) -> LatentDecoder:
    """The teacher and the loss on ``run``; returns the student, checked against both."""
    from accelerate.utils import set_seed

    from ..teachers import load_teacher

    config = run.config
    run.teacher = load_teacher(config.teacher, decoder=config.teacher_decoder, latent_space=config.latent_space)
    teacher_decoder = _teacher_decoder_module(run.teacher)
    if run.precision.channels_last and config.teacher_weight and teacher_decoder is not None:
        to_channels_last(teacher_decoder)  # it decodes every training batch
    set_seed(config.seed)  # the student's initialisation must not depend on what the teacher loading drew
    decoder = build_student(config, run.teacher.latent_space)
    check_setup(config, run.teacher, decoder)
    weights = LossWeights(l1=config.l1, mse=config.mse, ms_ssim=config.ms_ssim, lpips=config.lpips,
                          teacher=config.teacher_weight, temporal=config.temporal, adversarial=config.adversarial)
    run.criterion = DistillLoss(weights, config.lpips_weights)
    return decoder


def _teacher_decoder_module(teacher) -> nn.Module | None:
    """The module behind ``teacher.decode``: a TAE teacher's decoder, a diffusers teacher's VAE."""
    for name in ("decoder", "vae"):
        module = getattr(teacher, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def build_data(run: Run) -> None:
    """The data folders, the run folder, then the latents."""
    config, teacher = run.config, run.teacher
    with warnings.catch_warnings():
        if not run.is_main:  # one warning per bad file, not one per process
            warnings.simplefilter("ignore")
        run.dataset = open_folder(config.data, config.resolution, teacher.spatial_factor, config.frames,
                                  exclude=(config.exclude or "").split(","), max_stride=config.max_frame_stride,
                                  short_side=config.short_side)
        val_set = open_folder(config.val, config.resolution, teacher.spatial_factor, config.frames,
                              short_side=config.short_side) if config.val else None
    # a file or an unwritable folder at --out fails before the encoding pass; a run refused here (no readable
    # file in --data) leaves no empty --out behind
    with output_folder(run.out if run.is_main else None):
        _build_latents(run, val_set)


def _build_latents(run: Run, val_set: Any) -> None:
    """The latent cache of the training crops, and (rank 0) the encoded validation crops."""
    config, teacher = run.config, run.teacher
    cache_root = Path(config.cache_dir or os.environ.get("FASTDEC_CACHE") or Path.home() / ".cache/fastdec/latents")
    teacher.to(run.device)
    # each node's first process builds (a node-local cache is then built once per node, not once per rank; a
    # shared one once, the cache's lock making the other nodes wait) and the node's other processes reuse it
    with run.accelerator.local_main_process_first():
        run.cache = build_cache(run.dataset, teacher, cache_root, per_file=config.crops_per_image, seed=config.seed,
                                batch_size=config.device_batch_encode, num_workers=config.workers,
                                progress=run.accelerator.is_local_main_process)
    if run.is_main:  # each setting gets its own cache folder, and none is ever removed: say which this one is
        print(f"latent cache: {run.cache.folder} ({len(run.cache)} crops)")
    if run.is_main and run.dataset.skipped:
        print(f"skipped {len(run.dataset.skipped)} unreadable file(s) in {run.dataset.root}")
    if val_set is not None and run.is_main:
        run.val = prepare_val_set(val_set, teacher, config.val_count, config.device_batch_encode)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(decoder: LatentDecoder, config: TrainConfig) -> list[dict[str, Any]]:
    """One group at --lr; with --temporal-lr, the temporal layers in a second group at that rate."""
    if config.temporal_lr is None:
        return [{"params": list(decoder.parameters())}]
    temporal = {id(p) for _, p in decoder.temporal_parameters()}  # check_setup made sure there are some
    return [{"params": [p for p in decoder.parameters() if id(p) not in temporal]},
            {"params": [p for p in decoder.parameters() if id(p) in temporal], "lr": config.temporal_lr}]


def build_optimization(run: Run, decoder: LatentDecoder) -> None:
    """The EMA copy, AdamW with its schedule, the optional discriminator; all prepared by accelerate."""
    config, accelerator = run.config, run.accelerator
    run.ema = copy.deepcopy(decoder).requires_grad_(False)  # contiguous: validated and exported as it is
    if run.precision.channels_last:  # before the optimizer exists, so its state takes the same layout
        to_channels_last(decoder)
    model = TrainView(decoder)
    optimizer = torch.optim.AdamW(parameter_groups(decoder, config), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.min_lr_ratio))
    if config.adversarial:
        discriminator = PatchDiscriminator()
        if run.precision.channels_last:
            to_channels_last(discriminator)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.99))
        run.discriminator, run.disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    run.ema.to(run.device)


# optimizer settings a checkpoint restores (AdamW's param groups keep lr and weight decay; the scheduler its
# base rates), so they cannot change on --resume; the schedule's shape (--warmup, --steps) is recomputed
RESTORED_BY_OPTIMIZER = ("lr", "temporal_lr", "weight_decay", "disc_lr")


def check_resumable(path: Path, state: dict[str, Any], decoder: LatentDecoder, config: TrainConfig) -> None:
    """The checkpoint's weights fit the decoder this command builds (the same --decoder, and a --teacher of
    the same latent space) and its step is not past --steps, or an error saying which options it was trained with."""
    was = state.get("config") or {}
    if state["step"] > config.steps:  # it would re-export the checkpoint and exit 0, training nothing
        raise TrainError(f"--resume: {path} is at step {state['step']}, past --steps {config.steps} (the run was "
                         f"for {was.get('steps')}): pass --steps {state['step']} or more")
    # the optimizer's state carries these: a changed --lr was recorded in config.json but never trained with
    changed = [f"{flag(k)} {was[k]!r} there, {getattr(config, k)!r} here" for k in RESTORED_BY_OPTIMIZER
               if k in was and was[k] != getattr(config, k)]
    if changed:
        raise TrainError(f"--resume: {path} was trained with other optimizer settings ({'; '.join(changed)}), which "
                         "resuming restores: resume with the values it was trained with, or start a new --out from "
                         "its weights with --init")
    saved, mine = state["model"], decoder.state_dict()
    wrong = [k for k in mine if k in saved and tuple(saved[k].shape) != tuple(mine[k].shape)]
    missing, extra = [k for k in mine if k not in saved], [k for k in saved if k not in mine]
    if not (wrong or missing or extra):
        return
    if wrong:
        first = f"{wrong[0]} is {tuple(saved[wrong[0]].shape)} there but {tuple(mine[wrong[0]].shape)} here"
    else:
        first = f"{(missing or extra)[0]} is in {'this decoder but not there' if missing else 'it but not here'}"
    raise TrainError(
        f"--resume: {path} holds another decoder's weights ({first}). It was trained with --decoder "
        f"{was.get('decoder')} --teacher {was.get('teacher')}; this command builds --decoder {config.decoder} for "
        f"--teacher {config.teacher}. Resume with the options it was trained with, or train into a new --out")


def _resume_state(run: Run) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run into a folder that holds another run's
    checkpoints is refused: it overwrote the first ones and kept the rest, and a later --resume continued from
    the old run's newest with a metrics.csv of both."""
    check_run_folders(run)
    newest = latest_checkpoint(run.out)
    if run.world > 1:  # an --out one rank cannot see (node-local) would start it at step 0 while the others resume
        from accelerate.utils import gather_object

        seen = gather_object([newest.name if newest else None])
        if len(set(seen)) > 1:
            raise TrainError(f"the processes see different checkpoints in '{run.out}' (newest per rank: "
                             f"{', '.join(str(n) for n in seen)}): --out must be one folder every process shares")
    if not run.config.resume:
        if newest is not None:
            raise TrainError(f"'{run.out}' holds an earlier run's checkpoints (newest {newest.name}): pass --resume "
                             "to continue it, or another --out to start a new run (or delete the folder)")
        return None
    if newest is None:  # a requeued job stopped before its first checkpoint passes --resume all the same
        if run.is_main:
            print(f"--resume: no checkpoint in '{run.out / 'checkpoints'}' yet: starting from step 0")
        return None
    return load_resume_state(run.out)


def check_run_folders(run: Run) -> None:
    """Refuse, before any work, a link in --out where the run writes: checkpoints would go (and
    --keep-checkpoints delete) through it, and a resume that cannot read them would start again at step 0."""
    config = run.config
    for name, used in (("checkpoints", True), ("grids", bool(config.val)), ("samples", config.log_samples),
                       ("tensorboard", run.is_main)):
        if used:
            check_subfolder(run.out, name, f"the {name} folder")


def restore(run: Run, path: Path, state: dict[str, Any]) -> None:
    """Continue where ``state`` (read by :func:`load_resume_state`) stopped: weights, optimizers, step, RNG."""
    if (run.discriminator is not None) != ("discriminator" in state):
        raise TrainError(f"{path} was written by a run {'without' if run.discriminator else 'with'} --adversarial: "
                         "resume with the options it was trained with")
    run.student.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.discriminator is not None:
        run.accelerator.unwrap_model(run.discriminator).load_state_dict(state["discriminator"])
        run.disc_optimizer.load_state_dict(state["disc_optimizer"])
    run.step = state["step"]
    _check_resumed_precision(run, path, state.get("precision"))
    if state.get("cache_key") != run.cache.key:
        warnings.warn(f"{path} was trained on other data or crops (latent cache {state.get('cache_key')}, "
                      f"now {run.cache.key}): weights and optimizer resume, the data order starts afresh", stacklevel=2)
    else:
        # every rank's RNG state is saved, so their count is the world size the run had (old checkpoints too)
        _warn_changed_data_order(path, state.get("config") or {}, run.config, len(state["rng"]), run.world)
    restore_rng(state["rng"], run.rank, run.config.seed + run.step)
    run.rows = read_csv(run.out / "metrics.csv", run.step)
    if run.is_main:
        print(f"resumed from {path} at step {run.step}")


def restore_rng(states: list[dict[str, Any]], rank: int, seed: int) -> None:
    """This rank's saved RNG state; a rank the saved run did not have (more processes now) gets a stream of its
    own from ``seed`` and the rank, where rank 0's state would have repeated rank 0's --latent-noise."""
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        from accelerate.utils import set_seed

        set_seed(seed + rank)


# what the batches from a step on are drawn from (GlobalBatches): changed on --resume, the run goes on from the
# same step but not through the batches an uninterrupted run would have seen (--seed also draws the crops, so it
# is part of the cache key and a changed one meets the "other data or crops" warning); so is the number of
# processes, each of which takes its slice of every global batch
DATA_ORDER = ("batch_size", "grad_accum")


def _warn_changed_data_order(path: Path, was: dict[str, Any], config: TrainConfig, world_was: int,
                             world: int) -> None:
    changed = [f"{flag(k)} {was[k]!r} there, {getattr(config, k)!r} here" for k in DATA_ORDER
               if k in was and was[k] != getattr(config, k)]
    if world_was != world:
        changed.append(f"{world_was} process{'es' * (world_was != 1)} there, {world} here")
    if changed:
        warnings.warn(f"{path} was trained with {'; '.join(changed)}: training continues from its step, but on other "
                      "batches than an uninterrupted run would have had", stacklevel=3)


def _check_resumed_precision(run: Run, path: Path, saved: dict[str, Any] | None) -> None:
    """A run resumed in another precision or layout continues (the weights and optimizer state are fp32
    either way), but is no longer the same computation as a straight run: say so."""
    now = run.precision.to_dict()
    keys = ("mixed_precision", "channels_last")
    if saved is not None and any(saved.get(k) != now[k] for k in keys):
        warnings.warn(f"{path} was trained in {', '.join(f'{k}={saved.get(k)}' for k in keys)}, this run uses "
                      f"{', '.join(f'{k}={now[k]}' for k in keys)}: training continues, but not bit-identically "
                      "to an uninterrupted run", stacklevel=3)


def make_loader(run: Run) -> torch.utils.data.DataLoader:
    """Batches of (pixels, latents, ids) in the global order, from the step the run is at."""
    config = run.config
    sampler = GlobalBatches(len(run.cache), config.batch_size, run.rank, run.world, config.seed,
                            start=run.step * config.grad_accum)
    # its own generator: a loader without one draws its worker seed from the global RNG when iterated, which
    # a resumed run does after restoring it, so --latent-noise would draw other noise than a straight run
    return torch.utils.data.DataLoader(
        CachedCrops(run.cache, run.dataset), batch_sampler=sampler, num_workers=config.workers,
        pin_memory=run.device.type == "cuda", persistent_workers=config.workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )


def open_logs(run: Run) -> None:
    """config.json and TensorBoard (rank 0), the per-rank sample log (``--log-samples``)."""
    if run.is_main:
        print(f"precision: {run.precision.describe()}")
        write_json(run.out / "config.json", {**dataclasses.asdict(run.config), "precision": run.precision.to_dict()})
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.tensorboard = SummaryWriter(str(output_subfolder(run.out, "tensorboard", "the TensorBoard folder")))
        except ImportError:
            pass
    if run.config.log_samples:
        samples = output_subfolder(run.out, "samples", "the sample-log folder")
        path = output_path(samples, f"rank{run.rank}.jsonl", "sample log")
        trim_sample_log(path, run.step)
        # appended to, not replaced: a link in its place would add lines to a file outside --out
        run.sample_log = open(path, "a")


def trim_sample_log(path: Path, up_to_step: int) -> None:
    """A resumed run's sample log, cut back to its checkpoint's step, as metrics.csv is: the steps after it
    are trained again, and their lines would be there twice (a kill's half-written last line goes too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= up_to_step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


# ----------------------------------------------------------------------------- 2. one train step
def forward_loss(run: Run, pixels: torch.Tensor, latents: torch.Tensor, use_gan: bool):
    """The student's prediction and its loss (terms in ``parts``). With ``--latent-noise`` the student decodes
    noisy latents while the targets (and the teacher's decode) stay clean: it learns to ignore the jitter.

    The networks (student, teacher decoder, discriminator) run under the run's autocast; the loss terms do
    not: they get fp32 tensors with autocast off, because MS-SSIM's products of per-scale terms, FFT
    amplitudes and small L1 differences lose too much in bf16 (8 bits of mantissa). Weights, gradients,
    the optimizer state and the EMA are fp32 whatever the autocast.
    """
    weights = run.criterion.weights
    with run.autocast():
        pred = run.model(run.layout(add_latent_noise(latents, run.config.latent_noise)))
        teacher_out = None
        if weights.teacher:  # the teacher decodes frames, so clips are flattened and shaped back
            flat = latents.flatten(0, 1) if run.config.frames else latents
            teacher_out = run.teacher.decode(run.layout(flat)).view(pred.shape)
        fake_logits = run.discriminator(pred) if use_gan else None
    pred = pred.float()
    loss, parts = run.criterion(pred, pixels, None if teacher_out is None else teacher_out.float())
    if use_gan:
        g_loss = hinge_g_loss(fake_logits.float())
        parts["gan_g"] = float(g_loss.detach())
        loss = loss + weights.adversarial * g_loss
    return pred, loss, parts


def train_step(run: Run) -> StepResult:
    """One optimizer step over ``--grad-accum`` micro-batches; gradients sync on the last one only."""
    config, accelerator = run.config, run.accelerator
    run.model.train()
    use_gan = run.discriminator is not None and run.step >= config.adv_start
    ids: list[int] = []
    step_loss, step_parts = torch.zeros((), device=run.device), {}  # means over the micro-batches, for the log
    for micro in range(config.grad_accum):
        pixels, latents, batch_ids = next(run.batches)
        ids += batch_ids.tolist()
        pixels, latents = pixels.to(run.device, non_blocking=True), latents.to(run.device, non_blocking=True)
        last_micro = micro == config.grad_accum - 1
        with nullcontext() if last_micro else accelerator.no_sync(run.model):
            pred, loss, parts = forward_loss(run, pixels, latents, use_gan)
            accelerator.backward(loss / config.grad_accum)
        step_loss += loss.detach() / config.grad_accum
        step_parts = {k: step_parts.get(k, 0.0) + v / config.grad_accum for k, v in parts.items()}
    if config.clip_grad:
        accelerator.clip_grad_norm_(run.model.parameters(), config.clip_grad)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if use_gan:  # the discriminator learns on the last micro-batch, after the generator step
        step_parts["gan_d"] = discriminator_step(run, pixels, pred)
    update_ema(run.ema, run.student, ema_decay(run.step, config.ema))
    run.step += 1
    return StepResult(step_loss, step_parts, ids)


def discriminator_step(run: Run, pixels: torch.Tensor, pred: torch.Tensor) -> float:
    run.disc_optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        real, fake = run.discriminator(run.layout(pixels)), run.discriminator(pred.detach())
    d_loss = hinge_d_loss(real.float(), fake.float())
    run.accelerator.backward(d_loss)
    run.disc_optimizer.step()
    return float(d_loss.detach())


# ----------------------------------------------------------------------------- 3. validate and log
def run_validation(run: Run) -> dict[str, float]:
    """The EMA decoder on the validation crops, with a grid for this step (rank 0; empty without --val)."""
    if not run.val:
        return {}
    grid = output_subfolder(run.out, "grids", "the validation-grid folder") / f"step_{run.step:08d}.png"
    return validate(run.ema, run.val, grid, run.config.device_batch_encode)


def validate_untrained(run: Run) -> None:
    """Step 0 of a new run: the untrained decoder's score, and the teacher decoder's, the target to beat."""
    if not (run.is_main and run.step == 0 and run.val):
        return
    metrics = run_validation(run)
    message = f"step 0 (untrained): val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}"
    if "teacher" in run.val:
        metrics |= teacher_scores(run.val)
        message += f"; teacher decoder: {metrics['teacher_val_psnr']:.2f} dB, SSIM {metrics['teacher_val_ssim']:.4f}"
    run.rows.append({"step": 0, **metrics})
    write_csv(run.out / "metrics.csv", run.rows)
    print(message)


def _speed(run: Run) -> float:
    """Images (frames) per second since the last measurement, over all ranks."""
    config = run.config
    now, (last_time, last_step) = time.perf_counter(), run.clock
    run.clock = (now, run.step)
    images_per_step = config.batch_size * config.grad_accum * run.world * (config.frames or 1)
    return (run.step - last_step) * images_per_step / max(now - last_time, 1e-9)


def global_batch_losses(run: Run, result: StepResult) -> tuple[float, dict[str, float]]:
    """The step's loss and its terms over the global batch: each rank's mean over its micro-batches, averaged
    over the ranks (a collective: every rank calls it). Rank 0's own would be half the batch on two processes,
    and curves of one run on different process counts could not be compared."""
    names = list(result.parts)  # the same terms in the same order on every rank
    values = torch.tensor([float(result.loss), *(float(result.parts[n]) for n in names)])
    if run.world > 1:
        values = run.accelerator.reduce(values.to(run.device), reduction="mean")
    loss, *parts = values.cpu().tolist()
    return loss, dict(zip(names, parts))


def log_and_validate(run: Run, result: StepResult, bar) -> None:
    config, step = run.config, run.step
    row: dict[str, Any] = {}
    if step % config.log_every == 0 or step == run.stop:
        speed, (loss, parts) = _speed(run), global_batch_losses(run, result)
        row = {"step": step, "loss": loss, **parts, "lr": run.scheduler.get_last_lr()[0], "images_per_s": speed}
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.1f}")
    if run.val and (step % config.val_every == 0 or step == config.steps):
        row = {"step": step, **row, **run_validation(run)}
        bar.write(f"step {step}: val PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.4f}")
    if row and run.is_main:
        run.rows.append(row)
        write_csv(run.out / "metrics.csv", run.rows)
        if run.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    run.tensorboard.add_scalar(key, value, step)


# ----------------------------------------------------------------------------- 4. checkpoint
def save_checkpoint(run: Run) -> list[str]:
    """Rank 0 writes; every rank gathers its RNG state first (a collective: every rank must call this)."""
    from accelerate.utils import gather_object

    states = gather_object([rng_state()]) if run.world > 1 else [rng_state()]
    if not run.is_main:
        return []
    state = {
        "model": run.student.state_dict(), "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "step": run.step,
        "rng": states, "config": dataclasses.asdict(run.config), "cache_key": run.cache.key,
        "precision": run.precision.to_dict(),
    }
    if run.discriminator is not None:
        state["discriminator"] = run.accelerator.unwrap_model(run.discriminator).state_dict()
        state["disc_optimizer"] = run.disc_optimizer.state_dict()
    written = save_checkpoint_file(checkpoint_path(run.out, run.step), state)
    if run.config.keep_checkpoints is not None:
        prune_checkpoints(run.out, run.config.keep_checkpoints, written)
    return [str(written)]


def checkpoint(run: Run, result: StepResult) -> None:
    """A checkpoint every ``--ckpt-every`` steps and at the last step; the sample log notes what was written."""
    due = run.step % run.config.ckpt_every == 0 or run.step == run.stop
    wrote = save_checkpoint(run) if due else []
    if run.sample_log is not None:
        run.sample_log.write(json.dumps({"step": run.step, "rank": run.rank, "ids": result.ids, "wrote": wrote}) + "\n")
        run.sample_log.flush()


# ----------------------------------------------------------------------------- 5. export
def close_logs(run: Run) -> None:
    if run.sample_log is not None:
        run.sample_log.close()
    if run.tensorboard is not None:
        run.tensorboard.close()


def export(run: Run) -> Path:
    """The EMA weights as ``OUT/decoder.safetensors`` once ``--steps`` are done (rank 0); else the run folder."""
    run.accelerator.wait_for_everyone()
    result = run.out
    if run.is_main and run.step >= run.config.steps:
        result = save_decoder(run.ema.cpu(), run.out / "decoder.safetensors",
                              extra_metadata={"trained_steps": str(run.step), "teacher": str(run.config.teacher)})
        print(f"exported {result} (EMA weights, {run.step} steps)")
    elif run.is_main:  # --stop-at: it ended with the progress bar and said nothing of what to do next
        print(f"stopped at step {run.step} of {run.config.steps} (--stop-at), checkpoint "
              f"{checkpoint_path(run.out, run.step)}: run the same command with --resume to continue")
    run.accelerator.end_training()
    return result

"""``fastdec decode-batch``: decode many latents to image files, on one process or many (accelerate).

Latent files (``--latents`` takes a folder, a file or a glob):

* ``.safetensors`` shards. Each tensor is either one latent ``(C, h, w)`` named by
  its tensor key, or a stack ``(N, C, h, w)`` whose names are listed in the
  file's metadata ``{"fastdec_keys": json.dumps({tensor_name: [name, ...]})}``
  (default ``{tensor_name}_{i:05d}``). ``write_latent_shard`` writes the first form.
* ``.pt`` files: a tensor, a dict of tensors (rules as above), or
  ``{"latents": (N, C, h, w), "keys": [name, ...]}``. Loaded with ``weights_only``.
* ``.npy`` files: ``(C, h, w)`` named by the file stem, or ``(N, C, h, w)`` named ``{stem}_{i:05d}``.

Each latent becomes ``OUT/{name}.{png|webp|jpg}``. Work is the sorted list of all
latents; process ``r`` of ``W`` takes the ``r``-th contiguous slice of it, so any
number of processes (GPUs, nodes, CPU processes) covers everything exactly once.

Crash safety: images are written to a hidden temp file in the output folder and
renamed into place, so an image under its final name is complete; a rerun skips
those, deletes leftover temp files and decodes the rest. ``OUT/fastdec_manifest.json``
records the decoder identity (hash of the weights + config + latent space + output
settings) and every image; a rerun with a different decoder or settings is refused
unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import glob as globlib
import hashlib
import json
import os
import re
import sys
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import atomic_write

MANIFEST_NAME = "fastdec_manifest.json"
RANK_MANIFEST = ".fastdec_manifest.rank{rank}.json"
PROGRESS_FILE = ".fastdec_progress.rank{rank}"
TEMP_SUFFIX = ".fastdec-tmp"
LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")
FORMATS = {"png": ("PNG", ".png"), "webp": ("WEBP", ".webp"), "jpeg": ("JPEG", ".jpg")}
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CRASH_ENV = "FASTDEC_TEST_CRASH_AFTER"  # test hook: die (os._exit) after this many images, like a kill


class LatentFileError(ValueError):
    """A latent file that cannot be read or does not hold latents in a known layout."""


class ManifestMismatchError(RuntimeError):
    """The output folder was written with another decoder or other settings."""


# ----------------------------------------------------------------------------- latent files
def write_latent_shard(path: str | os.PathLike, latents: Mapping[str, torch.Tensor]) -> Path:
    """Write ``{name: (C, h, w) latent}`` to a safetensors shard that ``decode-batch`` reads (atomically)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, tensor in latents.items():
        check_key(key)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"latent '{key}' must be a (C, h, w) tensor, got {shape}; for a batch use z.unbind(0)")
        tensors[key] = tensor.detach().contiguous().cpu()
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"latent shards are .safetensors files, got '{path}'")
    return atomic_write(path, lambda tmp: save_file(tensors, tmp), suffix=".safetensors")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key) or key.endswith(TEMP_SUFFIX):
        raise ValueError(
            f"latent name {key!r} cannot be an image file name: use letters, digits, '_', '-' and '.' "
            "(no '/', not starting with '.')"
        )
    return key


@dataclass(frozen=True, order=True)
class WorkItem:
    """One latent: where it is stored and the image name it becomes."""

    file: str
    tensor: str  # key inside the file ("" for .npy / bare-tensor .pt)
    index: int  # position in a stacked (N, C, h, w) tensor, -1 for a single latent
    key: str = field(compare=False)
    shape: tuple[int, ...] = field(compare=False)


def _names(tensor_name: str, shape: Sequence[int], names: Sequence[str] | None, source: str) -> list[tuple[int, str]]:
    if len(shape) == 3:
        return [(-1, tensor_name)]
    if len(shape) == 4:
        if names is not None and len(names) != shape[0]:
            raise LatentFileError(f"{source}: '{tensor_name}' stacks {shape[0]} latents but lists {len(names)} names")
        return [(i, names[i] if names is not None else f"{tensor_name}_{i:05d}") for i in range(shape[0])]
    raise LatentFileError(
        f"{source}: '{tensor_name}' has shape {tuple(shape)}; latents are (C, h, w) or stacked (N, C, h, w)"
    )


def index_latent_file(path: str | os.PathLike) -> list[WorkItem]:
    """The latents a file holds (names and shapes), reading headers only where the format allows."""
    path = Path(path)
    source = str(path)
    entries: list[tuple[str, tuple[int, ...], Sequence[str] | None]] = []
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(source, framework="pt") as f:
                meta = f.metadata() or {}
                names = json.loads(meta["fastdec_keys"]) if "fastdec_keys" in meta else {}
                for name in f.keys():
                    entries.append((name, tuple(f.get_slice(name).get_shape()), names.get(name)))
        elif path.suffix == ".npy":
            array = np.load(source, mmap_mode="r", allow_pickle=False)
            entries.append((path.stem, tuple(array.shape), None))
        elif path.suffix in (".pt", ".pth"):
            entries = [(n, tuple(t.shape), k) for n, (t, k) in _pt_tensors(_load_pt(source), path).items()]
        else:
            raise LatentFileError(f"{source}: unknown latent file type (use {', '.join(LATENT_SUFFIXES)})")
    except LatentFileError:
        raise
    except Exception as e:  # every reader has its own error types; all mean "unreadable file"
        raise LatentFileError(f"{source}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    items = []
    for name, shape, names in entries:
        for index, key in _names(name, shape, names, source):
            items.append(WorkItem(source, name if path.suffix != ".npy" else "", index, key, tuple(shape[-3:])))
    return items


def _load_pt(source: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(source, map_location="cpu", weights_only=True)


def _pt_tensors(obj: Any, path: Path) -> dict[str, tuple[torch.Tensor, Sequence[str] | None]]:
    """tensor name -> (tensor, names of a stack or None)."""
    if isinstance(obj, torch.Tensor):
        return {path.stem: (obj, None)}
    if isinstance(obj, dict) and isinstance(obj.get("latents"), torch.Tensor) and isinstance(obj.get("keys"), list):
        return {"latents": (obj["latents"], [str(k) for k in obj["keys"]])}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): (v, None) for k, v in obj.items()}
    raise LatentFileError(
        f"{path}: a .pt latent file holds a tensor, a dict of tensors, or {{'latents': tensor, 'keys': [names]}}"
    )


def find_latent_files(spec: str) -> list[Path]:
    """Files named by a folder (searched recursively), a single file, or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in LATENT_SUFFIXES and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file()]
    files = sorted(p for p in files if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(
            f"no latent files found at '{spec}': pass a folder, a file or a glob such as 'latents/*.safetensors' "
            f"(types: {', '.join(LATENT_SUFFIXES)})"
        )
    return files


@dataclass
class Failure:
    file: str
    key: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}" + (f" [{self.key}]" if self.key else "") + f": {self.reason}"


def build_work_list(files: Sequence[Path]) -> tuple[list[WorkItem], list[Failure]]:
    """All latents of all readable files, sorted; unreadable files and duplicate names become failures."""
    items: list[WorkItem] = []
    failures: list[Failure] = []
    for path in files:
        try:
            items.extend(index_latent_file(path))
        except LatentFileError as e:
            failures.append(Failure(str(path), None, str(e).removeprefix(f"{path}: ")))
    items.sort()
    unique: list[WorkItem] = []
    seen: dict[str, WorkItem] = {}
    for item in items:
        try:
            check_key(item.key)
        except ValueError as e:
            failures.append(Failure(item.file, item.key, str(e)))
            continue
        if item.key in seen:
            failures.append(Failure(item.file, item.key, f"duplicate latent name, already in {seen[item.key].file}; skipped"))
            continue
        seen[item.key] = item
        unique.append(item)
    return unique, failures


def shard_for_rank(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """Contiguous slice ``rank`` of ``world_size`` (disjoint and complete; contiguity keeps file reads local)."""
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


class LatentReader:
    """Reads latents of work items, keeping a few files open (work is sorted, so reads are local)."""

    def __init__(self, cache_size: int = 8):
        self._open: OrderedDict[str, Any] = OrderedDict()
        self.cache_size = cache_size

    def _handle(self, file: str) -> Any:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        path = Path(file)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(file, framework="pt")
        elif path.suffix == ".npy":
            handle = np.load(file, mmap_mode="r", allow_pickle=False)
        else:
            handle = {name: t for name, (t, _) in _pt_tensors(_load_pt(file), path).items()}
        self._open[file] = handle
        if len(self._open) > self.cache_size:
            self._open.popitem(last=False)
        return handle

    def read(self, item: WorkItem) -> torch.Tensor:
        handle = self._handle(item.file)
        if isinstance(handle, np.ndarray):
            tensor = torch.from_numpy(np.array(handle if item.index < 0 else handle[item.index]))
        elif isinstance(handle, dict):
            tensor = handle[item.tensor] if item.index < 0 else handle[item.tensor][item.index]
        else:
            tensor = handle.get_tensor(item.tensor) if item.index < 0 else handle.get_slice(item.tensor)[item.index]
        return tensor.clone() if tensor.ndim == 3 else tensor.reshape(item.shape).clone()


# ----------------------------------------------------------------------------- decoder identity
def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): the same weights give the same hash anywhere."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def decoder_identity(decoder: Any, settings: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """What makes two runs produce the same images; ``id`` is its hash (``source`` is informational only)."""
    identity = {
        "architecture": decoder.architecture,
        "config": decoder.config_dict(),
        "latent_space": decoder.latent_space.to_dict(),
        "weights_sha256": weights_hash(decoder),
        "settings": dict(settings),
    }
    identity = json.loads(json.dumps(identity, default=str))  # as a manifest stores it (tuples -> lists), to compare
    identity["id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    identity["source"] = source
    return identity


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    diffs = [k for k in ("weights_sha256", "architecture", "config", "latent_space", "settings") if old.get(k) != new.get(k)]
    parts = []
    for key in diffs:
        if key == "settings":
            changed = {k: (old.get(key, {}).get(k), v) for k, v in new.get(key, {}).items() if old.get(key, {}).get(k) != v}
            parts.append("settings " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        elif key == "weights_sha256":
            parts.append("decoder weights")
        else:
            parts.append(key)
    return "; ".join(parts) or "decoder identity"


# ----------------------------------------------------------------------------- manifest
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError) as e:
        raise ManifestMismatchError(f"manifest '{path}' is unreadable ({e}); delete it or pass --overwrite") from e


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), suffix=TEMP_SUFFIX)


def existing_manifests(out: Path) -> list[tuple[Path, dict]]:
    paths = [out / MANIFEST_NAME] + sorted(out.glob(RANK_MANIFEST.format(rank="*")))
    return [(p, m) for p in paths if (m := _read_json(p)) is not None]


def check_manifest(out: Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse to mix decoders or settings in one folder (unless ``overwrite``)."""
    if overwrite:
        return
    for path, manifest in existing_manifests(out):
        old = manifest.get("decoder", {})
        if old.get("id") != identity["id"]:
            raise ManifestMismatchError(
                f"'{out}' holds images decoded with another decoder or settings (differs in: "
                f"{describe_difference(old, identity)}; manifest {path.name}: {old.get('source') or old.get('id')}). "
                "Use another --out folder, the same decoder and settings to resume, or --overwrite to decode everything again"
            )


def merge_manifests(out: Path, identity: Mapping[str, Any]) -> dict:
    """Fold per-rank manifests into ``fastdec_manifest.json`` (rank 0, after everyone is done)."""
    merged: dict[str, Any] = {}
    for path, manifest in existing_manifests(out):
        if manifest.get("decoder", {}).get("id") == identity["id"]:
            merged.update(manifest.get("images", {}))
    # an image is only recorded if it is on disk (a crash can leave a manifest ahead of nothing, never the reverse)
    merged = {k: v for k, v in sorted(merged.items()) if (out / v["file"]).exists()}
    manifest = {"fastdec_manifest": 1, "decoder": dict(identity), "images": merged, "updated": time.time()}
    _write_json(out / MANIFEST_NAME, manifest)
    for pattern in (RANK_MANIFEST, PROGRESS_FILE):
        for path in out.glob(pattern.format(rank="*")):
            path.unlink(missing_ok=True)
    return manifest


def clean_temp_files(out: Path) -> int:
    """Delete temp files an interrupted run left (only ours: hidden, with our suffix)."""
    count = 0
    for path in out.glob(f".*{TEMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        count += 1
    for path in out.glob(PROGRESS_FILE.format(rank="*")):
        path.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------------- image writing
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounding to nearest."""
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def writer_path(out: Path, key: str, image_format: str) -> Path:
    return out / f"{key}{FORMATS[image_format][1]}"


def save_image(array: np.ndarray, path: Path, image_format: str, quality: int) -> None:
    from PIL import Image

    pil_format, _ = FORMATS[image_format]
    options: dict[str, Any] = {"quality": quality} if image_format in ("webp", "jpeg") else {"compress_level": 1}
    image = Image.fromarray(array)
    atomic_write(path, lambda tmp: image.save(tmp, format=pil_format, **options), suffix=TEMP_SUFFIX)


class ImageWriter:
    """Encodes and writes images on threads (PIL releases the GIL) while the caller decodes the next batch.

    At most ``max_pending`` images wait in memory: ``submit`` blocks when writers fall behind.
    """

    def __init__(self, out: Path, image_format: str, quality: int, workers: int, max_pending: int):
        self.out, self.image_format, self.quality = out, image_format, quality
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fastdec-writer")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._lock = threading.Lock()
        self.written: list[WorkItem] = []
        self.failures: list[Failure] = []
        self.wait_s = 0.0
        crash = os.environ.get(_CRASH_ENV)
        self._crash_after = int(crash) if crash else None

    def path_for(self, key: str) -> Path:
        return writer_path(self.out, key, self.image_format)

    def submit(self, item: WorkItem, array: np.ndarray) -> Future:
        start = time.perf_counter()
        self._slots.acquire()
        self.wait_s += time.perf_counter() - start
        try:
            return self._pool.submit(self._write, item, array)
        except BaseException:
            self._slots.release()
            raise

    def _write(self, item: WorkItem, array: np.ndarray) -> None:
        try:
            save_image(array, self.path_for(item.key), self.image_format, self.quality)
            with self._lock:
                self.written.append(item)
                if self._crash_after is not None and len(self.written) >= self._crash_after:
                    self._simulate_crash(item, array)
        except Exception as e:  # disk full, permissions: report per image, keep going
            with self._lock:
                self.failures.append(Failure(item.file, item.key, f"cannot write image: {type(e).__name__}: {e}"))
        finally:
            self._slots.release()

    def _simulate_crash(self, item: WorkItem, array: np.ndarray) -> None:
        # what a kill during a write leaves: a half-written temp file, then the process is gone
        partial = self.out / f".{item.key}.crashed{TEMP_SUFFIX}"
        partial.write_bytes(array.tobytes()[: max(1, array.size // 3)])
        sys.stderr.write(f"{_CRASH_ENV}: simulated crash after {len(self.written)} images\n")
        sys.stderr.flush()
        os._exit(17)

    def close(self) -> None:
        start = time.perf_counter()
        self._pool.shutdown(wait=True)
        self.wait_s += time.perf_counter() - start


# ----------------------------------------------------------------------------- the run
@dataclass
class RankStats:
    rank: int
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    writer_wait_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time (all threads): on a shared machine, images per CPU-second stays honest
    failures: list[Failure] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def batches_by_shape(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Consecutive batches of equal-shape latents (decoders batch only equal shapes), in work order per shape."""
    groups: OrderedDict[tuple[int, ...], list[WorkItem]] = OrderedDict()
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


class _Progress:
    """A bar per process; rank 0's bar counts every process's images (read from tiny per-rank files)."""

    def __init__(self, out: Path, rank: int, world_size: int, own_total: int, total: int, enabled: bool):
        self.out, self.rank, self.world_size = out, rank, world_size
        self.count, self._last_write = 0, 0.0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            label = "decode-batch" if world_size == 1 else ("all ranks" if rank == 0 else f"rank {rank}")
            self.bar = tqdm(total=total if rank == 0 else own_total, desc=label, unit="img",
                            position=rank, leave=rank == 0, dynamic_ncols=True)

    def _others(self) -> int:
        total = 0
        for r in range(1, self.world_size):
            try:
                total += int((self.out / PROGRESS_FILE.format(rank=r)).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def update(self, n: int, force: bool = False) -> None:
        self.count += n
        now = time.monotonic()
        if self.world_size > 1 and self.rank > 0 and (force or now - self._last_write > 0.5):
            self._last_write = now
            path = self.out / PROGRESS_FILE.format(rank=self.rank)
            atomic_write(path, lambda tmp: Path(tmp).write_text(str(self.count)), suffix=TEMP_SUFFIX)
        if self.bar is not None:
            self.bar.n = self.count + (self._others() if self.rank == 0 else 0)
            self.bar.refresh()

    def wait_for_others(self, total: int, timeout_s: float = 3600.0) -> None:
        """Rank 0 keeps its bar moving until the other processes finish (then everyone meets at a barrier)."""
        if self.bar is None or self.rank != 0 or self.world_size == 1:
            return
        deadline = time.monotonic() + timeout_s
        while self.count + self._others() < total and time.monotonic() < deadline:
            time.sleep(0.2)
            self.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_decoder(args: argparse.Namespace) -> tuple[Any, str]:
    from .checkpoints import load_decoder
    from .models import create_decoder, list_decoders

    if not Path(args.decoder).expanduser().exists() and args.decoder in list_decoders():
        # every process must build the same random weights: seed before creating
        torch.manual_seed(args.seed)
        decoder = create_decoder(args.decoder, args.latent_space or "sdxl")
        source = f"preset:{args.decoder} (random weights, seed {args.seed})"
        warnings.warn(
            f"'{args.decoder}' is a preset with random weights: images are noise (useful for throughput tests only). "
            "Pass a trained checkpoint path for real images",
            stacklevel=2,
        )
    else:
        decoder = load_decoder(args.decoder, latent_space=args.latent_space)
        source = str(args.decoder)
    if decoder.is_video:
        raise ValueError(f"'{args.decoder}' is a video decoder: decode-batch writes images; use `fastdec decode-video`")
    return decoder.eval(), source


def run_decode_batch(args: argparse.Namespace) -> int:
    """The command: returns the exit status (1 if any latent failed)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if args.threads:
        torch.set_num_threads(args.threads)
    # cpu=True makes torchrun-launched processes on a GPU-less machine join one gloo group instead of
    # each running alone (accelerate's own `--cpu` flag launches a single process unless given an MPI hostfile)
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu)
    rank, world = state.process_index, state.num_processes
    is_main = state.is_main_process
    out = Path(args.out).expanduser()
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]

    decoder, source = _load_decoder(args)
    settings = {"format": args.format, "quality": args.quality if args.format != "png" else None,
                "vae_space": bool(args.vae_space), "dtype": args.dtype}
    identity = decoder_identity(decoder, settings, source)
    decoder = decoder.to(device=state.device, dtype=dtype)
    if args.channels_last:
        from .runtime import to_channels_last

        to_channels_last(decoder)

    ids = gather_object([identity["id"]]) if world > 1 else [identity["id"]]
    if len(set(ids)) != 1:
        raise ManifestMismatchError(
            f"processes loaded different decoders (ids {ids}): every node must see the same --decoder file"
        )

    files = find_latent_files(args.latents)
    items, failures = build_work_list(files)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    check_manifest(out, identity, args.overwrite)  # every rank raises the same error, none hangs at a barrier
    state.wait_for_everyone()
    if is_main:
        removed = clean_temp_files(out)
        if removed:
            print(f"removed {removed} temp file(s) left by an interrupted run", file=sys.stderr)
        if args.overwrite:
            # old images under this run's names go first: if this run crashes, a resume must not take them as done
            for item in items:
                writer_path(out, item.key, args.format).unlink(missing_ok=True)
            for path in out.glob(RANK_MANIFEST.format(rank="*")):
                path.unlink()
            (out / MANIFEST_NAME).unlink(missing_ok=True)
        _write_json(out / MANIFEST_NAME, {"fastdec_manifest": 1, "decoder": identity, "images": {}, "updated": time.time()}
                    if args.overwrite or not (out / MANIFEST_NAME).exists() else
                    {**json.loads((out / MANIFEST_NAME).read_text()), "decoder": identity})
        for failure in failures:
            print(f"skipping {failure}", file=sys.stderr)
    state.wait_for_everyone()

    # Batches are cut from the whole sorted list and whole batches are dealt to processes: every latent is
    # decoded in the same batch whatever the number of processes or earlier crashes, so the images are
    # bit-identical (conv kernels can differ in the last bit between batch compositions).
    my_batches = shard_for_rank(batches_by_shape(items, args.batch), rank, world)
    stats = RankStats(rank)
    writer = ImageWriter(out, args.format, args.quality, workers=args.writers, max_pending=2 * args.batch)
    records: dict[str, dict] = {}
    todo: list[tuple[list[WorkItem], set[str]]] = []  # (batch, keys still to write)
    for batch in my_batches:
        missing = set()
        for item in batch:
            if not args.overwrite and writer.path_for(item.key).exists():
                stats.skipped += 1
                records[item.key] = _record(item, writer)
            else:
                missing.add(item.key)
        if missing:
            todo.append((batch, missing))
    own_todo = sum(len(m) for _, m in todo)
    total_todo = sum(gather_object([own_todo])) if world > 1 else own_todo
    if is_main:
        print(f"decode-batch: {len(items)} latents in {len(files)} file(s), {len(items) - total_todo} already done, "
              f"{total_todo} to decode on {world} process(es); decoder {identity['id']} ({source})", file=sys.stderr)

    progress = _Progress(out, rank, world, own_todo, total_todo, enabled=not args.no_progress)
    rank_manifest = out / RANK_MANIFEST.format(rank=rank)
    last_manifest = time.monotonic()
    reader = LatentReader()
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch, missing in todo:
        latents, kept = [], []
        for item in batch:
            try:
                z = reader.read(item)
                if z.shape[0] != decoder.latent_channels:
                    raise ValueError(decoder.latent_space.channel_mismatch_message(z.shape[0]))
                if not z.is_floating_point():
                    raise TypeError(f"latents must be floating point, got {z.dtype}")
                if not torch.isfinite(z).all():
                    raise ValueError("latent contains NaN or inf (the sampler diverged or the file is corrupt)")
                latents.append(z)
                kept.append(item)
            except Exception as e:
                if item.key in missing:
                    stats.failures.append(Failure(item.file, item.key, f"{type(e).__name__}: {e}"))
        arrays = None
        if kept:
            t0 = time.perf_counter()
            try:
                z = torch.stack(latents).to(state.device, non_blocking=True).float()
                if args.vae_space:
                    z = decoder.latent_space.vae_to_decoder(z)
                with torch.inference_mode():
                    arrays = to_uint8(decoder(z))  # .cpu() inside waits for the device
            except Exception as e:  # an unexpected decode error fails this batch, not the run
                for item in kept:
                    if item.key in missing:
                        stats.failures.append(Failure(item.file, item.key, f"{type(e).__name__}: {e}"))
            stats.decode_s += time.perf_counter() - t0
        if arrays is not None:
            for item, array in zip(kept, arrays):
                if item.key in missing:
                    writer.submit(item, array)
                    records[item.key] = _record(item, writer)
        progress.update(len(missing))
        if time.monotonic() - last_manifest > 10:
            _write_rank_manifest(rank_manifest, identity, records, writer)
            last_manifest = time.monotonic()
    writer.close()
    stats.seconds = time.perf_counter() - start
    stats.cpu_s = time.process_time() - cpu_start
    stats.images = len(writer.written)
    stats.writer_wait_s = writer.wait_s
    stats.failures.extend(writer.failures)
    failed_keys = {f.key for f in writer.failures}
    _write_rank_manifest(rank_manifest, identity, {k: v for k, v in records.items() if k not in failed_keys}, writer)
    progress.update(0, force=True)
    progress.wait_for_others(total_todo)
    progress.close()

    if world > 1:
        print(f"[rank {rank}/{world}] {stats.images} images in {stats.seconds:.2f} s = {stats.images_per_s:.2f} images/s "
              f"(decode {stats.decode_s:.2f} s, waiting on writers {stats.writer_wait_s:.2f} s)", file=sys.stderr)
    all_stats: list[RankStats] = gather_object([stats]) if world > 1 else [stats]
    state.wait_for_everyone()
    status = 0
    if is_main:
        merge_manifests(out, identity)
        status = _summarize(all_stats, failures, len(items), args)
    if world > 1:
        status = max(gather_object([status]))
        state.wait_for_everyone()
        # an explicit teardown: gloo groups left to interpreter exit can abort (SIGABRT) a finished process
        state.destroy_process_group()
    return status


def _record(item: WorkItem, writer: ImageWriter) -> dict:
    return {"file": writer.path_for(item.key).name, "source": item.file, "shape": list(item.shape)}


def _write_rank_manifest(path: Path, identity: Mapping[str, Any], records: Mapping[str, dict], writer: ImageWriter) -> None:
    _write_json(path, {"fastdec_manifest": 1, "decoder": dict(identity), "images": dict(records), "updated": time.time()})


def _summarize(all_stats: list[RankStats], index_failures: list[Failure], total: int, args: argparse.Namespace) -> int:
    images = sum(s.images for s in all_stats)
    skipped = sum(s.skipped for s in all_stats)
    seconds = max((s.seconds for s in all_stats), default=0.0)
    failures = index_failures + [f for s in all_stats for f in s.failures]
    rate = images / seconds if seconds > 0 else 0.0
    print(f"decode-batch: {images} images decoded in {seconds:.2f} s = {rate:.2f} images/s total on "
          f"{len(all_stats)} process(es); {skipped} already done; {len(failures)} failed")
    if args.stats_json:
        report = {
            "processes": len(all_stats), "latents": total, "decoded": images, "skipped": skipped,
            "failed": len(failures), "seconds": seconds, "images_per_s": rate,
            "threads_per_process": torch.get_num_threads(), "batch": args.batch, "format": args.format,
            "per_process": [{"rank": s.rank, "images": s.images, "seconds": s.seconds, "images_per_s": s.images_per_s,
                             "decode_s": s.decode_s, "writer_wait_s": s.writer_wait_s, "cpu_s": s.cpu_s}
                            for s in all_stats],
            "images_per_cpu_s": images / max(1e-9, sum(s.cpu_s for s in all_stats)),
            "failures": [str(f) for f in failures],
        }
        _write_json(Path(args.stats_json), report)
    if failures:
        print(f"decode-batch: {len(failures)} latent(s) or file(s) FAILED (the rest were decoded):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- CLI
def _command(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise SystemExit("decode-batch: --batch must be >= 1")
    try:
        return run_decode_batch(args)
    except (ManifestMismatchError, FileNotFoundError, ValueError) as e:
        print(f"decode-batch: error: {e}", file=sys.stderr)
        return 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode-batch",
        help="decode many latent files to images (resumable; multi-process with `accelerate launch -m fastdec`)",
        description="Decode latents from .safetensors shards, .pt or .npy files to images named by each latent's key. "
                    "Run as `accelerate launch -m fastdec decode-batch ...` to split the work over processes.",
    )
    p.add_argument("--latents", required=True, help="folder (recursive), file or glob of .safetensors/.pt/.npy files")
    p.add_argument("--decoder", required=True, help="decoder checkpoint (fastdec .safetensors, TAESD .pth, "
                                                     "AutoencoderTiny folder) or a preset name (random weights)")
    p.add_argument("--out", required=True, help="output folder (resumes if it holds a run with the same decoder)")
    p.add_argument("--format", choices=sorted(FORMATS), default="png")
    p.add_argument("--quality", type=int, default=95, help="webp/jpeg quality (default 95)")
    p.add_argument("--batch", type=int, default=16, help="latents decoded together (default 16)")
    p.add_argument("--latent-space", default=None, help="latent space when the checkpoint cannot tell (sd15 vs sdxl)")
    p.add_argument("--vae-space", action="store_true",
                   help="latents are raw VAE latents (what vae.decode takes), not decoder/diffusion space")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="decoder precision (bfloat16 is several times faster on CPUs with AMX/AVX512-BF16)")
    from .runtime import add_channels_last_argument

    add_channels_last_argument(p)
    p.add_argument("--overwrite", action="store_true", help="decode everything again, even with another decoder")
    p.add_argument("--writers", type=int, default=4, help="image encoding/writing threads per process (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stats-json", default=None, help="write throughput and failures as JSON (rank 0)")
    p.set_defaults(func=_command)

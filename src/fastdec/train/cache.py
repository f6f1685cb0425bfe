"""Latent cache: encode the training crops once with the teacher, train from the stored latents.

Layout of a cache folder (``<cache_root>/<space>-<res>px-<key>/``)::

    index.json              what was planned and what is done (rewritten atomically)
    shard_00000.safetensors "latents": fp16 (n, C, h, w) or (n, T, C, h, w)

The plan is ``per_file`` random crops of every file (position, flip, and first frame and stride for videos),
drawn from the seed, stored in the index as crop parameters. Training reloads the pixels of
exactly those crops from the files, so pixels and latents stay aligned without storing pixels.
More crops per file = more variety, paid once in encoding time and disk
(fp16 latents: C*(R/f)^2*2 bytes per crop, 64 KB for FLUX.2 at 256 px).

The key hashes the teacher's fingerprint (a hash of its weights' bytes), latent space, resolution, frames
(and a video's largest frame stride), crops per file, seed and
the data files (name, size, mtime in ns): change any of them and a new cache is built; otherwise it is
reused. An interrupted build continues from the last completed shard. One process builds a cache at a time (a lock
file beside its folder); others wait for it, then reuse it. A cache whose index or shards
are damaged is an error that names the folder and says to delete it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import DataError
from ..io.files import atomic_write, output_subfolder, prepare_output_dir, write_json
from .data import Crop

INDEX = "index.json"
CACHE_VERSION = 1


def cache_key(dataset, teacher, per_file: int, seed: int) -> str:
    description = {
        "version": CACHE_VERSION,
        "teacher": teacher.fingerprint,
        "space": teacher.latent_space.to_dict(),
        "resolution": dataset.resolution,
        "frames": getattr(dataset, "frames", None),
        "per_file": per_file,
        "seed": seed,
        "root": str(dataset.root.resolve()),
        "files": dataset.describe(),
    }
    if getattr(dataset, "max_stride", 1) != 1:  # only then: caches of consecutive clips keep their keys
        description["max_stride"] = dataset.max_stride
    if getattr(dataset, "short_side", None):  # likewise: caches of unresized files keep theirs
        description["short_side"] = dataset.short_side
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _damaged(folder: Path, problem: str) -> DataError:
    return DataError(f"latent cache '{folder}' is damaged ({problem}): delete that folder and run training again "
                     "to rebuild it")


def read_index(folder: Path) -> dict[str, Any]:
    """A cache folder's index, or an error naming the folder when it is not valid JSON."""
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(folder, f"{INDEX} is unreadable: {e}") from e
    if not isinstance(index, dict) or not {"plan", "shards", "next"} <= set(index):
        raise _damaged(folder, f"{INDEX} is not a fastdec cache index")
    return index


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    write_json(folder / INDEX, index, indent=None)  # one line: the plan holds a row per crop


class LatentCache:
    """A complete cache: ``len(cache)`` entries, each a latent and the crop it was encoded from."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise DataError(f"'{self.folder}' is not a latent cache (no {INDEX})")
        self.index = read_index(self.folder)
        if not self.index.get("complete"):
            raise DataError(f"latent cache '{self.folder}' is incomplete: run training again to finish building it")
        plan = self.index["plan"]
        self.crops: list[Crop] = []
        self._where: list[tuple[str, int]] = []
        try:
            for shard in self.index["shards"]:
                self._check_shard(shard["name"], len(shard["items"]))
                for row, item in enumerate(shard["items"]):
                    self.crops.append(Crop.from_list(plan[item]))
                    self._where.append((shard["name"], row))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise _damaged(self.folder, f"{INDEX} does not match its shards: {type(e).__name__}: {e}") from e
        self._handles: dict[str, Any] = {}

    def _check_shard(self, name: str, rows: int) -> None:
        """A shard is readable and holds one latent per item (its header is read, not its data)."""
        try:
            with safe_open(str(self.folder / name), framework="pt") as f:
                stored = f.get_slice("latents").get_shape()[0]
        except (OSError, SafetensorError) as e:
            raise _damaged(self.folder, f"shard {name} is unreadable: {e}") from e
        if stored != rows:
            raise _damaged(self.folder, f"shard {name} holds {stored} latents, the index lists {rows}")

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def key(self) -> str:
        return self.index["key"]

    def latent(self, j: int) -> torch.Tensor:
        """Entry ``j``'s latent as float32."""
        name, row = self._where[j]
        handle = self._handles.get(name)
        if handle is None:  # opened lazily so each DataLoader worker gets its own handles
            handle = self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        try:
            return handle.get_slice("latents")[row:row + 1][0].float()
        except SafetensorError as e:
            raise _damaged(self.folder, f"shard {name} cannot be read: {e}") from e

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def encode_crops(teacher, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of (n, 3, R, R) crops or (n, T, 3, R, R) clips; an image teacher encodes frames independently."""
    if pixels.ndim == 5:
        n, t = pixels.shape[:2]
        z = teacher.encode(pixels.flatten(0, 1))
        return z.view(n, t, *z.shape[1:])
    return teacher.encode(pixels)


def _new_index(folder: Path, key: str, dataset, teacher, per_file: int, seed: int) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "version": CACHE_VERSION, "key": key, "teacher": teacher.fingerprint,
        "latent_space": teacher.latent_space.name, "resolution": dataset.resolution,
        "frames": getattr(dataset, "frames", None), "per_file": per_file, "seed": seed,
        "root": str(dataset.root), "files": [str(p.relative_to(dataset.root)) for p in dataset.files],
        "plan": [c.to_list() for c in dataset.random_crops(per_file, seed)],
        "shards": [], "next": 0, "skipped_files": [], "complete": False,
    }
    _write_index(folder, index)
    return index


class _ShardWriter:
    """Collects the crops of one shard, encodes them in batches, and writes the shard with the index."""

    def __init__(self, folder: Path, index: dict[str, Any], teacher, batch_size: int):
        self.folder, self.index, self.teacher, self.batch_size = folder, index, teacher, batch_size
        self.items: list[int] = []
        self.pending: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []

    def add(self, item: int, pixels: torch.Tensor) -> None:
        self.items.append(item)
        self.pending.append(pixels)
        if len(self.pending) == self.batch_size:
            self._encode_pending()

    def _encode_pending(self) -> None:
        if self.pending:
            self.latents.append(encode_crops(self.teacher, torch.stack(self.pending)).half().cpu())
            self.pending.clear()

    def finish(self, next_item: int, skipped: set[int]) -> None:
        """Write the shard (if any crop was readable), then the index saying where to continue."""
        self._encode_pending()
        if self.items:
            name = f"shard_{len(self.index['shards']):05d}.safetensors"
            tensor = torch.cat(self.latents).contiguous()
            atomic_write(self.folder / name, lambda tmp: save_file({"latents": tensor}, tmp), suffix=".safetensors")
            self.index["shards"].append({"name": name, "items": self.items})
        self.index["next"] = next_item
        self.index["skipped_files"] = sorted(skipped)
        _write_index(self.folder, self.index)
        self.items, self.latents = [], []


def _encode_remaining(folder: Path, index: dict[str, Any], dataset, teacher, batch_size: int, shard_size: int,
                      num_workers: int, progress: bool) -> None:
    """Encode the planned crops from ``index["next"]`` on, one shard at a time (resumable between shards)."""
    plan = [Crop.from_list(c) for c in index["plan"]]
    start = index["next"]
    skipped = set(index["skipped_files"])
    loader = torch.utils.data.DataLoader(_PlanPixels(dataset, plan), batch_size=None, num_workers=num_workers,
                                         sampler=range(start, len(plan)))
    writer = _ShardWriter(folder, index, teacher, batch_size)
    with tqdm(total=len(plan), initial=start, desc=f"encoding latents -> {folder.name}", unit="crop",
              disable=not progress) as bar:
        for item, pixels, error in loader:
            if pixels is not None:
                writer.add(item, pixels)
            elif plan[item].file not in skipped:  # one warning per file, not per crop
                skipped.add(plan[item].file)
                warnings.warn(f"skipping {error}", stacklevel=3)
            bar.update(1)
            if item + 1 - index["next"] >= shard_size or item + 1 == len(plan):
                writer.finish(item + 1, skipped)


def build_cache(
    dataset,
    teacher,
    cache_root: str | Path,
    per_file: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    shard_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> LatentCache:
    """Encode ``per_file`` random crops of every file of ``dataset`` with ``teacher`` (or reuse/resume)."""
    key = cache_key(dataset, teacher, per_file, seed)
    cache_root = prepare_output_dir(cache_root, "latent cache folder (--cache-dir)")
    folder = output_subfolder(cache_root, f"{teacher.latent_space.name}-{dataset.resolution}px-{key}",
                              "the latent cache's folder")
    with _build_lock(folder, progress):
        if (folder / INDEX).is_file():
            index = read_index(folder)
            if index.get("complete"):
                return LatentCache(folder)
        else:
            index = _new_index(folder, key, dataset, teacher, per_file, seed)
        _encode_remaining(folder, index, dataset, teacher, batch_size, shard_size, num_workers, progress)
        if not index["shards"]:
            raise DataError(f"no file in '{dataset.root}' could be decoded ({len(index['skipped_files'])} "
                            "unreadable): check the data folder")
        index["complete"] = True
        _write_index(folder, index)
        return LatentCache(folder)


@contextmanager
def _build_lock(folder: Path, progress: bool) -> Iterator[None]:
    """One builder per cache: runs of a sweep share ~/.cache/fastdec/latents, and the local rank 0 of every node
    may build at once; the others wait, then find the cache complete. The lock file sits beside the folder, so
    the folder can be deleted whole (the lock file stays: removing one races its next taker)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"waiting for another run that is building the latent cache {folder} ...", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _PlanPixels(torch.utils.data.Dataset):
    """Pixels of planned crops, for the encoding pass; a decoding failure comes back as ``None``."""

    def __init__(self, dataset, plan: list[Crop]):
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int):
        try:
            return item, self.dataset.load(self.plan[item]), ""
        except DataError as e:
            return item, None, str(e)


class CachedCrops(torch.utils.data.Dataset):
    """Training pairs from a cache: (pixels, latent, entry id). Pixels are re-read from the files."""

    def __init__(self, cache: LatentCache, dataset):
        self.cache, self.dataset = cache, dataset

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.dataset.load(self.cache.crops[j]), self.cache.latent(j), j


__all__ = ["CACHE_VERSION", "INDEX", "CachedCrops", "LatentCache", "build_cache", "cache_key", "encode_crops"]

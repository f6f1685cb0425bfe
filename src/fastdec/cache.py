"""Latent cache: encode the training crops once with the teacher, train from the stored latents.

Layout of a cache folder (``<cache_root>/<space>-<res>px-<key>/``)::

    index.json              what was planned and what is done (rewritten atomically)
    shard_00000.safetensors "latents": fp16 (n, C, h, w) or (n, T, C, h, w)

The plan is ``per_file`` random crops of every file (position, flip, and first frame for videos),
drawn from the seed, stored in the index as crop parameters. Training reloads the pixels of
exactly those crops from the files, so pixels and latents stay aligned without storing pixels.
More crops per file = more variety, paid once in encoding time and disk
(fp16 latents: C*(R/f)^2*2 bytes per crop, 64 KB for FLUX.2 at 256 px).

The key hashes the teacher's fingerprint, latent space, resolution, frames, crops per file, seed and
the data files (name, size, mtime): change any of them and a new cache is built; otherwise it is
reused. An interrupted build continues from the last completed shard.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoints import atomic_write
from .data import Crop, DataError

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
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


class LatentCache:
    """A complete cache: ``len(cache)`` entries, each a latent and the crop it was encoded from."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise DataError(f"'{self.folder}' is not a latent cache (no {INDEX})")
        self.index = json.loads(index_path.read_text())
        if not self.index.get("complete"):
            raise DataError(f"latent cache '{self.folder}' is incomplete: run training again to finish building it")
        plan = self.index["plan"]
        self.crops: list[Crop] = []
        self._where: list[tuple[str, int]] = []
        for shard in self.index["shards"]:
            for row, item in enumerate(shard["items"]):
                self.crops.append(Crop.from_list(plan[item]))
                self._where.append((shard["name"], row))
        self._handles: dict[str, Any] = {}

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
        return handle.get_slice("latents")[row:row + 1][0].float()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


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
    folder = Path(cache_root) / f"{teacher.latent_space.name}-{dataset.resolution}px-{key}"
    index_path = folder / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("complete"):
            return LatentCache(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        index = {
            "version": CACHE_VERSION, "key": key, "teacher": teacher.fingerprint,
            "latent_space": teacher.latent_space.name, "resolution": dataset.resolution,
            "frames": getattr(dataset, "frames", None), "per_file": per_file, "seed": seed,
            "root": str(dataset.root), "files": [str(p.relative_to(dataset.root)) for p in dataset.files],
            "plan": [c.to_list() for c in dataset.random_crops(per_file, seed)],
            "shards": [], "next": 0, "skipped_files": [], "complete": False,
        }
        _write_json(index_path, index)
    plan = [Crop.from_list(c) for c in index["plan"]]
    skipped = set(index["skipped_files"])
    bar = tqdm(total=len(plan), initial=index["next"], desc=f"encoding latents -> {folder.name}", unit="crop",
               disable=not progress)
    loader = torch.utils.data.DataLoader(
        _PlanPixels(dataset, plan), batch_size=None, num_workers=num_workers,
        sampler=range(index["next"], len(plan)),
    )
    pending_items: list[int] = []
    pending_pixels: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []

    def encode_pending() -> None:
        if pending_pixels:
            pixels = torch.stack(pending_pixels)
            if pixels.ndim == 5:  # clips: the image teacher encodes frames independently
                n, t = pixels.shape[:2]
                z = teacher.encode(pixels.flatten(0, 1))
                z = z.view(n, t, *z.shape[1:])
            else:
                z = teacher.encode(pixels)
            latents.append(z.half().cpu())
            pending_pixels.clear()

    shard_items: list[int] = []
    for item, pixels, error in loader:
        if pixels is None:
            file_index = plan[item].file
            if file_index not in skipped:  # one warning per file, not per crop
                skipped.add(file_index)
                warnings.warn(f"skipping {error}", stacklevel=2)
        else:
            shard_items.append(item)
            pending_pixels.append(pixels)
            if len(pending_pixels) == batch_size:
                encode_pending()
        bar.update(1)
        end_of_shard = (item + 1 - index["next"]) >= shard_size or item + 1 == len(plan)
        if end_of_shard:
            encode_pending()
            if shard_items:
                name = f"shard_{len(index['shards']):05d}.safetensors"
                tensor = torch.cat(latents).contiguous()
                atomic_write(folder / name, lambda tmp: save_file({"latents": tensor}, tmp), suffix=".safetensors")
                index["shards"].append({"name": name, "items": shard_items})
            index["next"] = item + 1
            index["skipped_files"] = sorted(skipped)
            _write_json(index_path, index)
            shard_items, latents = [], []
    bar.close()
    if not index["shards"]:
        raise DataError(f"no file in '{dataset.root}' could be decoded ({len(skipped)} unreadable): "
                        "check the data folder")
    index["complete"] = True
    _write_json(index_path, index)
    return LatentCache(folder)


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

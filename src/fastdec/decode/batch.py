"""``fastdec decode-batch`` as a library: many latents to image files, on one process or many (accelerate).

Latent files (``latents`` is a folder, a file or a glob) are read by :mod:`fastdec.io.latents`:

* ``.safetensors`` shards. Each tensor is either one latent ``(C, h, w)`` named by
  its tensor key, or a stack ``(N, C, h, w)`` whose names are listed in the
  file's metadata ``{"fastdec_keys": json.dumps({tensor_name: [name, ...]})}``
  (default ``{tensor_name}_{i:05d}``). ``fastdec.io.latents.write_latent_shard`` writes the first form.
* ``.pt`` files: a tensor, a dict of tensors (rules as above), or
  ``{"latents": (N, C, h, w), "keys": [name, ...]}``. Loaded with ``weights_only``.
* ``.npy`` files: ``(C, h, w)`` named by the file stem, or ``(N, C, h, w)`` named ``{stem}_{i:05d}``.

Each latent becomes ``OUT/{name}.{png|webp|jpg}``. Work is the sorted list of all
latents; process ``r`` of ``W`` takes the ``r``-th contiguous slice of it, so any
number of processes (GPUs, nodes, CPU processes) covers everything exactly once.

Crash safety: images are written to a hidden temp file in the output folder and
renamed into place, so an image under its final name is complete; a rerun skips
those (an empty or truncated one is decoded again, and so is one whose latent file
was rewritten since: the manifest records each file's size and mtime), deletes
leftover temp files and decodes the rest. One run at a time writes a folder: rank 0
holds a lock on it (``.fastdec_decode_batch.lock``) and a second run is refused. ``OUT/fastdec_manifest.json`` records the decoder identity (hash of
the weights + config + latent space + output settings) and every image; a rerun with a
different decoder or settings is refused unless ``overwrite``.

Bad input does not stop the run: an unreadable file, a bad name, a latent with the wrong
channels or NaN is reported (on stderr) and skipped, and the run ends with status 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..devices import check_launch_environment
from ..dtypes import dtype_name, parse_dtype
from ..errors import (
    LatentFileError,
    ManifestMismatchError,
    NonFiniteOutputError,
    UnsafePathError,
    UsageError,
)
from ..io.files import (TEMP_MARKER, check_name, check_output_file, output_folder, output_path, write_json,
                        write_text)
from ..io.images import IMAGE_FORMATS, save_image, to_uint8
from ..io.latents import LatentReader, LatentRef, check_key, check_latent, find_latent_files, index_latent_file
from ..resolve import check_random_weights, locate, resolve_decoder
from .common import describe_spec, require_image_decoder

MANIFEST_NAME = "fastdec_manifest.json"
RANK_MANIFEST = ".fastdec_manifest.rank{rank}.json"
PROGRESS_FILE = ".fastdec_progress.rank{rank}"
LOCK_NAME = ".fastdec_decode_batch.lock"  # left in place: removing a lock file races its next taker
TEMP_SUFFIX = TEMP_MARKER
FORMATS = IMAGE_FORMATS
_CRASH_ENV = "FASTDEC_TEST_CRASH_AFTER"  # test hook: die (os._exit) after this many images, like a kill
_MANIFEST_EVERY_S = 10.0

# the old name of a latent reference (it was bulk's own class before fastdec.io.latents)
WorkItem = LatentRef


# ----------------------------------------------------------------------------- the work
@dataclass
class Failure:
    file: str
    key: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}" + (f" [{self.key}]" if self.key else "") + f": {self.reason}"


def build_work_list(files: Sequence[Path]) -> tuple[list[LatentRef], list[Failure]]:
    """All latents of all readable files, sorted; unreadable files, bad names and duplicates become failures."""
    items: list[LatentRef] = []
    failures: list[Failure] = []
    for path in files:
        try:
            items.extend(index_latent_file(path))
        except LatentFileError as e:
            failures.append(Failure(str(path), None, str(e).removeprefix(f"{path}: ")))
    items.sort()
    unique: list[LatentRef] = []
    seen: dict[str, LatentRef] = {}
    for item in items:
        try:
            check_key(item.key)
        except UnsafePathError as e:
            failures.append(Failure(item.file, item.key, str(e)))
            continue
        if item.key in seen:
            failures.append(Failure(item.file, item.key, f"duplicate latent name, already in {seen[item.key].file}; skipped"))
            continue
        seen[item.key] = item
        unique.append(item)
    return unique, failures


def shard_for_rank(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Contiguous slice ``rank`` of ``world_size`` (disjoint and complete; contiguity keeps file reads local)."""
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


def batches_by_shape(items: Sequence[LatentRef], batch_size: int) -> list[list[LatentRef]]:
    """Consecutive batches of equal-shape latents (decoders batch only equal shapes), in work order per shape."""
    groups: OrderedDict[tuple[int, ...], list[LatentRef]] = OrderedDict()
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ----------------------------------------------------------------------------- decoder identity
def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): the same weights give the same hash anywhere."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _identity_id(identity: Mapping[str, Any]) -> str:
    """The hash of what makes two runs produce the same images (``id`` and ``source`` left out)."""
    core = {k: v for k, v in identity.items() if k not in ("id", "source")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


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
    identity["id"] = _identity_id(identity)
    identity["source"] = source
    return identity


def current_identity(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """An identity read from a manifest, in today's dtype vocabulary.

    Folders written before the one dtype vocabulary recorded ``float32``/``float16``/``bfloat16``; read as
    ``fp32``/``fp16``/``bf16`` (and the id recomputed), they resume instead of being refused.
    """
    settings = recorded.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("dtype"), str):
        return dict(recorded)
    try:
        canonical = dtype_name(settings["dtype"])
    except UsageError:
        return dict(recorded)
    if canonical == settings["dtype"]:
        return dict(recorded)
    upgraded = {**recorded, "settings": {**settings, "dtype": canonical}}
    upgraded["id"] = _identity_id(upgraded)
    return upgraded


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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise ManifestMismatchError(f"manifest '{path}' is unreadable ({e}); delete it or pass --overwrite") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestMismatchError(f"manifest '{path}' is not one decode-batch writes ({problem}); delete it or "
                                    "pass --overwrite")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's layout (None when nothing is): resume and merge read its records."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("decoder", {}), dict) or not isinstance(manifest.get("images", {}), dict):
        return "its 'decoder' or 'images' is not an object"
    for key, record in manifest.get("images", {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            return f"image {key!r} has no file name"
        try:
            check_name(record["file"], "its file")
        except UnsafePathError as e:
            return f"image {key!r}: {e}"
    return None


def existing_manifests(out: Path) -> list[tuple[Path, dict]]:
    paths = [out / MANIFEST_NAME] + sorted(out.glob(RANK_MANIFEST.format(rank="*")))
    return [(p, m) for p in paths if (m := _read_json(p)) is not None]


def check_manifest(out: Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse to mix decoders or settings in one folder (unless ``overwrite``)."""
    if overwrite:
        return
    for path, manifest in existing_manifests(out):
        old = current_identity(manifest.get("decoder", {}))
        if old.get("id") != identity["id"]:
            raise ManifestMismatchError(
                f"'{out}' holds images decoded with another decoder or settings (differs in: "
                f"{describe_difference(old, identity)}; manifest {path.name}: {old.get('source') or old.get('id')}). "
                "Use another --out folder, the same decoder and settings to resume, or --overwrite to decode everything again"
            )


def _write_manifest(path: Path, identity: Mapping[str, Any], records: Mapping[str, dict]) -> None:
    write_json(path, {"fastdec_manifest": 1, "decoder": dict(identity), "images": dict(records),
                      "updated": time.time()}, indent=1)


def recorded_images(out: Path, identity: Mapping[str, Any]) -> dict[str, Any]:
    """What this decoder's manifests (the folder's, then every rank's, newer) say was written."""
    records: dict[str, Any] = {}
    for _, manifest in existing_manifests(out):
        if current_identity(manifest.get("decoder", {})).get("id") == identity["id"]:
            records.update(manifest.get("images", {}))
    return records


def input_fingerprint(path: str) -> str:
    """Size and modification time of a latent file: a rewritten file (new latents under the old names) has new
    ones, so its images are not taken as done."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def merge_manifests(out: Path, identity: Mapping[str, Any]) -> dict:
    """Fold per-rank manifests into ``fastdec_manifest.json`` (rank 0, after everyone is done)."""
    merged = recorded_images(out, identity)
    # an image is only recorded if it is on disk (a crash can leave a manifest ahead of nothing, never the reverse)
    merged = {k: v for k, v in sorted(merged.items()) if (out / v["file"]).exists()}
    _write_manifest(out / MANIFEST_NAME, identity, merged)
    for pattern in (RANK_MANIFEST, PROGRESS_FILE):
        for path in out.glob(pattern.format(rank="*")):
            path.unlink(missing_ok=True)
    return _read_json(out / MANIFEST_NAME) or {}


def clean_temp_files(out: Path) -> int:
    """Delete temp files an interrupted run left (only ours: hidden, with our marker)."""
    count = 0
    for path in out.glob(f".*{TEMP_MARKER}*"):
        path.unlink(missing_ok=True)
        count += 1
    for path in out.glob(PROGRESS_FILE.format(rank="*")):
        path.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------------- image files
def writer_path(out: Path, key: str, image_format: str) -> Path:
    return output_path(out, f"{key}{IMAGE_FORMATS[image_format][1]}", "image name")


_TRAILERS = {"png": b"IEND\xaeB`\x82", "jpeg": b"\xff\xd9"}


def image_is_complete(path: Path, image_format: str) -> bool:
    """True for an image file that ends as its format ends: an empty or truncated file (copied off a full
    disk, cut by another tool) is not counted as done. Reads a few bytes, not the picture."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        with open(path, "rb") as f:
            if image_format == "webp":  # RIFF header: b"RIFF", payload size (file size - 8), b"WEBP"
                head = f.read(12)
                return head[:4] == b"RIFF" and head[8:] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 == size
            trailer = _TRAILERS[image_format]
            f.seek(max(0, size - len(trailer)))
            return f.read() == trailer
    except OSError:
        return False


class ImageWriter:
    """Encodes and writes images on threads (PIL releases the GIL) while the caller decodes the next batch.

    At most ``max_pending`` images wait in memory: ``submit`` blocks when writers fall behind.
    """

    def __init__(self, out: Path, image_format: str, quality: int | None, workers: int, max_pending: int):
        self.out, self.image_format, self.quality = out, image_format, quality
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fastdec-writer")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._lock = threading.Lock()
        self.written: list[LatentRef] = []
        self.failures: list[Failure] = []
        self.wait_s = 0.0
        crash = os.environ.get(_CRASH_ENV)
        self._crash_after = int(crash) if crash else None

    def path_for(self, key: str) -> Path:
        return writer_path(self.out, key, self.image_format)

    def submit(self, item: LatentRef, array: np.ndarray) -> Future:
        start = time.perf_counter()
        self._slots.acquire()
        self.wait_s += time.perf_counter() - start
        try:
            return self._pool.submit(self._write, item, array)
        except BaseException:
            self._slots.release()
            raise

    def _write(self, item: LatentRef, array: np.ndarray) -> None:
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

    def _simulate_crash(self, item: LatentRef, array: np.ndarray) -> None:
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


# ----------------------------------------------------------------------------- progress and statistics
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
            write_text(self.out / PROGRESS_FILE.format(rank=self.rank), str(self.count))
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


def _record(item: LatentRef, writer: ImageWriter, fingerprint: str) -> dict:
    return {"file": writer.path_for(item.key).name, "source": item.file, "shape": list(item.shape),
            "input": fingerprint}


def _input_changed(record: Any, item: LatentRef, fingerprint: str) -> bool:
    """An image on disk whose record says it came from other latents: another shape, or (manifests that record
    it) another version of its file. An image with no record (written just before a crash) counts as done."""
    if not isinstance(record, dict):
        return False
    if "shape" in record and record["shape"] != list(item.shape):
        return True
    return "input" in record and record["input"] != fingerprint


def summarize(all_stats: list[RankStats], index_failures: list[Failure], total: int, batch: int,
              image_format: str, stats_json: str | os.PathLike | None = None) -> int:
    """Print the run's totals (and every failure, on stderr); write ``stats_json``; the exit status."""
    images = sum(s.images for s in all_stats)
    skipped = sum(s.skipped for s in all_stats)
    seconds = max((s.seconds for s in all_stats), default=0.0)
    failures = index_failures + [f for s in all_stats for f in s.failures]
    rate = images / seconds if seconds > 0 else 0.0
    print(f"decode-batch: {images} images decoded in {seconds:.2f} s = {rate:.2f} images/s total on "
          f"{len(all_stats)} process(es); {skipped} already done; {len(failures)} failed")
    if stats_json:
        write_json(Path(stats_json), {
            "processes": len(all_stats), "latents": total, "decoded": images, "skipped": skipped,
            "failed": len(failures), "seconds": seconds, "images_per_s": rate,
            "threads_per_process": torch.get_num_threads(), "batch": batch, "format": image_format,
            "per_process": [{"rank": s.rank, "images": s.images, "seconds": s.seconds, "images_per_s": s.images_per_s,
                             "decode_s": s.decode_s, "writer_wait_s": s.writer_wait_s, "cpu_s": s.cpu_s}
                            for s in all_stats],
            "images_per_cpu_s": images / max(1e-9, sum(s.cpu_s for s in all_stats)),
            "failures": [str(f) for f in failures],
        })
    if failures:
        rest = "the rest were decoded" if images + skipped else "nothing was decoded"  # "the rest" of none misled
        print(f"decode-batch: {len(failures)} latent(s) or file(s) FAILED ({rest}):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- the run
DEFAULT_QUALITY = 95  # webp/jpeg


@dataclass
class BatchOptions:
    """How ``decode_batch`` decodes and writes (the ``decode-batch`` flags)."""

    image_format: str = "png"
    quality: int | None = None  # webp/jpeg only (None: 95); png is lossless, so a quality for it is refused
    batch: int = 16
    latent_space: str | None = None
    vae_space: bool = False
    dtype: str = "fp32"
    channels_last: bool = True
    overwrite: bool = False
    writers: int = 4
    threads: int = 0
    seed: int = 0
    progress: bool = True
    stats_json: str | None = None
    random_weights: bool = False

    def checked(self) -> "BatchOptions":
        """These options with the dtype in canonical form; a usage error for values that cannot work."""
        if self.image_format not in IMAGE_FORMATS:
            raise UsageError(f"--format {self.image_format!r} is not one of {', '.join(sorted(IMAGE_FORMATS))}")
        if self.image_format == "png" and self.quality is not None:  # it was silently ignored
            raise UsageError(f"--quality {self.quality} with --format png: png is lossless and has no quality; drop "
                             "--quality, or pick --format webp or jpeg")
        quality = DEFAULT_QUALITY if self.quality is None and self.image_format != "png" else self.quality
        if quality is not None and not 1 <= quality <= 100:
            raise UsageError(f"--quality must be in 1-100, got {quality}")
        for flag, value, least in (("--batch", self.batch, 1), ("--writers", self.writers, 1),
                                   ("--threads", self.threads, 0)):
            if value < least:
                raise UsageError(f"{flag} must be >= {least}, got {value}")
        if self.stats_json:  # written at the end: an unwritable place fails now, not after the whole run
            check_output_file(self.stats_json, "--stats-json")
        return BatchOptions(**{**asdict(self), "dtype": dtype_name(self.dtype), "quality": quality})

    def settings(self) -> dict[str, Any]:
        """The options that change the images (part of the decoder identity)."""
        return {"format": self.image_format, "quality": self.quality,
                "vae_space": bool(self.vae_space), "dtype": self.dtype}


class _Processes:
    """This process's place among the accelerate processes (one process: no collective calls)."""

    def __init__(self) -> None:
        from accelerate import PartialState

        check_launch_environment()
        # cpu=True makes torchrun-launched processes on a GPU-less machine join one gloo group instead of
        # each running alone (accelerate's own `--cpu` flag launches a single process unless given an MPI hostfile)
        use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        self.state = PartialState(cpu=use_cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.device = self.state.device

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def close(self) -> None:
        if self.world > 1:
            # an explicit teardown: gloo groups left to interpreter exit can abort (SIGABRT) a finished process
            self.state.destroy_process_group()


class _BatchRun:
    """One process's part of a ``decode_batch`` run, as the steps :meth:`run` calls in order."""

    def __init__(self, latents: str | os.PathLike, decoder: Any, out: str | os.PathLike, options: BatchOptions):
        self.latents, self.spec, self.out, self.opts = str(latents), decoder, Path(out).expanduser(), options
        self.records: dict[str, dict] = {}

    def run(self) -> int:
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.procs = _Processes()
        self.stats = RankStats(self.procs.rank)
        # every rank: the same error everywhere, none hangs at a barrier; refused here (a bad decoder, no
        # latents), the run leaves no empty --out behind
        with output_folder(self.out):
            self.load_decoder()
            self.list_work()
        self.lock_folder()
        try:
            self.prepare_folder()
            todo = self.plan()
            self.decode_all(todo)
            return self.finish()
        finally:
            if self.lock is not None:
                self.lock.release()

    def lock_folder(self) -> None:
        """Rank 0 holds a lock on ``--out`` for the whole run: a second run into the same folder (another
        decoder, or the same one twice) would pass the manifest check in the gap before either writes, then
        both write the same image names."""
        from filelock import FileLock, Timeout

        self.lock, held = None, True
        if self.procs.is_main:
            self.lock = FileLock(str(self.out / LOCK_NAME), timeout=0)
            try:
                self.lock.acquire()
            except Timeout:
                self.lock, held = None, False
        if not all(self.procs.gather(held)):  # every rank raises the same error, none waits at a barrier
            raise ManifestMismatchError(
                f"another decode-batch is writing to '{self.out}' (it holds {LOCK_NAME} there): wait for it to "
                "finish, or use another --out")

    def load_decoder(self) -> None:
        """The decoder, its identity (from the weights as loaded), then moved to this process's device."""
        torch.manual_seed(self.opts.seed)  # a preset's random weights: the same on every process
        check_random_weights(self.spec, self.opts.random_weights)
        if self.opts.seed != 0 and not self.opts.random_weights:  # a checkpoint's weights: the seed changed nothing
            raise UsageError(f"--seed seeds a preset's random weights (with --random-weights); '{self.spec}' has "
                             "weights of its own: drop --seed")
        decoder = resolve_decoder(self.spec, latent_space=self.opts.latent_space,
                                  random_weights=self.opts.random_weights).eval()
        require_image_decoder(decoder, self.spec, "decode-batch")
        located = locate(self.spec)
        self.source = (f"preset:{self.spec} (random weights, seed {self.opts.seed})" if located.kind == "preset"
                       else describe_spec(self.spec))
        self.identity = decoder_identity(decoder, self.opts.settings(), self.source)
        self.decoder = decoder.to(device=self.procs.device, dtype=parse_dtype(self.opts.dtype))
        if self.opts.channels_last:
            from ..runtime import to_channels_last

            to_channels_last(self.decoder)
        ids = self.procs.gather(self.identity["id"])
        if len(set(ids)) != 1:
            raise ManifestMismatchError(
                f"processes loaded different decoders (ids {ids}): every node must see the same --decoder file"
            )

    def list_work(self) -> None:
        self.files = find_latent_files(self.latents)
        self.items, self.index_failures = build_work_list(self.files)

    def prepare_folder(self) -> None:
        """Refuse another decoder's folder; on rank 0, clean up after a crash and (re)start the manifest."""
        self.procs.barrier()
        check_manifest(self.out, self.identity, self.opts.overwrite)  # every rank raises the same error
        self._refuse_unrecorded_images()
        self.procs.barrier()
        if self.procs.is_main:
            self._reset_folder()
        self.procs.barrier()

    def _refuse_unrecorded_images(self) -> None:
        """A folder with no manifest was never written by decode-batch (a run writes its manifest before its
        first image): an image there under a name this run writes is someone else's, not one already done."""
        if self.opts.overwrite or existing_manifests(self.out):
            return
        for item in self.items:
            taken = writer_path(self.out, item.key, self.opts.image_format)
            if taken.exists():
                raise ManifestMismatchError(
                    f"'{self.out}' holds {taken.name}, a name this run writes, but no {MANIFEST_NAME}: decode-batch "
                    "did not write it, so it is not taken as done. Use another --out, or --overwrite to replace it")

    def _reset_folder(self) -> None:
        removed = clean_temp_files(self.out)
        if removed:
            print(f"removed {removed} temp file(s) left by an interrupted run", file=sys.stderr)
        manifest_path = self.out / MANIFEST_NAME
        if self.opts.overwrite:
            # old images under this run's names go first: if this run crashes, a resume must not take them as done
            for item in self.items:
                writer_path(self.out, item.key, self.opts.image_format).unlink(missing_ok=True)
            for path in self.out.glob(RANK_MANIFEST.format(rank="*")):
                path.unlink()
            manifest_path.unlink(missing_ok=True)
        old = _read_json(manifest_path)
        _write_manifest(manifest_path, self.identity, (old or {}).get("images", {}))
        for failure in self.index_failures:
            print(f"skipping {failure}", file=sys.stderr)

    def plan(self) -> list[tuple[list[LatentRef], set[str]]]:
        """This process's batches, each with the keys still to write (complete images are done)."""
        # Batches are cut from the whole sorted list and whole batches are dealt to processes: every latent is
        # decoded in the same batch whatever the number of processes or earlier crashes, so the images are
        # bit-identical (conv kernels can differ in the last bit between batch compositions).
        my_batches = shard_for_rank(batches_by_shape(self.items, self.opts.batch), self.procs.rank, self.procs.world)
        self.writer = ImageWriter(self.out, self.opts.image_format, self.opts.quality, workers=self.opts.writers,
                                  max_pending=2 * self.opts.batch)
        self.fingerprints = {file: input_fingerprint(file) for file in {item.file for item in self.items}}
        recorded = {} if self.opts.overwrite else recorded_images(self.out, self.identity)
        todo, incomplete, changed = [], 0, 0
        for batch in my_batches:
            missing = set()
            for item in batch:
                path, fingerprint = self.writer.path_for(item.key), self.fingerprints[item.file]
                if self.opts.overwrite or not image_is_complete(path, self.opts.image_format):
                    incomplete += path.exists()
                    missing.add(item.key)
                elif _input_changed(recorded.get(item.key), item, fingerprint):
                    changed += 1
                    missing.add(item.key)
                else:
                    self.stats.skipped += 1
                    self.records[item.key] = _record(item, self.writer, fingerprint)
            if missing:
                todo.append((batch, missing))
        self.own_todo = sum(len(m) for _, m in todo)
        counts = self.procs.gather((self.own_todo, incomplete, changed))
        self.total_todo = sum(c[0] for c in counts)
        self._announce(sum(c[1] for c in counts), sum(c[2] for c in counts))
        return todo

    def _announce(self, incomplete: int, changed: int) -> None:
        if not self.procs.is_main:
            return
        if incomplete:
            print(f"{incomplete} image(s) on disk are empty or truncated: decoding them again", file=sys.stderr)
        if changed:
            print(f"{changed} image(s) on disk were decoded from latents that have changed since (their file was "
                  "rewritten): decoding them again", file=sys.stderr)
        print(f"decode-batch: {len(self.items)} latents in {len(self.files)} file(s), "
              f"{len(self.items) - self.total_todo} already done, {self.total_todo} to decode on {self.procs.world} "
              f"process(es); decoder {self.identity['id']} ({self.source})", file=sys.stderr)

    def decode_all(self, todo: list[tuple[list[LatentRef], set[str]]]) -> None:
        self.progress = _Progress(self.out, self.procs.rank, self.procs.world, self.own_todo, self.total_todo,
                                  enabled=self.opts.progress)
        self.rank_manifest = self.out / RANK_MANIFEST.format(rank=self.procs.rank)
        last_manifest = time.monotonic()
        reader = LatentReader()
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch, missing in todo:
            self.decode_one_batch(batch, missing, reader)
            self.progress.update(len(missing))
            if time.monotonic() - last_manifest > _MANIFEST_EVERY_S:
                _write_manifest(self.rank_manifest, self.identity, self.records)
                last_manifest = time.monotonic()
        self.writer.close()
        self.stats.seconds = time.perf_counter() - start
        self.stats.cpu_s = time.process_time() - cpu_start

    def _fail(self, items: Sequence[LatentRef], missing: set[str], reason: str) -> None:
        self.stats.failures += [Failure(i.file, i.key, reason) for i in items if i.key in missing]

    def read_batch(self, batch: Sequence[LatentRef], missing: set[str],
                   reader: LatentReader) -> tuple[list[torch.Tensor], list[LatentRef]]:
        """The batch's latents that read and pass the checks; the others become failures."""
        space, latents, kept = self.decoder.latent_space, [], []
        for item in batch:
            try:
                z = reader.read(item)
                hint = space.channel_mismatch_message(z.shape[0]) if z.ndim == 3 else ""
                latents.append(check_latent(z, item.key, self.decoder.latent_channels, hint))
                kept.append(item)
            except LatentFileError as e:
                self._fail([item], missing, str(e))
        return latents, kept

    def decode_one_batch(self, batch: Sequence[LatentRef], missing: set[str], reader: LatentReader) -> None:
        latents, kept = self.read_batch(batch, missing, reader)
        if not kept:
            return
        t0 = time.perf_counter()
        try:
            z = torch.stack(latents).to(self.procs.device, non_blocking=True).float()
            if self.opts.vae_space:
                z = self.decoder.latent_space.vae_to_decoder(z)
            with torch.inference_mode():
                arrays = to_uint8(self.decoder(z))  # .cpu() inside waits for the device
        except NonFiniteOutputError:
            self._fail(kept, missing, f"decoder {self.source} produced NaN or inf: no picture written "
                                      "(check the decoder weights)")
            return
        except Exception as e:  # an unexpected decode error fails this batch, not the run
            self._fail(kept, missing, f"{type(e).__name__}: {e}")
            return
        finally:
            self.stats.decode_s += time.perf_counter() - t0
        for item, array in zip(kept, arrays):
            if item.key in missing:
                self.writer.submit(item, array)
                self.records[item.key] = _record(item, self.writer, self.fingerprints[item.file])

    def finish(self) -> int:
        """Record what was written, meet the other processes, merge manifests and summarise (rank 0)."""
        stats, writer = self.stats, self.writer
        stats.images, stats.writer_wait_s = len(writer.written), writer.wait_s
        stats.failures.extend(writer.failures)
        failed = {f.key for f in writer.failures}
        _write_manifest(self.rank_manifest, self.identity, {k: v for k, v in self.records.items() if k not in failed})
        self.progress.update(0, force=True)
        self.progress.wait_for_others(self.total_todo)
        self.progress.close()
        procs = self.procs
        if procs.world > 1:
            print(f"[rank {procs.rank}/{procs.world}] {stats.images} images in {stats.seconds:.2f} s = "
                  f"{stats.images_per_s:.2f} images/s (decode {stats.decode_s:.2f} s, waiting on writers "
                  f"{stats.writer_wait_s:.2f} s)", file=sys.stderr)
        all_stats: list[RankStats] = procs.gather(stats)
        procs.barrier()
        status = 0
        if procs.is_main:
            merge_manifests(self.out, self.identity)
            status = summarize(all_stats, self.index_failures, len(self.items), self.opts.batch,
                               self.opts.image_format, self.opts.stats_json)
        if procs.world > 1:
            status = max(procs.gather(status))
            procs.barrier()
        procs.close()
        return status


def decode_batch(latents: str | os.PathLike, decoder: Any, out: str | os.PathLike, **options: Any) -> int:
    """Decode every latent under ``latents`` (folder, file or glob) to ``out/NAME.png`` (or webp/jpeg), resumably;
    run under ``accelerate launch`` to split the work over processes. ``options``: the fields of
    :class:`BatchOptions`. Returns the exit status: 0, or 1 when some latents or files failed (listed on stderr).
    """
    return _BatchRun(latents, decoder, out, BatchOptions(**options).checked()).run()

"""fastdec decode-batch: sharding over processes, crash/resume, corrupt files, decoder identity."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from factories import tiny_decoder

from fastdec import load_decoder, save_decoder
from fastdec.cli import main
from fastdec.decode.batch import (
    LOCK_NAME,
    MANIFEST_NAME,
    TEMP_SUFFIX,
    batches_by_shape,
    build_work_list,
    decoder_identity,
    image_is_complete,
    shard_for_rank,
)
from fastdec.errors import LatentFileError, UnsafePathError
from fastdec.io.images import to_uint8
from fastdec.io.latents import LatentRef, check_key, find_latent_files, write_latent_shard

ACCELERATE = Path(sys.executable).parent / "accelerate"
N_LATENTS = 200


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """200 latents (4x8x8) in every supported layout, and two tiny decoders."""
    root = tmp_path_factory.mktemp("bulk")
    latents_dir = root / "latents"
    latents_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    latents: dict[str, torch.Tensor] = {}

    def fresh(n: int) -> torch.Tensor:
        return torch.randn(n, 4, 8, 8, generator=g) * 1.5

    for shard in range(3):  # one tensor per key
        z = fresh(50)
        shard_latents = {f"img_{shard}_{i:03d}": z[i] for i in range(50)}
        write_latent_shard(latents_dir / f"shard{shard}.safetensors", shard_latents)
        latents.update(shard_latents)
    stacked = fresh(25)  # stacked tensor + names in metadata
    names = [f"stacked_{i:02d}" for i in range(25)]
    save_file({"latents": stacked}, str(latents_dir / "stacked.safetensors"),
              metadata={"fastdec_keys": json.dumps({"latents": names})})
    latents.update(zip(names, stacked))
    pt = fresh(15)  # .pt with latents + keys
    pt_names = [f"pt_{i:02d}" for i in range(15)]
    torch.save({"latents": pt, "keys": pt_names}, latents_dir / "more.pt")
    latents.update(zip(pt_names, pt))
    npy = fresh(10)  # stacked .npy: names are stem_00000...
    np.save(latents_dir / "arr.npy", npy.numpy())
    latents.update({f"arr_{i:05d}": npy[i] for i in range(10)})
    assert len(latents) == N_LATENTS

    decoder_a, decoder_b = tiny_decoder("tae-64", seed=1), tiny_decoder("tae-64", seed=2)
    save_decoder(decoder_a, root / "a.safetensors")
    save_decoder(decoder_b, root / "b.safetensors")
    return {"root": root, "latents_dir": latents_dir, "latents": latents,
            "a": root / "a.safetensors", "b": root / "b.safetensors"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` on CPU processes (torchrun underneath; --multi_gpu is accelerate's multi-process mode)."""
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "fastdec", "decode-batch", *args, "--no-progress", "--threads", "1"]
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def _pngs(out: Path) -> list[Path]:
    """The images under their final names (temp files of a write in progress are hidden: '.name...')."""
    return sorted(p for p in out.glob("*.png") if not p.name.startswith("."))


def _images(out: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in _pngs(out):
        with Image.open(path) as image:
            arrays[path.stem] = np.asarray(image.convert("RGB")).copy()  # a truncated file fails here
    return arrays


def _hidden(out: Path) -> list[str]:
    """Hidden files left in --out but the lock file, which stays (removing one races its next taker)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME)


@pytest.fixture(scope="module")
def single_process_run(workspace) -> dict[str, np.ndarray]:
    """The reference: one plain process, in this interpreter."""
    out = workspace["root"] / "single"
    assert main(["decode-batch", "--latents", str(workspace["latents_dir"]), "--decoder", str(workspace["a"]),
                 "--out", str(out), "--batch", "8", "--no-progress"]) == 0
    return _images(out)


def test_single_process_matches_direct_decoding(workspace, single_process_run):
    decoder = load_decoder(workspace["a"]).eval()
    assert sorted(single_process_run) == sorted(workspace["latents"])
    worst = 0
    with torch.inference_mode():
        for key, z in list(workspace["latents"].items())[::10]:  # every 10th: one-at-a-time decoding is slow here
            expected = to_uint8(decoder(z[None]))[0]
            assert single_process_run[key].shape == (64, 64, 3)
            # another model object from the same file, one latent at a time instead of batches of 8: fp32 results
            # differ by a few 1e-6, which moves a pixel across at most one rounding step (1/255)
            worst = max(worst, int(np.abs(expected.astype(int) - single_process_run[key]).max()))
    assert worst <= 1


def test_two_processes_decode_each_latent_once_identically(workspace, single_process_run):
    out = workspace["root"] / "two"
    stats = workspace["root"] / "two_stats.json"
    result = _launch(["--latents", str(workspace["latents_dir"]), "--decoder", str(workspace["a"]), "--out", str(out),
                      "--batch", "8", "--stats-json", str(stats)])
    assert result.returncode == 0, result.stderr[-3000:]
    images = _images(out)
    assert sorted(images) == sorted(single_process_run)  # exactly the 200 names
    for key, expected in single_process_run.items():
        np.testing.assert_array_equal(images[key], expected, err_msg=key)
    report = json.loads(stats.read_text())
    assert report["processes"] == 2 and report["decoded"] == N_LATENTS and report["failed"] == 0
    per_rank = [r["images"] for r in report["per_process"]]
    assert sum(per_rank) == N_LATENTS and min(per_rank) > 0
    assert "images/s total on 2 process(es)" in result.stdout
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["images"]) == N_LATENTS
    assert _hidden(out) == []  # no temp, per-rank manifest or progress files left


def test_crash_then_resume_completes_exactly_once(workspace, single_process_run):
    out = workspace["root"] / "crash"
    args = ["--latents", str(workspace["latents_dir"]), "--decoder", str(workspace["a"]), "--out", str(out),
            "--batch", "8"]
    crashed = _launch(args, env={"FASTDEC_TEST_CRASH_AFTER": "30"})
    assert crashed.returncode != 0
    done_before = len(_pngs(out))
    assert 30 <= done_before < N_LATENTS
    assert any(name.endswith(TEMP_SUFFIX) for name in _hidden(out))  # the "killed mid-write" leftover

    stats = workspace["root"] / "crash_stats.json"
    resumed = _launch([*args, "--stats-json", str(stats)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "temp file(s) left by an interrupted run" in resumed.stderr
    report = json.loads(stats.read_text())
    assert report["skipped"] == done_before and report["decoded"] == N_LATENTS - done_before
    images = _images(out)  # every file opens and decodes fully
    assert sorted(images) == sorted(single_process_run)
    for key, expected in single_process_run.items():
        np.testing.assert_array_equal(images[key], expected, err_msg=key)
    assert _hidden(out) == []
    assert len(json.loads((out / MANIFEST_NAME).read_text())["images"]) == N_LATENTS


def test_corrupt_files_are_reported_skipped_and_fail_the_run(workspace, tmp_path, capsys):
    latents = tmp_path / "latents"
    latents.mkdir()
    g = torch.Generator().manual_seed(3)
    write_latent_shard(latents / "good.safetensors", {f"g{i}": torch.randn(4, 8, 8, generator=g) for i in range(6)})
    (latents / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    good = latents / "good.safetensors"
    (latents / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    np.save(latents / "wrong_channels.npy", np.zeros((16, 8, 8), np.float32))
    nan = torch.randn(4, 8, 8)
    nan[0, 0, 0] = float("nan")
    write_latent_shard(latents / "nan.safetensors", {"has_nan": nan, "fine": torch.randn(4, 8, 8)})
    stack = torch.randn(3, 4, 8, 8)  # malformed shards: names that are not JSON, or not one per latent
    save_file({"latents": stack}, str(latents / "bad_meta.safetensors"), metadata={"fastdec_keys": "{oops"})
    save_file({"latents": stack}, str(latents / "bad_count.safetensors"),
              metadata={"fastdec_keys": json.dumps({"latents": ["only", "two"]})})
    save_file({"k" * 250: torch.randn(4, 8, 8), "short": torch.randn(4, 8, 8)}, str(latents / "long_key.safetensors"))
    out = tmp_path / "out"
    status = main(["decode-batch", "--latents", str(latents), "--decoder", str(workspace["a"]), "--out", str(out),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert sorted(p.stem for p in _pngs(out)) == sorted([f"g{i}" for i in range(6)] + ["fine", "short"])
    for name in ("broken.safetensors", "truncated.safetensors", "wrong_channels.npy", "has_nan",
                 "bad_meta.safetensors", "bad_count.safetensors", "k" * 250):
        assert name in err, name
    assert "expects 4 latent channels" in err and "NaN" in err and "must list 3 names" in err
    assert "bytes long" in err  # the too-long name says why
    assert "7 latent(s) or file(s) FAILED (the rest were decoded)" in err
    assert "Traceback" not in err


def test_nan_decoder_output_is_a_failure_not_a_black_picture(workspace, tmp_path, capsys):
    decoder = tiny_decoder("tae-64", seed=1)
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.fill_(float("nan"))
    path = save_decoder(decoder, tmp_path / "nan.safetensors")
    write_latent_shard(tmp_path / "s.safetensors", {f"k{i}": torch.randn(4, 8, 8) for i in range(3)})
    out = tmp_path / "out"
    assert main(["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(path),
                 "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "3 latent(s) or file(s) FAILED (nothing was decoded)" in err and "NaN" in err  # was "the rest were"
    assert _pngs(out) == []


def test_video_decoder_is_refused(tmp_path, capsys):
    path = save_decoder(tiny_decoder("tae-causal-64"), tmp_path / "causal.safetensors")
    write_latent_shard(tmp_path / "s.safetensors", {"k": torch.randn(4, 8, 8)})
    assert main(["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(path),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "is a video decoder" in capsys.readouterr().err


def test_seed_with_a_checkpoint_is_refused(tmp_path, capsys):
    # --seed 7 with a checkpoint resumed the --seed 0 folder: the seed changed nothing
    path = save_decoder(tiny_decoder("tae-64"), tmp_path / "d.safetensors")
    write_latent_shard(tmp_path / "s.safetensors", {"k": torch.randn(4, 8, 8)})
    assert main(["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(path),
                 "--out", str(tmp_path / "out"), "--no-progress", "--seed", "7"]) == 2
    assert "--seed seeds a preset's random weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_resume_decodes_empty_and_truncated_images_again(workspace, tmp_path, capsys):
    g = torch.Generator().manual_seed(6)
    write_latent_shard(tmp_path / "s.safetensors", {f"k{i}": torch.randn(4, 8, 8, generator=g) for i in range(5)})
    out = tmp_path / "out"
    stats = tmp_path / "stats.json"
    args = ["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(workspace["a"]),
            "--out", str(out), "--no-progress", "--stats-json", str(stats)]
    assert main(args) == 0
    first = _images(out)
    (out / "k1.png").write_bytes(b"")
    (out / "k3.png").write_bytes((out / "k3.png").read_bytes()[:-20])
    capsys.readouterr()
    assert main(args) == 0
    assert "2 image(s) on disk are empty or truncated" in capsys.readouterr().err
    report = json.loads(stats.read_text())
    assert report["skipped"] == 3 and report["decoded"] == 2
    again = _images(out)  # every file opens fully
    for key, expected in first.items():  # the same decoder file and batch: the same pixels
        np.testing.assert_array_equal(again[key], expected, err_msg=key)


def test_a_rewritten_latent_file_is_decoded_again_not_taken_as_done(workspace, tmp_path, capsys):
    """A resume skips images already on disk, but not ones decoded from a file that has new latents since."""
    g = torch.Generator().manual_seed(7)
    source = tmp_path / "s.safetensors"
    write_latent_shard(source, {f"k{i}": torch.randn(4, 8, 8, generator=g) for i in range(3)})
    out = tmp_path / "out"
    args = ["decode-batch", "--latents", str(source), "--decoder", str(workspace["a"]), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    first = _images(out)
    new = {f"k{i}": torch.randn(4, 8, 8, generator=g) * 3 for i in range(3)}
    write_latent_shard(source, new)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # a coarse clock
    capsys.readouterr()
    assert main(args) == 0
    assert "3 image(s) on disk were decoded from latents that have changed" in capsys.readouterr().err
    decoder = load_decoder(workspace["a"]).eval()
    with torch.inference_mode():
        expected = to_uint8(decoder(torch.stack([new[k] for k in sorted(new)])))
    again = _images(out)
    for key, array in zip(sorted(new), expected):
        assert not np.array_equal(again[key], first[key])
        assert np.abs(again[key].astype(int) - array).max() <= 1  # fp32 kernels: a rounding step at most
    assert main(args) == 0 and "3 already done" in capsys.readouterr().err  # and now they are done


def test_a_second_run_into_a_folder_being_written_is_refused(workspace, tmp_path, capsys):
    """Rank 0 holds a lock on --out: a second run (here, another decoder) is refused before it reads or writes
    anything there, instead of both passing the manifest check and writing the same names."""
    from filelock import FileLock

    write_latent_shard(tmp_path / "s.safetensors", {"k0": torch.randn(4, 8, 8)})
    out = tmp_path / "out"
    out.mkdir()
    args = ["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--out", str(out), "--no-progress"]
    with FileLock(str(out / LOCK_NAME)):  # what a run in progress holds
        assert main([*args, "--decoder", str(workspace["b"])]) == 2
        err = capsys.readouterr().err
        assert "another decode-batch is writing to" in err and "use another --out" in err
        assert not _pngs(out) and not (out / MANIFEST_NAME).exists()
    assert main([*args, "--decoder", str(workspace["a"])]) == 0  # the lock is gone with its holder
    assert [p.name for p in _pngs(out)] == ["k0.png"]


@pytest.mark.parametrize("image_format", ["png", "webp", "jpeg"])
def test_image_is_complete_reads_the_end_of_the_file(tmp_path, image_format):
    from fastdec.io.images import IMAGE_FORMATS, save_image

    path = save_image(torch.rand(3, 16, 16), tmp_path / f"x{IMAGE_FORMATS[image_format][1]}", image_format)
    assert image_is_complete(path, image_format)
    data = path.read_bytes()
    for damaged in (data[:-3], data[: len(data) // 2], b""):
        path.write_bytes(damaged)
        assert not image_is_complete(path, image_format), len(damaged)
    assert not image_is_complete(tmp_path / "missing.png", image_format)


def test_dtype_aliases_and_folders_of_older_versions_resume(workspace, tmp_path, capsys):
    """--dtype float32 is fp32; a manifest that recorded 'float32' (before the one dtype vocabulary) resumes."""
    write_latent_shard(tmp_path / "s.safetensors", {f"k{i}": torch.randn(4, 8, 8) for i in range(3)})
    out = tmp_path / "out"
    base = ["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(workspace["a"]),
            "--out", str(out), "--no-progress"]
    assert main([*base, "--dtype", "float32"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["decoder"]["settings"]["dtype"] == "fp32"
    old_settings = {**manifest["decoder"]["settings"], "dtype": "float32"}
    manifest["decoder"] = decoder_identity(load_decoder(workspace["a"]), old_settings, str(workspace["a"]))
    assert manifest["decoder"]["id"] != json.loads((out / MANIFEST_NAME).read_text())["decoder"]["id"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(base) == 0
    assert "3 already done" in capsys.readouterr().err
    assert main([*base, "--dtype", "bf16"]) == 2
    assert "dtype: 'fp32' -> 'bf16'" in capsys.readouterr().err


def test_other_decoder_or_settings_refused_unless_overwrite(workspace, tmp_path, capsys):
    latents = tmp_path / "latents"
    g = torch.Generator().manual_seed(4)
    zs = {f"k{i}": torch.randn(4, 8, 8, generator=g) for i in range(5)}
    write_latent_shard(latents / "s.safetensors", zs)
    out = tmp_path / "out"
    base = ["decode-batch", "--latents", str(latents), "--out", str(out), "--no-progress"]
    assert main([*base, "--decoder", str(workspace["a"])]) == 0
    capsys.readouterr()

    assert main([*base, "--decoder", str(workspace["b"])]) == 2
    err = capsys.readouterr().err
    assert "another decoder or settings" in err and "(differs in: decoder weights;" in err and "--overwrite" in err
    assert main([*base, "--decoder", str(workspace["a"]), "--vae-space"]) == 2
    assert "vae_space: False -> True" in capsys.readouterr().err

    assert main([*base, "--decoder", str(workspace["a"])]) == 0  # same decoder: resumes, nothing to do
    assert "5 already done" in capsys.readouterr().err

    assert main([*base, "--decoder", str(workspace["b"]), "--overwrite"]) == 0
    decoder_b = load_decoder(workspace["b"]).eval()
    with torch.inference_mode():
        expected = to_uint8(decoder_b(torch.stack([zs[k] for k in sorted(zs)])))
    images = _images(out)
    for key, array in zip(sorted(zs), expected):
        assert np.abs(images[key].astype(int) - array).max() <= 1
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["decoder"]["source"] == str(workspace["b"]) and len(manifest["images"]) == 5


@pytest.mark.parametrize("edit, problem", [
    (lambda m: [1, 2], "it holds a JSON list, not an object"),
    (lambda m: {**m, "images": {**m["images"], "zz": 5}}, "image 'zz' has no file name"),
    (lambda m: {**m, "images": {"k0": {"file": "../../k0.png"}}}, "image 'k0': its file '../../k0.png'"),
    (lambda m: {**m, "decoder": "a"}, "its 'decoder' or 'images' is not an object"),
])
def test_a_manifest_of_another_layout_is_named_not_a_traceback(workspace, tmp_path, capsys, edit, problem):
    latents = tmp_path / "latents"
    write_latent_shard(latents / "s.safetensors", {f"k{i}": torch.randn(4, 8, 8) for i in range(2)})
    out = tmp_path / "out"
    args = ["decode-batch", "--latents", str(latents), "--out", str(out), "--decoder", str(workspace["a"]),
            "--no-progress"]
    assert main(args) == 0
    (out / MANIFEST_NAME).write_text(json.dumps(edit(json.loads((out / MANIFEST_NAME).read_text()))))
    capsys.readouterr()
    assert main(args) == 2  # an AttributeError or TypeError traceback before, one after the images were written
    err = capsys.readouterr().err
    assert f"is not one decode-batch writes ({problem}" in err and "--overwrite" in err
    assert _hidden(out) == []
    assert main([*args, "--overwrite"]) == 0 and len(json.loads((out / MANIFEST_NAME).read_text())["images"]) == 2


def test_vae_space_latents_are_converted(workspace, tmp_path):
    decoder = load_decoder(workspace["a"]).eval()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 8, 8, generator=g)
    raw = decoder.latent_space.decoder_to_vae(z)
    write_latent_shard(tmp_path / "raw.safetensors", {f"r{i}": raw[i] for i in range(3)})
    out = tmp_path / "out"
    assert main(["decode-batch", "--latents", str(tmp_path / "raw.safetensors"), "--decoder", str(workspace["a"]),
                 "--out", str(out), "--vae-space", "--no-progress"]) == 0
    with torch.inference_mode():
        expected = to_uint8(decoder(z)).astype(int)
        unconverted = to_uint8(decoder(raw)).astype(int)
    images = _images(out)
    for i in range(3):
        assert np.abs(images[f"r{i}"] - expected[i]).max() <= 1
        assert np.abs(images[f"r{i}"] - unconverted[i]).mean() > 1  # the conversion did something


def test_lossy_formats_write_openable_images(workspace, tmp_path):
    write_latent_shard(tmp_path / "s.safetensors", {"q": torch.randn(4, 8, 8)})
    for image_format, suffix in (("webp", ".webp"), ("jpeg", ".jpg")):
        out = tmp_path / image_format
        assert main(["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(workspace["a"]),
                     "--out", str(out), "--format", image_format, "--quality", "90", "--no-progress"]) == 0
        with Image.open(out / f"q{suffix}") as image:
            assert image.format == image_format.upper() and image.size == (64, 64)
        # --quality reaches the encoder (a png took it and ignored it): quality 5 is a smaller file
        low = tmp_path / f"{image_format}-low"
        assert main(["decode-batch", "--latents", str(tmp_path / "s.safetensors"), "--decoder", str(workspace["a"]),
                     "--out", str(low), "--format", image_format, "--quality", "5", "--no-progress"]) == 0
        assert (low / f"q{suffix}").stat().st_size < (out / f"q{suffix}").stat().st_size


@pytest.mark.parametrize("n,world", [(0, 3), (7, 3), (200, 2), (5, 8), (101, 4)])
def test_shards_are_disjoint_and_complete(n, world):
    items = list(range(n))
    shards = [shard_for_rank(items, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_batches_group_equal_shapes():
    items = [LatentRef("f", f"t{i}", -1, f"k{i}", (4, 8, 8) if i % 3 else (4, 16, 8)) for i in range(10)]
    batches = batches_by_shape(items, 3)
    assert all(len({it.shape for it in b}) == 1 and len(b) <= 3 for b in batches)
    assert sorted(it.key for b in batches for it in b) == sorted(it.key for it in items)


def test_work_list_names_duplicates_and_bad_keys(tmp_path):
    write_latent_shard(tmp_path / "a.safetensors", {"x": torch.zeros(4, 8, 8), "y": torch.zeros(4, 8, 8)})
    write_latent_shard(tmp_path / "b.safetensors", {"x": torch.zeros(4, 8, 8)})
    items, failures = build_work_list(find_latent_files(str(tmp_path / "*.safetensors")))
    assert [i.key for i in items] == ["x", "y"]
    assert len(failures) == 1 and "duplicate" in failures[0].reason and failures[0].file.endswith("b.safetensors")
    for key in ("../escape", "a/b", ".hidden", "new\nline", "k" * 250):
        with pytest.raises(UnsafePathError, match="cannot be a file name"):
            check_key(key)
    with pytest.raises(LatentFileError, match=r"\(C, h, w\)"):
        write_latent_shard(tmp_path / "c.safetensors", {"batch": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(LatentFileError, match="no latent files"):
        find_latent_files(str(tmp_path / "nothing*.npy"))


def test_images_in_a_folder_without_a_manifest_are_not_taken_as_done(workspace, tmp_path, capsys):
    """A photo named like an output, or the images of a run whose manifest was deleted, counted as already
    done and were recorded as this decoder's (exit 0); without a manifest nothing there is decode-batch's."""
    latents = tmp_path / "latents"
    g = torch.Generator().manual_seed(5)
    write_latent_shard(latents / "s.safetensors", {f"k{i}": torch.randn(4, 8, 8, generator=g) for i in range(3)})
    out = tmp_path / "out"
    base = ["decode-batch", "--latents", str(latents), "--out", str(out), "--no-progress"]
    assert main([*base, "--decoder", str(workspace["a"])]) == 0
    (out / MANIFEST_NAME).unlink()
    capsys.readouterr()
    assert main([*base, "--decoder", str(workspace["b"])]) == 2
    err = capsys.readouterr().err
    assert "holds k0.png, a name this run writes, but no fastdec_manifest.json" in err and "--overwrite" in err
    assert not (out / MANIFEST_NAME).exists()  # refused before a manifest claimed the images
    assert main([*base, "--decoder", str(workspace["b"]), "--overwrite"]) == 0
    assert "3 already done" not in capsys.readouterr().err


@pytest.mark.parametrize("env, words", [
    ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"},
     "RANK=5 with WORLD_SIZE=2: a rank is 0 to WORLD_SIZE - 1"),  # it waited forever at the rendezvous
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a run needs at least 1 process"),  # ran as one process, exit 0
    ({"RANK": "1"}, "RANK=1 with WORLD_SIZE=1"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 without MASTER_ADDR, MASTER_PORT"),  # accelerate's traceback
])
def test_bad_launch_variables_are_named_before_any_process_group(workspace, tmp_path, monkeypatch, capsys, env, words):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert main(["decode-batch", "--latents", str(workspace["latents_dir"]), "--decoder", str(workspace["a"]),
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "torchrun or accelerate launch" in err and "Traceback" not in err
    assert not out.exists()

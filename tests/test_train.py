"""The training loop: real FLUX.2 distillation (slow), resume equivalence (also past a truncated checkpoint),
checkpoints that cannot run code, two-process DDP, option checks, errors, losses."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import make_images, tiny_decoder_file, tiny_encoder_file
from safetensors.torch import load_file

from fastdec import load_decoder
from fastdec.cli import main as cli_main
from fastdec.errors import DataError, NonFiniteOutputError, UnsafePathError, UsageError
from fastdec.train import GlobalBatches, TrainConfig, TrainError, lr_factor, make_config, train
from fastdec.train.losses import (LossConfigError, PatchDiscriminator, hinge_d_loss, hinge_g_loss, load_lpips,
                                  ms_ssim_loss, ms_ssim_scales, temporal_loss)
from fastdec.train.state import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_setup(tmp_path):
    return {
        "teacher": str(tiny_encoder_file(tmp_path / "w" / "taesdxl_encoder.pth")),
        "decoder": str(tiny_decoder_file(tmp_path / "w" / "student.safetensors")),
        "data": str(make_images(tmp_path / "train", 6)),
        "val": str(make_images(tmp_path / "val", 2, seed=9)),
        "cache_dir": str(tmp_path / "cache"),
        "resolution": 32, "batch_size": 2, "workers": 0, "warmup": 2, "log_every": 1, "val_every": 100,
        # fp32 pinned: `auto` is bf16 on CPUs with native bf16, and these tests compare numbers across runs
        # and against fp32 tolerances; the bf16 path has tests of its own below
        "mixed_precision": "no",
    }


def _run(**kwargs) -> TrainConfig:
    config = TrainConfig(**kwargs)
    train(config)
    return config


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "decoder.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # the same run, interrupted and resumed on the same machine: the same operations on the same numbers,
    # so the weights are bit-identical (not merely close)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_setup, tmp_path):
    straight = _run(**tiny_setup, steps=6, ckpt_every=3, out=str(tmp_path / "straight"), log_samples=True)
    _run(**tiny_setup, steps=6, ckpt_every=3, out=str(tmp_path / "resumed"), stop_at=3, log_samples=True)
    assert not (tmp_path / "resumed" / "decoder.safetensors").exists()  # stopped early: no export yet
    with (tmp_path / "resumed" / "samples" / "rank0.jsonl").open("a") as log:  # a kill after step 4's line
        log.write(json.dumps({"step": 4, "rank": 0, "ids": [0, 1], "wrote": []}) + '\n{"step": 5, "ra')
    _run(**tiny_setup, steps=6, ckpt_every=3, out=str(tmp_path / "resumed"), resume=True, log_samples=True)

    a, b = _weights(Path(straight.out)), _weights(tmp_path / "resumed")
    first = load_file(str(Path(tiny_setup["decoder"])))
    assert any(not torch.equal(a[k], first[k]) for k in a)  # it trained
    _assert_same_weights(a, b)
    # the resumed run continued the data stream where it stopped
    read = lambda run: [json.loads(line)["ids"] for line in (tmp_path / run / "samples" / "rank0.jsonl").open()]
    assert read("straight") == read("resumed")
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "resumed" / "metrics.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # the export is what load_decoder and swap_decoder take
    decoder = load_decoder(tmp_path / "resumed" / "decoder.safetensors")
    assert decoder(torch.randn(1, 4, 4, 4)).shape == (1, 3, 32, 32)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_setup, tmp_path):
    base = {**tiny_setup, "val": None, "steps": 6, "ckpt_every": 2}
    _run(**base, out=str(tmp_path / "straight"))
    _run(**base, out=str(tmp_path / "cut"), stop_at=4)
    checkpoints = tmp_path / "cut" / "checkpoints"
    latest = checkpoints / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # the disk filled up while it was copied
    with pytest.warns(UserWarning, match=r"step_00000004\.pt.*truncated or corrupt.*step_00000002\.pt"):
        _run(**base, out=str(tmp_path / "cut"), resume=True)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "cut"))

    # nothing intact left: an error naming the files, before any work
    for path in checkpoints.iterdir():
        path.write_bytes(b"")
    with pytest.raises(TrainError, match="can be read.*step_00000002.pt"):
        _run(**base | {"cache_dir": str(tmp_path / "unused")}, out=str(tmp_path / "cut"), resume=True)
    assert not (tmp_path / "unused").exists()


def test_a_fresh_run_into_a_folder_of_checkpoints_is_refused_and_resume_before_any_starts_fresh(tiny_setup, tmp_path,
                                                                                                capsys):
    out = tmp_path / "run"
    _run(**tiny_setup, steps=4, stop_at=2, ckpt_every=1, out=str(out))
    said = capsys.readouterr().out
    assert "stopped at step 2 of 4 (--stop-at)" in said and "step_00000002.pt: run the same command with --resume" in said
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    # without --resume it overwrote step 1, kept step 2, and a later --resume continued the old run
    with pytest.raises(TrainError, match=r"holds an earlier run's checkpoints \(newest step_00000002\.pt\): pass "
                                         r"--resume to continue it, or another --out"):
        _run(**tiny_setup, steps=4, stop_at=1, out=str(out))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before
    # a requeued job that always passes --resume, stopped before its first checkpoint: it starts at step 0
    fresh = tmp_path / "fresh"
    _run(**tiny_setup, steps=2, out=str(fresh), resume=True)
    assert "no checkpoint in" in capsys.readouterr().out and (fresh / "decoder.safetensors").is_file()


@pytest.mark.parametrize("content", [b"", b"\x80", b"\x80\x02}q\x00(X", b"garbage!"],
                         ids=["empty", "one byte", "cut pickle", "no pickle"])
def test_every_unreadable_checkpoint_is_skippable_not_a_traceback(tmp_path, content):
    """A cut legacy pickle fails in torch with IndexError or struct.error, not only EOFError: each is a
    checkpoint that cannot be read (a resume goes on to an older one), and the message never passes on
    torch's advice to load with weights_only=False."""
    from fastdec.errors import CheckpointError

    path = tmp_path / "step_00000001.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        read_checkpoint(path)
    assert "weights_only" not in str(error.value)
    path.write_bytes(b"\x80\x02c__builtin__\neval\n")  # asks for code: refused, the resume stops
    with pytest.raises(TrainError, match="holds eval.*never unpickles code"):
        read_checkpoint(path)


def test_keep_checkpoints_deletes_all_but_the_newest_and_resume_continues(tiny_setup, tmp_path):
    # every checkpoint holds model, EMA and optimizer: --ckpt-every 1 over a long run filled the disk
    out = tmp_path / "run"
    _run(**tiny_setup, steps=5, stop_at=4, ckpt_every=1, keep_checkpoints=2, out=str(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000004.pt"]
    _run(**tiny_setup, steps=5, ckpt_every=1, keep_checkpoints=2, out=str(out), resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000005.pt"]
    assert (out / "decoder.safetensors").is_file()
    # resumed past a truncated newest checkpoint, the run's next one is kept: counting the unreadable one
    # ahead of it as the newest deleted every checkpoint that could be read
    cut = tmp_path / "cut"
    _run(**tiny_setup, steps=5, stop_at=4, ckpt_every=2, out=str(cut))
    (cut / "checkpoints" / "step_00000004.pt").write_bytes(b"\x80")
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        _run(**tiny_setup, steps=5, stop_at=3, ckpt_every=1, keep_checkpoints=1, out=str(cut), resume=True)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000004.pt"]
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        _run(**tiny_setup, steps=5, ckpt_every=1, keep_checkpoints=1, out=str(cut), resume=True)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000005.pt"]
    with pytest.raises(UsageError, match="--keep-checkpoints must be a finite number greater than 0"):
        _run(**tiny_setup, steps=5, keep_checkpoints=0, out=str(tmp_path / "none"))


@pytest.mark.parametrize("link, options", [
    ("checkpoints", {"ckpt_every": 1}), ("grids", {"val_every": 1}), ("samples", {"log_samples": True}),
    ("samples/rank0.jsonl", {"log_samples": True}),
])
def test_a_link_inside_the_run_folder_is_refused_and_nothing_outside_changes(tiny_setup, tmp_path, link, options):
    # a link in --out to a folder elsewhere got checkpoints and grids written there, and --keep-checkpoints
    # deleted that folder's files; a linked sample log was appended to
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "step_00000001.pt"
    victim.write_bytes(b"someone else's file")
    out = tmp_path / "run"
    (out / Path(link).parent).mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(victim if link.endswith(".jsonl") else outside)
    with pytest.raises(UnsafePathError, match="outside|is a link to"):
        _run(**{**tiny_setup, "val_every": 100, **options}, steps=2, keep_checkpoints=1, out=str(out))
    assert sorted(p.name for p in outside.iterdir()) == ["step_00000001.pt"]
    assert victim.read_bytes() == b"someone else's file"


def test_a_run_refused_for_its_data_leaves_no_empty_out(tiny_setup, tmp_path):
    bad = make_images(tmp_path / "bad", 2, size=(128, 128), suffix=".jpg")
    for jpg in bad.iterdir():  # the header reads, the pixels do not: found only when the cache encodes them
        jpg.write_bytes(jpg.read_bytes()[:1000])
    out = tmp_path / "runs" / "new"
    with pytest.raises(DataError, match="could be decoded"), pytest.warns(UserWarning, match="skipping cannot decode"):
        _run(**{**tiny_setup, "data": str(bad), "val": None}, steps=1, out=str(out))
    assert not (tmp_path / "runs").exists()


def test_a_resume_through_a_linked_checkpoints_folder_is_refused_before_it_starts_afresh(tiny_setup, tmp_path,
                                                                                          capsys):
    out = tmp_path / "run"
    _run(**tiny_setup, steps=2, stop_at=1, ckpt_every=1, out=str(out))
    (out / "checkpoints").rename(tmp_path / "scratch")
    (out / "checkpoints").symlink_to(tmp_path / "scratch")
    from fastdec.train import latest_checkpoint

    assert latest_checkpoint(out).name == "step_00000001.pt"  # reading is fine
    metrics = (out / "metrics.csv").read_bytes()
    with pytest.raises(UnsafePathError, match="Replace the link by a real folder holding what it points to"):
        _run(**tiny_setup, steps=2, ckpt_every=1, out=str(out), resume=True)
    assert "starting from step 0" not in capsys.readouterr().out
    assert (out / "metrics.csv").read_bytes() == metrics  # refused at the start: no step trained, none logged
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["step_00000001.pt"]
    (out / "checkpoints").unlink()
    (out / "loop").symlink_to(out / "loop")  # a link that loops: named, where resolve() raised RuntimeError
    from fastdec.io.files import check_subfolder

    with pytest.raises(UnsafePathError, match="is a link to"):
        check_subfolder(out, "loop")


def test_a_linked_latent_cache_folder_is_refused(tiny_setup, tmp_path):
    _run(**tiny_setup, steps=1, out=str(tmp_path / "first"))
    cache = Path(tiny_setup["cache_dir"])
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    outside = tmp_path / "outside"
    entry.rename(outside)
    entry.symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir())
    (outside / "index.json").unlink()  # so the run would build the cache again, through the link
    with pytest.raises(UnsafePathError, match="is a link to"):
        _run(**tiny_setup, steps=1, out=str(tmp_path / "second"))
    assert sorted(p.name for p in outside.iterdir()) == [n for n in before if n != "index.json"]


def test_resume_with_another_decoder_is_refused_before_any_encoding(tiny_setup, tmp_path, capsys):
    """A run resumed with another --decoder met load_state_dict's traceback, after a new latent cache was
    encoded (a teacher of another space did the same): now an error naming the options it was trained with."""
    out = tmp_path / "run"
    _run(**tiny_setup, steps=4, stop_at=2, ckpt_every=2, out=str(out))
    wider = tiny_decoder_file(tmp_path / "w" / "wider.safetensors", width=24)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (tiny_setup | {"cache_dir": str(tmp_path / "new-cache"),
                                                                       "decoder": str(wider)}).items()]
    assert cli_main(["train", *flags, "--steps", "4", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds another decoder's weights" in err and "there but" in err and "Traceback" not in err
    assert f"trained with --decoder {tiny_setup['decoder']}" in err and "Resume with the options" in err
    assert not (tmp_path / "new-cache").exists()  # refused before the encoding pass
    # a --steps below the checkpoint's step trained nothing and exited 0
    with pytest.raises(TrainError, match=r"step_00000002\.pt is at step 2, past --steps 1 \(the run was for 4\)"):
        _run(**tiny_setup | {"cache_dir": str(tmp_path / "new-cache")}, steps=1, out=str(out), resume=True)
    assert not (tmp_path / "new-cache").exists()


@pytest.mark.parametrize("change", [{"lr": 1e-2}, {"weight_decay": 0.1}])
def test_resume_with_other_optimizer_settings_is_refused(tiny_setup, tmp_path, change):
    # the optimizer state restored the old rate: --lr 1e-2 was written to config.json and never trained with
    out = tmp_path / "run"
    _run(**tiny_setup, steps=4, stop_at=2, ckpt_every=2, out=str(out))
    key = next(iter(change))
    with pytest.raises(TrainError, match=f"other optimizer settings \\(--{key.replace('_', '-')} .* there, "
                                         f"{change[key]!r} here\\).*resume with the values it was trained with"):
        _run(**tiny_setup | change, steps=4, out=str(out), resume=True)
    _run(**tiny_setup | {"warmup": 1}, steps=4, out=str(out), resume=True)  # the schedule's shape may change


def test_resume_with_another_batch_order_warns(tiny_setup, tmp_path):
    # the batches from the resumed step on were drawn with the new size, silently unlike an uninterrupted run
    out = tmp_path / "run"
    _run(**tiny_setup, steps=4, stop_at=2, ckpt_every=2, out=str(out))
    with pytest.warns(UserWarning, match="trained with --batch-size 2 there, 1 here; --grad-accum 1 there, 2 here: "
                                         "training continues from its step, but on other batches"):
        _run(**tiny_setup | {"batch_size": 1}, grad_accum=2, steps=4, out=str(out), resume=True)
    with pytest.warns(UserWarning, match="trained on other data or crops .*the data order starts afresh"):
        _run(**tiny_setup, seed=7, steps=5, out=str(out), resume=True)  # the seed draws the crops too


def test_options_that_tune_an_absent_term_are_refused():
    # each was accepted and did nothing (a GAN that never starts built and checkpointed a discriminator)
    base = dict(teacher="t.pth", decoder="tae-64", data="d", out="o", steps=100)
    cases = [({"lpips_weights": "alex.pth"}, "--lpips-weights tunes --lpips"),
             ({"disc_lr": 5.0}, "--disc-lr tunes --adversarial"),
             ({"adversarial": 0.1, "adv_start": 100}, "--adv-start 100, but the run ends at --steps 100")]
    for extra, message in cases:
        with pytest.raises(UsageError, match=message):
            make_config(base | extra)
    assert make_config(base | {"adversarial": 0.1, "adv_start": 50}).adv_start == 50


def test_a_checkpoint_decoder_with_init_says_its_weights_are_not_used(tiny_setup, tmp_path):
    # --init's weights replaced the --decoder checkpoint's, which the user may have meant to continue from
    with pytest.warns(UserWarning, match="is a trained checkpoint: with --init only its architecture is used"):
        _run(**tiny_setup, steps=1, init=tiny_setup["decoder"], out=str(tmp_path / "run"))


class _WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: what a planted checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_runs_code_from_a_planted_checkpoint(tiny_setup, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    _run(**tiny_setup, steps=4, stop_at=2, ckpt_every=2, out=str(out))
    planted = out / "checkpoints" / "step_00000009.pt"  # newer than the real one, so resume picks it
    torch.save({"model": _WritesMarker(marker), "ema": {}, "optimizer": {}, "scheduler": {}, "step": 9, "rng": []},
               planted)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_setup.items()]
    assert cli_main(["train", *flags, "--steps", "4", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "fastdec train: error: checkpoint" in err and "step_00000009.pt" in err and "never unpickles" in err
    assert not marker.exists()
    assert not (out / "decoder.safetensors").exists()
    # the test can fail: loading the same file the unsafe way does run its code
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_mismatched_latent_channels_fail_before_any_work(tiny_setup, tmp_path, capsys):
    sd3_decoder = tiny_decoder_file(tmp_path / "w" / "sd3.safetensors", space="sd3")
    args = ["train", "--teacher", tiny_setup["teacher"], "--decoder", str(sd3_decoder), "--data", tiny_setup["data"],
            "--resolution", "32", "--steps", "2", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c2")]
    assert cli_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # errors go to stderr, once
    assert captured.err.startswith("fastdec train: error: --decoder:")
    assert "'sd3'" in captured.err and "'sdxl'" in captured.err and "sd3.safetensors" in captured.err
    # the space is the teacher's: "leave the latent space out" was no fix a train user could make
    assert captured.err.rstrip().endswith("pick a decoder for 'sdxl' (a preset is built in any space), or a "
                                          "--teacher of that space")
    assert not (tmp_path / "c2").exists() and not (tmp_path / "run").exists()  # nothing was encoded or written
    # --init with a decoder of another space: the same, before any work
    args[4] = "tae-64"
    assert cli_main(args + ["--init", str(sd3_decoder)]) == 2
    assert "error: --init:" in capsys.readouterr().err and not (tmp_path / "c2").exists()
    # --init takes trained weights: a preset name has none
    assert cli_main(args + ["--init", "tae-64"]) == 2
    assert "untrained architecture" in capsys.readouterr().err
    # --out that is a file: refused once the data folder is read, before the encoding pass
    out_file = tmp_path / "out.txt"
    out_file.write_text("not a folder")
    assert cli_main(["train", "--teacher", tiny_setup["teacher"], "--data", tiny_setup["data"], "--decoder", "tae-64",
                     "--resolution", "32", "--out", str(out_file), "--cache-dir", str(tmp_path / "c2")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not (tmp_path / "c2").exists()
    # a teacher file that does not exist is named in the error
    assert cli_main(["train", "--teacher", str(Path(tiny_setup["teacher"]).parent / "missing.pth"), "--data", "x",
                     "--out", str(tmp_path / "run")]) == 2
    assert "missing.pth" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--ckpt-every", "0"),
    ("--log-every", "0"), ("--val-every", "-1"), ("--resolution", "0"), ("--lr", "0"), ("--lr", "nan"),
    ("--crops-per-image", "0"), ("--ema", "1"), ("--warmup", "-1"), ("--frames", "0"), ("--max-frame-stride", "0"),
    ("--temporal-lr", "0"), ("--short-side", "0"),
])
def test_bad_numbers_are_refused_before_any_work(tiny_setup, tmp_path, capsys, flag, value):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--teacher", tiny_setup["teacher"], "--data", tiny_setup["data"], "--out", str(out),
            "--cache-dir", str(cache), flag, value]
    assert cli_main(args) == 2
    assert capsys.readouterr().err.startswith(f"fastdec train: error: {flag} must be")
    assert not out.exists() and not cache.exists()
    # the Python API checks the same, before loading anything
    with pytest.raises(UsageError, match=flag):
        train(TrainConfig(teacher="missing.pth", data="missing", out=str(out), **{flag[2:].replace("-", "_"): float(value)}))


def test_config_file_with_cli_override(tiny_setup, tmp_path, capsys):
    import yaml
    from PIL import Image

    file_values = {k.replace("_", "-"): v for k, v in tiny_setup.items()} | {"steps": 50, "lr": 0.01}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(file_values))
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(config_file), "--steps", "2", "--out", str(out)]) == 0
    # which cache folder the run uses (caches of other settings stay beside it until deleted)
    cache = next(p for p in Path(tiny_setup["cache_dir"]).iterdir() if p.is_dir())
    assert f"latent cache: {cache} (24 crops)" in capsys.readouterr().out
    written = json.loads((out / "config.json").read_text())
    assert written["steps"] == 2 and written["lr"] == 0.01 and written["resolution"] == 32
    assert (out / "decoder.safetensors").exists()
    first = next(csv.DictReader((out / "metrics.csv").open()))
    assert "teacher_val_psnr" not in first  # no teacher decoder: no teacher column either
    with Image.open(out / "grids" / "step_00000002.png") as grid:
        assert grid.size == (3 * 32, 2 * 32)  # original | student | error, one row per val image
    # with a teacher decoder: its PSNR on the same crops is logged, and the grid gains its column
    teacher_decoder = tiny_decoder_file(tmp_path / "w" / "teacher_dec.safetensors", seed=5)
    assert cli_main(["train", "--config", str(config_file), "--steps", "1", "--out", str(tmp_path / "run2"),
                     "--teacher-decoder", str(teacher_decoder), "--teacher-weight", "0.5"]) == 0
    first = next(csv.DictReader((tmp_path / "run2" / "metrics.csv").open()))
    assert 0 < float(first["teacher_val_psnr"]) < 60
    with Image.open(tmp_path / "run2" / "grids" / "step_00000001.png") as grid:
        assert grid.size == (4 * 32, 2 * 32)


def test_config_file_values_are_checked_and_typed(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('steps = 3\nunknown_knob = 1\n')
    with pytest.raises(TrainError, match="unknown_knob"):
        make_config({}, str(toml))
    with pytest.raises(TrainError, match="--teacher is required"):
        make_config({"data": "x", "out": "y"})
    # YAML 1.1 reads 5e-4 (no dot) as text: numbers written so are still numbers
    config_file = tmp_path / "train.yaml"
    config_file.write_text("lr: 5e-4\nsteps: 1e3\ndata: d\nout: o\nteacher: t\n")
    config = make_config({}, str(config_file))
    assert config.lr == 5e-4 and config.steps == 1000 and isinstance(config.steps, int)
    for bad in ("steps: 2.5", "steps: many", "resume: 3"):
        config_file.write_text(bad + "\n")
        with pytest.raises(UsageError, match=bad.split(":")[0]):
            make_config({}, str(config_file))
    config_file.write_text("- a list\n")
    with pytest.raises(TrainError, match="option: value"):
        make_config({}, str(config_file))
    # a frame stride means nothing for images: refused, not silently ignored
    with pytest.raises(UsageError, match="--max-frame-stride samples video clips: it needs --frames"):
        make_config({"data": "d", "out": "o", "teacher": "t", "max_frame_stride": 2})
    assert make_config({"data": "d", "out": "o", "teacher": "t", "max_frame_stride": 2, "frames": 8}).max_frame_stride == 2
    # crops cannot be larger than the resized files they are cut from
    with pytest.raises(DataError, match="--short-side 64 is smaller than the --resolution 128"):
        make_config({"data": "d", "out": "o", "teacher": "t", "resolution": 128, "short_side": 64})
    # a key given twice, or in both spellings, would silently keep one of the two values
    for text, words in (("steps: 2\nsteps: 3000\n", "the key 'steps' is given twice"),
                        ("batch-size: 2\nbatch_size: 4\n", "gives batch_size twice, as 'batch-size' and 'batch_size'")):
        config_file.write_text(text)
        with pytest.raises(TrainError, match=words):
            make_config({}, str(config_file))
    # an option that means nothing without another, and infinities, are refused by name
    required = {"data": "d", "out": "o", "teacher": "t"}
    with pytest.raises(UsageError, match="--init-partial copies what fits from the --init checkpoint"):
        make_config({**required, "init_partial": True})
    with pytest.raises(UsageError, match="--latent-noise must be a finite number, 0 or more, got inf"):
        make_config({**required, "latent_noise": float("inf")})
    with pytest.raises(UsageError, match="--lr must be a finite number greater than 0, got inf"):
        make_config({**required, "lr": float("inf")})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_different_data_and_only_rank0_writes(tiny_setup, tmp_path):
    out = tmp_path / "ddp"
    flags = []
    for key, value in tiny_setup.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu` alone starts ONE process; --multi_gpu selects the torchrun launcher and our
    # --cpu makes the processes use CPU + gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "fastdec", "train", *flags, "--steps", "4", "--ckpt-every", "2", "--out", str(out),
           "--log-samples", "--cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = {r: [json.loads(line) for line in (out / "samples" / f"rank{r}.jsonl").open()] for r in (0, 1)}
    for entry0, entry1 in zip(logs[0], logs[1]):
        assert entry0["step"] == entry1["step"] and not set(entry0["ids"]) & set(entry1["ids"])
    assert [e["wrote"] for e in logs[1]] == [[]] * 4
    assert sum(len(e["wrote"]) for e in logs[0]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    assert (out / "decoder.safetensors").exists()
    # the logged loss is the global batch's (both ranks'), not rank 0's half: one process with the whole
    # global batch (batch 4, the same crops) at step 1, from the same weights, logs the same loss (fp32: the
    # two halves' means averaged vs one mean of four, a few roundings apart)
    one = tmp_path / "one"
    _run(**{**tiny_setup, "batch_size": 4}, steps=1, out=str(one), log_samples=True)
    (whole,) = [json.loads(line) for line in (one / "samples" / "rank0.jsonl").open()]
    assert sorted(whole["ids"]) == sorted(logs[0][0]["ids"] + logs[1][0]["ids"])
    losses = [float({row["step"]: row["loss"] for row in csv.DictReader((run / "metrics.csv").open())}["1"])
              for run in (out, one)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # resumed by one process: each rank had its slice of every global batch, so the batches change
    with pytest.warns(UserWarning, match="trained with 2 processes there, 1 here: training continues from its step"):
        _run(**tiny_setup, steps=5, out=str(out), resume=True)


def test_a_resumed_rank_gets_its_saved_rng_state_and_a_new_rank_its_own_stream():
    from fastdec.train.loop import restore_rng
    from fastdec.train.state import rng_state

    torch.manual_seed(1)
    saved = [rng_state()]
    expected = torch.rand(4)
    restore_rng(saved, 0, seed=5)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)  # the same stream, bit for bit
    restore_rng(saved, 1, seed=5)  # a rank the run did not have: rank 0's state repeated rank 0's noise
    new_rank = torch.rand(4)
    assert not torch.equal(new_rank, expected)
    restore_rng(saved, 2, seed=5)
    assert not torch.equal(torch.rand(4), new_rank)


def test_validation_refuses_a_diverged_decoder(make_decoder, tmp_path):
    from fastdec.train import validate

    decoder = make_decoder("tae-64", "sdxl")
    val = {"latents": torch.randn(2, 4, 4, 4), "pixels": torch.rand(2, 3, 32, 32)}
    scores = validate(decoder, val, tmp_path / "grid.png", batch_size=2)
    assert 0 < scores["val_psnr"] < 60 and (tmp_path / "grid.png").exists()
    with torch.no_grad():
        next(decoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="diverged training"):
        validate(decoder, val, tmp_path / "nan.png", batch_size=2)
    assert not (tmp_path / "nan.png").exists()  # no black picture either


def test_global_batches_split_ranks_and_resume():
    full = iter(GlobalBatches(10, 3, rank=0, world=1, seed=1))
    stream = [i for _ in range(7) for i in next(full)]
    assert sorted(stream[:10]) == list(range(10))  # each epoch is a permutation
    r0, r1 = iter(GlobalBatches(10, 3, 0, 2, seed=1)), iter(GlobalBatches(10, 3, 1, 2, seed=1))
    assert next(r0) + next(r1) == stream[:6]
    later = iter(GlobalBatches(10, 3, rank=0, world=1, seed=1, start=4))
    assert next(later) == stream[12:15]


def test_lr_schedule_warms_up_and_decays():
    values = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] == pytest.approx(0.1, abs=1e-3)


def test_losses():
    target = torch.rand(2, 4, 3, 16, 16)
    assert float(temporal_loss(target + 0.2, target)) == pytest.approx(0, abs=1e-6)  # constant error: no flicker
    flicker = target.clone()
    flicker[:, 1::2] += 0.1
    assert float(temporal_loss(flicker, target)) == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(LossConfigError, match="frames"):
        temporal_loss(target[:, 0], target[:, 0])

    assert [ms_ssim_scales(s) for s in (20, 21, 41, 64, 160, 161, 512)] == [1, 2, 3, 3, 4, 5, 5]
    image = torch.rand(2, 3, 64, 64)
    assert float(ms_ssim_loss(image, image)) == pytest.approx(0, abs=1e-5)
    assert float(ms_ssim_loss(image.roll(8, -1), image)) > 0.1
    with pytest.raises(LossConfigError, match="resolution"):
        ms_ssim_loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))

    with pytest.raises(LossConfigError, match="--lpips-weights"):
        load_lpips(None)
    with pytest.raises(LossConfigError, match="not found"):
        load_lpips("/nonexistent/alexnet.pth")

    disc = PatchDiscriminator(width=8)
    logits = disc(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 8, 8)
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0
    assert float(hinge_g_loss(torch.full((4,), 3.0))) == -3


def test_adversarial_and_ms_ssim_training_runs(tiny_setup, tmp_path):
    _run(**{**tiny_setup, "resolution": 48}, steps=3, adversarial=0.1, adv_start=1, ms_ssim=0.5,
         out=str(tmp_path / "gan"))
    rows = list(csv.DictReader((tmp_path / "gan" / "metrics.csv").open()))
    assert "gan_d" in rows[-1] and float(rows[-1]["gan_d"]) > 0 and "ms_ssim" in rows[-1]
    # the checkpoint holds tensors and plain values only: it loads with weights_only=True, GAN states included
    state = read_checkpoint(tmp_path / "gan" / "checkpoints" / "step_00000003.pt")
    assert "discriminator" in state and "disc_optimizer" in state
    assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)
    not_a_state = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_a_state)
    with pytest.raises(TrainError, match="not a fastdec training checkpoint"):
        read_checkpoint(not_a_state)
    # the right keys with other values met a TypeError deep in --resume; each is named now
    for key, value, problem in [("model", 1, "'model' is of type int, not a dict of tensors"),
                                ("ema", {"w": "text"}, "'ema' holds 'w' of type str, not a tensor"),
                                ("optimizer", [1], "'optimizer' is of type list, not a dict"),
                                ("step", "7", "'step' is '7', not a step number"),
                                ("step", -1, "'step' is -1"), ("rng", 6, "'rng' is not a list of RNG states"),
                                ("disc_optimizer", 3, "'disc_optimizer' is of type int")]:
        torch.save({**state, key: value}, not_a_state)
        with pytest.raises(TrainError, match=f"not a fastdec training checkpoint \\({problem}"):
            read_checkpoint(not_a_state)


def test_video_decoder_trains_on_clips(tiny_setup, tmp_path):
    for name in ("a", "b"):
        make_images(tmp_path / "clips" / name, 5, size=(40, 40), seed=ord(name))
    image_decoder = tiny_decoder_file(tmp_path / "w" / "image.safetensors", width=64)
    run = {**tiny_setup, "data": str(tmp_path / "clips"), "val": str(tmp_path / "clips")}
    _run(**run | {"decoder": "tae-causal-64"}, init=str(image_decoder), frames=3, temporal=1.0, steps=2,
         max_frame_stride=2, crops_per_image=6, out=str(tmp_path / "video"))
    rows = list(csv.DictReader((tmp_path / "video" / "metrics.csv").open()))
    assert float(rows[-1]["temporal"]) > 0
    # the cached clips have random strides (3 frames of 5 fit strides 1 and 2), and training read them back
    (index,) = Path(run["cache_dir"]).glob("*/index.json")
    assert {stride for *_, stride in json.loads(index.read_text())["plan"]} == {1, 2}
    decoder = load_decoder(tmp_path / "video" / "decoder.safetensors")
    assert decoder.is_video and decoder(torch.randn(1, 3, 4, 4, 4)).shape == (1, 3, 3, 32, 32)
    with pytest.raises(TrainError, match="--frames"):
        train(TrainConfig(**run | {"decoder": "tae-causal-64"}, steps=1, out=str(tmp_path / "x")))


def test_temporal_lr_trains_the_temporal_layers_at_their_own_rate(tiny_setup, tmp_path):
    """--temporal-lr: memory convs (zero at the start) learn at it while the image part stays at --lr."""
    from fastdec.train.loop import parameter_groups

    for name in ("a", "b"):
        make_images(tmp_path / "clips" / name, 4, size=(40, 40), seed=ord(name))
    image_file = tiny_decoder_file(tmp_path / "w" / "image.safetensors", width=64)
    run = {**tiny_setup, "data": str(tmp_path / "clips"), "val": None, "decoder": "tae-causal-64",
           "init": str(image_file), "frames": 3, "temporal": 1.0, "crops_per_image": 2, "warmup": 0}
    config = _run(**run, steps=2, lr=1e-9, temporal_lr=1e-2, out=str(tmp_path / "video"))
    trained = _weights(tmp_path / "video")
    image = load_file(str(image_file))
    memory = [k for k in trained if ".memory." in k]
    assert memory and set(trained) - set(memory) == set(image)
    # AdamW moves each weight by about lr per step: 1e-2 for the memory convs, 1e-9 for the rest (fp32 weights
    # read back from fp32 safetensors, so a 1e-9 step stays below 1e-6)
    assert min(trained[k].abs().max().item() for k in memory) > 1e-3
    assert max((trained[k] - image[k]).abs().max().item() for k in image) < 1e-6
    decoder = load_decoder(tmp_path / "video" / "decoder.safetensors")
    groups = parameter_groups(decoder, config)
    assert [g.get("lr") for g in groups] == [None, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for _, p in decoder.temporal_parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(decoder.parameters()))
    # an image run has nothing to give the rate to: refused before any work, with the fix
    with pytest.raises(UsageError, match="--temporal-lr trains a video decoder's temporal layers: it needs --frames"):
        make_config({"data": "d", "out": "o", "teacher": "t", "temporal_lr": 1e-3})


@pytest.mark.slow
def test_real_flux2_training_raises_validation_psnr(taef2_encoder_path, taef2_decoder_path, tmp_path):
    """200 CPU steps of tae-64 in the FLUX.2 space on BSDS crops: validation PSNR must rise clearly."""
    from conftest import shared_path

    train_dir, val_dir = shared_path("data", "images", "train"), shared_path("data", "images", "val")
    torch.manual_seed(0)
    start = time.perf_counter()
    config = _run(teacher=str(taef2_encoder_path), teacher_decoder=str(taef2_decoder_path), decoder="tae-64",
                  data=str(train_dir), val=str(val_dir),
                  resolution=64, crops_per_image=1, steps=200, batch_size=8, lr=2e-3, warmup=20, ema=0.99,
                  val_every=200, val_count=16, ckpt_every=1000, log_every=50, workers=0,
                  cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    rows = list(csv.DictReader((Path(config.out) / "metrics.csv").open()))
    before = float(rows[0]["val_psnr"])
    after = float([r for r in rows if r.get("val_psnr")][-1]["val_psnr"])
    print(f"FLUX.2 tae-64, 200 steps at 64 px: val PSNR {before:.2f} dB (untrained) -> {after:.2f} dB "
          f"in {time.perf_counter() - start:.0f} s; the TAEF2 decoder on the same crops: "
          f"{float(rows[0]['teacher_val_psnr']):.2f} dB")
    assert after > before + 8  # measured here: 6.4 -> 18.5 dB (TAEF2 decoder: 26.6 dB)


def test_gradient_accumulation_equals_a_bigger_batch(tiny_setup, tmp_path):
    base = {**tiny_setup, "val": None}
    _run(**base | {"batch_size": 2}, grad_accum=1, steps=3, out=str(tmp_path / "big"))
    _run(**base | {"batch_size": 1}, grad_accum=2, steps=3, out=str(tmp_path / "accum"))
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    # fp32: the same gradients summed in another order (two half-batch means vs one mean), through 3 AdamW
    # steps whose update divides by sqrt(v): a few 1e-6 relative per step, amplified where v is small
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- precision (issue 13, item 3)
def test_precision_rule_for_every_kind_of_machine():
    from fastdec.train.precision import cpu_bf16_flags, resolve_precision

    amx, plain = ("avx512_bf16", "amx_bf16"), ()
    # auto on a CPU: bf16 + channels_last exactly where the CPU has native bf16 arithmetic
    fast = resolve_precision("auto", "auto", "cpu", cpu_flags=amx)
    assert (fast.mixed_precision, fast.channels_last) == ("bf16", True) and "amx_bf16" in fast.reason
    slow = resolve_precision("auto", "auto", "cpu", cpu_flags=plain)
    assert (slow.mixed_precision, slow.channels_last) == ("fp32", False) and "no native bf16" in slow.reason
    # auto on a GPU keeps its meaning: bf16 when supported, the layout as it was
    assert resolve_precision("auto", "auto", "cuda", cuda_bf16=True).mixed_precision == "bf16"
    assert resolve_precision("auto", "auto", "cuda", cuda_bf16=False).mixed_precision == "fp32"
    assert not resolve_precision("auto", "auto", "cuda", cuda_bf16=True).channels_last
    # explicit choices win; fp32 is there by both names
    for name in ("no", "fp32"):
        assert resolve_precision(name, "auto", "cpu", cpu_flags=amx).mixed_precision == "fp32"
    assert resolve_precision("no", "on", "cpu", cpu_flags=amx).channels_last
    assert not resolve_precision("bf16", "off", "cpu", cpu_flags=amx).channels_last
    emulated = resolve_precision("bf16", "auto", "cpu", cpu_flags=plain)
    assert emulated.mixed_precision == "bf16" and "slower than fp32" in emulated.reason
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "auto", "cpu", cpu_flags=amx)
    with pytest.raises(UsageError, match="no bf16 support"):
        resolve_precision("bf16", "auto", "cuda", cuda_bf16=False)
    # the flags come from the first `flags` line of /proc/cpuinfo
    info = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\nprocessor\t: 1\nflags\t: fpu\n"
    assert cpu_bf16_flags(info) == ("avx512_bf16",)
    assert cpu_bf16_flags("flags : fpu avx2 avx512f\n") == () and cpu_bf16_flags("") == ()


def test_precision_options_from_flags_and_config_files(tmp_path, capsys):
    # YAML 1.1 reads bare no / on / off as booleans: they mean the words they are
    config_file = tmp_path / "train.yaml"
    config_file.write_text("mixed-precision: no\nchannels-last: off\ndata: d\nout: o\nteacher: t\n")
    config = make_config({}, str(config_file))
    assert (config.mixed_precision, config.channels_last) == ("no", "off")
    config_file.write_text("channels-last: on\ndata: d\nout: o\nteacher: t\n")
    assert make_config({}, str(config_file)).channels_last == "on"
    with pytest.raises(UsageError, match="--channels-last must be one of auto, on, off"):
        make_config({"channels_last": "sideways", "data": "d", "out": "o", "teacher": "t"})
    with pytest.raises(SystemExit) as exited:  # argparse refuses a word that is not a choice
        cli_main(["train", "--teacher", "t", "--data", "d", "--out", "o", "--mixed-precision", "fp8"])
    assert exited.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def _conv_output_dtypes(run) -> tuple[list[torch.dtype], list[tuple[torch.dtype, bool]]]:
    """Hooks recording what the student's convolutions output and what the loss receives (dtype, autocast on)."""
    convs, losses = [], []
    for m in run.student.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda module, args, out: convs.append(out.dtype))
    run.criterion.register_forward_pre_hook(
        lambda module, args: losses.append((args[0].dtype, torch.is_autocast_enabled(run.device.type))))
    return convs, losses


@pytest.mark.parametrize("mixed_precision, network_dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_a_train_step_runs_the_networks_in_its_precision_and_the_losses_in_fp32(
        tiny_setup, tmp_path, mixed_precision, network_dtype):
    from fastdec.train.config import validate_config
    from fastdec.train.loop import build_run, close_logs, train_step

    config = TrainConfig(**tiny_setup | {"mixed_precision": mixed_precision, "resolution": 48}, ms_ssim=0.5,
                         steps=2, out=str(tmp_path / "run"))
    run = build_run(validate_config(config))
    convs, losses = _conv_output_dtypes(run)
    conv = next(m for m in run.student.modules() if isinstance(m, torch.nn.Conv2d))
    before = conv.weight.detach().clone()
    result = train_step(run)
    close_logs(run)
    assert convs and set(convs) == {network_dtype}
    assert losses == [(torch.float32, False)]  # MS-SSIM and L1 on fp32 tensors, autocast off
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss) and "ms_ssim" in result.parts
    # the weights, their update and the EMA stay fp32; bf16 puts the student's convolutions in channels_last
    assert conv.weight.dtype == torch.float32 and not torch.equal(conv.weight.detach(), before)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (mixed_precision == "bf16")
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in run.ema.parameters())


def test_a_bf16_run_resumes_and_continues(tiny_setup, tmp_path):
    """bf16 autocast on the CPU (emulated where the CPU lacks native bf16: slower, same path)."""
    bf16 = {**tiny_setup, "mixed_precision": "bf16", "steps": 6, "ckpt_every": 3}
    straight = _run(**bf16, out=str(tmp_path / "straight"))
    _run(**bf16, out=str(tmp_path / "resumed"), stop_at=3)
    _run(**bf16, out=str(tmp_path / "resumed"), resume=True)
    written = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert written["mixed_precision"] == "bf16"
    assert written["precision"]["mixed_precision"] == "bf16" and written["precision"]["channels_last"] is True
    a, b = _weights(Path(straight.out)), _weights(tmp_path / "resumed")
    first = load_file(str(Path(tiny_setup["decoder"])))
    assert any(not torch.equal(a[k], first[k]) for k in a)  # it trained
    # bf16 kernels are as deterministic as fp32 ones on one machine (one thread): the resumed run repeats the
    # straight run's operations on the same numbers
    _assert_same_weights(a, b)
    state = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000006.pt")
    assert state["precision"]["mixed_precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    # continuing it in fp32 works, and says it is no longer the straight run's computation
    with pytest.warns(UserWarning, match="mixed_precision=bf16.*mixed_precision=fp32.*not bit-identically"):
        _run(**bf16 | {"mixed_precision": "no", "steps": 8}, out=str(tmp_path / "resumed"), resume=True)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "resumed" / "metrics.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 8

"""`fastdec decode`: latents files -> PNGs equal to the decoder output; automatic tiling under a memory budget;
bad latents, unsafe names and bad options refused before anything is written. Also what the three decode
commands share: one registration each, presets only with --random-weights, --out checked first."""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastdec import save_decoder
from fastdec.cli import main
from fastdec.decode import load_latents, parse_bytes
from fastdec.errors import LatentFileError, UsageError


@pytest.fixture
def checkpoint(tmp_path, make_decoder, one_thread):
    decoder = make_decoder("tae-64", "sdxl")
    return decoder, save_decoder(decoder, tmp_path / "dec.safetensors")


def _png(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255


def _pngs(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_decode_safetensors_batch_to_pngs(tmp_path, checkpoint):
    decoder, path = checkpoint
    z = torch.randn(2, 4, 8, 12)
    save_file({"latents": z}, str(tmp_path / "z.safetensors"))
    assert main(["decode", str(tmp_path / "z.safetensors"), "--decoder", str(path), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    with torch.no_grad():
        reference = decoder(z)
    for i in range(2):
        image = _png(tmp_path / "out" / f"z_latents_{i}.png")
        assert image.shape == (3, 64, 96)
        # the command decodes with the weights reloaded from the file, in channels_last: fp32 results differ from
        # the reference by a few 1e-6, which can move a pixel across one rounding step (1/255) at most
        assert (image - reference[i]).abs().max() <= 1 / 255 + 1e-6


def test_forced_tiles_match_untiled(tmp_path, checkpoint):
    _, path = checkpoint
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((4, 40, 40)).astype(np.float32))
    common = [str(tmp_path / "z.npy"), "--decoder", str(path), "--quiet"]
    assert main(["decode", *common, "--out", str(tmp_path / "whole")]) == 0
    assert main(["decode", *common, "--out", str(tmp_path / "tiled"), "--tile", "24"]) == 0
    # tiles with the measured receptive field as overlap give the untiled output up to fp32 summation order
    whole, tiled = _png(tmp_path / "whole" / "z.png"), _png(tmp_path / "tiled" / "z.png")
    assert whole.shape == (3, 320, 320) and (whole - tiled).abs().max() <= 1 / 255 + 1e-6


def test_the_message_says_untiled_when_the_latent_fits_in_one_tile(tmp_path, checkpoint, capsys):
    # a 40x40 latent with --tile 48 is decoded whole, and the line said "tiled, 48x48 latent px tiles"
    _, path = checkpoint
    np.save(tmp_path / "z.npy", np.zeros((4, 40, 40), np.float32))
    assert main(["decode", str(tmp_path / "z.npy"), "--decoder", str(path), "--out", str(tmp_path / "o"),
                 "--tile", "48"]) == 0
    captured = capsys.readouterr()
    assert "(320x320, untiled)" in captured.out + captured.err


def test_load_npy_pt_and_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.float32))
    torch.save({"x": torch.zeros(4, 8, 8), "y": torch.zeros(1, 4, 8, 8)}, tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", np.zeros((3, 4, 8, 8), np.float32))
    assert [n for n, _ in load_latents(tmp_path / "a.npy")] == [""]
    assert [n for n, _ in load_latents(tmp_path / "b.pt")] == ["x", "y"]
    assert [n for n, _ in load_latents(tmp_path / "c.npy")] == ["0", "1", "2"]
    np.save(tmp_path / "bad.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(LatentFileError, match=r"latents are \(C, h, w\)"):
        load_latents(tmp_path / "bad.npy")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LatentFileError, match="safetensors"):
        load_latents(tmp_path / "a.txt")
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 2**20 and parse_bytes(1000) == 1000
    for text in ("lots", "0", "0MB", "-1GB"):
        with pytest.raises(UsageError):
            parse_bytes(text)


# ----------------------------------------------------------------------------- nothing written outside --out
@pytest.mark.parametrize("key", ["x/../../../../escape", "..", "bad\nname", "tab\there", "a" * 250, ".hidden"])
@pytest.mark.parametrize("fmt", [".safetensors", ".pt"])
def test_unsafe_latent_keys_are_refused(tmp_path, checkpoint, capsys, key, fmt):
    _, path = checkpoint
    latents = tmp_path / f"z{fmt}"
    tensors = {"fine": torch.randn(4, 8, 8), key: torch.randn(4, 8, 8)}
    save_file(tensors, str(latents)) if fmt == ".safetensors" else torch.save(tensors, latents)
    out = tmp_path / "a" / "b" / "c" / "d" / "out"  # deep enough that an escape would still land in tmp_path
    assert main(["decode", str(latents), "--decoder", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdec decode: error:") and "cannot be a file name" in err and "Traceback" not in err
    assert _pngs(tmp_path) == []  # not even the good latent: names are checked before any image is written


# ----------------------------------------------------------------------------- bad latents: nothing written
def _nan_batch():
    z = torch.randn(3, 4, 8, 8)
    z[1, 2, 3, 4] = float("nan")
    return {"latents": z}


BAD_LATENTS = {
    "nan": (_nan_batch, "contains NaN"),
    "inf": (lambda: {"a": torch.randn(4, 8, 8), "b": torch.full((4, 8, 8), float("inf"))}, "NaN or inf"),
    "channels": (lambda: {"latents": torch.randn(2, 16, 8, 8)}, "expects 4 latent channels"),
    "integer": (lambda: {"latents": torch.ones(2, 4, 8, 8, dtype=torch.int64)}, "integer dtype"),
    "boolean": (lambda: {"latents": torch.ones(2, 4, 8, 8, dtype=torch.bool)}, "boolean dtype torch.bool"),
    "batch0": (lambda: {"latents": torch.zeros(0, 4, 8, 8)}, "batch size 0"),
    "zero_dim": (lambda: {"latents": torch.zeros(4, 0, 8)}, "empty dimension"),
    "five_dims": (lambda: {"latents": torch.zeros(1, 2, 4, 8, 8)}, r"\(C, h, w\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_LATENTS))
def test_bad_latents_are_an_error_and_nothing_is_written(tmp_path, checkpoint, capsys, case):
    make, message = BAD_LATENTS[case]
    _, path = checkpoint
    latents = tmp_path / "z.safetensors"
    save_file(make(), str(latents))
    out = tmp_path / "out"
    assert main(["decode", str(latents), "--decoder", str(path), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fastdec decode: error:") and "Traceback" not in captured.err
    assert re.search(message, captured.err), captured.err
    assert "error" not in captured.out
    assert _pngs(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_latent_files_are_an_error(tmp_path, checkpoint, capsys, damage):
    _, path = checkpoint
    good = tmp_path / "good.safetensors"
    save_file({"latents": torch.randn(2, 4, 8, 8)}, str(good))
    data = {"truncated": good.read_bytes()[:-64], "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
            "empty": b""}[damage]
    (tmp_path / "bad.safetensors").write_bytes(data)
    assert main(["decode", str(tmp_path / "bad.safetensors"), "--decoder", str(path), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "truncated, corrupt" in err and "Traceback" not in err
    assert _pngs(tmp_path) == []


def test_nan_decoder_output_writes_no_picture(tmp_path, make_decoder, capsys, one_thread):
    decoder = make_decoder("tae-64", "sdxl")
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.fill_(float("nan"))
    path = save_decoder(decoder, tmp_path / "nan.safetensors")
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 8, 8), np.float32))
    assert main(["decode", str(tmp_path / "z.npy"), "--decoder", str(path), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "produced NaN or inf" in err and "nan.safetensors" in err and "0 of 2 images were written" in err
    assert _pngs(tmp_path) == []


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("flags,message", [
    (["--max-memory", "0"], "is zero"),
    (["--max-memory", "lots"], "cannot read memory size"),
    (["--tile", "-4"], "--tile must be at least 1"),
    (["--tile", "0"], "--tile must be at least 1"),
    (["--tile", "48", "--max-memory", "1KB"], "--tile and --max-memory both choose"),  # --max-memory was dropped
    (["--device", "cuda:7"], "not available"),
    (["--device", "gpu"], "unknown --device"),
])
def test_bad_options_are_usage_errors(tmp_path, checkpoint, capsys, flags, message):
    _, path = checkpoint
    np.save(tmp_path / "z.npy", np.zeros((4, 8, 8), np.float32))
    assert main(["decode", str(tmp_path / "z.npy"), "--decoder", str(path), "--out", str(tmp_path / "out"),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert _pngs(tmp_path) == []


def test_unknown_dtype_is_a_usage_error(tmp_path, checkpoint, capsys):
    _, path = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["decode", "z.npy", "--decoder", str(path), "--out", str(tmp_path / "out"), "--dtype", "fp8"])
    assert exit_info.value.code == 2 and "unknown dtype 'fp8'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the three decode commands
def _inputs(tmp_path, command):
    np.save(tmp_path / "clip.npy", np.zeros((2, 4, 8, 8), np.float32))
    write = {"decode": ["decode", str(tmp_path / "clip.npy"), "--out", str(tmp_path / "out")],
             "decode-video": ["decode-video", str(tmp_path / "clip.npy"), "--out", str(tmp_path / "out.mp4")],
             "decode-batch": ["decode-batch", "--latents", str(tmp_path / "clip.npy"), "--out", str(tmp_path / "out"),
                              "--no-progress"]}
    return write[command]


@pytest.mark.parametrize("command", ["decode", "decode-video", "decode-batch"])
def test_preset_needs_random_weights(tmp_path, capsys, command, one_thread):
    args = _inputs(tmp_path, command)
    assert main([*args, "--decoder", "tae-64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdec {command}: error:") and "untrained" in err and "--random-weights" in err
    assert not (tmp_path / "out.mp4").exists() and _pngs(tmp_path) == []
    if command == "decode":  # with the flag the preset is built (random weights) and decodes
        assert main([*args, "--decoder", "tae-64", "--random-weights", "--quiet"]) == 0
        assert _pngs(tmp_path / "out") == ["clip_0.png", "clip_1.png"]


@pytest.mark.parametrize("command", ["decode", "decode-video", "decode-batch"])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    args = _inputs(tmp_path, command)
    out = tmp_path / ("out.mp4" if command == "decode-video" else "out")
    out.mkdir() if command == "decode-video" else out.write_text("a file")
    # a decoder that does not exist: the --out check must come first
    assert main([*args, "--decoder", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdec {command}: error:") and "--out" in err and "missing.safetensors" not in err


@pytest.mark.parametrize("case,flags,message", [
    ("nan", [], "frame 1' contains NaN"),
    ("frames0", [], "0 frames"),
    ("integer", [], "torch.int64 values"),
    ("ok", ["--chunk", "0"], "--chunk must be a whole number >= 1"),
    ("ok", ["--start", "-1"], "--start must be a whole number >= 0"),
    ("ok", ["--fps", "0"], "--fps must be a finite number of frames per second > 0"),
])
def test_decode_video_checks_the_clip_and_options_before_writing(tmp_path, checkpoint, capsys, case, flags, message):
    _, path = checkpoint
    clip = {"frames0": torch.zeros(0, 4, 8, 8), "integer": torch.ones(3, 4, 8, 8, dtype=torch.int64)}.get(
        case, torch.randn(3, 4, 8, 8))
    if case == "nan":
        clip[1, 0, 0, 0] = float("nan")
    torch.save(clip, tmp_path / "clip.pt")
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(tmp_path / "clip.pt"), "--decoder", str(path), "--out", str(out), "--quiet",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdec decode-video: error:") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.pt", "dec.safetensors"]  # no video, no temp file


def test_decode_video_in_python_refuses_counts_that_are_no_whole_numbers(tmp_path, checkpoint):
    from fastdec.decode.video import decode_video
    from fastdec.errors import FastdecError

    _, path = checkpoint
    torch.save(torch.randn(3, 4, 8, 8), tmp_path / "clip.pt")
    for option, value, words in (("chunk", 2.5, "--chunk must be a whole number >= 1, got 2.5"),
                                 ("start", None, "--start needs a value"),
                                 ("num_frames", True, "--num-frames must be a whole number >= 1, got True"),
                                 ("fps", "24", "--fps must be a finite number of frames per second > 0, got '24'")):
        with pytest.raises(FastdecError, match=re.escape(words)):
            decode_video(tmp_path / "clip.pt", tmp_path / "out.mp4", path, progress=False, **{option: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.pt", "dec.safetensors"]


def test_a_max_memory_too_small_for_one_latent_writes_no_image_and_leaves_no_folder(tmp_path, checkpoint, capsys):
    """--max-memory that fits latent 'a' untiled but no tile of 'b': 'a' was written before 'b' was refused;
    every image's tile is chosen first now. A refused decode also leaves no empty --out behind."""
    from fastdec.decode import activation_bytes_per_pixel

    decoder, path = checkpoint
    save_file({"a": torch.randn(4, 8, 8), "b": torch.randn(4, 40, 40)}, str(tmp_path / "mixed.safetensors"))
    pixels = (8 * decoder.upsample_factor) ** 2
    fits_a = activation_bytes_per_pixel(decoder) * pixels + 3 * 4 * pixels * 2  # its activations and output
    out = tmp_path / "new" / "out"
    argv = ["decode", str(tmp_path / "mixed.safetensors"), "--decoder", str(path), "--out", str(out), "--quiet"]
    assert main([*argv, "--max-memory", str(fits_a)]) == 2
    err = capsys.readouterr().err
    assert "is too small for this 320x320 image" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no image, and no folder made for them
    assert main([*argv, "--max-memory", "1KB"]) == 2
    assert "--max-memory 1KB is too small" in capsys.readouterr().err  # not '0MB'
    assert main([*argv[:3], str(tmp_path / "untrained-name"), *argv[4:]]) == 2
    assert not (tmp_path / "new").exists()
    assert main(argv) == 0 and _pngs(out) == ["mixed_a.png", "mixed_b.png"]
    (tmp_path / "no-latents").mkdir()
    assert main(["decode-batch", "--latents", str(tmp_path / "no-latents"), "--decoder", str(path), "--out",
                 str(tmp_path / "batch" / "out"), "--no-progress"]) == 2
    assert "no-latents" in capsys.readouterr().err and not (tmp_path / "batch").exists()


def test_old_module_paths_register_each_command_once():
    """`fastdec.cli` lists the old modules until it switches to fastdec.decode.cli: both give each command once."""
    for modules in (["fastdec.decode", "fastdec.decode_video", "fastdec.bulk"], ["fastdec.decode.cli"]):
        subparsers = argparse.ArgumentParser().add_subparsers()
        for name in modules:
            importlib.import_module(name).add_commands(subparsers)  # a second registration raises (Python 3.11+)
        assert sorted(subparsers.choices) == ["decode", "decode-batch", "decode-video"]
    from fastdec.bulk import WorkItem, run_decode_batch, write_latent_shard  # noqa: F401
    from fastdec.decode import activation_bytes_per_pixel, choose_tile  # noqa: F401
    from fastdec.decode_video import DecodeVideoError, decode_stream, load_latents  # noqa: F401


# ----------------------------------------------------------------------------- memory budget
_RSS = ("import resource, sys; from fastdec.cli import main; rc = main(sys.argv[1:]); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def _peak_rss_mb(args):
    result = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024, result.stdout


@pytest.mark.slow  # ~2.5 min on the shared 2-core machine: 9 tiles of a 1024 px image
def test_large_decode_stays_within_memory_budget(tmp_path):
    # 1024x1024 px with tae-64: untiled needs ~1.6 GB of RSS (estimate 1.8 GB); an 800MB budget forces tiles
    from fastdec import create_decoder
    from fastdec.decode import activation_bytes_per_pixel

    decoder = create_decoder("tae-64", "sdxl")
    save_decoder(decoder, tmp_path / "dec.safetensors")
    assert activation_bytes_per_pixel(decoder) * 1024 * 1024 > 2 * 800 * 2**20
    np.save(tmp_path / "big.npy", np.random.randn(4, 128, 128).astype(np.float32))
    np.save(tmp_path / "tiny.npy", np.random.randn(4, 4, 4).astype(np.float32))
    common = ["--decoder", str(tmp_path / "dec.safetensors"), "--out", str(tmp_path / "out")]
    baseline, _ = _peak_rss_mb(["decode", str(tmp_path / "tiny.npy"), *common])
    peak, stdout = _peak_rss_mb(["decode", str(tmp_path / "big.npy"), *common, "--max-memory", "800MB"])
    assert "tiled" in stdout and (tmp_path / "out" / "big.png").exists()
    assert Image.open(tmp_path / "out" / "big.png").size == (1024, 1024)
    # the budget bounds the growth over a tiny decode (the interpreter, torch and the weights are in both)
    assert peak - baseline < 800, (peak, baseline)


def test_decode_given_a_folder_points_to_decode_batch(tmp_path, checkpoint, capsys):
    _, path = checkpoint
    (tmp_path / "latents").mkdir()
    assert main(["decode", str(tmp_path / "latents"), "--decoder", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a latents file" in err and "fastdec decode-batch --latents FOLDER" in err


def test_a_complex_latent_is_called_complex_not_integer():
    from fastdec.errors import LatentFileError
    from fastdec.io.latents import check_latent

    with pytest.raises(LatentFileError, match="has complex dtype torch.complex64"):
        check_latent(torch.zeros(4, 2, 2, dtype=torch.complex64), "z")

"""Bad inputs, command by command (issue 15's "Must show"): every command and decoder refuses them the same way.

Each case runs ``fastdec.cli.main(argv)`` in-process on tiny decoders (``factories.tiny_decoder`` saved as
checkpoints) and tiny inputs, and asserts four things (:func:`run_command`):

* the exit status: 2 for an error; 1 where a command documents "skipped and went on" (``decode-batch``'s
  failed latents, ``bench``'s failed rows);
* the message on stderr names the problem (and the file or field, where there is one), without a traceback;
* nothing was written, changed or removed outside the places the command writes to (a snapshot of the
  test's folders before and after);
* nothing half-done stays: no temporary file, no empty or unreadable file at a final name.

The classes are those of the issue: names that would escape the output folder, pickled code wherever
weights or training state are read, NaN decoder output, checkpoint metadata nonsense, bad numbers and
options, corrupt/truncated/empty files, bad latents, unreadable images and empty folders, ``--out`` that is a
file, missing relative paths (never a Hub download), and empty batches.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from _train_helpers import make_images, tiny_encoder_file
from factories import tiny_decoder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastdec
from fastdec import save_decoder
from fastdec.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"tae-64": "sdxl", "effvit-attn": "sdxl", "tae-causal-64": "svd"}
DECODERS = list(SPACE)
IMAGE_DECODERS = ["tae-64", "effvit-attn"]
VIDEO_DECODERS = ["tae-causal-64"]
COMMANDS = ["decode", "decode-batch", "decode-video", "eval-images", "eval-video", "train", "export-onnx", "bench"]
# which decoders each command takes (video commands also decode with image decoders, frame by frame)
TAKES = {
    "decode": IMAGE_DECODERS, "decode-batch": IMAGE_DECODERS, "decode-video": DECODERS, "eval-images": IMAGE_DECODERS,
    "eval-video": VIDEO_DECODERS, "train": DECODERS, "export-onnx": IMAGE_DECODERS, "bench": DECODERS,
}
PAIRS = [(command, preset) for command in COMMANDS for preset in TAKES[command]]
TEMP_MARKERS = (".fastdec-tmp", ".fastdec-probe")


# ----------------------------------------------------------------------------- the inputs, built once
@dataclass
class Assets:
    root: Path

    def decoder(self, preset: str, kind: str = "good") -> Path:
        return self.root / "w" / f"{preset}-{kind}.safetensors"

    @property
    def latents(self) -> Path:  # two sdxl latents, (4, 4, 4) each
        return self.root / "z.safetensors"

    @property
    def clip(self) -> Path:  # one svd clip of 3 latent frames
        return self.root / "clip.safetensors"

    def encoder(self, space: str) -> Path:
        return self.root / "w" / ("taesdv_encoder.pth" if space == "svd" else "taesdxl_encoder.pth")

    @property
    def images(self) -> Path:
        return self.root / "imgs"

    @property
    def videos(self) -> Path:
        return self.root / "vids"


def _nan_weights(preset: str) -> torch.nn.Module:
    """The tiny decoder with one NaN in its first weight: what a diverged training exports."""
    decoder = tiny_decoder(preset, SPACE[preset], seed=1)
    with torch.no_grad():
        next(iter(decoder.parameters())).view(-1)[3] = float("nan")
    return decoder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    a = Assets(tmp_path_factory.mktemp("inputs"))
    for preset in DECODERS:
        save_decoder(tiny_decoder(preset, SPACE[preset]), a.decoder(preset))
        save_decoder(_nan_weights(preset), a.decoder(preset, "nan"))
    tiny_encoder_file(a.encoder("sdxl"), "sdxl")
    tiny_encoder_file(a.encoder("svd"), "svd")
    make_images(a.images, 2, size=(32, 32))
    make_images(a.videos / "clip", 3, size=(32, 32))
    torch.manual_seed(0)
    save_file({"a": torch.randn(4, 4, 4), "b": torch.randn(4, 4, 4)}, str(a.latents))
    save_file({"clip": torch.randn(1, 3, 4, 4, 4)}, str(a.clip))
    return a


# ----------------------------------------------------------------------------- commands
@dataclass
class Command:
    argv: list[str]
    writes: list[Path]  # where it may write: its output folder (and a training run's latent cache)


def command(name: str, a: Assets, decoder: Any, out: Path, **inputs: Any) -> Command:
    """``name``'s smallest complete command line with ``decoder`` (a path or spec) writing under ``out``.
    ``inputs`` replace its defaults: latents, clip, data, teacher."""
    d, preset = str(decoder), _preset_of(decoder)
    space = SPACE.get(preset, "sdxl")
    latents, clip = inputs.get("latents", a.latents), inputs.get("clip", a.clip)
    teacher = inputs.get("teacher", a.encoder(space))
    if name == "decode":
        return Command(["decode", latents, "--decoder", d, "--out", out, "--quiet"], [out])
    if name == "decode-batch":
        return Command(["decode-batch", "--latents", latents, "--decoder", d, "--out", out, "--no-progress",
                        "--writers", "1"], [out])
    if name == "decode-video":
        return Command(["decode-video", clip, "--decoder", d, "--out", out / "clip.gif", "--quiet"], [out])
    if name == "eval-images":
        return Command(["eval", "images", "--data", inputs.get("data", a.images), "--teacher", teacher,
                        "--decoder", d, "--out", out], [out])
    if name == "eval-video":
        return Command(["eval", "video", "--data", inputs.get("data", a.videos), "--teacher", teacher,
                        "--decoder", d, "--frames", "3", "--out", out], [out])
    if name == "train":
        cache = out.parent / f"{out.name}-cache"
        video = ["--frames", "2"] if preset in VIDEO_DECODERS else []
        data = inputs.get("data", a.videos if video else a.images)
        return Command(["train", "--teacher", teacher, "--decoder", d, "--data", data, "--out", out,
                        "--cache-dir", cache, "--resolution", "32", "--steps", "2", "--batch-size", "2",
                        "--workers", "0", "--warmup", "1", "--log-every", "1", "--crops-per-image", "1", *video],
                       [out, cache])
    if name == "export-onnx":
        return Command(["export", "onnx", "--decoder", d, "--out", out / "decoder.onnx"], [out])
    if name == "bench":
        video = ["--video", "--video-frames", "2"] if preset in VIDEO_DECODERS else []
        return Command(["bench", "--decoders", d, "--baselines", "none", "--sizes", "32", "--repeats", "1",
                        "--warmup", "0", "--no-memory", "--json", out / "bench.json", *video], [out])
    raise AssertionError(name)


def _preset_of(decoder: Any) -> str:
    return next((p for p in sorted(SPACE, key=len, reverse=True) if p in str(decoder)), "tae-64")


# ----------------------------------------------------------------------------- the four checks
def snapshot(roots: list[Path]) -> dict[Path, Any]:
    """Every file (size, mtime) and folder under ``roots``."""
    seen: dict[Path, Any] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            seen[path] = "dir" if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
    return seen


def _inside(path: Path, places: list[Path]) -> bool:
    return any(path == place or place in path.parents for place in places)


def check_complete(path: Path) -> None:
    """A file at a final name holds a whole file of its kind."""
    assert path.stat().st_size > 0, f"empty file left at {path}"
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".webp", ".gif"):
        with Image.open(path) as image:
            image.load()
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".safetensors":
        load_file(str(path))
    elif suffix == ".pt":
        torch.load(path, weights_only=True)


def run_command(capsys, cmd: Command, status: int, *messages: str, roots: list[Path],
                nothing_written: bool = True) -> str:
    """Run ``cmd``; assert its exit status, that stderr holds every message (case-insensitive), that nothing
    changed outside ``cmd.writes``, that no temporary or incomplete file stayed, and (``nothing_written``)
    that no file at all was written. Returns stderr."""
    before = snapshot(roots)
    try:
        code = main([str(arg) for arg in cmd.argv])
    except SystemExit as e:  # argparse's own usage errors (a choice or type it refuses) exit with status 2
        code = e.code
    captured = capsys.readouterr()
    after = snapshot(roots)
    changed = [p for p in after if before.get(p) != after[p] and not (after[p] == "dir" and p in before)]
    removed = [p for p in before if p not in after]
    # the parent folders of an output place may be created (empty but for it)
    outside = [p for p in changed + removed if not _inside(p, cmd.writes)
               and not (after.get(p) == "dir" and any(p in place.parents for place in cmd.writes))]
    assert not outside, f"{cmd.argv[0]} touched {outside} outside {cmd.writes}"
    temps = [p for p in after if any(marker in p.name for marker in TEMP_MARKERS)]
    assert not temps, f"temporary files left: {temps}"
    # lock files (decode-batch's in its folder, a latent cache's beside it: empty, and kept, since removing
    # one races its next taker) are the files not counted
    written = [p for p in changed if after[p] != "dir" and not (p.name.startswith(".") and p.suffix == ".lock")]
    for path in written:
        check_complete(path)
    if nothing_written:
        assert not written, f"{cmd.argv[0]} failed but wrote {written}"
    err = captured.err
    assert code == status, f"exit {code}, expected {status}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    for message in messages:
        assert message.lower() in err.lower(), f"{message!r} not in stderr: {err[-2000:]}"
    return err


@pytest.fixture
def check(capsys, tmp_path, assets, monkeypatch):
    """``check(cmd, status, *messages, nothing_written=True)`` with the snapshot over this test's folder and
    the shared inputs; the working directory is the test's folder (for relative paths); the Hub is never
    reached (a test that would download fails)."""
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried the Hugging Face Hub: {args}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)

    def run(cmd: Command, status: int, *messages: str, nothing_written: bool = True) -> str:
        return run_command(capsys, cmd, status, *messages, roots=[tmp_path, assets.root],
                           nothing_written=nothing_written)

    return run


def _deep_out(tmp_path: Path) -> Path:
    # deep enough that a name escaping by '../' x4 would still land inside tmp_path, where the snapshot sees it
    return tmp_path / "a" / "b" / "c" / "d" / "out"


# ============================================================================= 1. names that would escape --out
ESCAPING_NAMES = {
    "dotdot": "../../../../escaped",
    "nested": "sub/../../../../../escaped",
    "absolute": "{tmp}/absolute",
    "parent": "..",
    "newline": "name\n",
    "carriage-return": "cr\rname",
    "nul": "nul\x00byte",
    "bidi": "gpj.\u202eevil",  # right-to-left override: shows as 'evil.jpg'
    "long": "n" * 201,
    "long-multibyte": "\u00e9" * 101,  # 202 bytes in UTF-8, 101 characters
    "hidden": ".hidden",
    "temp-marker": "x.fastdec-tmp",
    "backslash": "..\\..\\escaped",
}


def _named_latents(path: Path, name: str, fmt: str) -> Path:
    tensors = {"fine": torch.randn(4, 4, 4), name: torch.randn(4, 4, 4)}
    if fmt == ".pt":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case", sorted(ESCAPING_NAMES))
@pytest.mark.parametrize("fmt", [".safetensors", ".pt"])
def test_decode_refuses_latent_names_that_are_no_plain_file_name(check, assets, tmp_path, case, fmt):
    name = ESCAPING_NAMES[case].format(tmp=tmp_path)
    latents = _named_latents(tmp_path / f"z{fmt}", name, fmt)
    out = _deep_out(tmp_path)
    # names are checked before any image is written: not even the good latent is decoded
    check(command("decode", assets, assets.decoder("tae-64"), out, latents=latents), 2, "cannot be a file name")


@pytest.mark.parametrize("case", sorted(ESCAPING_NAMES))
def test_decode_batch_skips_bad_names_and_decodes_the_rest(check, assets, tmp_path, case):
    name = ESCAPING_NAMES[case].format(tmp=tmp_path)
    latents = _named_latents(tmp_path / "shard.safetensors", name, ".safetensors")
    out = _deep_out(tmp_path)
    check(command("decode-batch", assets, assets.decoder("effvit-attn"), out, latents=latents), 1,
          "cannot be a file name", "FAILED", nothing_written=False)
    assert (out / "fine.png").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == ["fine.png"]


@pytest.mark.parametrize("names", [["../../../../escaped", "ok"], ["ok", "ok\n"], ["ok", "x" * 300]])
def test_decode_batch_refuses_names_from_shard_metadata(check, assets, tmp_path, names):
    """Names of a stack come from the file's ``fastdec_keys`` metadata: metadata is checked like keys."""
    shard = tmp_path / "stack.safetensors"
    save_file({"stack": torch.randn(2, 4, 4, 4)}, str(shard), metadata={"fastdec_keys": json.dumps({"stack": names})})
    out = _deep_out(tmp_path)
    check(command("decode-batch", assets, assets.decoder("tae-64"), out, latents=shard), 1,
          "cannot be a file name", nothing_written=False)
    assert [p.name for p in out.glob("*.png")] == ["ok.png"]


@pytest.mark.parametrize("metadata", ['{"stack": "not a list"}', '["stack"]', "{broken", '{"stack": ["only one"]}'])
def test_decode_batch_skips_a_shard_with_bad_name_metadata(check, assets, tmp_path, metadata):
    bad, good = tmp_path / "in" / "bad.safetensors", tmp_path / "in" / "good.safetensors"
    bad.parent.mkdir()
    save_file({"stack": torch.randn(2, 4, 4, 4)}, str(bad), metadata={"fastdec_keys": metadata})
    save_file({"good": torch.randn(4, 4, 4)}, str(good))
    out = tmp_path / "out"
    check(command("decode-batch", assets, assets.decoder("tae-64"), out, latents=bad.parent), 1, "bad.safetensors",
          nothing_written=False)
    assert [p.name for p in out.glob("*.png")] == ["good.png"]


@pytest.mark.parametrize("stem", ["z\n", "z\t", "\u202ez"])
def test_a_latents_file_name_with_control_characters_is_no_output_name(check, assets, tmp_path, stem):
    """``decode`` names each image after the latents file: a file name is checked like a key."""
    latents = tmp_path / f"{stem}.npy"
    np.save(latents, np.zeros((4, 4, 4), np.float32))
    check(command("decode", assets, assets.decoder("tae-64"), tmp_path / "out", latents=latents), 2,
          "cannot be a file name", "control character")


def test_latents_files_whose_names_are_not_utf8_are_read_or_named():
    """A .pt was called truncated or corrupt (torch hands the name to C++ as UTF-8); a .safetensors too."""
    import tempfile

    from fastdec.errors import LatentFileError
    from fastdec.io.latents import read_latents, read_tensors

    with tempfile.TemporaryDirectory() as folder:
        base = os.fsencode(folder) + b"/z" + bytes([0xfe])
        torch.save({"z": torch.ones(4, 2, 2)}, os.fsdecode(base + b".pt"))
        assert [(n, tuple(z.shape)) for n, z in read_latents(os.fsdecode(base + b".pt"))] == [("z", (4, 2, 2))]
        save_file({"z": torch.ones(4, 2, 2)}, os.path.join(folder, "plain.safetensors"))
        os.rename(os.path.join(folder, "plain.safetensors"), os.fsdecode(base + b".safetensors"))
        for read in (read_latents, read_tensors):
            with pytest.raises(LatentFileError, match=r"z\\xfe.safetensors': its path is not valid UTF-8.*rename"):
                read(os.fsdecode(base + b".safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_two_latents_of_one_name_are_refused_before_any_image(check, assets, tmp_path, suffix):
    # the stack 'a' of two is a_0 and a_1, as is the key 'a_0': three latents gave two files, one overwritten
    tensors = {"a": torch.randn(2, 4, 8, 8), "a_0": torch.randn(4, 8, 8)}
    latents = tmp_path / f"coll{suffix}"
    save_file(tensors, str(latents)) if suffix == ".safetensors" else torch.save(tensors, latents)
    check(command("decode", assets, assets.decoder("tae-64"), tmp_path / "out", latents=latents), 2,
          "latent 0 of key 'a' and key 'a_0' are both named 'a_0'", "rename one key")


def test_a_latents_file_name_that_is_not_utf8_is_named_as_such(check, assets, tmp_path):
    # it was called a control character (Python keeps the undecodable bytes as surrogates)
    latents = tmp_path / f"{os.fsdecode(b'z' + bytes([0xff]))}.npy"
    np.save(latents, np.zeros((4, 4, 4), np.float32))
    check(command("decode", assets, assets.decoder("tae-64"), tmp_path / "out", latents=latents), 2,
          "cannot be a file name", "not valid UTF-8")


# ============================================================================= 2. pickled code is never run
class _Plants:
    """Pickles whose loading would create a marker file, through three different callables."""

    @staticmethod
    def open_file(marker: Path) -> Any:
        return _Reduce(open, (str(marker), "w"))

    @staticmethod
    def make_dir(marker: Path) -> Any:
        return _Reduce(os.makedirs, (str(marker),))

    @staticmethod
    def touch(marker: Path) -> Any:
        return _Reduce(Path.touch, (Path(marker),))


class _Reduce:
    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _with(cmd: Command, *flags: Any) -> Command:
    cmd.argv += [str(f) for f in flags]
    return cmd


def _plant(path: Path, payload: Any, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


PLANTED = {
    # where the pickle is read -> (file name, command built around the planted file, planting callable, payload)
    "decoder .pth": ("planted.pth", lambda a, p, o: command("decode", a, p, o), "open_file",
                     lambda m: {"1.weight": m, "3.weight": torch.zeros(1)}),
    "decoder .pth, legacy format": ("planted.pth", lambda a, p, o: command("decode-batch", a, p, o), "touch",
                                    lambda m: {"1.weight": m}),
    "decoder for eval": ("planted.pth", lambda a, p, o: command("eval-images", a, p, o), "make_dir",
                         lambda m: {"1.weight": m}),
    "decoder for export": ("planted.pth", lambda a, p, o: command("export-onnx", a, p, o), "touch",
                           lambda m: {"state_dict": {"1.weight": m}}),
    "decoder for bench": ("planted.pth", lambda a, p, o: command("bench", a, p, o), "open_file", lambda m: [m]),
    "decoder to train from": ("planted.pth", lambda a, p, o: command("train", a, p, o), "make_dir",
                              lambda m: {"1.weight": m}),
    "AutoencoderTiny folder .bin": ("tiny/diffusion_pytorch_model.bin",
                                    lambda a, p, o: command("decode", a, p.parent, o), "touch",
                                    lambda m: {"decoder.layers.0.weight": m}),
    "teacher .pth for train": ("taesdxl_encoder.pth",
                               lambda a, p, o: command("train", a, a.decoder("tae-64"), o, teacher=p), "open_file",
                               lambda m: {"0.weight": m}),
    "teacher .pth for eval": ("taesdxl_encoder.pth",
                              lambda a, p, o: command("eval-images", a, a.decoder("tae-64"), o, teacher=p), "touch",
                              lambda m: {"0.weight": m}),
    "decoder for --init": ("planted.pth", lambda a, p, o: _with(command("train", a, a.decoder("tae-64"), o),
                                                                "--init", p), "touch", lambda m: {"1.weight": m}),
    "teacher decoder for eval": ("planted.pth",
                                 lambda a, p, o: _with(command("eval-images", a, a.decoder("tae-64"), o),
                                                       "--teacher-decoder", p), "open_file", lambda m: {"1.weight": m}),
    "teacher .pth for decode-video": ("taesdxl_encoder.pth",
                                      lambda a, p, o: _with(command("decode-video", a, a.decoder("tae-64"), o,
                                                                    clip=a.videos / "clip"), "--teacher", p),
                                      "make_dir", lambda m: {"0.weight": m}),
    "latents .pt for decode": ("planted.pt",
                               lambda a, p, o: command("decode", a, a.decoder("tae-64"), o, latents=p), "make_dir",
                               lambda m: {"a": m}),
    "latents .pt, legacy format": ("planted.pt",
                                   lambda a, p, o: command("decode", a, a.decoder("tae-64"), o, latents=p),
                                   "open_file", lambda m: m),
    "latents .pt for decode-video": ("planted.pt",
                                     lambda a, p, o: command("decode-video", a, a.decoder("tae-causal-64"), o, clip=p),
                                     "touch", lambda m: {"clip": m}),
}


@pytest.mark.parametrize("where", sorted(PLANTED))
def test_pickled_code_is_never_run(check, assets, tmp_path, where):
    name, build, plant, payload = PLANTED[where]
    marker = tmp_path / "marker"
    planted = _plant(tmp_path / "files" / name, payload(getattr(_Plants, plant)(marker)), legacy="legacy" in where)
    check(build(assets, planted, tmp_path / "out"), 2, "never unpickles code", planted.name)
    assert not marker.exists()
    # the test can fail: unpickling the same file the unsafe way does run its code
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_a_planted_latents_shard_is_skipped_by_decode_batch(check, assets, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "in"
    _plant(folder / "planted.pt", {"a": _Plants.make_dir(marker)})
    torch.save({"good": torch.randn(4, 4, 4)}, folder / "good.pt")
    check(command("decode-batch", assets, assets.decoder("tae-64"), tmp_path / "out", latents=folder), 1,
          "never unpickles code", "planted.pt", nothing_written=False)
    assert not marker.exists() and (tmp_path / "out" / "good.png").is_file()


def test_eval_latents_folder_with_planted_file(check, assets, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "latents"
    _plant(folder / "img_000.pt", _Plants.open_file(marker))
    torch.save(torch.randn(4, 4, 4), folder / "img_001.pt")
    cmd = command("eval-images", assets, assets.decoder("tae-64"), tmp_path / "out")
    cmd.argv[cmd.argv.index("--teacher"):cmd.argv.index("--teacher") + 2] = ["--latents", str(folder)]
    check(cmd, 2, "never unpickles code", "img_000.pt")
    assert not marker.exists()


def test_train_resume_never_runs_a_planted_training_state(check, assets, tmp_path):
    """A run folder holding only a planted checkpoint (no earlier run needed to plant one)."""
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    _plant(out / "checkpoints" / "step_00000007.pt", {"model": _Plants.touch(marker), "step": 7})
    cmd = command("train", assets, assets.decoder("tae-64"), out)
    cmd.argv.append("--resume")
    check(cmd, 2, "never unpickles code", "step_00000007.pt", nothing_written=False)
    assert not marker.exists() and not (out / "decoder.safetensors").exists()


# ============================================================================= 3. NaN decoder output
@pytest.mark.parametrize("name, preset", PAIRS)
def test_nan_weights_are_an_error_in_every_command(check, assets, tmp_path, name, preset):
    """A checkpoint with one NaN weight: never a black picture, a score, a speed or an exported model."""
    cmd = command(name, assets, assets.decoder(preset, "nan"), tmp_path / "out")
    status = 1 if name == "decode-batch" or (name == "bench" and preset in IMAGE_DECODERS) else 2
    named = [] if name == "train" else [f"{preset}-nan"]
    inputs = {"decode": "'a'", "decode-batch": "[a]", "decode-video": "clip.safetensors", "eval-images": "img_000.png",
              "eval-video": "clip", "train": "--decoder", "export-onnx": "example latents", "bench": "32"}
    check(cmd, status, "NaN", inputs[name], *named, nothing_written=False)
    out = tmp_path / "out"
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.gif")) and not list(out.rglob("*.onnx"))
    assert not (out / "decoder.safetensors").exists() and not (out / "report.json").exists()
    if name == "bench" and status == 1:  # the row failed and the report says so, with no timing for it
        report = json.loads((out / "bench.json").read_text())
        assert report["failed"] and not report["rows"]


# ============================================================================= 4. checkpoint metadata nonsense
def _with_metadata(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    fields = {k: json.loads(v) if k in ("config", "latent_space") else v for k, v in metadata.items()}
    change(fields)
    written = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}
    save_file(load_file(str(source)), str(target), metadata=written)
    return target


def _space(**changes: Any) -> Callable[[dict], None]:
    return lambda f: f["latent_space"].update(changes)


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda f: f.__setitem__(key, value)


def _replace_space(record: Any) -> Callable[[dict], None]:
    return lambda f: f.__setitem__("latent_space", record)


METADATA = {  # case -> (change, words the message must hold)
    "spatial factor 7": (_space(spatial_factor=7), ["spatial_factor", "7", "powers of 2"]),
    "spatial factor 0": (_space(spatial_factor=0), ["spatial_factor", "0"]),
    "spatial factor -8": (_space(spatial_factor=-8), ["spatial_factor", "-8"]),
    "spatial factor text": (_space(spatial_factor="abc"), ["spatial_factor", "'abc'"]),
    "spatial factor 8.5": (_space(spatial_factor=8.5), ["spatial_factor", "8.5"]),
    "scaling factor 0": (_space(scaling_factor=0), ["scaling_factor", "> 0"]),
    "scaling factor negative": (_space(scaling_factor=-0.13), ["scaling_factor", "-0.13"]),
    "scaling factor text": (_space(scaling_factor="abc"), ["scaling_factor", "'abc'"]),
    "scaling factor NaN": (_space(scaling_factor=float("nan")), ["scaling_factor", "nan"]),
    "shift factor inf": (_space(shift_factor=float("inf")), ["shift_factor", "inf"]),
    "channels 0": (_space(channels=0), ["channels", "0"]),
    "channels negative": (_space(channels=-4), ["channels", "-4"]),
    "channels disagree with the space": (_space(channels=16), ["channels", "16"]),
    "std of zero": (_space(latents_std=[1.0, 0.0, 1.0, 1.0], latents_mean=[0.0] * 4), ["latents_std"]),
    "mean of the wrong length": (_space(latents_mean=[0.0, 1.0]), ["latents_mean", "one number per channel"]),
    "temporal text": (_space(temporal="yes"), ["temporal", "'yes'"]),
    "unknown space field": (_space(colour_space="rgb"), ["'colour_space'", "upgrade fastdec"]),
    "unknown space name": (_replace_space({"name": "sdxxl", "channels": 4}), ["'sdxxl'", "spatial_factor"]),
    "space name not text": (_space(name=7), ["'name'", "7"]),
    "space not an object": (_replace_space(["sdxl"]), ["'latent_space'", "JSON object"]),
    "space not JSON": (_set("latent_space", "{sdxl"), ["'latent_space'", "not valid JSON"]),
    "newer format": (_set("format_version", "2"), ["format version 2", "upgrade fastdec"]),
    "format version text": (_set("format_version", "one"), ["'format_version'", "'one'"]),
    "config not an object": (_set("config", "[8, 8]"), ["'config'", "JSON object"]),
    "config not JSON": (_set("config", "{width: 8"), ["'config'", "not valid JSON"]),
    "no config": (_set("config", None), ["'config'", "lacks"]),
    "unknown architecture": (_set("architecture", "tae-9000"), ["'architecture'", "tae-9000", "--plugin"]),
    "no architecture": (_set("architecture", None), ["'architecture'"]),
}
# the config field that holds the width(s), per decoder
WIDTH_FIELD = {"tae-64": "width", "tae-causal-64": "width", "effvit-attn": "widths"}


def _width(preset: str, value: Any) -> Callable[[dict], None]:
    key = WIDTH_FIELD[preset]
    return lambda f: f["config"].update({key: value if key == "width" else [value] * len(f["config"][key])})


# case -> (width, does the message name the field): a width in range that the weights do not have is caught by
# comparing shapes on the meta device, before anything of that size is allocated
WIDTHS = {"negative": (-8, "-8", True), "absurd": (10**9, "1000000000", True), "text": ("wide", "'wide'", True),
          "weights disagree": (2048, "does not match", False)}


def _decode_command(assets: Assets, preset: str, decoder: Path, out: Path) -> Command:
    return command("decode-video" if preset in VIDEO_DECODERS else "decode", assets, decoder, out)


@pytest.mark.parametrize("preset", DECODERS)
@pytest.mark.parametrize("case", sorted(METADATA))
def test_checkpoint_metadata_is_checked_on_load(check, assets, tmp_path, preset, case):
    change, words = METADATA[case]
    planted = _with_metadata(assets.decoder(preset), tmp_path / f"{preset}-edited.safetensors", change)
    check(_decode_command(assets, preset, planted, tmp_path / "out"), 2, f"{preset}-edited.safetensors", *words)


@pytest.mark.parametrize("preset", DECODERS)
@pytest.mark.parametrize("case", sorted(WIDTHS))
def test_bad_widths_are_named_not_met_as_allocation_errors(check, assets, tmp_path, preset, case):
    value, word, names_field = WIDTHS[case]
    planted = _with_metadata(assets.decoder(preset), tmp_path / f"{preset}-wide.safetensors", _width(preset, value))
    field = [f"{WIDTH_FIELD[preset]}="] if names_field else []
    check(_decode_command(assets, preset, planted, tmp_path / "out"), 2, f"{preset}-wide.safetensors", "'config'",
          word, *field)


@pytest.mark.parametrize("name, preset", PAIRS)
@pytest.mark.parametrize("case", ["newer format", "spatial factor 7"])
def test_every_command_checks_checkpoint_metadata(check, assets, tmp_path, name, preset, case):
    change, words = METADATA[case]
    planted = _with_metadata(assets.decoder(preset), tmp_path / f"{preset}-edited.safetensors", change)
    check(command(name, assets, planted, tmp_path / "out"), 2, f"{preset}-edited.safetensors", *words)


def test_metadata_checks_reach_the_python_api(tmp_path, assets):
    from fastdec import load_decoder
    from fastdec.checkpoints import decoder_info
    from fastdec.errors import CheckpointError, LatentSpaceError
    from fastdec.latent_spaces import LatentSpace, get_latent_space

    planted = _with_metadata(assets.decoder("tae-64"), tmp_path / "edited.safetensors", _space(spatial_factor=12))
    for load in (load_decoder, decoder_info):
        with pytest.raises(CheckpointError, match="spatial_factor"):
            load(planted)
    with pytest.raises(LatentSpaceError, match="scaling_factor"):
        get_latent_space({"name": "sdxl", "scaling_factor": "0.13"})
    # a record that leaves fields out takes them from its preset, not from the dataclass defaults
    assert LatentSpace.from_dict({"name": "sana", "channels": 32}) == get_latent_space("sana")
    # every preset and a variant survive the round trip; a space fastdec does not know, fully given, loads
    for space in [*map(get_latent_space, ("sd15", "sdxl", "sd3", "flux1", "flux2", "svd", "sana")),
                  get_latent_space("sdxl").with_vae_config({"latents_mean": [0.1] * 4, "latents_std": [2.0] * 4})]:
        assert LatentSpace.from_dict(json.loads(space.to_json())) == space
    custom = {"name": "dcae-f64c128", "channels": 128, "spatial_factor": 64, "scaling_factor": 0.3}
    assert LatentSpace.from_dict(custom).spatial_factor == 64


# ============================================================================= 5. bad numbers and options
BAD_OPTIONS = [  # (command, preset, flags, words)
    ("decode", "tae-64", ["--max-memory", "0"], ["memory", "zero"]),
    ("decode", "tae-64", ["--max-memory=-2GB"], ["memory size '-2GB'"]),
    ("decode", "tae-64", ["--max-memory", "lots"], ["'lots'"]),
    ("decode", "effvit-attn", ["--tile", "-4"], ["--tile", "-4"]),
    ("decode", "tae-64", ["--tile", "0"], ["--tile"]),
    ("decode", "tae-64", ["--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    ("decode", "tae-64", ["--device", "cuda:7"], ["cuda:7", "not available"]),
    ("decode", "tae-64", ["--device", "banana"], ["unknown --device 'banana'"]),
    ("decode-batch", "tae-64", ["--batch", "0"], ["--batch"]),
    ("decode-batch", "tae-64", ["--format", "webp", "--quality", "101"], ["--quality must be in 1-100, got 101"]),
    ("decode-batch", "tae-64", ["--quality", "80"], ["--quality 80 with --format png", "png is lossless"]),
    ("decode-batch", "tae-64", ["--writers", "0"], ["--writers"]),
    ("decode-batch", "tae-64", ["--threads", "-1"], ["--threads"]),
    ("decode-batch", "tae-64", ["--dtype", "int8"], ["unknown dtype 'int8'"]),
    ("decode-video", "tae-causal-64", ["--chunk", "0"], ["--chunk"]),
    ("decode-video", "tae-causal-64", ["--start", "-1"], ["--start"]),
    ("decode-video", "tae-causal-64", ["--num-frames", "0"], ["--num-frames"]),
    ("decode-video", "tae-causal-64", ["--fps", "nan"], ["--fps"]),
    ("decode-video", "tae-causal-64", ["--fps", "inf"], ["--fps", "finite"]),
    ("decode-video", "tae-causal-64", ["--fps", "1e-9"], ["--fps 1e-09 is outside", "0.02 to 50 fps"]),
    # the command writes .gif: past 50 fps players would show it at 10
    ("decode-video", "tae-causal-64", ["--fps", "60"], ["--fps 60", "write an .mp4"]),
    ("decode-video", "tae-causal-64", ["--crf", "99"], ["--crf", "51"]),
    ("decode-video", "tae-causal-64", ["--threads", "0"], ["--threads"]),
    ("decode-video", "tae-causal-64", ["--device", "mps:3"], ["mps:3", "not available"]),
    ("decode-video", "tae-causal-64", ["--dtype", "fp64"], ["unknown dtype 'fp64'"]),
    ("decode-video", "tae-causal-64", ["--start", "5"], ["3 latent frames", "--start 5 is past the last one (2)"]),
    ("decode-video", "tae-causal-64", ["--start", "1", "--num-frames", "3"], ["cannot take 1..3", "--num-frames 2"]),
    ("eval-images", "tae-64", ["--limit", "-1"], ["--limit", "-1"]),
    ("eval-images", "tae-64", ["--limit", "0"], ["--limit"]),
    ("eval-images", "tae-64", ["--resolution", "0"], ["--resolution"]),
    ("eval-images", "tae-64", ["--resolution", "36"], ["--resolution 36", "multiple"]),
    ("eval-images", "tae-64", ["--grid", "-2"], ["--grid"]),
    ("eval-images", "tae-64", ["--device", "cuda"], ["--device cuda", "not available"]),
    ("eval-images", "effvit-attn", ["--device", "quantum"], ["unknown --device 'quantum'"]),
    ("eval-video", "tae-causal-64", ["--frames", "0"], ["--frames"]),
    ("eval-video", "tae-causal-64", ["--batch-size", "0"], ["--batch-size"]),
    ("eval-video", "tae-causal-64", ["--clip-frames", "-3"], ["--clip-frames"]),
    ("eval-video", "tae-causal-64", ["--device", "cuda:1"], ["cuda:1", "not available"]),
    ("train", "tae-64", ["--steps", "-5"], ["--steps"]),
    ("train", "tae-64", ["--batch-size", "0"], ["--batch-size"]),
    ("train", "tae-64", ["--lr", "inf"], ["--lr"]),
    ("train", "effvit-attn", ["--grad-accum", "0"], ["--grad-accum"]),
    ("train", "tae-causal-64", ["--crops-per-image", "0"], ["--crops-per-image"]),
    ("train", "tae-64", ["--mixed-precision", "fp8"], ["--mixed-precision"]),
    ("export-onnx", "tae-64", ["--opset", "0"], ["--opset", ">= 7"]),
    ("export-onnx", "effvit-attn", ["--opset", "-3"], ["--opset"]),
    ("export-onnx", "tae-64", ["--out", "model.txt"], ["--out must end in .onnx"]),
    ("bench", "tae-64", ["--sizes", "0"], ["size 0"]),
    ("bench", "tae-64", ["--sizes", "36"], ["size 36", "multiple of 8"]),
    ("bench", "tae-64", ["--repeats", "0"], ["--repeats"]),
    ("bench", "effvit-attn", ["--batch", "-1"], ["--batch"]),
    ("bench", "tae-64", ["--threads", "-2"], ["--threads"]),
    ("bench", "tae-64", ["--dtype", "fp4"], ["unknown dtype 'fp4'"]),
    ("bench", "tae-64", ["--device", "banana"], ["unknown --device 'banana'"]),
    ("bench", "tae-64", ["--device", "cuda:5"], ["cuda:5", "not available"]),
    ("bench", "tae-causal-64", ["--svd-frames", "-1"], ["--svd-frames"]),
    ("bench", "tae-causal-64", ["--video-frames", "0"], ["--video-frames"]),
]


def _device_exists(device: str) -> bool:
    from fastdec.devices import check_device
    from fastdec.errors import UsageError

    try:
        check_device(device)
    except UsageError:
        return False
    return True


@pytest.mark.parametrize("name, preset, flags, words", BAD_OPTIONS,
                         ids=[f"{c}{''.join(f)}" for c, _, f, _ in BAD_OPTIONS])
def test_bad_numbers_and_options_are_usage_errors_before_any_work(check, assets, tmp_path, name, preset, flags,
                                                                  words):
    if "--device" in flags and _device_exists(flags[flags.index("--device") + 1]):  # pragma: no cover
        pytest.skip("this machine has the device the case calls unavailable")
    cmd = command(name, assets, assets.decoder(preset), tmp_path / "out")
    cmd.argv += flags
    check(cmd, 2, "error", *words)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    assert not (tmp_path / "out-cache").exists()  # train refuses before encoding anything


# ============================================================================= 6. corrupt, truncated, empty files
def _truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


DAMAGES = {
    "empty": lambda src, dst: (dst.write_bytes(b""), dst)[1],
    "truncated": lambda src, dst: _truncated(src, dst),
    "header only": lambda src, dst: _truncated(src, dst, keep=0.02),
    "random bytes": lambda src, dst: (dst.write_bytes(np.random.default_rng(0).bytes(4096)), dst)[1],
    "text": lambda src, dst: (dst.write_text("not a weights file\n"), dst)[1],
}


# every damage for three commands, the three commonest for every command
DAMAGED_DECODER = [(damage, name, preset) for damage in sorted(DAMAGES) for name, preset in PAIRS
                   if damage in ("empty", "truncated", "random bytes") or name in ("decode", "train", "bench")]


@pytest.mark.parametrize("damage, name, preset", DAMAGED_DECODER)
def test_a_damaged_decoder_checkpoint_names_the_file(check, assets, tmp_path, damage, name, preset):
    broken = DAMAGES[damage](assets.decoder(preset), tmp_path / f"{preset}-broken.safetensors")
    check(command(name, assets, broken, tmp_path / "out"), 2, f"{preset}-broken.safetensors")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", ["train", "eval-images", "eval-video"])
def test_a_damaged_teacher_encoder_names_the_file(check, assets, tmp_path, damage, name):
    preset = "tae-causal-64" if name == "eval-video" else "tae-64"
    space = SPACE[preset]
    broken = DAMAGES[damage](assets.encoder(space), tmp_path / assets.encoder(space).name)
    check(command(name, assets, assets.decoder(preset), tmp_path / "out", teacher=broken), 2, broken.name)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
@pytest.mark.parametrize("name", ["decode", "decode-video"])
def test_a_damaged_latents_file_names_the_file(check, assets, tmp_path, damage, suffix, name):
    preset = "tae-64" if name == "decode" else "tae-causal-64"
    z = torch.randn(2, 4, 4, 4) if name == "decode" else torch.randn(3, 4, 4, 4)
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        save_file({"z": z}, str(good))
    elif suffix == ".pt":
        torch.save(z, good)
    else:
        np.save(good, z.numpy())
    broken = DAMAGES[damage](good, tmp_path / f"broken{suffix}")
    inputs = {"latents": broken} if name == "decode" else {"clip": broken}
    check(command(name, assets, assets.decoder(preset), tmp_path / "out", **inputs), 2, f"broken{suffix}")


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
def test_decode_batch_skips_a_damaged_shard_and_goes_on(check, assets, tmp_path, damage):
    folder = tmp_path / "in"
    folder.mkdir()
    save_file({"good": torch.randn(4, 4, 4)}, str(folder / "good.safetensors"))
    save_file({"other": torch.randn(4, 4, 4)}, str(tmp_path / "other.safetensors"))
    DAMAGES[damage](tmp_path / "other.safetensors", folder / "broken.safetensors")
    check(command("decode-batch", assets, assets.decoder("tae-64"), tmp_path / "out", latents=folder), 1,
          "broken.safetensors", nothing_written=False)
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["good.png"]


def test_decode_batch_redoes_an_empty_or_truncated_output_on_resume(check, assets, tmp_path):
    out = tmp_path / "out"
    cmd = command("decode-batch", assets, assets.decoder("tae-64"), out)
    check(cmd, 0, nothing_written=False)
    whole = (out / "a.png").read_bytes()
    (out / "a.png").write_bytes(b"")
    _truncated(out / "b.png", out / "b.png")
    check(cmd, 0, "2 to decode", nothing_written=False)
    assert (out / "a.png").read_bytes() == whole and Image.open(out / "b.png").size == (32, 32)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
def test_resume_from_a_damaged_only_checkpoint_names_it(check, assets, tmp_path, damage):
    out = tmp_path / "run"
    state = tmp_path / "state.pt"
    torch.save({"model": tiny_decoder("tae-64").state_dict(), "step": 4}, state)
    (out / "checkpoints").mkdir(parents=True)
    DAMAGES[damage](state, out / "checkpoints" / "step_00000004.pt")
    cmd = command("train", assets, assets.decoder("tae-64"), out)
    cmd.argv.append("--resume")
    check(cmd, 2, "step_00000004.pt", nothing_written=False)
    assert not (out / "decoder.safetensors").exists()


@pytest.mark.parametrize("part", ["index", "shard"])
def test_a_damaged_latent_cache_names_the_cache_folder(check, assets, tmp_path, part):
    first = command("train", assets, assets.decoder("tae-64"), tmp_path / "run1")
    check(first, 0, nothing_written=False)
    cache = Path(first.argv[first.argv.index("--cache-dir") + 1])
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    target = folder / "index.json" if part == "index" else sorted(folder.glob("shard_*.safetensors"))[0]
    _truncated(target, target)
    second = command("train", assets, assets.decoder("tae-64"), tmp_path / "run2")
    second.argv[second.argv.index("--cache-dir") + 1] = str(cache)
    second.writes.append(cache)
    check(second, 2, folder.name, "delete", nothing_written=False)
    assert not (tmp_path / "run2" / "decoder.safetensors").exists()


def test_a_save_leaves_the_temporary_files_of_saves_still_running(tmp_path):
    """Two writers of one file (two runs sharing a latent cache, decode-batch's writer threads saving 'a.png'
    and 'a.png.v2.png') each write a temporary file; a save removes only a dead writer's, never a live one's."""
    from fastdec.io import files

    target = tmp_path / "index.json"
    live = files.temp_file_for(target)  # this process's own: it is still writing it
    other_machine = tmp_path / f".index.json.00000000-1.abc{files.TEMP_MARKER}"  # pid 1 here is not that writer
    other_machine.write_text("{")
    longer_name = files.temp_file_for(tmp_path / "index.json.v2")
    files.write_json(target, {"ok": True})
    assert live.exists() and other_machine.exists() and longer_name.exists()
    assert json.loads(target.read_text()) == {"ok": True}


def test_an_interrupted_save_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    """``atomic_write``, under every file fastdec writes: fsync before the rename, the old file intact when the
    write fails, and temporary files of a save that died (a kill leaves them) removed by the next save."""
    from fastdec.io import files

    target = tmp_path / "report.json"
    files.write_json(target, {"run": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that is gone, as a killed run is
    host = files._owner_tag().partition("-")[0]
    stale = tmp_path / f".report.json.{host}-{dead.pid}.k1ll3d{files.TEMP_MARKER}"
    stale.write_text('{"run": ')  # what a kill mid-write leaves
    other = tmp_path / f".other.json.{host}-{dead.pid}.k1ll3d{files.TEMP_MARKER}"
    other.write_text("{")  # another file's leftover: not this save's to remove

    def failing_write(tmp: str) -> None:
        Path(tmp).write_text('{"run": 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing_write)
    assert json.loads(target.read_text()) == {"run": 1} and not stale.exists() and other.exists()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    files.write_json(target, {"run": 3})
    assert synced and json.loads(target.read_text()) == {"run": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "report.json"]


# ============================================================================= 7. bad latents
BAD_LATENTS = {  # case -> (tensor for decode (N, C, h, w) or a clip (T, C, h, w), words)
    "integer": (lambda: torch.ones(2, 4, 4, 4, dtype=torch.int32), ["int32"]),
    "bool": (lambda: torch.ones(2, 4, 4, 4, dtype=torch.bool), ["bool"]),
    "wrong channels": (lambda: torch.randn(2, 16, 4, 4), ["16 channels", "sd3"]),
    "one channel": (lambda: torch.randn(2, 1, 4, 4), ["1 channels"]),
    "batch 0": (lambda: torch.zeros(0, 4, 4, 4), ["0"]),
    "zero height": (lambda: torch.zeros(2, 4, 0, 4), ["empty dimension", "(4, 0, 4)"]),
    "zero width": (lambda: torch.zeros(2, 4, 4, 0), ["empty dimension"]),
    "nan": (lambda: _one_nan_each(torch.randn(2, 4, 4, 4)), ["NaN"]),
    "inf": (lambda: torch.full((2, 4, 4, 4), float("-inf")), ["inf"]),
    "six dims": (lambda: torch.zeros(1, 1, 2, 4, 4, 4), ["shape"]),
}


def _one_nan_each(z: torch.Tensor) -> torch.Tensor:
    z[:, 1, 2, 3] = float("nan")  # one value in each latent: a sampler that diverged in one place
    return z


def _latents_file(path: Path, z: torch.Tensor) -> Path:
    save_file({"z": z.contiguous()}, str(path))
    return path


@pytest.mark.parametrize("preset", IMAGE_DECODERS)
@pytest.mark.parametrize("case", sorted(BAD_LATENTS))
def test_decode_refuses_bad_latents_before_writing_any_image(check, assets, tmp_path, preset, case):
    make, words = BAD_LATENTS[case]
    latents = _latents_file(tmp_path / "bad.safetensors", make())
    check(command("decode", assets, assets.decoder(preset), tmp_path / "out", latents=latents), 2, "bad.safetensors",
          *words)


@pytest.mark.parametrize("case", sorted(set(BAD_LATENTS) - {"batch 0", "six dims"}))
def test_decode_batch_skips_bad_latents_and_decodes_the_rest(check, assets, tmp_path, case):
    make, words = BAD_LATENTS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    bad = make()
    save_file({f"bad_{i}": z.contiguous() for i, z in enumerate(bad)}, str(folder / "bad.safetensors"))
    save_file({"good": torch.randn(4, 4, 4)}, str(folder / "good.safetensors"))
    check(command("decode-batch", assets, assets.decoder("effvit-attn"), tmp_path / "out", latents=folder), 1,
          "bad_0", *words[:1], nothing_written=False)
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["good.png"]


@pytest.mark.parametrize("preset", DECODERS)
@pytest.mark.parametrize("case", sorted(set(BAD_LATENTS) - {"six dims"}))
def test_decode_video_refuses_a_bad_clip(check, assets, tmp_path, preset, case):
    make, words = BAD_LATENTS[case]
    clip = _latents_file(tmp_path / "bad.safetensors", make())  # (T, C, h, w): a clip of T frames
    words = ["0 frames"] if case == "batch 0" else words[:1]
    check(command("decode-video", assets, assets.decoder(preset), tmp_path / "out", clip=clip), 2, "bad.safetensors",
          *words)


@pytest.mark.parametrize("case", ["integer", "wrong channels", "zero height", "nan", "inf"])
def test_eval_refuses_bad_precomputed_latents(check, assets, tmp_path, case):
    make, words = BAD_LATENTS[case]
    folder = tmp_path / "latents"
    folder.mkdir()
    for i in range(2):
        save_file({"latents": make()[0].contiguous()}, str(folder / f"img_{i:03d}.safetensors"))
    cmd = command("eval-images", assets, assets.decoder("tae-64"), tmp_path / "out")
    cmd.argv[cmd.argv.index("--teacher"):cmd.argv.index("--teacher") + 2] = ["--latents", str(folder)]
    check(cmd, 2, "img_000", *words[:1])


# ============================================================================= 8. unreadable images, empty folders
def _with_broken_images(assets: Assets, folder: Path, broken: int, good: bool = True) -> Path:
    folder.mkdir(parents=True)
    if good:
        for image in assets.images.iterdir():
            (folder / image.name).write_bytes(image.read_bytes())
    for i in range(broken):
        (folder / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    return folder


@pytest.mark.parametrize("preset", IMAGE_DECODERS)
def test_eval_skips_unreadable_images_counts_them_and_scores_the_rest(check, assets, tmp_path, preset):
    data = _with_broken_images(assets, tmp_path / "data", broken=2)
    out = tmp_path / "out"
    err = check(command("eval-images", assets, assets.decoder(preset), out, data=data), 0, nothing_written=False)
    assert err.count("warning: skipping 'broken_") == 2  # one warning each
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["count"] == 2 and sorted(report["skipped"]["files"]) == ["broken_0.png", "broken_1.png"]
    rows = [r for r in (out / "per_image.csv").read_text().splitlines()[1:] if r]
    assert rows and not any("broken" in r for r in rows)


def _broken_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))  # an MP4 header and nothing else
    return path


def test_eval_video_skips_an_unreadable_video_and_counts_it(check, assets, tmp_path):
    data = tmp_path / "videos"
    make_images(data / "clip", 3, size=(32, 32))
    _broken_video(data / "broken.mp4")
    out = tmp_path / "out"
    err = check(command("eval-video", assets, assets.decoder("tae-causal-64"), out, data=data), 0,
                "warning: skipping 'broken.mp4'", nothing_written=False)
    assert err.count("warning: skipping") == 1
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert skipped["count"] == 1 and list(skipped["files"]) == ["broken.mp4"]


@pytest.mark.parametrize("broken", ["a frame", "the video"])
def test_decode_video_names_an_unreadable_input_and_writes_nothing(check, assets, tmp_path, broken):
    if broken == "a frame":
        source = tmp_path / "frames"
        make_images(source, 3, size=(32, 32))
        (source / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
        word = "img_001.png"
    else:
        source, word = _broken_video(tmp_path / "broken.mp4"), "broken.mp4"
    cmd = command("decode-video", assets, assets.decoder("tae-causal-64"), tmp_path / "out", clip=source)
    check(_with(cmd, "--teacher", assets.encoder("svd")), 2, word)


@pytest.mark.parametrize("preset", DECODERS)
def test_train_skips_unreadable_files(check, assets, tmp_path, preset):
    if preset in VIDEO_DECODERS:
        data = tmp_path / "clips"
        make_images(data / "clip", 3, size=(32, 32))
        make_images(data / "clip2", 3, size=(32, 32), seed=1)
        _broken_video(data / "broken.mp4")
    else:
        data = _with_broken_images(assets, tmp_path / "data", broken=1)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken"):
        check(command("train", assets, assets.decoder(preset), out, data=data), 0, nothing_written=False)
    assert (out / "decoder.safetensors").is_file()


EMPTY_FOLDERS = {  # command -> (what the folder is given as, words)
    "decode-batch": ("latents", ["no latent files"]),
    "eval-images": ("data", ["no images"]),
    "eval-video": ("data", ["no videos"]),
    "train": ("data", ["empty"]),
}


# folders of unreadable images (decode-batch's unreadable shards and eval video's videos are covered above)
EMPTY_CASES = [(name, contents) for name in sorted(EMPTY_FOLDERS) for contents in ("nothing", "other files",
               "only unreadable") if contents != "only unreadable" or name in ("eval-images", "train")]


@pytest.mark.filterwarnings("ignore:skipping unreadable")
@pytest.mark.parametrize("name, contents", EMPTY_CASES)
def test_empty_folders_are_an_error_naming_the_folder(check, assets, tmp_path, name, contents):
    given, words = EMPTY_FOLDERS[name]
    folder = tmp_path / "empty"
    folder.mkdir()
    if contents == "other files":
        (folder / "notes.txt").write_text("no inputs here")
        (folder / "sub").mkdir()
    elif contents == "only unreadable":
        folder.rmdir()
        _with_broken_images(assets, folder, broken=2, good=False)
        words = ["none of the 2 images"] if name == "eval-images" else ["2 image files, none readable"]
    preset = "tae-causal-64" if name == "eval-video" else "tae-64"
    cmd = command(name, assets, assets.decoder(preset), tmp_path / "out", **{given: folder})
    check(cmd, 2, "empty", *words)


# ============================================================================= 9. --out that is a file
@pytest.mark.parametrize("name, preset", PAIRS)
def test_out_that_is_a_file_is_refused_before_any_work(check, assets, tmp_path, name, preset):
    blocker = tmp_path / "out"
    blocker.write_text("a file where a folder should be")
    cmd = command(name, assets, assets.decoder(preset), blocker)
    # commands that write one file under --out find no folder to put it in; the others refuse the folder
    words = "not a writable folder" if name in ("decode-video", "export-onnx", "bench") else "is a file, not a folder"
    check(cmd, 2, str(blocker), words)
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("flag", ["--stats-json", "--cache-dir"])
def test_other_output_places_that_are_files_are_refused_first(check, assets, tmp_path, flag):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    if flag == "--stats-json":
        cmd = command("decode-batch", assets, assets.decoder("tae-64"), tmp_path / "out")
        cmd.argv += [flag, str(blocker / "stats.json")]
    else:
        cmd = command("train", assets, assets.decoder("tae-64"), tmp_path / "out")
        cmd.argv[cmd.argv.index("--cache-dir") + 1] = str(blocker)
    check(cmd, 2, str(blocker.name), nothing_written=True)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/proc/self").is_dir(), reason="needs /proc, where no file can be "
                    "created even by root")
def test_bench_json_where_no_file_can_be_created_fails_before_the_benchmark(check, assets, tmp_path):
    cmd = command("bench", assets, assets.decoder("tae-64"), tmp_path / "out")
    cmd.argv[cmd.argv.index("--json") + 1] = "/proc/fastdec-bench.json"
    err = check(cmd, 2, "--json", "/proc")
    assert "median" not in err  # nothing was timed


# ============================================================================= 10. missing relative paths
MISSING = {  # (command, preset, which argument) -> words
    ("decode", "tae-64", "--decoder"): ["decoder file 'runs/dec.safetensors' not found"],
    ("decode-batch", "tae-64", "--decoder"): ["not found"],
    ("decode-video", "tae-causal-64", "--decoder"): ["not found"],
    ("export-onnx", "tae-64", "--decoder"): ["not found"],
    ("bench", "tae-64", "--decoders"): ["not found"],
    ("eval-images", "effvit-attn", "--decoder"): ["not found"],
    ("eval-images", "tae-64", "--teacher"): ["no such file"],
    ("eval-images", "tae-64", "--teacher-decoder"): ["not found"],
    ("eval-video", "tae-causal-64", "--teacher"): ["no such file"],
    ("train", "tae-64", "--decoder"): ["not found"],
    ("train", "tae-64", "--init"): ["not found"],
    ("train", "tae-64", "--teacher"): ["no such file"],
    ("train", "tae-64", "--teacher-decoder"): ["not found"],
    ("decode-video", "tae-causal-64", "--teacher"): ["no such file"],
}


@pytest.mark.parametrize("name, preset, flag", sorted(MISSING))
@pytest.mark.parametrize("spec", ["runs/dec.safetensors", "runs/dec"])
def test_a_missing_relative_path_is_a_missing_file_not_a_hub_download(check, assets, tmp_path, name, preset, flag,
                                                                      spec):
    (tmp_path / "runs").mkdir()  # the folder exists: 'runs/dec' is a path, not the Hub repository runs/dec
    cmd = command(name, assets, assets.decoder(preset), tmp_path / "out")
    if flag in cmd.argv:
        cmd.argv[cmd.argv.index(flag) + 1] = spec
    else:
        cmd.argv += [flag, spec]
    if flag == "--teacher" and name == "decode-video":  # a video input is what needs a teacher
        cmd.argv[1] = str(assets.videos / "clip")
    words = [w.replace("runs/dec.safetensors", spec) for w in MISSING[(name, preset, flag)]]
    err = check(cmd, 2, spec, *words)
    assert "hub" not in err.lower().replace("not read as a hub id", "").replace("not a hub id", "")


def test_load_encoder_names_a_missing_encoder_file(tmp_path, monkeypatch):
    from fastdec import load_encoder
    from fastdec.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/enc.pth", "runs/enc"):
        with pytest.raises(CheckpointError, match=f"encoder file '{spec}' not found"):
            load_encoder(spec)
    # torch's list of every device type came back, after the weights were read
    with pytest.raises(ValueError, match="unknown device 'tpu': use cpu, cuda"):
        load_encoder(tiny_encoder_file(tmp_path / "enc.pth"), device="tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_encoder(tiny_encoder_file(tmp_path / "enc.pth"), dtype="int8")


def test_create_decoder_names_a_preset_that_is_no_name():
    from fastdec.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match=r"unknown decoder preset \['tae-64'\]; choose one of"):
        fastdec.create_decoder(["tae-64"])  # an "unhashable type: 'list'" TypeError


# ============================================================================= 11. empty batches, no frames
@pytest.mark.parametrize("preset", DECODERS)
def test_empty_batches_decode_to_empty_results_everywhere(preset):
    from fastdec.pipelines import FastVAE

    decoder = tiny_decoder(preset, SPACE[preset])
    vae = FastVAE.from_decoder(decoder)
    c, f = decoder.latent_channels, decoder.upsample_factor
    for num_frames in (None, 2):
        assert vae.decode(torch.zeros(0, c, 4, 6), num_frames=num_frames).sample.shape == (0, 3, 4 * f, 6 * f)
    if decoder.is_video:
        for shape in [(0, 2, c, 4, 4), (1, 0, c, 4, 4)]:
            assert decoder(torch.zeros(shape)).shape == (*shape[:2], 3, 4 * f, 4 * f)
        stream = decoder.stream()
        assert stream.push(torch.zeros(1, 0, c, 4, 4)).shape == (1, 0, 3, 4 * f, 4 * f)
        assert stream.frames_decoded == 0 and stream.state is None  # an empty push leaves the stream as it was
        first = stream.push(torch.randn(1, 1, c, 4, 4))
        assert first.shape == (1, 1, 3, 4 * f, 4 * f) and torch.isfinite(first).all()
    else:
        assert decoder(torch.zeros(0, c, 4, 6)).shape == (0, 3, 4 * f, 6 * f)
    with pytest.raises(Exception, match="zero height or width"):
        decoder(torch.zeros(1, 1, c, 0, 4) if decoder.is_video else torch.zeros(1, c, 0, 4))


@pytest.mark.parametrize("preset", DECODERS)
def test_fastvae_refuses_nan_output_naming_the_decoder(preset):
    from fastdec.errors import NonFiniteOutputError
    from fastdec.pipelines import FastVAE

    vae = FastVAE.from_decoder(_nan_weights(preset))
    with pytest.raises(NonFiniteOutputError, match=preset.split("-")[0]):
        vae.decode(torch.randn(2, 4, 4, 4), num_frames=2)


def test_decode_refuses_a_file_whose_stacks_are_empty(check, assets, tmp_path):
    latents = _latents_file(tmp_path / "empty.safetensors", torch.zeros(0, 4, 4, 4))
    check(command("decode", assets, assets.decoder("tae-64"), tmp_path / "out", latents=latents), 2,
          "empty.safetensors", "batch size 0")


# ============================================================================= 12. the two security cases
def test_regression_decode_never_writes_outside_out(check, assets, tmp_path):
    """Issue 15 item 1: a key such as ``x/../../../../tmp/escape`` once became the output path."""
    latents = tmp_path / "z.pt"
    torch.save({"x/../../../../escape": torch.randn(4, 4, 4)}, latents)
    out = _deep_out(tmp_path)
    check(command("decode", assets, assets.decoder("tae-64"), out, latents=latents), 2, "cannot be a file name")
    assert not (tmp_path / "a" / "escape.png").exists() and not list(tmp_path.rglob("*escape*"))


def test_output_names_through_links_are_refused_and_a_looping_link_is_no_traceback(tmp_path):
    from fastdec.errors import UnsafePathError
    from fastdec.io.files import output_path

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "away.png").symlink_to(outside / "away.png")  # dangling, into another folder
    (out / "loop.png").symlink_to(out / "loop.png")
    with pytest.raises(UnsafePathError, match="would be written outside"):
        output_path(out, "away.png")
    # resolve() raised RuntimeError on the loop; the link stays inside, and atomic_write replaces the link itself
    assert output_path(out, "loop.png") == out / "loop.png"


def test_regression_resume_runs_no_code(check, assets, tmp_path):
    """Issue 15 item 2: ``train --resume`` once loaded checkpoints with ``weights_only=False``."""
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    _plant(out / "checkpoints" / "step_00000001.pt", {"model": _Plants.open_file(marker), "ema": {}, "step": 1})
    cmd = command("train", assets, assets.decoder("effvit-attn"), out)
    cmd.argv.append("--resume")
    check(cmd, 2, "never unpickles code", nothing_written=False)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what fastdec does: weights_only refuses the global
        torch.load(out / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert not marker.exists()


def _tiny_encoder():
    from fastdec.latent_spaces import get_latent_space
    from fastdec.models.tae import TAEEncoder, TAEEncoderConfig

    return TAEEncoder(TAEEncoderConfig(latent_channels=4, width=8, stage_blocks=(1, 1, 1)), get_latent_space("sd15"))


def _pixels_takers() -> dict[str, Callable[[torch.Tensor], Any]]:
    from fastdec.eval import metrics as M
    from fastdec.runtime.deflickering import deflicker

    clean = torch.full((4, 3, 48, 48), 0.5)
    return {
        "the TAE encoder": lambda x: _tiny_encoder()(x),
        "PSNR": lambda x: M.psnr(x, clean), "SSIM": lambda x: M.ssim(clean, x), "VIF": lambda x: M.vif(x, clean),
        "the gradient-energy ratio": lambda x: M.gradient_energy_ratio(x, clean),
        "flicker": lambda x: M.flicker_score(x, clean), "deflicker": deflicker,
    }


@pytest.mark.parametrize("who", list(_pixels_takers()))
@pytest.mark.parametrize("images, problem", [
    (lambda x: x * 255, "look like 0-255 values, divide by 255"),
    (lambda x: x * 2 - 1, r"look like \[-1, 1\] values .*\(images \+ 1\) / 2"),
    (lambda x: x * 1.2, r"clamp them"),
    (lambda x: (x * 255).to(torch.uint8), r"got torch.uint8 \(uint8 (images|frames): (images|frames).float\(\) / 255\)"),
    (lambda x: torch.where(x > 0.9, float("nan"), x), "NaN or inf"),
])
def test_images_outside_0_1_are_refused_where_pixels_are_taken(who, images, problem):
    # 0-255 or [-1, 1] images ran through the encoder and the metrics without a word: wrong latents and scores
    pixels = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, TypeError), match=f"{who} .*{problem}"):
        _pixels_takers()[who](images(pixels))
    _pixels_takers()[who](pixels)  # the same pixels in [0, 1] are taken


def test_metrics_refuse_a_data_range_that_is_no_scale():
    from fastdec.eval import metrics as M

    x = torch.rand(1, 3, 16, 16)
    for data_range in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="data_range is the pixels' full scale"):
            M.psnr(x, x, data_range=data_range)
    assert torch.isfinite(M.psnr(x * 255, (x * 255).round(), data_range=255.0)).all()  # 8-bit scale is taken


# ============================================================================= 13. config files of another make
@pytest.mark.parametrize("content, problem", [
    (b"\xff\xfe{}", r"is not UTF-8 text \(byte 0\): save it as UTF-8"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"{", "is not valid JSON"),
])
def test_json_configs_that_are_not_utf8_or_no_object_are_named(tmp_path, content, problem):
    """A config.json in a latin-1 file met a UnicodeDecodeError traceback, a JSON list an AttributeError."""
    from fastdec.errors import CheckpointError, EvalError, TeacherError
    from fastdec.eval.metrics import VideoMAEExtractor
    from fastdec.io.checkpoints import read_decoder
    from fastdec.teachers import load_teacher

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(content)
    for load, error, what in [(read_decoder, CheckpointError, "decoder config"),
                              (load_teacher, TeacherError, "VAE config"),
                              (VideoMAEExtractor, EvalError, "VideoMAE config")]:
        with pytest.raises(error, match=f"{what} '.*config.json' {problem}"):
            load(folder)


def test_a_train_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    from fastdec.cli import main

    config = tmp_path / "run.yaml"
    config.write_bytes(b"steps: 2\n# caf\xe9\n")  # latin-1
    assert main(["train", "--config", str(config)]) == 2
    assert f"config file '{config}' is not UTF-8 text (byte 14): save it as UTF-8" in capsys.readouterr().err

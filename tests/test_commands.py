"""Every command alike: one decoder resolution (resolve_decoder's precedence rule) and one error path
(``fastdec <command>: error: <message>`` on stderr, exit status 2, nothing on stdout)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _train_helpers import make_images, tiny_decoder_file, tiny_encoder_file

import fastdec.resolve
from fastdec.cli import main
from fastdec.errors import CheckpointError, DecoderSpecError
from fastdec.pretrained import PRETRAINED, PretrainedDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    latents = tmp_path / "lat.pt"
    torch.save(torch.randn(1, 4, 4, 4), latents)
    clip = tmp_path / "clip.pt"
    torch.save(torch.randn(3, 4, 4, 4), clip)
    return {
        "latents": latents, "clip": clip, "images": make_images(tmp_path / "images", 2, size=(32, 32)),
        "teacher": tiny_encoder_file(tmp_path / "taesdxl_encoder.pth"),
        "decoder": tiny_decoder_file(tmp_path / "decoder.safetensors"), "out": tmp_path / "out",
    }


# every command that takes a decoder spec, as argv given the spec
DECODER_COMMANDS = {
    "decode": lambda i, spec: ["decode", str(i["latents"]), "--decoder", spec, "--out", str(i["out"])],
    "decode-video": lambda i, spec: ["decode-video", str(i["clip"]), "--decoder", spec,
                                     "--out", str(i["out"] / "v.mp4")],
    "decode-batch": lambda i, spec: ["decode-batch", "--latents", str(i["latents"]), "--decoder", spec,
                                     "--out", str(i["out"]), "--no-progress"],
    "export onnx": lambda i, spec: ["export", "onnx", "--decoder", spec, "--out", str(i["out"] / "d.onnx")],
    "eval images": lambda i, spec: ["eval", "images", "--data", str(i["images"]), "--teacher", str(i["teacher"]),
                                    "--decoder", spec, "--out", str(i["out"])],
    "train --init": lambda i, spec: ["train", "--teacher", str(i["teacher"]), "--decoder", "tae-64", "--init", spec,
                                     "--data", str(i["images"]), "--resolution", "32", "--steps", "1",
                                     "--out", str(i["out"])],
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _fails_with(argv: list[str], capsys, prefix: str, *needles: str) -> None:
    rc, out, err = _run(argv, capsys)
    assert rc == 2, err
    assert err.startswith(f"fastdec {prefix}: error: "), err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err and not out.strip().startswith("error")


@pytest.fixture
def fake_pretrained(monkeypatch):
    """A registered pretrained name whose weights file is reported missing: proves the name reached
    the pretrained branch of the resolver (the real weights are the next issue's)."""
    class Missing(PretrainedDecoder):
        def path(self) -> Path:
            raise DecoderSpecError(f"PRETRAINED-LOOKUP {self.name}")

    monkeypatch.setitem(PRETRAINED, "test-pretrained", Missing("test-pretrained", "x.safetensors", "sdxl", "test"))


@pytest.fixture
def fake_hub(monkeypatch):
    def download(repo_id: str) -> Path:
        raise CheckpointError(f"HUB-DOWNLOAD {repo_id}")

    monkeypatch.setattr(fastdec.resolve, "download", download)


SPECS = {
    # spec -> what every command must say
    "missing file": ("runs/missing.safetensors", "decoder file 'runs/missing.safetensors' not found"),
    "untrained preset": ("tae-64", "untrained architecture"),
    "pretrained name": ("test-pretrained", "PRETRAINED-LOOKUP test-pretrained"),
    "hub id": ("someone/some-decoder", "HUB-DOWNLOAD someone/some-decoder"),
    "unknown name": ("no-such-decoder", "is not a decoder file, folder, pretrained name or Hub id"),
}


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("command", list(DECODER_COMMANDS))
def test_every_command_resolves_a_spec_the_same_way(command, kind, inputs, fake_pretrained, fake_hub, capsys):
    spec, message = SPECS[kind]
    if command == "train --init" and kind == "untrained preset":
        message = "untrained architecture"  # --init wants weights: a preset is refused there too
    _fails_with(DECODER_COMMANDS[command](inputs, spec), capsys, command.split(" --")[0], message)
    assert not inputs["out"].exists() or not any(inputs["out"].rglob("*.png"))


def test_a_corrupt_checkpoint_is_the_same_error_everywhere(inputs, capsys):
    bad = inputs["out"].parent / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for command, argv in DECODER_COMMANDS.items():
        _fails_with(argv(inputs, str(bad)), capsys, command.split(" --")[0], "cannot read checkpoint", str(bad))


def test_a_local_file_wins_over_a_preset_name(tmp_path, monkeypatch):
    """Rule 2 before rule 4: a file of yours named like a preset is what you mean."""
    monkeypatch.chdir(tmp_path)
    tiny_decoder_file(tmp_path / "tae-64" / "decoder.safetensors")  # a checkpoint folder named like a preset
    decoder = fastdec.resolve.resolve_decoder("tae-64")
    assert decoder.config.width == 16  # the file's (test-size) decoder, not the width-64 preset


def test_random_weights_builds_the_preset(inputs, capsys):
    argv = DECODER_COMMANDS["decode"](inputs, "tae-64") + ["--random-weights", "--quiet"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert len(list(inputs["out"].glob("*.png"))) == 1


@pytest.mark.parametrize("command", ["decode", "decode-video", "decode-batch", "export onnx"])
def test_random_weights_with_a_checkpoint_is_refused(command, inputs, capsys):
    # the flag was dropped and the checkpoint's trained weights decoded, the user believing them random
    argv = DECODER_COMMANDS[command](inputs, str(inputs["decoder"])) + ["--random-weights"]
    _fails_with(argv, capsys, command, "--random-weights builds a preset", "is a checkpoint", "drop --random-weights")
    assert not inputs["out"].exists() or not any(p.is_file() for p in inputs["out"].rglob("*"))


# every command, a missing input file: the same prefix, stderr, exit 2
MISSING_INPUT = {
    "decode": lambda i, m: ["decode", str(m), "--decoder", str(i["decoder"]), "--out", str(i["out"])],
    "decode-video": lambda i, m: ["decode-video", str(m), "--decoder", str(i["decoder"]),
                                  "--out", str(i["out"] / "v.mp4")],
    "decode-batch": lambda i, m: ["decode-batch", "--latents", str(m), "--decoder", str(i["decoder"]),
                                  "--out", str(i["out"]), "--no-progress"],
    "export onnx": lambda i, m: ["export", "onnx", "--decoder", str(m), "--out", str(i["out"] / "d.onnx")],
    "eval images": lambda i, m: ["eval", "images", "--data", str(m), "--teacher", str(i["teacher"]),
                                 "--decoder", str(i["decoder"])],
    "eval video": lambda i, m: ["eval", "video", "--data", str(m), "--teacher", str(i["teacher"]),
                                "--decoder", str(i["decoder"])],
    "train": lambda i, m: ["train", "--teacher", str(i["teacher"]), "--decoder", "tae-64", "--data", str(m),
                           "--resolution", "32", "--steps", "1", "--out", str(i["out"])],
    "bench": lambda i, m: ["bench", "--decoders", str(m), "--baselines", "none", "--sizes", "64"],
}


@pytest.mark.parametrize("command", list(MISSING_INPUT))
def test_a_missing_input_file_is_the_same_error_in_every_command(command, inputs, capsys):
    missing = inputs["out"].parent / "missing" / "input.safetensors"
    _fails_with(MISSING_INPUT[command](inputs, missing), capsys, command, str(missing))


@pytest.mark.parametrize("command", list(MISSING_INPUT))
def test_an_empty_input_name_is_refused_in_every_command(command, inputs, capsys):
    # '' was read as the current folder ("folder '.' holds no single decoder checkpoint"), or as not given
    _fails_with(MISSING_INPUT[command](inputs, ""), capsys, command, "is empty: give a value, or leave it out")


def test_an_empty_latent_space_is_no_default(inputs, capsys):
    # it exported an sdxl-space decoder, exit 0
    _fails_with(["export", "onnx", "--decoder", "tae-64", "--random-weights", "--latent-space", "",
                 "--out", str(inputs["out"] / "d.onnx")], capsys, "export onnx", "--latent-space is empty")
    assert not (inputs["out"] / "d.onnx").exists()
    _fails_with(["pretrained", "--card", " "], capsys, "pretrained", "--card is empty")  # it printed the list


@pytest.mark.parametrize("device, words", [("tpu", "unknown device 'tpu': use cpu, cuda, cuda:N or mps"),
                                           ("cpu:abc", "unknown device 'cpu:abc'"),
                                           ("cuda:3", "device cuda:3 is not available")])
def test_resolve_decoder_names_a_device_it_cannot_use(device, words):
    """The CLI checked --device; the Python API met torch's RuntimeError or 'Torch not compiled with CUDA'."""
    from fastdec import resolve_decoder
    from fastdec.errors import UsageError

    if device == "cuda:3" and torch.cuda.device_count() > 3:  # pragma: no cover
        pytest.skip("this machine has a fourth CUDA device")
    with pytest.raises(UsageError, match=re.escape(words)):
        resolve_decoder("flux2-turbo", device=device)


def test_every_help_text_prints_as_written():
    # argparse %-formats help= strings but not description=: "95%%" was printed in eval's descriptions
    from fastdec.cli import build_parser, iter_parsers

    parsers = list(iter_parsers(build_parser()))
    assert len(parsers) > 10  # every command and subcommand
    for parser in parsers:
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, parser.prog


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, monkeypatch, capsys):
    # what a job scheduler sends: the process died on the spot, leaving its temporary files behind
    import os
    import signal
    import time

    import fastdec.runtime.cli
    from fastdec.cli import main
    from fastdec.io.files import atomic_write

    out = tmp_path / "out" / "model.onnx"

    def killed_mid_write(args):
        def write(tmp):
            Path(tmp).write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here, as it would in the middle of any work

        atomic_write(out, write)

    monkeypatch.setattr(fastdec.runtime.cli, "_cmd_export_onnx", killed_mid_write)
    # a stand-in for the default action: without the command's handler SIGTERM would end pytest itself
    fallback = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        before = signal.getsignal(signal.SIGTERM)
        started = time.perf_counter()
        assert main(["export", "onnx", "--decoder", "x", "--out", str(out)]) == 128 + signal.SIGTERM
        assert time.perf_counter() - started < 5
        assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only
    finally:
        signal.signal(signal.SIGTERM, fallback)
    assert capsys.readouterr().err.strip() == "fastdec export onnx: terminated"
    assert list(out.parent.iterdir()) == []  # the temporary file was removed, no model.onnx


def test_a_second_sigterm_during_cleanup_falls_back_to_the_default_action():
    import signal

    from fastdec.cli import Terminated, _raise_terminated

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            _raise_terminated(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)

"""docs/adding_a_decoder.md, run as written: the example file is imported from the docs (nothing in fastdec
is edited), trained for a few steps through the CLI with --plugin, saved, loaded, decoded, swapped into a
pipeline; its temporal version starts equal to it and decodes a clip through decode-video."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import make_images, tiny_encoder_file

import fastdec
from fastdec.cli import main
from fastdec.plugins import load_plugin

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "shuffle_decoder.py"


@pytest.fixture(scope="module")
def example():
    return load_plugin(str(EXAMPLE))


def test_the_example_registers_an_architecture_and_presets(example):
    assert "my-shuffle-32" in fastdec.list_decoders(video=False)
    assert "my-shuffle-temporal-32" in fastdec.list_decoders(video=True)
    decoder = fastdec.create_decoder("my-shuffle-32", "flux2").eval()
    with torch.no_grad():
        rgb = decoder(torch.randn(1, 32, 16, 16))
    assert rgb.shape == (1, 3, 128, 128) and 0 <= rgb.min() and rgb.max() <= 1
    assert isinstance(decoder.head[-1], torch.nn.PixelShuffle)  # ESPCN: no conv at full resolution


def test_train_save_load_decode_swap(example, tmp_path, capsys):
    images = make_images(tmp_path / "train", 4, size=(32, 32))
    teacher = tiny_encoder_file(tmp_path / "taesdxl_encoder.pth")
    run = tmp_path / "run"
    rc = main(["--plugin", str(EXAMPLE), "train", "--teacher", str(teacher), "--decoder", "my-shuffle-32",
               "--data", str(images), "--resolution", "32", "--steps", "4", "--batch-size", "2", "--workers", "0",
               "--log-every", "1", "--val-every", "100", "--cache-dir", str(tmp_path / "cache"), "--out", str(run)])
    assert rc == 0, capsys.readouterr().err
    decoder = fastdec.load_decoder(run / "decoder.safetensors")
    assert decoder.architecture == "my-shuffle" and decoder.latent_space.name == "sdxl"

    z = torch.randn(2, 4, 4, 4)
    torch.save(z, tmp_path / "lat.pt")
    out = tmp_path / "pngs"
    assert main(["--plugin", str(EXAMPLE), "decode", str(tmp_path / "lat.pt"), "--decoder",
                 str(run / "decoder.safetensors"), "--out", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.png"))) == 2

    import pipeline_fixtures as pf

    pipe = pf.sdxl_pipeline()
    fastdec.swap_decoder(pipe, decoder)
    raw = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        sample = pipe.vae.decode(raw).sample
        expected = decoder(decoder.latent_space.vae_to_decoder(raw)) * 2 - 1
    # FastVAE converts the raw latents in fp32 then decodes: the same module on the same tensor
    torch.testing.assert_close(sample, expected, atol=1e-6, rtol=0)


def test_temporal_version_starts_equal_and_decodes_a_clip(example, tmp_path):
    image = fastdec.create_decoder("my-shuffle-32", "sdxl").eval()
    with torch.no_grad():
        image.head[-2].bias += 0.5  # mid-range pixels, so the comparison is not of clamped zeros
    video = example.TemporalShuffleDecoder.from_image_decoder(image).eval()
    z = torch.randn(1, 5, 4, 4, 4)
    with torch.no_grad():
        frames, per_frame = video(z), image(z[0])
    assert frames.shape == (1, 5, 3, 32, 32)
    # the temporal mix is zero, so the same convs run on the same numbers; the batch is laid out alike
    torch.testing.assert_close(frames[0], per_frame, atol=1e-6, rtol=0)
    path = fastdec.save_decoder(video, tmp_path / "video.safetensors")
    loaded = fastdec.load_decoder(path)
    assert type(loaded) is example.TemporalShuffleDecoder
    torch.save(z[0], tmp_path / "clip.pt")
    out = tmp_path / "clip.mp4"
    assert main(["--plugin", str(EXAMPLE), "decode-video", str(tmp_path / "clip.pt"), "--decoder", str(path),
                 "--out", str(out), "--quiet"]) == 0
    from fastdec.decode.video import decoding_mode
    from fastdec.io.video import read_video

    assert read_video(out).shape == (5, 3, 32, 32)
    # decode-video said "frame by frame (image decoder: expect flicker)" of it, which decodes the whole clip
    assert decoding_mode(loaded, parallel=False) == "the whole clip in one call"


def test_a_missing_plugin_is_a_usage_error(tmp_path, capsys):
    assert main(["--plugin", str(tmp_path / "nope.py"), "decode", "x.pt", "--decoder", "x", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "plugin file" in err and "nope.py" in err


@pytest.mark.parametrize("source, words", [
    ("raise RuntimeError('boom at import')\n", "at {path}:1: RuntimeError: boom at import"),
    ("import fastdec_no_such_dependency\n", "ModuleNotFoundError"),
    ("def broken(:\n", "at {path}:1: SyntaxError"),
])
def test_a_plugin_that_fails_on_import_is_named_with_its_line(tmp_path, capsys, source, words):
    plugin = tmp_path / "plug.py"
    plugin.write_text(source)
    assert main(["--plugin", str(plugin), "pretrained"]) == 2
    err = capsys.readouterr().err
    assert words.format(path=plugin) in err and "Traceback" not in err and "Fix the plugin" in err
    assert main(["--plugin", "", "pretrained"]) == 2
    assert "--plugin is empty" in capsys.readouterr().err


def test_bench_measures_a_plugin_decoder_and_its_video_version(example, tmp_path, capsys):
    # the memory probe's own process did not load the plugin ("not a decoder file", no peak MB), and
    # bench --video called decode_chunks, which only fastdec's chunked decoders have
    import json

    report = tmp_path / "bench.json"
    assert main(["--plugin", str(EXAMPLE), "bench", "--decoders", "my-shuffle-32", "--baselines", "none",
                 "--sizes", "64", "--repeats", "1", "--warmup", "0", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["rows"]
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] > 0, row.get("peak_mem_error")
    report = tmp_path / "video.json"
    assert main(["--plugin", str(EXAMPLE), "bench", "--video", "--decoders", "my-shuffle-temporal-32",
                 "--baselines", "none", "--sizes", "64", "--video-frames", "4", "--repeats", "1", "--warmup",
                 "0", "--no-memory", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["parallel"] and rows[0]["per_frame_s"] > 0


def _plugin(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source)
    return folder / name


SHUFFLE_LIKE = """
from dataclasses import dataclass
import torch.nn as nn
from fastdec.models import LatentDecoder, register_architecture, register_preset

@dataclass
class Config:
    latent_channels: int = 4

@register_architecture
class Decoder(LatentDecoder):
    architecture = "{arch}"
    config_class = Config

    def __init__(self, config, latent_space):
        super().__init__(config, latent_space)
        self.head = nn.Sequential(nn.Conv2d(config.latent_channels, 3 * 64, 1), nn.PixelShuffle({shuffle}))

    def decode_layers(self, z):
        return self.head(z)

@register_preset("{preset}", "{arch}", "test plugin")
def preset(space):
    return {{}}
"""


@pytest.fixture
def registry():
    """The registries and loaded plugins as they were, back after the test: a test's plugins stay out of the
    rest of the session (and out of every later memory probe's process)."""
    from fastdec import plugins
    from fastdec.models import ARCHITECTURES, PRESETS

    saved = dict(ARCHITECTURES), dict(PRESETS), dict(plugins._LOADED)
    yield
    for live, old in zip((ARCHITECTURES, PRESETS, plugins._LOADED), saved):
        live.clear()
        live.update(old)


def test_a_plugin_imported_under_two_names_is_one_definition(registry, tmp_path, monkeypatch, capsys):
    # --plugin x.py makes a module of its own name; another plugin's `import x` defines the same classes
    # again, which the check of taken names refused as another definition
    folder = tmp_path / "plug"
    folder.mkdir()
    (folder / "shuffle_decoder.py").write_text(EXAMPLE.read_text())
    more = _plugin(folder, "more.py", "import functools\n"
                   "from shuffle_decoder import ShuffleDecoder  # noqa: F401\n"
                   "from fastdec.models import register_preset\n"
                   "def make(space, width):\n    return dict(width=width, blocks=1)\n"
                   "for _ in range(2):  # a partial registered again, as a reloaded module does\n"
                   "    register_preset('guide-more-16', 'my-shuffle', 'd')(functools.partial(make, width=16))\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "shuffle_decoder", raising=False)
    from fastdec.models import ARCHITECTURES, PRESETS

    for registered in (ARCHITECTURES, PRESETS):  # this copy's names, free as on a user's machine (restored after)
        for name in [n for n in registered if n.startswith("my-shuffle")]:
            del registered[name]
    assert main(["--plugin", str(folder / "shuffle_decoder.py"), "--plugin", str(more), "pretrained"]) == 0, \
        capsys.readouterr().err
    assert fastdec.create_decoder("guide-more-16", "sdxl").config.width == 16
    # a partial with other arguments, or a preset of another architecture, is another definition
    import functools

    from fastdec.models import register_preset
    from fastdec.models.tae import tae_64

    with pytest.raises(fastdec.errors.UsageError, match="preset name 'guide-more-16' is taken"):
        register_preset("guide-more-16", "my-shuffle", "d")(functools.partial(load_plugin(str(more)).make, width=128))
    with pytest.raises(fastdec.errors.UsageError, match=r"preset name 'tae-64' is taken .*\('tae'\)"):
        register_preset("tae-64", "effvit", "mine")(functools.partial(tae_64))
    assert fastdec.models.PRESETS["tae-64"].architecture == "tae"


def test_two_plugin_files_of_one_name_are_both_loaded(registry, tmp_path, capsys):
    # both were imported as the module fastdec_plugin_decoders: the second was skipped without a word
    a = _plugin(tmp_path / "a", "decoders.py", SHUFFLE_LIKE.format(arch="guide-a", preset="guide-a-1", shuffle=8))
    b = _plugin(tmp_path / "b", "decoders.py", SHUFFLE_LIKE.format(arch="guide-b", preset="guide-b-1", shuffle=8))
    assert main(["--plugin", str(a), "--plugin", str(b), "pretrained"]) == 0
    assert {"guide-a-1", "guide-b-1"} <= set(fastdec.list_decoders())
    assert load_plugin(str(a)) is load_plugin(str(tmp_path / "a" / ".." / "a" / "decoders.py"))  # once per file


@pytest.mark.parametrize("source, words", [
    (SHUFFLE_LIKE.format(arch="guide-c", preset="tae-64", shuffle=8),
     "UsageError: preset name 'tae-64' is taken by fastdec.models.tae.tae_64"),
    (SHUFFLE_LIKE.format(arch="tae", preset="guide-d-1", shuffle=8), "architecture name 'tae' is taken by "
                                                                    "fastdec.models.tae.TAEDecoder"),
    (SHUFFLE_LIKE.format(arch="", preset="guide-e-1", shuffle=8), "Decoder sets no architecture name"),
    (SHUFFLE_LIKE.format(arch="guide-f", preset="guide-f-1", shuffle=8).replace("latent_channels", "channels"),
     "config_class must be a @dataclass with a latent_channels field"),
])
def test_a_plugin_that_registers_what_cannot_work_is_refused_at_import(registry, tmp_path, capsys, source, words):
    # a preset or architecture of a built-in name replaced fastdec's own without a word (then blamed its
    # checkpoints); a missing name or config field met a traceback at the first decode
    plugin = _plugin(tmp_path, "plug.py", source)
    assert main(["--plugin", str(plugin), "pretrained"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert fastdec.models.PRESETS["tae-64"].make_config.__module__ == "fastdec.models.tae"
    assert fastdec.models.ARCHITECTURES["tae"].__module__ == "fastdec.models.tae"


def test_a_decoder_whose_layers_upsample_by_another_factor_is_refused_at_decode(registry, tmp_path):
    # x8 layers in the x32 Sana space wrote 64x64 pictures for 8x8 latents, where 256x256 were due
    plugin = load_plugin(str(_plugin(tmp_path, "wrong.py",
                                     SHUFFLE_LIKE.format(arch="guide-g", preset="guide-g-1", shuffle=8))))
    decoder = fastdec.create_decoder("guide-g-1", "sdxl")
    assert decoder(torch.randn(1, 4, 8, 8)).shape == (1, 3, 64, 64)  # right for a x8 space
    wrong = plugin.Decoder(plugin.Config(latent_channels=32), fastdec.get_latent_space("sana"))
    with pytest.raises(fastdec.errors.DecoderOutputError,
                       match=r"returned \(1, 3, 64, 64\) for latents \(1, 32, 8, 8\); 'sana' latents decode to "
                             r"\(1, 3, 256, 256\)"):
        wrong(torch.randn(1, 32, 8, 8))


def test_a_module_plugin_whose_own_import_fails_is_located(registry, tmp_path, monkeypatch, capsys):
    # "cannot be imported ... put the module on PYTHONPATH" was said of a module that is there, whose own
    # `import` of a missing package failed
    package = tmp_path / "mydecs"
    _plugin(package, "__init__.py", "")
    _plugin(package, "decoders.py", "import fastdec_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--plugin", "mydecs.decoders", "pretrained"]) == 2
    err = capsys.readouterr().err
    assert f"at {package / 'decoders.py'}:1: ModuleNotFoundError" in err and "PYTHONPATH" not in err
    assert main(["--plugin", "mydecs.nothing_here", "pretrained"]) == 2
    assert "cannot be imported" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the page itself, as written
GUIDE = EXAMPLE.parents[1] / "adding_a_decoder.md"


def _blocks() -> list[tuple[str, str]]:
    """(language, code) of the guide's fenced blocks, in page order."""
    import re

    return re.findall(r"^```(python|bash)\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def _is_definition(code: str) -> bool:
    return "@register_architecture" in code


def _statements(code: str) -> list[str]:
    """Top-level statements as ASTs, docstrings and ``from __future__`` left out (comments are not in an AST)."""
    import ast

    def strip(node: ast.AST) -> ast.AST:
        for child in ast.walk(node):
            body = getattr(child, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                child.body = body[1:] or [ast.Pass()]
        return node

    tree = strip(ast.parse(code))
    return [ast.dump(s) for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]


def test_the_example_file_is_the_guides_definitions():
    # the page once called an `upsampler` it never defined, and its from_image_decoder differed from the file's
    definitions = "\n\n".join(code for language, code in _blocks() if language == "python" and _is_definition(code))
    assert _statements(definitions) == _statements(EXAMPLE.read_text())


def _doc_command(line: str, tmp: Path, teacher: Path, images: Path, clips: Path) -> list[str]:
    """A command of the page with its paths made real, 2 steps for 2000, and what keeps it small."""
    import shlex

    argv = shlex.split(line)
    assert argv[0] == "fastdec", line
    replaced = {"docs/examples/shuffle_decoder.py": str(EXAMPLE), "../shared/weights/taef2_encoder.pth": str(teacher),
                "../shared/data/images/train": str(images), "../shared/data/video/clips": str(clips), "2000": "2"}
    argv = [replaced.get(a, a) for a in argv[1:]]
    command = argv[argv.index("--plugin") + 2]
    extra = {"train": ["--batch-size", "2", "--workers", "0", "--val-every", "100", "--cache-dir", str(tmp / "cache")],
             "bench": ["--sizes", "64", "--repeats", "1", "--warmup", "0", "--no-memory", "--baselines", "none"],
             "decode": ["--quiet"], "decode-video": ["--quiet"]}
    return argv + extra.get(command, [])


def test_the_guide_runs_as_written(example, tmp_path, monkeypatch, taef2_encoder_path, capsys):
    """Every block of the page in order: the usage blocks as one script beside the example file (which the
    definition blocks make up; ``pipe`` is the FLUX.2 pipeline the page assumes), the commands through the CLI."""
    import pipeline_fixtures as pf

    images = make_images(tmp_path / "images", 4, size=(128, 128))
    clips = tmp_path / "clips"
    for name in ("a", "b"):
        make_images(clips / name, 8, size=(128, 128), seed=ord(name))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "shuffle_decoder", example)
    from safetensors.torch import save_file

    save_file({"z": torch.randn(2, 32, 8, 8)}, "latents.safetensors")
    torch.save(torch.randn(4, 32, 8, 8), "clip_latents.pt")
    session = {"pipe": pf.flux2_pipeline()}
    ran = []
    for language, code in _blocks():
        if language == "python" and not _is_definition(code):
            exec(compile(code, str(GUIDE), "exec"), session)
            ran.append("python")
            continue
        if language == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                argv = _doc_command(line, tmp_path, taef2_encoder_path, images, clips)
                assert main(argv) == 0, f"{line}\n{capsys.readouterr().err}"
                ran.append(argv[argv.index("--plugin") + 2])
    assert ran == ["python", "train", "python", "decode", "bench", "python", "train", "decode-video"]
    from fastdec.pipelines import FastVAE

    assert isinstance(session["pipe"].vae, FastVAE) and session["pipe"].vae.decoder.architecture == "my-shuffle"
    assert session["frames"].shape == (1, 8, 3, 128, 128)
    assert (tmp_path / "clip.mp4").is_file() and len(list((tmp_path / "pngs").glob("*.png"))) == 2

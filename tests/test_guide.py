"""docs/adding_a_decoder.md, run as written: the example file is imported from the docs (nothing in fastdec
is edited), trained for a few steps through the CLI with --plugin, saved, loaded, decoded, swapped into a
pipeline; its temporal version starts equal to it and decodes a clip through decode-video."""
from __future__ import annotations

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
    from fastdec.io.video import read_video

    assert read_video(out).shape == (5, 3, 32, 32)


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

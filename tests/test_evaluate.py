"""`fastdec eval images|video`: end to end on real assets, and input errors on synthetic ones."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_mean_ci, shared_path
from fastdec.cli import main
from fastdec.errors import CheckpointError, DataError, EvalError, LatentFileError, NonFiniteOutputError, UsageError
from fastdec.eval import metrics as M
from fastdec.eval.run import EvalDecoder, decode_frames, evaluate_images, evaluate_video
from fastdec.io.checkpoints import save_decoder
from fastdec.resolve import load_decoder, load_encoder
from fastdec.models import create_decoder


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory) -> Path:
    """The first 8 BSDS validation photos (sorted by name)."""
    src = shared_path("data", "images", "val")
    folder = tmp_path_factory.mktemp("val8")
    for path in sorted(src.glob("*.jpg"))[:8]:
        shutil.copy(path, folder / path.name)
    return folder


def _independent_psnr(folder: Path, encoder_path: Path, decoder_path: Path) -> list[float]:
    """Centre crop to multiples of 8, encode, decode and PSNR with plain numpy (no fastdec.eval)."""
    encoder, decoder = load_encoder(encoder_path), load_decoder(decoder_path)
    values = []
    for path in sorted(folder.glob("*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
        h, w = rgb.shape[0] // 8 * 8, rgb.shape[1] // 8 * 8
        top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
        rgb = rgb[top:top + h, left:left + w]
        with torch.no_grad():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
            y = decoder(encoder(x))[0].permute(1, 2, 0).double().numpy()
        values.append(10 * np.log10(1.0 / np.mean((y - rgb.astype(np.float32)) ** 2)))
    return values


def test_end_to_end_taef2_on_bsds(val_subset, tmp_path, taef2_encoder_path, taef2_decoder_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "images", "--data", str(val_subset), "--teacher", str(taef2_encoder_path),
                 "--teacher-decoder", str(taef2_decoder_path), "--decoder", str(taef2_decoder_path),
                 "--out", str(out), "--grid", "2"])
    assert code == 0
    assert "PSNR" in capsys.readouterr().out
    for name in ("report.json", "report.md", "per_image.csv", "grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    entry = report["decoders"]["taef2_decoder"]["metrics"]
    expected = _independent_psnr(val_subset, taef2_encoder_path, taef2_decoder_path)
    assert report["count"] == 8 and report["skipped"] == {"count": 0, "files": {}}
    # the same weights in both paths; 0.01 dB absorbs float32 reordering between the two decodes
    assert entry["original"]["psnr"]["mean"] == pytest.approx(float(np.mean(expected)), abs=0.01)
    assert entry["original"]["psnr"]["ci_low"] < entry["original"]["psnr"]["mean"] < entry["original"]["psnr"]["ci_high"]
    assert 0 < entry["original"]["ssim"]["mean"] < 1 and 0 < entry["original"]["ms_ssim"]["mean"] < 1
    # the same weights as the teacher's decoder: an exact match, counted rather than averaged, and the
    # infinite mean is null in the (strict) JSON
    assert entry["teacher"]["psnr"]["n_infinite"] == 8 and entry["teacher"]["psnr"]["mean"] is None
    assert entry["teacher"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert any("LPIPS omitted" in n and "--lpips-weights" in n for n in report["notes"])
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 2  # vs original and vs teacher
    by_image = [float(r["psnr"]) for r in rows if r["reference"] == "original"]
    np.testing.assert_allclose(by_image, expected, atol=0.01)
    md = (out / "report.md").read_text()
    assert "| PSNR ↑ |" in md and "## taef2_decoder" in md and "grid.png" in md


@pytest.fixture
def tiny_images(tmp_path) -> Path:
    """Crops of scikit-image's bundled photos, odd sizes so the crop logic matters."""
    from skimage import data

    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        Image.fromarray(image[:61, :83]).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def tiny_decoder(tmp_path, make_decoder) -> Path:
    return save_decoder(make_decoder("tae-64", "sd15"), tmp_path / "tiny.safetensors")


@pytest.fixture
def latents(tiny_images, tmp_path) -> Path:
    """One latent per image (4 x 7 x 10 -> 56 x 80 px, the centre of 61 x 83), one file type each."""
    from safetensors.torch import save_file

    folder = tmp_path / "latents"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for k, path in enumerate(sorted(tiny_images.glob("*.png"))):
        z = torch.randn(4, 7, 10, generator=gen)
        if k == 0:
            np.save(folder / f"{path.stem}.npy", z.numpy())
        elif k == 1:
            torch.save(z, folder / f"{path.stem}.pt")
        else:
            save_file({"latents": z[None]}, str(folder / f"{path.stem}.safetensors"))
    return folder


def _stored_latent(folder: Path, stem: str) -> torch.Tensor:
    if (folder / f"{stem}.npy").is_file():
        return torch.from_numpy(np.load(folder / f"{stem}.npy"))
    if (folder / f"{stem}.pt").is_file():
        return torch.load(folder / f"{stem}.pt")
    from safetensors.torch import load_file

    return load_file(str(folder / f"{stem}.safetensors"))["latents"][0]


def test_latents_mode_with_a_tiny_decoder(tiny_images, tiny_decoder, latents, tmp_path):
    report = evaluate_images(tiny_images, [str(tiny_decoder)], out=tmp_path / "out", latents=latents, grid=1)
    decoder = load_decoder(tiny_decoder)
    psnrs = []
    for path in sorted(tiny_images.glob("*.png")):
        image = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None].float() / 255
        original = image[..., 2:58, 1:81]
        with torch.no_grad():
            psnrs.append(float(M.psnr(decoder(_stored_latent(latents, path.stem)[None]), original)[0]))
    stats = report["decoders"]["tiny"]["metrics"]["original"]
    # the same file loaded twice decodes the same latents: 1e-4 dB covers float32 reordering
    assert stats["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert stats["psnr"]["n"] == 3
    assert "ms_ssim" not in stats  # 56 x 80 px is too small: omitted, with a note
    assert any("MS-SSIM omitted" in n for n in report["notes"])
    assert any("no --teacher" in n for n in report["notes"])
    assert (tmp_path / "out" / "grid.png").is_file()


def test_input_errors_name_the_fix(tiny_images, tiny_decoder, tmp_path, capsys):
    with pytest.raises(EvalError, match="--teacher ENCODER.*--latents"):
        evaluate_images(tiny_images, [str(tiny_decoder)])
    with pytest.raises(LatentFileError, match="no latents for 'astronaut.png'"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=tmp_path)
    # two files for one image: which one was meant is not for the evaluation to guess (the .pt was taken)
    ambiguous = tmp_path / "ambiguous"
    ambiguous.mkdir()
    for image in sorted(Path(tiny_images).iterdir()):
        torch.save(torch.zeros(4, 7, 10), ambiguous / f"{image.stem}.pt")
    np.save(ambiguous / "astronaut.npy", np.zeros((4, 7, 10), np.float32))
    with pytest.raises(LatentFileError, match="several latent files for 'astronaut.png'.*astronaut.pt, "
                                              "astronaut.npy; keep one"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=ambiguous)
    with pytest.raises(EvalError, match="--resolution cannot be combined"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=tmp_path, resolution=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        evaluate_images(tmp_path / "empty", [str(tiny_decoder)], latents=tmp_path)
    with pytest.raises(EvalError, match="no decoder to evaluate"):
        evaluate_images(tiny_images, [], latents=tmp_path)
    with pytest.raises(EvalError, match="--lpips-weights '.*nofile.pth' is not a file"):  # was an omitted-metric note
        evaluate_images(tiny_images, [str(tiny_decoder)], teacher=str(tmp_path / "unused.pth"),
                        lpips_weights=str(tmp_path / "nofile.pth"))
    assert main(["eval", "images", "--data", str(tiny_images), "--decoder", str(tiny_decoder)]) == 2
    captured = capsys.readouterr()
    assert "fastdec eval images: error:" in captured.err and "pass --teacher" in captured.err
    assert "error" not in captured.out


def test_a_preset_is_refused_as_an_untrained_decoder(tiny_images, latents, capsys):
    """--decoder goes through resolve_decoder: a preset name is not silently random."""
    assert main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents),
                 "--decoder", "tae-64"]) == 2
    assert "untrained architecture" in capsys.readouterr().err


def test_teacher_errors(tiny_images, tmp_path, taef2_encoder_path, taef2_decoder_path, make_decoder):
    with pytest.raises(EvalError, match="--decoder teacher needs a teacher with a decoder"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path))
    with pytest.raises(EvalError, match="not a multiple of the latent factor 8"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path),
                        teacher_decoder=str(taef2_decoder_path), resolution=60)
    # an image smaller than --resolution is skipped (like an unreadable one); all of them: the error says why
    with pytest.raises(DataError, match="none of the 3 images .*: astronaut.png: cannot crop 64x64 from a 61x83"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path),
                        teacher_decoder=str(taef2_decoder_path), resolution=64)
    sd = save_decoder(make_decoder("tae-64", "sd15"), tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match=r"'sd15' latents, not 'flux2' \(channels 4 vs 32.*or a --teacher of that "
                                              r"space$"):
        evaluate_images(tiny_images, [str(sd)], teacher=str(taef2_encoder_path))


# ----------------------------------------------------------------------------- bad inputs (issue 15)
@pytest.fixture
def nan_decoder(tmp_path, make_decoder) -> Path:
    """A checkpoint with a NaN in its output bias: every picture it decodes is NaN."""
    decoder = make_decoder("tae-64", "sd15")
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias[0] = float("nan")
    return save_decoder(decoder, tmp_path / "broken.safetensors")


def test_a_nan_decoder_is_an_error_never_a_score(tiny_images, latents, tiny_decoder, nan_decoder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents),
                 "--decoder", str(tiny_decoder), "--decoder", str(nan_decoder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "fastdec eval images: error:" in captured.err
    # names the decoder and the input (the first image, sorted by name)
    assert "decoder 'broken'" in captured.err and "'astronaut.png'" in captured.err and "NaN" in captured.err
    assert "PSNR" not in captured.out and "exact (inf)" not in captured.out
    assert not any(out.glob("*")), "no report (nor part of one) is written"
    with pytest.raises(NonFiniteOutputError, match="broken"):
        evaluate_images(tiny_images, [str(nan_decoder)], latents=latents)


def test_one_decoder_or_exclude_may_be_given_as_a_string(tiny_images, tiny_decoder, latents):
    # the string's letters were the decoders ("'f' is not a decoder file") and the names left out
    one = evaluate_images(tiny_images, str(tiny_decoder), latents=latents, grid=0)
    assert list(one["decoders"]) == ["tiny"]
    assert evaluate_images(tiny_images, [tiny_decoder], latents=latents, grid=0, limit=1)["count"] == 1  # a Path
    for bad in (None, [create_decoder("tae-64", "sd15")], 5):
        with pytest.raises(TypeError, match="decoders is a list of specs"):
            evaluate_images(tiny_images, bad, latents=latents)
    with pytest.raises(DataError, match="--exclude names clip1, which is not in"):  # its letters: "1, c, i, l, p"
        evaluate_video(tiny_images, [str(tiny_decoder)], teacher="t.pth", exclude="clip1")


def test_a_file_name_that_is_not_utf8_is_reported_escaped(tmp_path, taef2_encoder_path, make_decoder, capsys):
    """The grid's matplotlib title, then the CSV, failed with a traceback on the name's surrogates."""
    import os

    folder = tmp_path / "images"
    folder.mkdir()
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(os.fsdecode(os.fsencode(folder) + b"/bad\xff.png"))
    decoder = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "d.safetensors")
    out = tmp_path / "out"
    assert main(["eval", "images", "--data", str(folder), "--teacher", str(taef2_encoder_path),
                 "--decoder", str(decoder), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "bad\\xff.png,d," in (out / "per_image.csv").read_text()
    assert (out / "grid.png").is_file()


def test_a_non_finite_output_is_refused_even_from_an_unchecking_decoder(tiny_images, latents):
    """Decoders that do not check themselves (teachers, foreign modules) are checked by the evaluation."""
    from fastdec.eval.run import ImageEvaluation, Notes, run_evaluation

    def nan_decode(z: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8), float("nan"))

    from fastdec.latent_spaces import get_latent_space

    decoder = EvalDecoder("foreign", "a foreign module", nan_decode)
    task = ImageEvaluation(data=tiny_images, items=sorted(tiny_images.glob("*.png")), teacher=None,
                           decoders=[decoder], space=get_latent_space("sd15"), factor=8, device="cpu", notes=Notes(), options={},
                           latents=latents, resolution=None, lpips=None, fid=None, grid=0)
    with pytest.raises(NonFiniteOutputError, match="decoder 'foreign' .* on 'astronaut.png'"):
        run_evaluation(task)


def test_unreadable_images_are_skipped_and_counted(tiny_images, latents, tiny_decoder, tmp_path, capsys):
    (tiny_images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents),
                 "--decoder", str(tiny_decoder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("warning: skipping 'broken.png'") == 1
    assert "skipped 1 unreadable images: broken.png" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 3 and report["skipped"]["count"] == 1
    assert list(report["skipped"]["files"]) == ["broken.png"]
    assert report["decoders"]["tiny"]["metrics"]["original"]["psnr"]["n"] == 3
    assert "skipped 1 unreadable images" in (out / "report.md").read_text()
    # nothing readable at all: an error, not an empty report
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    shutil.copy(tiny_images / "broken.png", only_broken / "broken.png")
    with pytest.raises(DataError, match="none of the 1 images"):
        evaluate_images(only_broken, [str(tiny_decoder)], latents=latents)


@pytest.mark.parametrize("kind, flag, value", [
    ("images", "--limit", "0"), ("images", "--limit", "-1"), ("images", "--resolution", "0"),
    ("images", "--resolution", "-8"), ("images", "--grid", "-1"), ("video", "--limit", "-1"),
    ("video", "--frames", "0"), ("video", "--batch-size", "0"), ("video", "--clip-frames", "-4"),
])
def test_counts_are_validated_before_any_work(kind, flag, value, tiny_images, tiny_decoder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", kind, "--data", str(tiny_images), "--decoder", str(tiny_decoder), "--out", str(out),
            "--teacher", str(tmp_path / "not-loaded.pth"), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"fastdec eval {kind}: error: {flag} must be a whole number >=" in err and value in err
    assert not out.exists()


def test_clip_frames_without_an_fvd_extractor_is_refused(tiny_images, tiny_decoder, tmp_path, capsys):
    # it sets the FVD window only, and was dropped with no note
    out = tmp_path / "out"
    assert main(["eval", "video", "--data", str(tiny_images), "--decoder", str(tiny_decoder), "--out", str(out),
                 "--teacher", str(tmp_path / "not-loaded.pth"), "--clip-frames", "8"]) == 2
    assert "--clip-frames sets the FVD window, and no --fvd-extractor is given" in capsys.readouterr().err
    assert not out.exists()


def test_limit_takes_the_first_images(tiny_images, tiny_decoder, latents):
    report = evaluate_images(tiny_images, [str(tiny_decoder)], latents=latents, limit=2)
    assert report["count"] == 2
    with pytest.raises(UsageError, match="--limit"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=latents, limit=-1)


# ----------------------------------------------------------------------------- video
def _write_clip(folder: Path, frames: np.ndarray, as_mp4: bool) -> None:
    if as_mp4:
        import av

        with av.open(str(folder.with_suffix(".mp4")), "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": "0"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        folder.mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / f"{i:05d}.png")


def test_video_end_to_end_with_flicker_and_fvd(tmp_path, taef2_encoder_path, taef2_decoder_path):
    from skimage import data

    videos = tmp_path / "videos"
    videos.mkdir()
    photo = data.astronaut()
    for k, as_mp4 in enumerate((False, True)):
        # a slow pan over the photo: 6 frames of 60 x 76 (cropped to 56 x 72 for /8)
        frames = np.stack([photo[100 + 2 * t + 40 * k: 160 + 2 * t + 40 * k, 150 + 3 * t: 226 + 3 * t] for t in range(6)])
        _write_clip(videos / f"clip{k}", np.ascontiguousarray(frames), as_mp4)
    from test_metrics import _tiny_videomae

    extractor = _tiny_videomae(tmp_path / "videomae")  # 4-frame clips
    out = tmp_path / "out"
    code = main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path),
                 "--teacher-decoder", str(taef2_decoder_path), "--decoder", "teacher", "--frames", "5",
                 "--fvd-extractor", f"videomae:{extractor}", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["decoders"]["teacher"]
    assert report["count"] == 2 and report["settings"]["shapes"] == ["5x56x72"]
    assert sorted(entry["per_frame_psnr"]) == ["clip0", "clip1.mp4"]
    assert all(len(v) == 5 for v in entry["per_frame_psnr"].values())
    flicker = entry["metrics"]["original"]["flicker"]
    assert flicker["n"] == 2 and 0 < flicker["mean"] < 0.2
    # flicker of the report equals the metric on an independent decode of the frame folder
    enc, dec = load_encoder(taef2_encoder_path), load_decoder(taef2_decoder_path)
    frames = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                          for p in sorted((videos / "clip0").glob("*.png"))[:5]]).float() / 255
    frames = frames[..., 2:58, 2:74]
    with torch.no_grad():
        decoded = dec(enc(frames))
    with open(out / "per_clip.csv") as f:
        clip0 = next(r for r in csv.DictReader(f) if r["video"] == "clip0")
    # same weights, frames decoded in chunks of 4 vs all 5 at once: float32 agreement, far inside 1e-4
    assert float(clip0["flicker"]) == pytest.approx(M.flicker_score(decoded, frames), rel=1e-4)
    assert float(clip0["psnr"]) == pytest.approx(float(M.psnr(decoded, frames).mean()), abs=1e-3)
    assert entry["fvd"]["n"] == 2 and math.isfinite(entry["fvd"]["value"])
    for name in ("report.md", "per_frame.csv", "frames.png", "psnr_per_frame.png"):
        assert (out / name).is_file(), name
    # --resolution: short side resized to R, then a centre R x R crop
    small = evaluate_video(videos, ["teacher"], teacher=str(taef2_encoder_path),
                           teacher_decoder=str(taef2_decoder_path), frames=3, resolution=48)
    assert small["settings"]["shapes"] == ["3x48x48"]


def test_eval_without_a_kind_is_a_usage_error(capsys):
    assert main(["eval"]) == 2
    assert "images" in capsys.readouterr().err


def test_video_decoders_get_the_whole_clip(make_decoder):
    """Video decoders decode (1, T, C, h, w) at once; image decoders frame by frame, in chunks."""
    video = make_decoder("tae-causal-64", "flux2")
    image = make_decoder("tae-64", "flux2")
    z = torch.randn(5, 32, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = decode_frames(EvalDecoder("v", "v", video, is_video=True), z, batch=2)
        # the same module on the same tensor: identical
        torch.testing.assert_close(got, video(z[None])[0], rtol=0, atol=0)
        # chunks of 2 vs one batch of 5: float32 kernels may block differently by batch size (a few ulp)
        torch.testing.assert_close(decode_frames(EvalDecoder("i", "i", image), z, batch=2), image(z),
                                   rtol=1e-5, atol=1e-6)
    assert got.shape == (5, 3, 32, 48)


def test_old_import_paths_keep_working():
    import fastdec.eval.run as run
    import fastdec.evaluate as old
    import fastdec.metrics as old_metrics

    assert old.evaluate_images is run.evaluate_images and old.evaluate_video is run.evaluate_video
    assert old.EvalError is EvalError and callable(old.add_commands)
    assert old_metrics.psnr is M.psnr and old_metrics.FrechetStats is M.FrechetStats
    assert old_metrics.MetricUnavailable is M.MetricUnavailable and old_metrics.SSIM_KERNEL == 11


# ----------------------------------------------------------------------------- VIF and gradient energy (issue 13)
def test_vif_and_gradient_energy_in_every_report_format(tiny_images, tiny_decoder, latents, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents),
                 "--decoder", str(tiny_decoder), "--out", str(out), "--grid", "0"]) == 0
    terminal = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stats = report["decoders"]["tiny"]["metrics"]["original"]
    decoder = load_decoder(tiny_decoder)
    expected = {"vif": [], "gradient_energy": []}
    for path in sorted(tiny_images.glob("*.png")):  # decoded independently: the same crop as the latents test
        image = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None].float() / 255
        original = image[..., 2:58, 1:81]
        with torch.no_grad():
            decoded = decoder(_stored_latent(latents, path.stem)[None])
        expected["vif"].append(float(M.vif(decoded, original)[0]))
        expected["gradient_energy"].append(float(M.gradient_energy_ratio(decoded, original)[0]))
    with open(out / "per_image.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["reference"] == "original"]
    for metric, values in expected.items():
        stat = stats[metric]
        # the same checkpoint decoding the same latents in both paths: float32 reordering only
        np.testing.assert_allclose([float(r[metric]) for r in rows], values, rtol=1e-4, atol=1e-5)
        assert stat["mean"] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-5) and stat["n"] == 3
        assert stat["ci_low"] < stat["mean"] < stat["ci_high"] and stat["confidence"] == 0.95
    # an untrained decoder against photos: little information and none of the edges
    assert 0 <= stats["vif"]["mean"] < 0.5
    md = (out / "report.md").read_text()
    for text in (md, terminal):
        assert "| VIF ↑ |" in text and "| gradient energy → 1 |" in text
    assert "0-255" in md and "Sobel" in md  # what was passed and computed is in the report
    assert "0-255" in report["settings"]["vif"]


def test_vif_is_left_out_with_a_note_for_images_under_41_px(tmp_path, tiny_decoder):
    from safetensors.torch import save_file

    images, latent_dir = tmp_path / "small", tmp_path / "small_latents"
    images.mkdir(), latent_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):  # 40 x 48 px: room for SSIM and the Sobel filter, not for VIF's 41-px windows
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"s{k}.png")
        save_file({"latents": torch.randn(1, 4, 5, 6)}, str(latent_dir / f"s{k}.safetensors"))
    report = evaluate_images(images, [str(tiny_decoder)], latents=latent_dir, grid=0)
    stats = report["decoders"]["tiny"]["metrics"]["original"]
    assert "vif" not in stats and stats["gradient_energy"]["n"] == 2
    assert any("VIF omitted" in n and "41 px" in n for n in report["notes"])


def test_vif_of_a_flat_image_is_left_out_with_a_note(tmp_path, tiny_decoder):
    from safetensors.torch import save_file

    images, latent_dir = tmp_path / "flat", tmp_path / "flat_latents"
    images.mkdir(), latent_dir.mkdir()
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)  # no signal variance: VIF is 0/0 = NaN
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, pixels in (("grey", grey), ("noisy", noisy)):
        Image.fromarray(pixels).save(images / f"{name}.png")
        save_file({"latents": torch.randn(1, 4, 8, 8)}, str(latent_dir / f"{name}.safetensors"))
    report = evaluate_images(images, [str(tiny_decoder)], latents=latent_dir, grid=0)
    vif = report["decoders"]["tiny"]["metrics"]["original"]["vif"]
    assert vif["n"] == 1 and "n_infinite" not in vif and math.isfinite(vif["mean"])  # counted as an exact match
    assert any("VIF omitted" in n and "flat" in n for n in report["notes"])


# ----------------------------------------------------------------------------- paired differences vs a baseline
@pytest.fixture
def other_decoder(tmp_path, make_decoder) -> Path:
    """A second tiny decoder (another seed): a different decode of the same latents."""
    return save_decoder(make_decoder("tae-64", "sd15", seed=1), tmp_path / "other.safetensors")


def _csv_differences(path: Path, key: str, decoder: str, baseline: str, reference: str, metric: str) -> list[float]:
    """decoder - baseline per input, straight from the CSV (inputs where either side is empty left out)."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["reference"] == reference]
    base = {r[key]: r[metric] for r in rows if r["decoder"] == baseline}
    assert base, f"no {baseline} rows vs {reference}"
    return [float(r[metric]) - float(base[r[key]]) for r in rows
            if r["decoder"] == decoder and r[metric] != "" and base[r[key]] != ""]


def _check_paired(stat: dict, differences: list[float]) -> None:
    """The report's paired stat is the mean and Student-t interval of exactly these per-input differences."""
    assert_mean_ci(stat, differences)
    assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"] and stat["ci_low"] < stat["ci_high"]


def test_paired_differences_against_the_first_decoder(tiny_images, latents, tiny_decoder, other_decoder, tmp_path,
                                                      capsys):
    out = tmp_path / "out"
    assert main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents), "--decoder",
                 str(tiny_decoder), "--decoder", str(other_decoder), "--out", str(out), "--grid", "0"]) == 0
    terminal = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "vs_baseline" not in report["decoders"]["tiny"]  # the baseline is not compared with itself
    assert report["settings"]["baseline"] == "tiny"
    paired = report["decoders"]["other"]["vs_baseline"]
    assert paired["baseline"] == "tiny" and set(paired) == {"baseline", "original"}  # no teacher: no teacher rows
    measured = ("psnr", "ssim", "vif", "gradient_energy")  # MS-SSIM (56 x 80 px) and LPIPS (no weights) are not
    assert sorted(paired["original"]) == sorted(measured)
    for metric in measured:
        stat = paired["original"][metric]
        _check_paired(stat, _csv_differences(out / "per_image.csv", "image", "other", "tiny", "original", metric))
        # every image measured for both: the mean difference is the difference of the means
        means = {name: report["decoders"][name]["metrics"]["original"][metric]["mean"] for name in ("tiny", "other")}
        assert stat["mean"] == pytest.approx(means["other"] - means["tiny"], rel=1e-6, abs=1e-9)
    # pairing removes the between-image spread the two decoders share: tighter than either mean's interval
    psnr = paired["original"]["psnr"]
    alone = report["decoders"]["tiny"]["metrics"]["original"]["psnr"]
    assert psnr["ci_high"] - psnr["ci_low"] < alone["ci_high"] - alone["ci_low"]
    # report.md and the terminal: the table, the same decimals as the other tables (2 for PSNR, 4 for SSIM)
    md = (out / "report.md").read_text()
    cell = f"{psnr['mean']:+.2f} [{psnr['ci_low']:+.2f}, {psnr['ci_high']:+.2f}]"
    ssim = paired["original"]["ssim"]
    ssim_cell = f"{ssim['mean']:+.4f} [{ssim['ci_low']:+.4f}, {ssim['ci_high']:+.4f}]"
    for text in (md, terminal):
        assert "Difference vs tiny (paired over the same 3 images, 95% CI)" in text
        assert "| decoder | PSNR ↑ | SSIM ↑ | VIF ↑ | gradient energy → 1 |" in text
        assert f"| other | {cell} | {ssim_cell} |" in text
    assert "## Difference vs tiny" in md


def test_baseline_option_picks_another_decoder_and_unknown_names_are_errors(
        tiny_images, latents, tiny_decoder, other_decoder, tmp_path, capsys):
    first = evaluate_images(tiny_images, [str(tiny_decoder), str(other_decoder)], latents=latents, grid=0)
    out = tmp_path / "out"
    assert main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents), "--decoder",
                 str(tiny_decoder), "--decoder", str(other_decoder), "--baseline", "other", "--out", str(out),
                 "--grid", "0"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert "vs_baseline" not in report["decoders"]["other"]
    paired = report["decoders"]["tiny"]["vs_baseline"]
    assert paired["baseline"] == "other"
    # the other way round: the same differences, negated
    swapped = first["decoders"]["other"]["vs_baseline"]["original"]["psnr"]
    assert paired["original"]["psnr"]["mean"] == pytest.approx(-swapped["mean"], rel=1e-6)
    assert paired["original"]["psnr"]["ci_low"] == pytest.approx(-swapped["ci_high"], rel=1e-6)
    _check_paired(paired["original"]["psnr"],
                  _csv_differences(out / "per_image.csv", "image", "tiny", "other", "original", "psnr"))
    assert "Difference vs other (paired over the same 3 images" in (out / "report.md").read_text()
    # an unknown name: refused before anything is loaded or written, naming the valid report names
    bad = tmp_path / "bad"
    assert main(["eval", "images", "--data", str(tiny_images), "--latents", str(latents), "--decoder",
                 str(tiny_decoder), "--decoder", str(other_decoder), "--baseline", "tiny.safetensors",
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "fastdec eval images: error: --baseline 'tiny.safetensors'" in err and "'tiny', 'other'" in err
    assert not bad.exists()
    with pytest.raises(UsageError, match=r"--baseline 'nope' .*'tiny', 'other'"):
        evaluate_images(tiny_images, [str(tiny_decoder), str(other_decoder)], latents=latents, baseline="nope")
    with pytest.raises(UsageError, match=r"--baseline 'nope' .*'tiny', 'other'"):  # the teacher is never loaded
        evaluate_video(tiny_images, [str(tiny_decoder), str(other_decoder)], teacher=str(tmp_path / "none.pth"),
                       baseline="nope")
    # one decoder: nothing to compare, no table
    single = evaluate_images(tiny_images, [str(tiny_decoder)], latents=latents, grid=0, baseline="tiny")
    assert "vs_baseline" not in single["decoders"]["tiny"] and single["settings"]["baseline"] is None


def test_paired_summary_pairs_measured_values_and_counts_exact_matches():
    # None on either side: left out; inf on either side: counted as n_infinite, as summarize does
    stat = M.summarize_paired([1.0, None, math.inf, 3.0, 2.0], [0.0, 2.0, 5.0, 1.0, None])
    assert stat["n"] == 2 and stat["n_infinite"] == 1 and stat["mean"] == pytest.approx(1.5)
    assert stat == {**M.mean_ci([1.0, 2.0]).to_dict(), "n_infinite": 1}
    # only exact matches: no difference to average (NaN, null in JSON), not an infinite one
    only_exact = M.summarize_paired([math.inf, math.inf], [math.inf, 30.0])
    assert math.isnan(only_exact["mean"]) and only_exact["n_infinite"] == 2
    from fastdec.eval.report import format_difference

    # the baseline is exact and the decoder is not: "exact matches only" said the decoder was exact too
    assert format_difference(only_exact) == "— (an exact match in every pair)"
    assert M.summarize_paired([None], [1.0]) is None
    with pytest.raises(EvalError, match="same samples"):
        M.summarize_paired([1.0, 2.0], [1.0])


def test_video_paired_differences_per_clip_and_per_reference(tmp_path, taef2_encoder_path, taef2_decoder_path,
                                                             make_decoder, capsys):
    from skimage import data

    videos = tmp_path / "videos"
    videos.mkdir()
    photo = data.astronaut()
    for k in range(3):  # 3 frame folders of a slow pan, 3 frames of 40 x 48 px each
        frames = np.stack([photo[100 + 2 * t + 50 * k: 140 + 2 * t + 50 * k, 150 + 3 * t: 198 + 3 * t]
                           for t in range(3)])
        _write_clip(videos / f"clip{k}", np.ascontiguousarray(frames), as_mp4=False)
    a = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "a.safetensors")
    b = save_decoder(make_decoder("tae-64", "flux2", seed=1), tmp_path / "b.safetensors")
    out = tmp_path / "out"
    assert main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path), "--teacher-decoder",
                 str(taef2_decoder_path), "--decoder", "teacher", "--decoder", str(a), "--decoder", str(b),
                 "--baseline", "a", "--frames", "3", "--out", str(out)]) == 0
    terminal = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    decoders = report["decoders"]
    assert "vs_baseline" not in decoders["a"]
    # the teacher's decoder is never scored against its own decode: only "original" pairs
    assert set(decoders["teacher"]["vs_baseline"]) == {"baseline", "original"}
    assert set(decoders["b"]["vs_baseline"]) == {"baseline", "original", "teacher"}
    for name in ("teacher", "b"):
        for reference in set(decoders[name]["vs_baseline"]) - {"baseline"}:
            for metric in ("psnr", "ssim", "flicker"):
                stat = decoders[name]["vs_baseline"][reference][metric]
                _check_paired(stat, _csv_differences(out / "per_clip.csv", "video", name, "a", reference, metric))
    md = (out / "report.md").read_text()
    for text in (md, terminal):
        assert "Difference vs a (paired over the same 3 clips, 95% CI)" in text
        assert "Difference vs a, both scored against the teacher decode (paired over the same 3 clips" in text
        assert "| decoder | PSNR ↑ | SSIM ↑ | FLICKER ↓ |" in text
    flicker = decoders["b"]["vs_baseline"]["original"]["flicker"]
    assert f"{flicker['mean']:+.5f} [{flicker['ci_low']:+.5f}, {flicker['ci_high']:+.5f}]" in md


def test_video_eval_refusals_say_why_and_leave_no_report_folder(tmp_path, capsys):
    """--frames 1 (no frame pair), an --exclude that leaves nothing, and clips that all fail to read are errors
    that say which; and a run refused after --out was made removes it again (it was empty)."""
    from _train_helpers import make_images, tiny_encoder_file
    from factories import tiny_decoder as make_tiny

    make_images(tmp_path / "videos" / "clip", 3, size=(32, 32))
    decoder = save_decoder(make_tiny("tae-causal-64", "sdxl"), tmp_path / "causal.safetensors")
    out = tmp_path / "deep" / "report"
    base = ["eval", "video", "--data", str(tmp_path / "videos"), "--decoder", str(decoder), "--out", str(out),
            "--teacher", str(tiny_encoder_file(tmp_path / "taesdxl_encoder.pth"))]
    for flags, words in ((["--frames", "1"], "compare successive frames, so a clip needs at least 2"),
                         (["--exclude", "clip"], "--exclude leaves out all 1 files or folders"),
                         (["--frames", "5"], "none of the 1 clips in")):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not (tmp_path / "deep").exists()
    assert "could be read: clip: " in err and "3" in err  # the reason, not only the earlier warning line
    assert main([*base, "--frames", "3"]) == 0 and (out / "report.json").is_file()


def test_images_too_small_and_latents_of_another_size_are_skipped_and_named(tiny_images, latents, tiny_decoder,
                                                                           tmp_path, capsys):
    """A 7x7 image stopped the whole run; a latent of another image's size was centre-cropped to and scored
    (PSNR 12, exit 0), or a larger one blamed on --resolution: each is skipped now, with its reason."""
    import shutil

    from PIL import Image

    data, lat = tmp_path / "data", tmp_path / "lat"
    shutil.copytree(tiny_images, data)
    shutil.copytree(latents, lat)
    Image.new("RGB", (7, 7)).save(data / "tiny.png")
    torch.save(torch.randn(4, 5, 7), lat / "tiny.pt")
    first = sorted(p for p in lat.iterdir() if p.stem == "astronaut")[0]
    wrong = first.with_name("astronaut.pt")
    first.unlink()
    torch.save(torch.randn(4, 5, 7), wrong)  # 40x56 px, not the image's size
    report = evaluate_images(data, [str(tiny_decoder)], latents=lat)
    err = capsys.readouterr().err
    assert "skipping 'astronaut.png': its latents 'astronaut.pt' are 5x7, but a" in err
    assert report["decoders"]["tiny"]["metrics"]["original"]["psnr"]["n"] == 2  # chelsea, coffee
    assert sorted(report["skipped"]["files"]) == ["astronaut.png", "tiny.png"]

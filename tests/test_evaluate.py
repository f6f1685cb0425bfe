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

from conftest import shared_path
from fastdec import metrics as M
from fastdec.checkpoints import load_decoder, load_encoder, save_decoder
from fastdec.cli import main
from fastdec.evaluate import EvalError, evaluate_images, evaluate_video
from fastdec.models.registry import create_decoder


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory) -> Path:
    """The first 8 BSDS validation photos (sorted by name)."""
    src = shared_path("data", "images", "val")
    folder = tmp_path_factory.mktemp("val8")
    for path in sorted(src.glob("*.jpg"))[:8]:
        shutil.copy(path, folder / path.name)
    return folder


def _independent_psnr(folder: Path, encoder_path: Path, decoder_path: Path) -> list[float]:
    """Centre crop to multiples of 8, encode, decode and PSNR with plain numpy (no fastdec.metrics)."""
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
    assert report["count"] == 8
    assert entry["original"]["psnr"]["mean"] == pytest.approx(float(np.mean(expected)), abs=0.01)
    assert entry["original"]["psnr"]["ci_low"] < entry["original"]["psnr"]["mean"] < entry["original"]["psnr"]["ci_high"]
    assert 0 < entry["original"]["ssim"]["mean"] < 1 and 0 < entry["original"]["ms_ssim"]["mean"] < 1
    # the same weights as the teacher's decoder: an exact match, reported as such rather than averaged
    assert entry["teacher"]["psnr"]["n_infinite"] == 8
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
def tiny_decoder(tmp_path) -> Path:
    torch.manual_seed(0)
    decoder = create_decoder("tae-64", "sd15", width=8, stage_blocks=(1, 1, 1), final_blocks=0)
    return save_decoder(decoder, tmp_path / "tiny.safetensors")


def test_latents_mode_with_a_tiny_decoder(tiny_images, tiny_decoder, tmp_path):
    latents = tmp_path / "latents"
    latents.mkdir()
    gen = torch.Generator().manual_seed(0)
    stored = {}
    for k, path in enumerate(sorted(tiny_images.glob("*.png"))):
        z = torch.randn(4, 7, 10, generator=gen)  # -> 56 x 80 px, centre of the 61 x 83 image
        stored[path.name] = z
        if k == 0:
            np.save(latents / f"{path.stem}.npy", z.numpy())
        elif k == 1:
            torch.save(z, latents / f"{path.stem}.pt")
        else:
            from safetensors.torch import save_file

            save_file({"latents": z[None]}, str(latents / f"{path.stem}.safetensors"))
    report = evaluate_images(tiny_images, [str(tiny_decoder)], out=tmp_path / "out", latents=latents, grid=1)
    decoder = load_decoder(tiny_decoder)
    psnrs = []
    for name, z in sorted(stored.items()):
        image = torch.from_numpy(np.asarray(Image.open(tiny_images / name))).permute(2, 0, 1)[None].float() / 255
        original = image[..., 2:58, 1:81]
        with torch.no_grad():
            psnrs.append(float(M.psnr(decoder(z[None]), original)[0]))
    stats = report["decoders"]["tiny"]["metrics"]["original"]
    assert stats["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert stats["psnr"]["n"] == 3
    assert "ms_ssim" not in stats  # 56 x 80 px is too small: omitted, with a note
    assert any("MS-SSIM omitted" in n for n in report["notes"])
    assert any("no --teacher" in n for n in report["notes"])
    assert (tmp_path / "out" / "grid.png").is_file()


def test_input_errors_name_the_fix(tiny_images, tiny_decoder, tmp_path, capsys):
    with pytest.raises(EvalError, match="--teacher ENCODER.*--latents"):
        evaluate_images(tiny_images, [str(tiny_decoder)])
    with pytest.raises(EvalError, match="no latents for 'astronaut.png'"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=tmp_path)
    with pytest.raises(EvalError, match="--resolution cannot be combined"):
        evaluate_images(tiny_images, [str(tiny_decoder)], latents=tmp_path, resolution=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no images"):
        evaluate_images(tmp_path / "empty", [str(tiny_decoder)], latents=tmp_path)
    with pytest.raises(EvalError, match="no decoder to evaluate"):
        evaluate_images(tiny_images, [], latents=tmp_path)
    assert main(["eval", "images", "--data", str(tiny_images), "--decoder", str(tiny_decoder)]) == 2
    assert "pass --teacher" in capsys.readouterr().err


def test_teacher_errors(tiny_images, tmp_path, taef2_encoder_path, taef2_decoder_path):
    with pytest.raises(EvalError, match="--decoder teacher needs a teacher with a decoder"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path))
    with pytest.raises(EvalError, match="not a multiple of the latent factor 8"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path),
                        teacher_decoder=str(taef2_decoder_path), resolution=60)
    with pytest.raises(EvalError, match="cannot crop 64x64 from a 61x83"):
        evaluate_images(tiny_images, ["teacher"], teacher=str(taef2_encoder_path),
                        teacher_decoder=str(taef2_decoder_path), resolution=64)
    torch.manual_seed(0)
    sd = save_decoder(create_decoder("tae-64", "sd15", width=8, stage_blocks=(1, 1, 1)), tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="decoder for 'sd15', not 'flux2'"):
        evaluate_images(tiny_images, [str(sd)], teacher=str(taef2_encoder_path))


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
    frames = torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1)
                          for p in sorted((videos / "clip0").glob("*.png"))[:5]]).float() / 255
    frames = frames[..., 2:58, 2:74]
    with torch.no_grad():
        decoded = dec(enc(frames))
    with open(out / "per_clip.csv") as f:
        clip0 = next(r for r in csv.DictReader(f) if r["video"] == "clip0")
    assert float(clip0["flicker"]) == pytest.approx(M.flicker_score(decoded, frames), rel=1e-4)
    assert float(clip0["psnr"]) == pytest.approx(float(M.psnr(decoded, frames).mean()), abs=1e-3)
    assert entry["fvd"]["n"] == 2 and math.isfinite(entry["fvd"]["value"])
    for name in ("report.md", "per_frame.csv", "frames.png", "psnr_per_frame.png"):
        assert (out / name).is_file(), name
    # --resolution: short side resized to R, then a centre R x R crop
    small = evaluate_video(videos, ["teacher"], teacher=str(taef2_encoder_path),
                           teacher_decoder=str(taef2_decoder_path), frames=3, resolution=48)
    assert small["settings"]["shapes"] == ["3x48x48"]
    assert main(["eval"]) == 2


def test_video_decoders_get_the_whole_clip():
    """Video decoders decode (1, T, C, h, w) at once; image decoders frame by frame, in chunks."""
    from fastdec.evaluate import _decode_frames, _Decoder

    torch.manual_seed(0)
    video = create_decoder("tae-causal-64", "flux2", width=8, stage_blocks=(1, 1, 1), final_blocks=0).eval()
    z = torch.randn(5, 32, 4, 6)
    with torch.no_grad():
        got = _decode_frames(_Decoder("v", "v", video, is_video=True), z, batch=2)
        torch.testing.assert_close(got, video(z[None])[0])
        image = create_decoder("tae-64", "flux2", width=8, stage_blocks=(1, 1, 1), final_blocks=0).eval()
        torch.testing.assert_close(_decode_frames(_Decoder("i", "i", image), z, batch=2), image(z))
    assert got.shape == (5, 3, 32, 48)

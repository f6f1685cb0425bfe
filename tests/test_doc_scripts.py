"""The scripts that make the README's and model cards' figures: training curves, crop grids, model cards."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_metrics(run: Path, rows: list[str]) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,val_psnr,teacher_val_psnr,loss\n" + "\n".join(rows) + "\n")
    return run


def test_training_curves_reads_validation_points_and_the_teacher_line(tmp_path, capsys):
    curves = load_script("benchmarks/training_curves.py")
    run = write_metrics(tmp_path / "run", ["0,20.5,27.3,", "50,,,0.1", "100,25.25,,0.05"])
    assert curves.read_curve(run, "val_psnr") == ([0, 100], [20.5, 25.25], 27.3)
    assert curves.main(["--run", f"hifi={run}", "--out", str(tmp_path / "c.png")]) == 0
    assert "hifi: val_psnr 0: 20.5, 100: 25.25" in capsys.readouterr().out
    assert Image.open(tmp_path / "c.png").format == "PNG"
    with pytest.raises(SystemExit, match="no column 'temporal'"):
        curves.read_curve(run, "temporal")
    with pytest.raises(SystemExit, match="metrics.csv not found"):
        curves.read_curve(tmp_path / "nothing", "val_psnr")


def test_crop_box_is_centred_on_the_latent_grid():
    grid = load_script("benchmarks/crop_grid.py")
    assert grid.crop_box(320, 480, 160, 8) == (80, 160)
    top, left = grid.crop_box(321, 487, 100, 8)
    assert top % 8 == 0 and left % 8 == 0 and abs(top - (321 - 100) / 2) < 8


def test_crop_grid_writes_original_decoders_and_errors(tmp_path, taef2_encoder_path):
    """A tiny end-to-end grid: 2 photos x (original, 2 decoders, 2 error maps) of 32 px crops."""
    import fastdec
    from factories import tiny_decoder

    grid = load_script("benchmarks/crop_grid.py")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy()).save(photos / f"p{i}.png")
    decoder = fastdec.save_decoder(tiny_decoder("tae-64", "flux2", seed=0), tmp_path / "tiny.safetensors")
    out = tmp_path / "grid.png"
    grid.main(["--data", str(photos), "--teacher", str(taef2_encoder_path), "--decoder", f"A={decoder}",
               "--decoder", str(decoder), "--photos", "2", "--size", "32", "--out", str(out)])
    image = Image.open(out)
    assert image.size == (32 * 5, 2 * (32 + grid.LABEL_HEIGHT))


def test_model_card_markdown_carries_metrics_and_speed():
    package = load_script("tools/package_pretrained.py")
    stat = {"mean": 30.1, "ci_low": 29.4, "ci_high": 30.8, "n": 100}
    card = {"name": "flux2-x", "description": "d", "architecture": "tae {}", "started_from": "TAEF2",
            "config": "flux2-x.yaml", "params": 1234567, "gflops_512": 61.7, "weights": "fp16", "latents": "l",
            "data": [{"name": "BSDS500 train", "licence": "research use", "used_for": "training"}],
            "training": {"steps": 10, "batch_size": 8, "resolution": 128, "losses": {"l1": 1.0},
                         "precision": "bf16 autocast", "wall_time_min": 1.5, "hardware": "CPU, 2 threads, no GPU",
                         "validation_curve": [{"step": 0, "val_psnr": 27.34}, {"step": 10, "val_psnr": 28.0}]},
            "trades": "softer than TAEF2",
            "evaluation": {"set": "BSDS500 val", "confidence": "95%", "metrics": {"psnr": stat},
                           "vs_baseline": {"psnr": {"mean": 1.57, "ci_low": 1.49, "ci_high": 1.65, "n": 100}}},
            "speed": [{"setting": "eager fp32", "ms": 300.0, "baseline_ms": 700.0, "speedup": 2.33}]}
    text = package.render_card(card)
    assert "## flux2-x" in text and "1,234,567 parameters, 61.7 GFLOPs" in text
    assert "| psnr | 30.10 [29.40, 30.80] | +1.57 [+1.49, +1.65] |" in text
    assert "| eager fp32 | 300.0 | 700.0 | 2.33x |" in text
    assert "softer than TAEF2" in text and "0: 27.34, 10: 28.00" in text
    # a video card: its clips and the temporal loss are said, and no empty validation line is written
    video = {**card, "training": {**card["training"], "losses": {"l1": 1.0, "temporal": 1.0}, "validation_curve": [],
                                  "clips": {"frames": 8, "max_frame_stride": 2}}}
    text = package.render_card(video)
    assert "128 px crops of 8-frame clips (random stride 1-2), losses {'l1': 1.0, 'temporal': 1.0}" in text
    assert "Validation PSNR" not in text
    # the learning rates and the resize, when the run had them
    video["training"].update(lr=5e-5, temporal_lr=1e-3, short_side=256)
    assert "clips (random stride 1-2) of files resized to a 256 px short side, losses {'l1': 1.0, 'temporal': 1.0}, " \
           "lr 5e-05 (temporal layers 0.001), bf16" in package.render_card(video)
    video["training"]["latent_noise"] = 0.15
    assert "256 px short side, latents + noise of std up to 0.15, losses" in package.render_card(video)


def test_training_facts_read_the_run_folder(tmp_path):
    package = load_script("tools/package_pretrained.py")
    run = write_metrics(tmp_path / "run", ["0,27.5,27.3,", "25,,,0.02"])
    config = {"steps": 25, "batch_size": 2, "resolution": 128, "l1": 1.0, "temporal": 1.0, "mse": 0.0, "frames": 8,
              "max_frame_stride": 2, "precision": {"mixed_precision": "bf16", "channels_last": True}}
    (run / "config.json").write_text("{}")
    (run / "decoder.safetensors").write_bytes(b"")
    facts = package.training_facts(run, config)
    assert facts["losses"] == {"l1": 1.0, "temporal": 1.0}  # weights of 0 are not losses
    assert facts["clips"] == {"frames": 8, "max_frame_stride": 2}
    assert facts["validation_curve"] == [{"step": 0, "val_psnr": 27.5}]
    assert facts["precision"] == "bf16 autocast, channels_last" and facts["wall_time_min"] >= 0
    assert "temporal_lr" not in facts and "short_side" not in facts  # said only when the run set them
    facts = package.training_facts(run, {**config, "lr": 5e-5, "temporal_lr": 1e-3, "short_side": 256})
    assert (facts["lr"], facts["temporal_lr"], facts["short_side"]) == (5e-5, 1e-3, 256)
    assert "latent_noise" not in facts
    assert package.training_facts(run, {**config, "latent_noise": 0.15})["latent_noise"] == 0.15


def test_flicker_split_finds_where_the_flicker_is():
    """Flicker added where the original is still is all 'still' and all removable; flicker that rides on a
    moving part is all 'moving'; a decode that equals the original has none."""
    split = load_script("benchmarks/flicker_split.py")
    torch.manual_seed(0)
    original = torch.full((6, 3, 32, 32), 0.5)
    original[:, :, :, 16:] = torch.rand(6, 1, 32, 16)  # right half changes every frame, left half is still
    assert split.flicker_split(original, original)["flicker"] == 0
    still_flicker = original.clone()
    still_flicker[1::2, :, 4:12, 2:8] += 0.1  # a patch in the still half that blinks
    result = split.flicker_split(still_flicker, original)
    assert result["flicker"] > 0 and result["still_share"] == pytest.approx(1.0)
    assert result["still_bound"] == pytest.approx(1.0)  # the original is exactly still there: all removable
    assert 0.3 < result["still_pixels"] < 0.5  # the left half, less the motion map's blur across the edge
    moving_error = original.clone()
    moving_error[1::2, :, 4:12, 22:28] += 0.1
    result = split.flicker_split(moving_error, original)
    assert result["still_share"] == 0 and result["still_bound"] == 0
    with pytest.raises(ValueError, match="same"):
        split.flicker_split(original[:1], original[:1])


def _panning_clip(frames: int = 6, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random texture panning 1 px per frame to the left, and a second texture for errors that pan
    with it: (T, 3, size, size) each."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.nn.functional.avg_pool2d(torch.rand(2, 3, size + 4, size + frames + 4, generator=g), 5, 1)
    clip = torch.stack([wide[0, :, :, t:t + size] for t in range(frames)])
    travelling_error = torch.stack([wide[1, :, :, t:t + size] for t in range(frames)]) - 0.5
    return clip * 0.8 + 0.1, travelling_error


def test_flicker_oracle_removes_independent_error_not_error_that_travels():
    """Filtering along the original's motion averages out an error that is new in every frame (less flicker,
    higher PSNR) and leaves an error that moves with the content where it was; strength 0 is the decode itself."""
    oracle = load_script("benchmarks/flicker_oracle.py")
    original, travelling = _panning_clip()
    for method in ("ilk", "tvl1"):  # the pan: each pixel was 1 px to the right one frame before
        pan = oracle.backward_flows(original, method)[:, :, 4:-4, 4:-4]
        assert np.allclose(pan[:, 1], 1.0, atol=0.15) and np.allclose(pan[:, 0], 0.0, atol=0.15), method
    flows = oracle.backward_flows(original)
    noisy = (original + 0.03 * torch.randn(original.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    psnr0, flicker0 = oracle.score(noisy, original)
    psnr1, flicker1 = oracle.score(oracle.oracle_filter(noisy, original, 0.5, flows=flows), original)
    assert flicker1 < 0.8 * flicker0 and psnr1 > psnr0 + 0.5
    assert abs(oracle.error_travel(noisy, original, flows)) < 0.2
    carried = (original + 0.2 * travelling).clamp(0, 1)
    assert oracle.error_travel(carried, original, flows) > 0.8
    _, flicker_carried = oracle.score(carried, original)
    _, flicker_carried_filtered = oracle.score(oracle.oracle_filter(carried, original, 0.5, flows=flows), original)
    assert flicker_carried_filtered > 0.8 * flicker_carried
    assert torch.equal(oracle.oracle_filter(noisy, original, 0.0, flows=flows), noisy)
    with pytest.raises(ValueError, match="alpha"):
        oracle.oracle_filter(noisy, original, 1.0, flows=flows)
    with pytest.raises(ValueError, match="same"):
        oracle.error_travel(noisy[:, :, :16], original)


def test_flicker_oracle_means_and_plot(tmp_path):
    """Means over clips are per decoder and strength, relative to the same decoder unfiltered; the plot is a PNG."""
    oracle = load_script("benchmarks/flicker_oracle.py")
    rows = [{"video": v, "decoder": "d", "alpha": a, "psnr": p, "flicker": f}
            for v, a, p, f in [("x", 0.0, 30.0, 0.010), ("y", 0.0, 32.0, 0.006),
                               ("x", 0.5, 30.5, 0.008), ("y", 0.5, 32.1, 0.006)]]
    base, half = oracle.means(rows)
    assert (base["flicker_ratio"], base["psnr_change"]) == (1.0, 0.0)
    assert half["flicker_ratio"] == pytest.approx(0.007 / 0.008) and half["psnr_change"] == pytest.approx(0.3)
    # the axes hold every point and the goal region's corner, however far below the goal a filter gets
    (x0, x1), (y0, y1) = oracle.plot_limits([{"flicker_ratio": 0.6, "psnr_change": -1.5},
                                             {"flicker_ratio": 1.0, "psnr_change": 0.8}], 0.8, 0.2)
    assert x0 < 0.6 and x1 > 1.0 and y0 < -1.5 and y1 > 0.8
    (x0, _), (y0, _) = oracle.plot_limits([{"flicker_ratio": 1.0, "psnr_change": 0.0}], 0.8, 0.2)
    assert x0 < 0.8 and y0 < -0.2
    png = oracle.write_plot(rows, tmp_path / "oracle.png", "ilk", latent_noise=0.1)
    assert Image.open(png).format == "PNG" and not list(tmp_path.glob(".*"))


def test_flicker_gate_holds_still_jitter_and_lets_motion_through():
    """The flow-free gate averages out noise that is new in every frame where the picture is still (less
    flicker, higher PSNR), and where the content moves by much more than tau it passes the decode through."""
    gate = load_script("benchmarks/flicker_gate.py")
    g = torch.Generator().manual_seed(0)
    still = torch.full((8, 3, 32, 32), 0.5)
    jittered = (still + 0.01 * torch.randn(still.shape, generator=g)).clamp(0, 1)
    psnr0, flicker0 = gate.score(jittered, still)
    psnr1, flicker1 = gate.score(gate.gated_filter(jittered, 0.85, 0.02), still)
    assert flicker1 < 0.6 * flicker0 and psnr1 > psnr0 + 1.0
    # a clip that changes by ~0.3 per pixel each frame: |D_t - F_{t-1}| >> tau, so the gate lets go
    moving = torch.rand((6, 3, 32, 32), generator=g)
    assert (gate.gated_filter(moving, 0.85, 0.02) - moving).abs().max() < 1e-3
    assert gate.gated_filter(jittered, 0.0, 0.02) is jittered
    for bad, match in [((jittered, 1.0, 0.02), "alpha"), ((jittered, 0.5, 0.0), "tau"),
                       ((jittered[:, :1], 0.5, 0.02), "RGB")]:
        with pytest.raises(ValueError, match=match):
            gate.gated_filter(*bad)
    with pytest.raises(ValueError, match="window"):
        gate.gated_filter(jittered, 0.5, 0.02, window=4)


def test_flicker_scripts_run_end_to_end(tmp_path, capsys):
    """Both flicker scripts score a folder of clips with a real (tiny, random) encoder and decoder and write their
    rows; a --clips filter that matches nothing is an error naming the folder."""
    import json

    from _train_helpers import make_images, tiny_decoder_file, tiny_encoder_file

    videos = tmp_path / "videos"
    make_images(videos / "clip", 4, size=(32, 32))
    teacher = tiny_encoder_file(tmp_path / "taesdxl_encoder.pth")
    decoder = tiny_decoder_file(tmp_path / "decoder.safetensors")
    common = ["--data", str(videos), "--teacher", str(teacher), "--decoder", str(decoder), "--frames", "4",
              "--resolution", "32"]
    split = load_script("benchmarks/flicker_split.py")
    assert split.main([*common, "--json", str(tmp_path / "split.json")]) == 0
    [row] = json.loads((tmp_path / "split.json").read_text())
    assert row["video"] == "clip" and row["flicker"] > 0
    oracle = load_script("benchmarks/flicker_oracle.py")
    assert oracle.main([*common, "--alpha", "0", "0.5", "--json", str(tmp_path / "oracle.json"),
                        "--plot", str(tmp_path / "oracle.png")]) == 0
    rows = json.loads((tmp_path / "oracle.json").read_text())
    assert [r["alpha"] for r in rows] == [0.0, 0.5] and rows[0]["flicker"] == pytest.approx(row["flicker"])
    assert Image.open(tmp_path / "oracle.png").format == "PNG" and "means over clips" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no videos in .*videos.* match --clips nope"):
        oracle.main([*common, "--clips", "nope"])
    # --latent-noise: both scripts jitter the latents as `fastdec eval video` does, so they agree with each other
    noisy = [*common, "--latent-noise", "0.5"]
    assert split.main([*noisy, "--json", str(tmp_path / "split.json")]) == 0
    assert oracle.main([*noisy, "--alpha", "0", "--json", str(tmp_path / "oracle.json")]) == 0
    [jittered] = json.loads((tmp_path / "split.json").read_text())
    assert jittered["flicker"] != pytest.approx(row["flicker"])
    assert json.loads((tmp_path / "oracle.json").read_text())[0]["flicker"] == pytest.approx(jittered["flicker"])
    gate = load_script("benchmarks/flicker_gate.py")
    assert gate.main([*noisy, "--alpha", "0", "0.5", "--tau", "0.02", "0.04", "--json", str(tmp_path / "gate.json"),
                      "--plot", str(tmp_path / "gate.png")]) == 0
    rows = json.loads((tmp_path / "gate.json").read_text())
    assert [(r["alpha"], r["tau"]) for r in rows] == [(0.0, 0.0), (0.5, 0.02), (0.5, 0.04)]
    assert rows[0]["flicker"] == pytest.approx(jittered["flicker"])  # unfiltered: the same decode as the others
    assert Image.open(tmp_path / "gate.png").format == "PNG" and "alpha 0.50  tau 0.04" in capsys.readouterr().out
    # bad settings are usage errors, refused before anything is decoded
    for script, bad in [(gate, ["--alpha", "1.5"]), (gate, ["--tau", "0"]), (oracle, ["--alpha", "1"])]:
        with pytest.raises(SystemExit):
            script.main([*common, *bad])
        assert "must be" in capsys.readouterr().err

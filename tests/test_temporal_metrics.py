"""Temporal video metrics: frame_diff, temporal_energy, excess_motion, tOF, and how `fastdec eval video`
reports them (per frame, per clip, means with CIs, paired differences, frame_diff.png, --tof)."""
from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_mean_ci
from fastdec.cli import main
from fastdec.errors import EvalError, MetricUnavailable
from fastdec.eval import metrics as M
from fastdec.eval.run import evaluate_video
from fastdec.io.checkpoints import save_decoder

AMPLITUDES = (0.02, 0.05, 0.1)


def _texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random RGB texture (3, h, w) in [0.3, 0.7]: mid-range so injected flicker is never clamped,
    smooth so optical flow has gradients to work with."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 4, w // 4, generator=gen)
    return 0.3 + 0.4 * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _moving(frames: int = 5, size: int = 32) -> torch.Tensor:
    """A 1 px/frame horizontal pan over a texture, (T, 3, size, size)."""
    big = _texture(size, size + frames)
    return torch.stack([big[..., t:t + size] for t in range(frames)])


def _static(frames: int = 5, size: int = 32) -> torch.Tensor:
    return _texture(size, size)[None].repeat(frames, 1, 1, 1)


def _flicker(clip: torch.Tensor, amplitude: float, seed: int = 1) -> torch.Tensor:
    """The clip with a random brightness offset per frame (the same pattern for every amplitude, scaled)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.rand(clip.shape[0], generator=gen) * 2 - 1
    return clip + amplitude * offsets.view(-1, 1, 1, 1)


def _all(decoded: torch.Tensor, original: torch.Tensor) -> dict[str, float | None]:
    return {"flicker": M.flicker_score(decoded, original),
            "frame_diff": float(np.mean(M.frame_diff(decoded, original))),
            "temporal_energy": M.temporal_energy(decoded, original),
            "excess_motion": M.excess_motion(decoded, original),
            "tof": M.tof(M.clip_flows(decoded), M.clip_flows(original))}


# ----------------------------------------------------------------------------- the metrics on tensors
def test_static_clip_decoded_static_scores_zero_and_has_no_temporal_energy():
    original = _static()
    decoded = original + 0.03  # a constant bias: an error, but not a temporal one
    scores = _all(decoded, original)
    assert scores["flicker"] == 0 and scores["excess_motion"] == 0
    assert M.frame_diff(decoded, original) == [0.0] * 4
    assert scores["tof"] < 1e-6
    # the original does not move: the ratio is undefined, reported as None (never inf or NaN)
    assert scores["temporal_energy"] is None
    assert M.temporal_energy(_flicker(original, 0.05), original) is None


def test_a_perfect_decode_moves_exactly_like_the_original():
    original = _moving()
    scores = _all(original.clone(), original)
    assert scores["temporal_energy"] == pytest.approx(1.0, abs=1e-12)
    assert scores["flicker"] == 0 and scores["excess_motion"] == 0 and scores["tof"] < 1e-6


@pytest.mark.parametrize("make", [_static, _moving], ids=["static", "moving"])
def test_every_temporal_metric_grows_with_injected_flicker(make):
    original = make()
    runs = [_all(_flicker(original, a), original) for a in (0.0, *AMPLITUDES)]
    for metric in ("flicker", "frame_diff", "excess_motion", "tof"):
        values = [r[metric] for r in runs]
        assert values[0] < 1e-6 and all(b > a for a, b in zip(values, values[1:])), (metric, values)
    if make is _moving:  # a static original has no temporal energy to compare with
        energy = [r["temporal_energy"] for r in runs]
        assert energy[0] == pytest.approx(1.0) and all(b > a for a, b in zip(energy, energy[1:])), energy
        assert energy[1] > 1


def test_pixel_noise_flicker_raises_temporal_energy_and_excess_motion():
    original = _moving()
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(original.shape, generator=gen)
    noisy = [(original + a * noise).clamp(0, 1) for a in AMPLITUDES]  # a decode is clamped to [0, 1]
    energy = [M.temporal_energy(decoded, original) for decoded in noisy]
    excess = [M.excess_motion(decoded, original) for decoded in noisy]
    assert 1 < energy[0] < energy[1] < energy[2]
    assert 0 < excess[0] < excess[1] < excess[2]


def test_a_temporally_smoothed_decode_has_temporal_energy_below_one():
    original = _moving()
    frozen = original[:1].repeat(original.shape[0], 1, 1, 1)  # the decode never moves
    assert M.temporal_energy(frozen, original) == 0
    assert M.excess_motion(frozen, original) == 0  # it adds no motion ...
    assert M.flicker_score(frozen, original) > 0  # ... but its motion is wrong


def test_frame_diff_clip_mean_is_the_flicker_score():
    gen = torch.Generator().manual_seed(3)
    original, decoded = torch.rand(6, 3, 12, 16, generator=gen), torch.rand(6, 3, 12, 16, generator=gen)
    series = M.frame_diff(decoded, original)
    assert len(series) == 5
    assert float(np.mean(series)) == pytest.approx(M.flicker_score(decoded, original), rel=1e-12)
    # t = 1 by hand
    expected = ((decoded[1] - decoded[0]).double() - (original[1] - original[0]).double()).abs().mean()
    assert series[0] == pytest.approx(float(expected), rel=1e-12)


def test_temporal_metrics_refuse_one_frame_and_mismatched_clips():
    one = torch.rand(1, 3, 8, 8)
    for fn in (M.frame_diff, M.temporal_energy, M.excess_motion, M.flicker_score):
        with pytest.raises(Exception, match="at least 2 frames"):
            fn(one, one)
        with pytest.raises(Exception, match="shaped"):
            fn(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))
    with pytest.raises(Exception, match="same clip size"):
        M.tof(np.zeros((1, 2, 4, 4)), np.zeros((2, 2, 4, 4)))


def _without_skimage(monkeypatch) -> None:
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_tof_without_scikit_image_names_the_install(monkeypatch, tmp_path, capsys):
    _without_skimage(monkeypatch)
    with pytest.raises(MetricUnavailable, match=r'pip install "fastdec\[metrics\]"'):
        M.clip_flows(_moving())
    # refused before the teacher is loaded or a clip read: neither exists here
    assert main(["eval", "video", "--data", str(tmp_path / "none"), "--teacher", str(tmp_path / "none.pth"),
                 "--decoder", "teacher", "--tof"]) == 2
    err = capsys.readouterr().err
    assert "fastdec eval video: error:" in err and "--tof" in err and 'pip install "fastdec[metrics]"' in err


# ----------------------------------------------------------------------------- fastdec eval video
def _write_clips(folder: Path) -> dict[str, np.ndarray]:
    """3 frame folders of 4 frames, 32 x 40 px: two pans over scikit-image's astronaut, one static clip."""
    from skimage import data

    photo = data.astronaut()
    clips = {f"pan{k}": np.stack([photo[100 + 2 * t + 60 * k: 132 + 2 * t + 60 * k, 150 + 3 * t: 190 + 3 * t]
                                  for t in range(4)]) for k in range(2)}
    clips["still"] = np.stack([photo[300:332, 200:240]] * 4)
    for name, frames in clips.items():
        (folder / name).mkdir(parents=True)
        for i, frame in enumerate(frames):
            Image.fromarray(np.ascontiguousarray(frame)).save(folder / name / f"{i:05d}.png")
    return clips


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_video_reports_the_temporal_metrics(tmp_path, taef2_encoder_path, taef2_decoder_path, make_decoder,
                                                 monkeypatch, one_thread, capsys):
    videos = tmp_path / "videos"
    _write_clips(videos)
    a = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "a.safetensors")
    calls = []
    real_flows = M.clip_flows
    monkeypatch.setattr(M, "clip_flows", lambda clip: calls.append(clip.shape) or real_flows(clip))
    out = tmp_path / "out"
    assert main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path), "--teacher-decoder",
                 str(taef2_decoder_path), "--decoder", "teacher", "--decoder", str(a), "--frames", "4", "--tof",
                 "--out", str(out)]) == 0
    terminal = capsys.readouterr().out
    # per clip: the original, the teacher decode (also the 'teacher' decoder's output) and a's decode, once each
    assert len(calls) == 3 * 3
    report = json.loads((out / "report.json").read_text())
    frames, clips = _csv(out / "per_frame.csv"), _csv(out / "per_clip.csv")
    assert {"temporal_energy", "excess_motion", "tof"} <= set(clips[0]) and "frame_diff" in frames[0]
    for clip in clips:
        series = [r["frame_diff"] for r in frames if (r["video"], r["decoder"], r["reference"])
                  == (clip["video"], clip["decoder"], clip["reference"])]
        assert series[0] == "" and len(series) == 4  # frame 0 has no previous frame
        assert float(clip["flicker"]) == pytest.approx(np.mean([float(v) for v in series[1:]]), rel=1e-9)
        assert float(clip["tof"]) >= 0 and float(clip["excess_motion"]) >= 0
    # the static clip: no temporal energy vs the original (empty, left out of the mean, with a note)
    still = [c for c in clips if c["video"] == "still" and c["reference"] == "original"]
    assert all(c["temporal_energy"] == "" for c in still)
    assert any("temporal_energy of 'still' vs original not reported" in n for n in report["notes"])
    for name in ("teacher", "a"):
        stats = report["decoders"][name]["metrics"]["original"]
        rows = [c for c in clips if c["decoder"] == name and c["reference"] == "original"]
        for metric in ("temporal_energy", "excess_motion", "tof"):
            assert_mean_ci(stats[metric], [float(c[metric]) for c in rows if c[metric] != ""])
        assert stats["temporal_energy"]["n"] == 2 and stats["tof"]["n"] == 3
        assert {"temporal_energy", "excess_motion", "tof"} <= set(report["decoders"][name]["clips"][0])
    paired = report["decoders"]["a"]["vs_baseline"]
    assert paired["baseline"] == "teacher" and {"temporal_energy", "excess_motion", "tof"} <= set(paired["original"])
    settings = report["settings"]
    assert "optical_flow_ilk" in settings["tof"] and "sum_t" in settings["temporal_energy"]
    md = (out / "report.md").read_text()
    for text in (md, terminal):
        assert "| temporal energy → 1 |" in text and "| excess motion ↓ |" in text and "| tOF ↓ |" in text
    assert "| clip | frames | PSNR vs original | SSIM | flicker | temporal energy | excess motion | tOF |" in md
    assert "- tOF: TecoGAN tOF" in md and "frame_diff.png" in md
    assert "frame_diff.png" in report["files"]["figures"]
    with Image.open(out / "frame_diff.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
        png.verify()
    # without --tof: no flow computed, no tOF column, and the settings say how to get it
    calls.clear()
    plain = evaluate_video(videos, ["teacher"], teacher=str(taef2_encoder_path),
                           teacher_decoder=str(taef2_decoder_path), frames=4)
    assert not calls and "tof" not in plain["decoders"]["teacher"]["metrics"]["original"]
    assert "--tof" in plain["settings"]["tof"] and "tof" not in plain["decoders"]["teacher"]["clips"][0]


def test_frame_diff_plot_caps_its_panels(tmp_path):
    from fastdec.eval.report import MAX_DIFF_PANELS, write_frame_diff_plot

    series = {"a": {f"clip{k}": [0.01 * k, 0.0] for k in range(MAX_DIFF_PANELS + 2)}, "b": {"clip0": [0.0, 0.0]}}
    path = write_frame_diff_plot(tmp_path / "frame_diff.png", series)
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.verify()


def test_motion_metrics_are_temporal_energy_and_excess_motion_in_one_pass():
    """What fastdec eval video reports: the pair equals the two metrics computed on their own, and a static
    original leaves temporal energy undefined while excess motion is still measured."""
    torch.manual_seed(0)
    original = torch.rand(5, 3, 16, 16) * 0.9 + 0.05  # room for the flicker inside [0, 1]
    decoded = _flicker(original, 0.05)
    assert M.motion_metrics(decoded, original) == (M.temporal_energy(decoded, original),
                                                    M.excess_motion(decoded, original))
    static = original[:1].expand(5, -1, -1, -1)
    energy, excess = M.motion_metrics(_flicker(static, 0.05), static)
    assert energy is None and excess > 0.01
    with pytest.raises(EvalError, match="motion metrics needs at least 2 frames"):
        M.motion_metrics(original[:1], original[:1])

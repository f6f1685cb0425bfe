"""Latents that jitter from frame to frame, as a denoiser's do: ``--latent-noise`` in training (the student
decodes noisy latents, the targets stay clean) and in ``fastdec eval`` (every decoder decodes the same
jittered latents)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _train_helpers import make_images, tiny_decoder_file, tiny_encoder_file
from fastdec import load_decoder
from fastdec.cli import main
from fastdec.errors import UsageError
from fastdec.eval import metrics as M
from fastdec.eval.run import evaluate_images, evaluate_video, jitter_latents, load_clip, load_eval_teacher
from fastdec.io.checkpoints import save_decoder
from fastdec.train import TrainConfig, make_config, train
from fastdec.train.data import add_latent_noise
from fastdec.train.student import TrainView
from test_temporal_metrics import _write_clips

# 40,000 noise values per estimate: a sample std is within ~0.4% (1/sqrt(2n)) of the true one and a correlation
# within ~0.005 of 0 at one standard error, so 3% and 0.03 are six standard errors
SHAPE = (4, 25, 20, 20)


def _stds(noise: torch.Tensor) -> torch.Tensor:
    return noise.flatten(1).std(dim=1)


# ----------------------------------------------------------------------------- the noise itself
def test_eval_jitter_is_seeded_by_name_and_independent_per_frame():
    z = torch.zeros(SHAPE)
    assert jitter_latents(z, 0.0, "a.mp4") is z  # off: the encoder's latents, untouched
    a = jitter_latents(z, 0.1, "a.mp4")
    assert torch.equal(a, jitter_latents(z, 0.1, "a.mp4"))  # the same input: the same noise, run after run
    assert not torch.equal(a, jitter_latents(z, 0.1, "b.mp4"))
    assert float(a.std()) == pytest.approx(0.1, rel=0.03)
    frames = a.flatten(1)  # per frame (the first axis of a clip's latents)
    correlation = np.corrcoef(frames.numpy())
    assert np.abs(correlation[~np.eye(len(frames), dtype=bool)]).max() < 0.03
    # the noise is drawn in fp32 on the CPU whatever the latents: bf16 latents get the same noise, rounded
    bf16 = jitter_latents(z.bfloat16(), 0.1, "a.mp4")
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), a, atol=0, rtol=2 ** -8)  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("std", [-0.1, float("nan"), float("inf"), True])
def test_eval_refuses_a_bad_noise_std(std, tmp_path):
    with pytest.raises(UsageError, match="--latent-noise must be a finite std >= 0"):
        evaluate_video(tmp_path, ["teacher"], teacher="t.pth", latent_noise=std)


def test_training_noise_draws_a_std_per_sample_up_to_the_limit():
    z = torch.zeros(SHAPE)
    assert add_latent_noise(z, 0.0) is z
    torch.manual_seed(3)
    stds = _stds(add_latent_noise(z, 0.2))
    assert (stds <= 0.2 * 1.03).all() and stds.max() - stds.min() > 0.01  # one std per sample, drawn
    # drawn from the global RNG, which checkpoints save: the same seed gives the same noise
    first, second = add_latent_noise(z, 0.2), add_latent_noise(z, 0.2)
    assert not torch.equal(first, second)  # every draw is new
    torch.manual_seed(3)
    again = add_latent_noise(z, 0.2)
    torch.manual_seed(3)
    assert torch.equal(again, add_latent_noise(z, 0.2))
    # per element independent: a clip's frames carry uncorrelated noise
    frames = add_latent_noise(torch.zeros(1, *SHAPE), 0.2)[0].flatten(1)
    assert np.abs(np.corrcoef(frames.numpy())[~np.eye(SHAPE[0], dtype=bool)]).max() < 0.03
    with pytest.raises(UsageError, match="--latent-noise must be a finite number, 0 or more"):
        make_config({"data": "d", "out": "o", "teacher": "t", "latent_noise": -0.5})


# ----------------------------------------------------------------------------- training
def test_the_student_decodes_noisy_latents_and_resumes_the_same_noise(tmp_path, monkeypatch):
    import fastdec.train.loop as loop

    setup = {"teacher": str(tiny_encoder_file(tmp_path / "w" / "taesdxl_encoder.pth")),
             "decoder": str(tiny_decoder_file(tmp_path / "w" / "student.safetensors")),
             "data": str(make_images(tmp_path / "train", 4)), "cache_dir": str(tmp_path / "cache"),
             "resolution": 32, "batch_size": 2, "workers": 0, "warmup": 0, "log_every": 1, "val_every": 100,
             "mixed_precision": "no", "latent_noise": 0.5, "steps": 4, "ckpt_every": 2}
    drawn, decoded = [], []
    real_noise = loop.add_latent_noise
    monkeypatch.setattr(loop, "add_latent_noise", lambda z, std: drawn.append((z, std, real_noise(z, std)))
                        or drawn[-1][2])
    # the latents the student is given (training runs it through TrainView)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: decoded.append(args[0].clone()) if isinstance(module, TrainView) else None)
    try:
        train(TrainConfig(**setup, out=str(tmp_path / "straight")))
    finally:
        hook.remove()
    clean, std, noisy = drawn[0]
    assert std == 0.5 and len(drawn) == 4
    assert torch.equal(decoded[0], noisy) and not torch.allclose(noisy, clean)  # the student saw the noisy ones
    assert float((noisy - clean).std()) < 0.5
    # interrupted and resumed: the noise continues from the saved RNG, so the weights are bit-identical
    monkeypatch.undo()
    straight = load_decoder(tmp_path / "straight" / "decoder.safetensors").state_dict()
    train(TrainConfig(**setup, out=str(tmp_path / "resumed"), stop_at=2))
    train(TrainConfig(**setup, out=str(tmp_path / "resumed"), resume=True))
    resumed = load_decoder(tmp_path / "resumed" / "decoder.safetensors").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ----------------------------------------------------------------------------- fastdec eval
def test_eval_video_decodes_the_same_jittered_latents_with_every_decoder(tmp_path, taef2_encoder_path,
                                                                         make_decoder, one_thread, capsys):
    videos = tmp_path / "videos"
    _write_clips(videos)
    a = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "a.safetensors")
    twin = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "twin.safetensors")
    out = tmp_path / "out"
    assert main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path), "--decoder", str(a),
                 "--decoder", str(twin), "--frames", "4", "--latent-noise", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["latent_noise"] == 0.3
    assert "latents jittered: + Gaussian noise of std 0.3" in (out / "report.md").read_text()
    # the same weights on the same jittered latents: every paired difference is exactly 0
    for metric in ("psnr", "flicker"):
        assert report["decoders"]["twin"]["vs_baseline"]["original"][metric]["mean"] == 0
    # what a user gets by hand: the clip's latents plus jitter_latents' noise, decoded
    teacher, decoder = load_eval_teacher(str(taef2_encoder_path)), load_decoder(a)
    clip = load_clip(videos / "pan0", 4, None, 8)
    with torch.no_grad():
        z = teacher.encode(clip)
        jittered, plain = decoder(jitter_latents(z, 0.3, "pan0")), decoder(z)
    row = next(c for c in report["decoders"]["a"]["clips"] if c["video"] == "pan0")
    # the same fp32 latents through the same weights: 1e-4 dB and 1e-6 of flicker cover float reordering
    assert row["psnr"] == pytest.approx(float(M.psnr(jittered, clip).mean()), abs=1e-4)
    assert row["flicker"] == pytest.approx(M.flicker_score(jittered, clip), abs=1e-6)
    # and not the clean latents' score (a random tiny decoder is not very sensitive: 6e-5 apart, measured)
    assert abs(row["flicker"] - M.flicker_score(plain, clip)) > 1e-5
    assert main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path), "--decoder", str(a),
                 "--latent-noise", "-1"]) == 2
    assert "--latent-noise must be a finite std >= 0" in capsys.readouterr().err


def test_eval_images_jitters_stored_latents_too(tmp_path, make_decoder):
    folder = make_images(tmp_path / "images", 2, size=(32, 32))
    latents = tmp_path / "latents"
    latents.mkdir()
    gen = torch.Generator().manual_seed(0)
    stored = {}
    for path in sorted(folder.glob("*.png")):
        stored[path.name] = torch.randn(1, 4, 4, 4, generator=gen)
        torch.save(stored[path.name][0], latents / f"{path.stem}.pt")
    decoder_file = save_decoder(make_decoder("tae-64", "sd15"), tmp_path / "d.safetensors")
    report = evaluate_images(folder, [str(decoder_file)], latents=latents, latent_noise=0.2, grid=0)
    decoder = load_decoder(decoder_file)
    expected = []
    for name, z in stored.items():
        original = torch.from_numpy(np.array(Image.open(folder / name))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expected.append(float(M.psnr(decoder(jitter_latents(z, 0.2, name)), original)[0]))
    # the same fp32 latents and weights: 1e-4 dB covers float reordering
    assert report["decoders"]["d"]["metrics"]["original"]["psnr"]["mean"] == pytest.approx(np.mean(expected),
                                                                                            abs=1e-4)
    assert report["settings"]["latent_noise"] == 0.2

"""Deflicker (``fastdec.runtime.deflickering``): steadying decoded video where the picture holds still, streamed
the same as all at once, and its ``--deflicker`` flags in ``fastdec decode-video`` and ``fastdec eval video``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdec.cli import main
from fastdec.errors import UsageError
from fastdec.eval import metrics as M
from fastdec.io.checkpoints import save_decoder
from fastdec.io.video import read_video
from fastdec.runtime.deflickering import Deflicker, DeflickerSettings, as_deflicker_settings, deflicker
from test_temporal_metrics import _write_clips
from test_video import _tiny

# fp32 round-off: the streamed and the whole-clip filter run the same ops on the same values, one frame at a time
STREAM_ATOL = 1e-6


def _still_and_jittered(frames: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth still picture (T, 3, 32, 32) and the same with independent per-frame noise (std 0.005, well under
    the 0.02 threshold once averaged over 5x5), as a jittering decode would give."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, 32)
    picture = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32), 0.5 * torch.ones(32, 32)])
    still = picture[None].expand(frames, 3, 32, 32).clone()
    return still, (still + 0.005 * torch.randn(still.shape, generator=gen)).clamp(0, 1)


def test_it_steadies_a_jittering_still_clip_and_lets_big_changes_through():
    still, jittered = _still_and_jittered()
    steadied = deflicker(jittered)
    assert M.flicker_score(steadied, still) < 0.6 * M.flicker_score(jittered, still)
    assert float(M.psnr(steadied, still).mean()) > float(M.psnr(jittered, still).mean()) + 1.0
    # a change far above the threshold (0.2 against 0.02) is not held: exp(-100) ~ 4e-44, far below an fp32 ulp of 0.3
    moving = torch.stack([torch.full((3, 32, 32), 0.2 * (t % 2) + 0.3) for t in range(6)])
    assert torch.equal(deflicker(moving), moving)
    assert deflicker(jittered, DeflickerSettings(strength=0)) is jittered  # strength 0: off


@pytest.mark.parametrize("sizes", [(1,) * 12, (3, 5, 4), (12,)])
def test_streaming_in_chunks_gives_the_whole_clip_filter(sizes):
    _, jittered = _still_and_jittered()
    jittered[6:] = 1 - jittered[6:]  # a cut in the middle: the filter lets go there
    whole = deflicker(jittered)
    steady, out, start = Deflicker(), [], 0
    for size in sizes:
        out.append(steady(jittered[start:start + size]))
        start += size
    torch.testing.assert_close(torch.cat(out), whole, atol=STREAM_ATOL, rtol=0)
    # N clips together are each clip on its own, and reset() starts a new video
    other = _still_and_jittered(seed=1)[1]
    together = deflicker(torch.stack([jittered, other]))
    torch.testing.assert_close(together[1], deflicker(other), atol=STREAM_ATOL, rtol=0)
    steady.reset()
    torch.testing.assert_close(steady(other), deflicker(other), atol=STREAM_ATOL, rtol=0)


def test_it_keeps_the_frames_dtype():
    _, jittered = _still_and_jittered(4)
    out = deflicker(jittered.bfloat16())
    assert out.dtype == torch.bfloat16
    # computed in fp32 and rounded once: within bf16's half-ulp (2^-9 relative) of the fp32 result on bf16 input
    torch.testing.assert_close(out.float(), deflicker(jittered.bfloat16().float()), atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("settings,flag", [
    ({"strength": 1.0}, "--deflicker-strength"), ({"strength": -0.1}, "--deflicker-strength"),
    ({"strength": float("nan")}, "--deflicker-strength"), ({"threshold": 0.0}, "--deflicker-threshold"),
    ({"threshold": float("inf")}, "--deflicker-threshold"), ({"window": 4}, "window must be an odd"),
    # fp32 rounds 1e-300 to 0, where an unchanged pixel would be 0/0 = NaN, blamed on the decoder
    ({"threshold": 1e-300}, "at least 1e-06"), ({"threshold": True}, "--deflicker-threshold"),
    ({"strength": False}, "--deflicker-strength"), ({"window": True}, "window must be an odd"),
    ({"strength": torch.tensor([0.5])}, "--deflicker-strength"), ({"strength": torch.tensor(True)}, "strength"),
    ({"threshold": torch.tensor(0.0)}, "--deflicker-threshold"),
])
def test_bad_settings_are_refused_naming_the_flag(settings, flag):
    with pytest.raises(UsageError, match=flag):
        DeflickerSettings(**settings)


def test_bad_frames_and_a_switched_video_are_refused():
    from fastdec.errors import InputTypeError, NonFiniteOutputError

    with pytest.raises(UsageError, match=r"RGB frames shaped"):
        deflicker(torch.zeros(4, 4, 8, 8))
    with pytest.raises(InputTypeError, match=r"float frames in \[0, 1\], got torch.uint8"):
        deflicker(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(UsageError, match="zero size"):
        deflicker(torch.zeros(4, 3, 0, 8))
    spoiled = torch.rand(4, 3, 8, 8)
    spoiled[1, 0, 2, 2] = float("nan")  # it would spread through the 5x5 box into every later frame
    with pytest.raises(NonFiniteOutputError, match="NaN or inf"):
        deflicker(spoiled)
    for not_settings in ({"strength": 0.5}, 0.5):
        with pytest.raises(InputTypeError, match="DeflickerSettings"):
            Deflicker(not_settings)
    steady = Deflicker()
    # an empty push (a stream pushed 0 latent frames returns (1, 0, 3, H, W)) stays empty and keeps no state
    assert steady(torch.zeros(1, 0, 3, 8, 8)).shape == (1, 0, 3, 8, 8) and steady.previous is None
    steady(torch.zeros(2, 3, 8, 8))
    with pytest.raises(UsageError, match=r"call reset\(\) between videos"):
        steady(torch.zeros(2, 3, 16, 16))
    assert as_deflicker_settings(True) == DeflickerSettings() and as_deflicker_settings(None) is None
    with pytest.raises(UsageError, match="deflicker must be"):
        as_deflicker_settings(0.5)


# ----------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("kind", ["causal", "image"])
def test_decode_video_deflickers_what_it_decodes(tmp_path, kind, monkeypatch, capsys):
    from fastdec.decode import video as decode_video_module
    from fastdec.decode.video import decode_stream

    decoder = _tiny(kind)
    ckpt = save_decoder(decoder, tmp_path / "dec.safetensors")
    torch.manual_seed(1)
    z = torch.randn(1, 9, 4, 8, 8) * 0.5
    settings = DeflickerSettings(strength=0.9, threshold=0.05)
    chunks = lambda: (z[:, i:i + 2] for i in range(0, 9, 2))  # noqa: E731
    streamed = torch.cat(list(decode_stream(decoder, chunks(), deflicker=settings)))
    plain = torch.cat(list(decode_stream(decoder, chunks())))
    torch.testing.assert_close(streamed, deflicker(plain, settings), atol=STREAM_ATOL, rtol=0)
    # it did something: the random decoder's frames barely change, and the filter holds them steadier still
    assert (streamed[1:] - streamed[:-1]).abs().mean() < 0.5 * (plain[1:] - plain[:-1]).abs().mean()
    # what the command hands the video writer (H.264's 8 bits would hide differences this small)
    handed, write = [], decode_video_module.VideoWriter.write
    monkeypatch.setattr(decode_video_module.VideoWriter, "write",
                        lambda self, frames: handed.append(frames.clone()) or write(self, frames))
    torch.save(z[0], tmp_path / "lat.pt")
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(tmp_path / "lat.pt"), "--decoder", str(ckpt), "--out", str(out), "--chunk", "2",
                 "--deflicker-strength", "0.9", "--deflicker-threshold", "0.05", "--quiet"]) == 0
    assert "deflicker strength 0.9 threshold 0.05" in capsys.readouterr().err
    # the same fp32 weights, latents and filter, but the command runs the convs channels_last: other kernels,
    # a few fp32 ulps per layer on values in [0, 1]
    torch.testing.assert_close(torch.cat(handed), streamed, atol=1e-5, rtol=0)
    assert read_video(out).shape == (9, 3, 64, 64)


def test_decode_video_refuses_bad_deflicker_settings_before_decoding(tmp_path, capsys):
    ckpt = save_decoder(_tiny("image"), tmp_path / "dec.safetensors")
    torch.save(torch.randn(3, 4, 8, 8), tmp_path / "lat.pt")
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(tmp_path / "lat.pt"), "--decoder", str(ckpt), "--out", str(out),
                 "--deflicker-strength", "1"]) == 2
    assert "(--deflicker-strength) must be in [0, 1) (0 is off; the flag takes (0, 1)), got 1.0" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))  # nothing, not even a temporary file
    # 0 implied --deflicker and then held nothing (in eval video, NAME+deflicker rows equal to NAME's)
    assert main(["decode-video", str(tmp_path / "lat.pt"), "--decoder", str(ckpt), "--out", str(out),
                 "--deflicker-strength", "0"]) == 2
    assert "--deflicker-strength 0 holds nothing" in capsys.readouterr().err
    assert not out.exists()


def test_settings_take_numpy_numbers_and_torch_scalars_as_plain_floats():
    # np.float32(0.5) is no float subclass: "must be in [0, 1) ... got np.float32(0.5)"
    settings = DeflickerSettings(strength=np.float32(0.5), threshold=np.float64(0.05))
    assert type(settings.strength) is float and settings.strength == 0.5 and type(settings.threshold) is float
    # a strength computed in torch is a 0-dim tensor: it was refused as "must be in [0, 1)"
    assert DeflickerSettings(strength=torch.tensor(0.5), threshold=torch.tensor(0.05, dtype=torch.float64)) == settings
    frames = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(deflicker(frames, settings), deflicker(frames, DeflickerSettings(0.5, 0.05)))


def test_eval_video_refuses_a_deflicker_that_holds_nothing(tmp_path):
    from fastdec.eval.run import evaluate_video

    with pytest.raises(ValueError, match="deflicker strength 0 holds nothing, so each NAME\\+deflicker row would equal"):
        evaluate_video(tmp_path / "videos", ["flux2-turbo"], teacher="t.pth", out=tmp_path / "out",
                       deflicker=DeflickerSettings(strength=0))
    # "no" is truthy: tOF was computed, and the report said tof_enabled 'no'
    with pytest.raises(TypeError, match="evaluate_video's tof must be True or False, got 'no'"):
        evaluate_video(tmp_path / "videos", ["flux2-turbo"], teacher="t.pth", out=tmp_path / "out", tof="no")
    assert not (tmp_path / "out").exists()


def test_eval_video_scores_each_decoder_deflickered_beside_it(tmp_path, taef2_encoder_path, make_decoder,
                                                               one_thread):
    from fastdec.eval.run import load_clip, load_eval_teacher

    videos = tmp_path / "videos"
    _write_clips(videos)
    a = save_decoder(make_decoder("tae-64", "flux2"), tmp_path / "a.safetensors")
    out = tmp_path / "out"
    assert main(["eval", "video", "--data", str(videos), "--teacher", str(taef2_encoder_path), "--decoder", str(a),
                 "--frames", "4", "--latent-noise", "0.3", "--deflicker-threshold", "0.05", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["decoders"]) == ["a", "a+deflicker"]
    assert report["settings"]["deflicker"] == {"strength": 0.9, "threshold": 0.05, "window": 5}
    assert report["decoders"]["a+deflicker"]["vs_baseline"]["baseline"] == "a"  # paired against its own decode
    assert "NAME+deflicker: NAME's decode deflickered (fastdec.runtime.deflickering: strength 0.9, threshold 0.05" \
        in (out / "report.md").read_text()
    # what a user gets by hand: the jittered latents decoded, then deflickered
    from fastdec import load_decoder
    from fastdec.eval.run import jitter_latents

    teacher, decoder = load_eval_teacher(str(taef2_encoder_path)), load_decoder(a)
    clip = load_clip(videos / "still", 4, None, 8)
    with torch.no_grad():
        decoded = decoder(jitter_latents(teacher.encode(clip), 0.3, "still"))
    steadied = deflicker(decoded, DeflickerSettings(threshold=0.05))
    rows = {r["video"]: r for r in report["decoders"]["a+deflicker"]["clips"]}
    # the same fp32 latents, weights and filter: 1e-6 of flicker and 1e-4 dB cover float reordering
    assert rows["still"]["flicker"] == pytest.approx(M.flicker_score(steadied, clip), abs=1e-6)
    assert rows["still"]["psnr"] == pytest.approx(float(M.psnr(steadied, clip).mean()), abs=1e-4)
    plain = {r["video"]: r for r in report["decoders"]["a"]["clips"]}
    assert rows["still"]["flicker"] < plain["still"]["flicker"]  # a still clip's jitter is what it removes


def test_bench_video_times_streaming_with_deflicker_beside_streaming(tmp_path, monkeypatch):
    """--deflicker adds a streaming+deflicker row per push size, and that row runs the filter on every push."""
    import fastdec.runtime.deflickering as module
    from fastdec.bench.video import STREAMING_DEFLICKER, _mode_call

    out = tmp_path / "video.json"
    assert main(["bench", "--video", "--sizes", "32", "--video-frames", "4", "--baselines", "none", "--no-memory",
                 "--decoders", "tae-causal-64", "--push-frames", "2", "--deflicker", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted((r["mode"], r["push_frames"]) for r in report["rows"]) == [
        ("parallel", None), ("streaming", 2), (STREAMING_DEFLICKER, 2)]
    assert report["settings"]["deflicker"] is True
    filtered = []
    monkeypatch.setattr(module.Deflicker, "__call__", lambda self, frames: filtered.append(frames.shape[1]))

    class Stream:
        def stream(self):
            return self

        def push(self, z):
            return torch.zeros(1, z.shape[1], 3, 8, 8)

    _mode_call(Stream(), STREAMING_DEFLICKER, push=3)(torch.zeros(1, 7, 4, 1, 1))
    assert filtered == [3, 3, 1]
    _mode_call(Stream(), "streaming", push=3)(torch.zeros(1, 7, 4, 1, 1))
    assert filtered == [3, 3, 1]  # plain streaming does not filter


@pytest.mark.parametrize("video", [True, False])
def test_fast_vae_deflickers_each_decoded_clip(video):
    """enable_deflicker: every clip of a ``decode(..., num_frames=T)`` call filtered on its own, for a video
    decoder and for an image decoder decoding a pipeline's frames; frames without num_frames are left alone."""
    import pipeline_fixtures as pf
    from fastdec.errors import InputTypeError, PipelineError
    from fastdec.pipelines import FastVAE

    decoder = pf.MeanMixVideoDecoder.random("svd") if video else pf.tiny_decoder("svd")
    fast = FastVAE.from_decoder(decoder, vae=pf.svd_vae())
    torch.manual_seed(0)
    raw = torch.randn(6, 4, 4, 4)
    settings = DeflickerSettings(strength=0.9, threshold=0.5)  # random decoders: a threshold they cross rarely
    with torch.no_grad():
        plain = fast.decode(raw, num_frames=3).sample
        fast.enable_deflicker(settings)
        steadied = fast.decode(raw, num_frames=3).sample
        as_images = fast.decode(raw[:2]).sample
    expected = deflicker(((plain + 1) / 2).view(2, 3, *plain.shape[1:]), settings).flatten(0, 1) * 2 - 1
    # the same fp32 frames through the same filter; the [0, 1] <-> [-1, 1] round trip costs an ulp or two
    torch.testing.assert_close(steadied, expected, atol=1e-6, rtol=0)
    assert (steadied - plain).abs().max() > 1e-3  # it did something
    if not video:
        torch.testing.assert_close(as_images, plain[:2], atol=1e-6, rtol=0)  # no num_frames: images, unfiltered
        calls = []
        decoder.register_forward_hook(lambda *_: calls.append(1))
        with pytest.raises(PipelineError, match="num_frames=4"):
            fast.decode(raw, num_frames=4)
        assert calls == []  # refused before any frame was decoded
    with pytest.raises(InputTypeError, match="DeflickerSettings"):
        fast.enable_deflicker({"strength": 0.5})  # not met later as an AttributeError inside decode
    fast.disable_deflicker()
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(raw, num_frames=3).sample, plain, atol=0, rtol=0)


def test_eval_refuses_a_report_name_its_deflickered_twin_would_take(tmp_path):
    from fastdec.eval.run import evaluate_video

    # refused from the names alone: nothing is loaded (t.pth and the decoders do not exist)
    with pytest.raises(UsageError, match=r"rename 'b\+deflicker'"):
        evaluate_video(tmp_path, ["b.safetensors", "b+deflicker.safetensors"], teacher="t.pth", deflicker=True)
    with pytest.raises(UsageError, match="deflicker must be"):
        evaluate_video(tmp_path, ["b.safetensors"], teacher="t.pth", deflicker="yes")

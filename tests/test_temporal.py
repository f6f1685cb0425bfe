"""Video decoders: causal streaming == parallel, start == image decoder, flat streaming memory, temporal chunks."""
from __future__ import annotations

import pytest
import torch

from factories import tiny_decoder
from fastdec.checkpoints import load_decoder, save_decoder
from fastdec.errors import UsageError
from fastdec.models import create_decoder, list_decoders
from fastdec.models.causal import CausalTAEDecoder, MemBlock
from fastdec.models.temporal import TemporalTAEConfig, TemporalTAEDecoder, chunk_windows

# Width 16, one block per stage: small enough for a shared 2-core CPU, deep enough to carry state.
TINY = dict(width=16)

# Separately built modules doing the same maths, or the same module on other batch shapes (stream pushes vs
# the whole clip, windows vs clips, channels_last): the CPU kernels pick other blockings, so fp32 sums run in
# other orders. That costs a few 1e-6 relative per conv layer (fp32 unit roundoff 6e-8 times the sqrt of a
# 9 * 192 fan-in), over the ~35 conv layers of tae-causal-192 up to ~1e-4 on outputs of order 1 (1.13e-5 was
# measured on an AMD EPYC, 0 to 3e-8 on Intel). Every effect the tests look for (memory, attention, a
# wrong state hand-over) is 30x or more larger.
FP32_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_memory(decoder: CausalTAEDecoder, std: float) -> CausalTAEDecoder:
    # Fresh memory convs are zero: without this the streaming tests could not see a broken state hand-over.
    for block in decoder.modules():
        if isinstance(block, MemBlock):
            torch.nn.init.normal_(block.memory.weight, std=std)
    return decoder


def _tiny_causal(seed: int = 0, memory_std: float = 0.1) -> CausalTAEDecoder:
    return _randomise_memory(tiny_decoder("tae-causal-64", "sd15", seed=seed, **TINY), memory_std)


def _tiny_temporal(**overrides) -> TemporalTAEDecoder:
    config = {**TINY, "head_dim": 8, "chunk_size": 4, "chunk_overlap": 1, **overrides}
    decoder = tiny_decoder("tae-temporal-192", "sd15", **config)
    torch.nn.init.normal_(decoder.temporal_mid.out.weight, std=0.5)
    return decoder


def test_presets_registered_and_shapes():
    assert {"tae-temporal-192", "tae-causal-64", "tae-causal-192"} <= set(list_decoders(video=True))
    assert not {"tae-temporal-192", "tae-causal-64"} & set(list_decoders(video=False))
    z = torch.randn(1, 3, 4, 2, 2)
    for name in ("tae-causal-64", "tae-temporal-192"):
        decoder = create_decoder(name, "svd").eval()
        assert decoder.is_video and decoder.upsample_factor == 8
        with torch.no_grad():
            rgb = decoder(z)
        assert rgb.shape == (1, 3, 3, 16, 16)
        assert rgb.min() >= 0 and rgb.max() <= 1
    # FLUX.2 space: the causal decoder keeps TAEF2's GroupNorm branch so TAEF2 weights fit
    assert create_decoder("tae-causal-64", "flux2").config.use_midblock_gn


@pytest.mark.parametrize("use_gn", [False, True])
def test_causal_from_image_decoder_equals_image_decoder(use_gn, make_decoder):
    image = make_decoder("tae-64", "sd15", seed=1, use_midblock_gn=use_gn, **TINY)
    causal = CausalTAEDecoder.from_image_decoder(image).eval()
    z = torch.randn(2, 5, 4, 6, 7)
    with torch.no_grad():
        expected = image(z.flatten(0, 1)).unflatten(0, (2, 5))
        torch.testing.assert_close(causal(z), expected, atol=FP32_ATOL, rtol=0)
        stream = causal.stream()
        streamed = torch.cat([stream.push(z[:, t]) for t in range(5)], dim=1)
        torch.testing.assert_close(streamed, expected, atol=FP32_ATOL, rtol=0)
        # the bound can fail: a causal decoder with its own random start is far off
        assert (make_decoder("tae-causal-64", "sd15", seed=2, **TINY)(z) - expected).abs().max() > 1e-2


def test_from_image_decoder_rejects_other_decoders():
    with pytest.raises(TypeError, match="TAE image decoder"):
        CausalTAEDecoder.from_image_decoder(_tiny_causal())


def _check_streaming_equals_parallel(decoder, z, split):
    with torch.no_grad():
        parallel = decoder(z)
        stream = decoder.stream()
        pieces, t = [], 0
        for k in split:
            pieces.append(stream.push(z[:, t : t + k]))
            t += k
        streamed = torch.cat(pieces, dim=1)
        independent = torch.cat([decoder(z[:, t : t + 1]) for t in range(z.shape[1])], dim=1)
    assert stream.frames_decoded == z.shape[1]
    torch.testing.assert_close(streamed, parallel, atol=FP32_ATOL, rtol=0)
    # the memory branch is live: a stream that lost its state (each frame with no past) is far off
    assert (independent[:, 1:] - parallel[:, 1:]).abs().max() > 30 * FP32_ATOL


@pytest.mark.parametrize("split", [[1] * 7, [3, 3, 1], [7], [2, 5]], ids=["1-at-a-time", "threes", "all", "2+5"])
def test_streaming_equals_parallel(split):
    _check_streaming_equals_parallel(_tiny_causal(), torch.randn(2, sum(split), 4, 3, 4), split)


@pytest.mark.parametrize("name", ["tae-causal-64", "tae-causal-192"])
def test_streaming_equals_parallel_presets(name):
    torch.manual_seed(0)
    decoder = _randomise_memory(create_decoder(name, "sd15").eval(), 0.02)
    # 2x2 latents keep the full-width presets cheap on a shared 2-core CPU
    _check_streaming_equals_parallel(decoder, torch.randn(1, 4, 4, 2, 2), [1, 2, 1])


def test_causal_depends_on_past_not_future():
    decoder = _tiny_causal()
    z = torch.randn(1, 6, 4, 4, 4)
    perturbed = z.clone()
    perturbed[:, 3] += 1.0
    with torch.no_grad():
        a, b = decoder(z), decoder(perturbed)
    # frames before 3 never see frame 3 (the same module on inputs of the same shape: exact)
    assert torch.equal(a[:, :3], b[:, :3])
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3  # frame 4 does, through memory


def test_stream_state_is_one_frame_per_block_and_resets():
    decoder = _tiny_causal()
    stream = decoder.stream()
    z = torch.randn(1, 20, 4, 4, 4)
    with torch.no_grad():
        first = stream.push(z[:, :1])
        one_frame = stream.state_bytes()
        for t in range(1, 20):
            stream.push(z[:, t])
        # one block per resolution (4, 8, 16, 32 px), 16 channels of fp32
        assert stream.state_bytes() == one_frame == 16 * 4 * (4 * 4 + 8 * 8 + 16 * 16 + 32 * 32)
        stream.reset()
        assert torch.equal(stream.push(z[:, :1]), first)


def test_a_stream_follows_its_decoder_to_another_dtype():
    """A .bfloat16() between pushes met the fp32 features: torch's "expected scalar type" error."""
    torch.manual_seed(0)
    decoder = _randomise_memory(_tiny_causal(), 0.05)
    z = torch.randn(1, 4, 4, 3, 4)
    with torch.no_grad():
        reference = decoder(z)
        stream = decoder.stream()
        first = stream.push(z[:, :2])
        rest = decoder.bfloat16() and stream.push(z[:, 2:])
    assert rest.dtype == torch.bfloat16 and all(s.dtype == torch.bfloat16 for s in stream.state)
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); a few layers of it on [0, 1] RGB stay within 0.05,
    # while a stream that lost its features is far further off (test_streaming_equals_parallel)
    torch.testing.assert_close(rest.float(), reference[:, 2:], atol=0.05, rtol=0)
    torch.testing.assert_close(first, reference[:, :2], atol=FP32_ATOL, rtol=0)


def test_stream_rejects_bad_pushes():
    stream = _tiny_causal().stream()
    with torch.no_grad():
        stream.push(torch.randn(2, 4, 4, 4))  # one frame, 2 clips
        with pytest.raises(UsageError, match="clip"):
            stream.push(torch.randn(1, 4, 4, 4))
        with pytest.raises(UsageError, match="size changed"):
            stream.push(torch.randn(2, 1, 4, 8, 8))
        with pytest.raises(UsageError, match="latent channels|channels"):
            stream.push(torch.randn(2, 1, 16, 4, 4))


def test_stream_checks_frame_size_without_a_latent_resolution_block(make_decoder):
    # no block at the latent resolution: the first memory state is at 2x; the size check must not use it
    stream = make_decoder("tae-causal-64", "sd15", stage_blocks=(0, 1, 1)).stream()
    with torch.no_grad():
        stream.push(torch.randn(1, 4, 3, 5))
        assert stream.push(torch.randn(1, 4, 3, 5)).shape == (1, 1, 3, 24, 40)
        with pytest.raises(UsageError, match="size changed"):
            stream.push(torch.randn(1, 4, 6, 10))


def test_video_decoder_input_errors():
    decoder = _tiny_causal()
    with pytest.raises(UsageError, match="add a time dimension"):
        decoder(torch.randn(3, 4, 4, 4))
    with pytest.raises(UsageError, match="NaN"):
        decoder(torch.full((1, 2, 4, 4, 4), float("nan")))


def _peak_bytes_build(mode: str, frames: int):
    """Builder for fastdec.bench.peak_memory (runs in a fresh process): one whole-video decode."""
    decoder = _tiny_causal()
    z = torch.randn(1, frames, 4, 16, 16)  # 128 x 128 frames: ~1 MB per 16-channel full-resolution activation

    def run():
        if mode == "parallel":
            return decoder(z)
        stream = decoder.stream()
        for t in range(frames):
            stream.push(z[:, t])

    return run


def test_streaming_peak_memory_is_flat_in_frame_count():
    from fastdec.bench import peak_memory

    builder = f"{__name__}:_peak_bytes_build"

    def mb(mode, frames):
        stats = peak_memory(builder, dict(mode=mode, frames=frames), threads=1, warm_calls=1, timeout=300)
        assert stats.error is None, stats.error
        return stats.peak_mb

    from concurrent.futures import ThreadPoolExecutor

    # each probe is its own process, mostly waiting for a core on a shared machine: run them side by side
    with ThreadPoolExecutor(3) as pool:
        stream_8, stream_64, parallel_32 = pool.map(
            lambda job: mb(*job), [("streaming", 8), ("streaming", 64), ("parallel", 32)]
        )
    # the probe does see memory that grows with frames (parallel holds every frame's activations: ~200 MB)...
    assert parallel_32 - stream_8 > 40, (stream_8, parallel_32)
    # ...and streaming 56 more frames costs less than 4 frames' worth of that. Keeping the frames would cost 56
    # frames' worth (~360 MB); measured: 4-9 MB, allocator noise that a fixed few-MB bound tripped on now and then
    per_frame = (parallel_32 - stream_8) / 24
    assert stream_64 - stream_8 < 4 * per_frame, (stream_8, stream_64, per_frame)


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5, 8, 9, 10, 17, 33])
@pytest.mark.parametrize("chunk_size,overlap", [(4, 1), (8, 2), (5, 0), (3, 1), (8, 3)])
def test_chunk_windows_cover_every_frame_once_with_context(num_frames, chunk_size, overlap):
    windows = chunk_windows(num_frames, chunk_size, overlap)
    kept = [t for w in windows for t in range(w.keep_start, w.keep_stop)]
    assert kept == list(range(num_frames))
    for w in windows:
        assert 0 <= w.start <= w.keep_start < w.keep_stop <= w.stop <= num_frames
        assert w.stop - w.start == min(chunk_size, num_frames)
        # every kept frame has `overlap` context frames on both sides unless the clip ends first
        assert w.keep_start - w.start >= min(overlap, w.keep_start)
        assert w.stop - w.keep_stop >= min(overlap, num_frames - w.keep_stop)


def test_chunk_windows_rejects_impossible_overlap():
    with pytest.raises(UsageError, match="chunk_size >= 2"):
        chunk_windows(10, 4, 2)
    with pytest.raises(UsageError, match="chunk_size=4, overlap=2"):
        TemporalTAEConfig(chunk_size=4, chunk_overlap=2)


def test_temporal_block_mixes_frames_within_a_chunk():
    decoder = _tiny_temporal(chunk_size=8)
    z = torch.randn(1, 6, 4, 4, 4)
    perturbed = z.clone()
    perturbed[:, 0] += 1.0
    with torch.no_grad():
        a, b = decoder(z), decoder(perturbed)
    # frame 5 sees frame 0 through temporal attention (a pure per-frame decoder would give exactly 0 here)
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-4


def test_temporal_starts_as_image_decoder(make_decoder):
    image = make_decoder("tae-64", "sd15", seed=2, **TINY)
    temporal = TemporalTAEDecoder.from_image_decoder(image, head_dim=8, chunk_size=4, chunk_overlap=1).eval()
    z = torch.randn(1, 9, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(temporal(z), image(z[0])[None], atol=FP32_ATOL, rtol=0)


def test_chunked_decode_uses_each_windows_context():
    chunked = _tiny_temporal(chunk_size=4, chunk_overlap=1)
    whole = _tiny_temporal(chunk_size=64, chunk_overlap=1)
    z = torch.randn(1, 11, 4, 4, 4)
    with torch.no_grad():
        out = chunked(z)
        assert out.shape[1] == 11
        # each kept frame equals decoding its window alone (context included) and taking that frame
        for w in chunked.windows(11):
            alone = whole(z[:, w.start : w.stop])
            k0, k1 = w.keep_start - w.start, w.keep_stop - w.start
            torch.testing.assert_close(out[:, w.keep_start : w.keep_stop], alone[:, k0:k1], atol=FP32_ATOL, rtol=0)
        # when one chunk covers the clip, chunked decoding is one full-clip decode
        short = z[:, :4]
        torch.testing.assert_close(chunked(short), whole(short), atol=FP32_ATOL, rtol=0)
        # the window's context matters: the middle window decoded with no context frames is far off
        w = chunked.windows(11)[1]
        no_context = whole(z[:, w.keep_start : w.keep_stop])
        assert (no_context - out[:, w.keep_start : w.keep_stop]).abs().max() > 30 * FP32_ATOL
        # decode_chunks yields the same frames, in order, window by window (same module, same windows: exact)
        firsts, parts = zip(*chunked.decode_chunks(z))
        assert list(firsts) == [w.keep_start for w in chunked.windows(11)]
        torch.testing.assert_close(torch.cat(parts, dim=1), out, atol=0, rtol=0)


@pytest.mark.parametrize("make", [_tiny_causal, _tiny_temporal])
def test_video_decoders_round_trip_through_checkpoints(tmp_path, make):
    decoder = make()
    path = save_decoder(decoder, tmp_path / "video.safetensors")
    loaded = load_decoder(path).eval()
    assert type(loaded) is type(decoder) and loaded.config == decoder.config
    state, loaded_state = decoder.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    z = torch.randn(1, 5, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), decoder(z), atol=FP32_ATOL, rtol=0)


def test_bench_video_end_to_end_json(tmp_path):
    """`fastdec bench --video` on a tiny size: SVD baseline and both causal modes, speed-ups from one run."""
    import json

    from fastdec.cli import main

    out = tmp_path / "video.json"
    code = main(["bench", "--video", "--sizes", "32", "--video-frames", "2", "--decoders", "tae-causal-64",
                 "--repeats", "1", "--svd-repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {(r["name"], r["mode"]): r for r in report["rows"]}
    assert {("tae-causal-64", "parallel"), ("tae-causal-64", "streaming")} <= set(rows)
    svd = next(r for r in report["rows"] if r["name"] == "svd-vae")
    # the reference is a median of --svd-repeats timed calls, and the settings say so
    assert svd["runs"] == 2 and rows[("tae-causal-64", "parallel")]["runs"] == 1
    assert report["settings"]["svd_repeats"] == 2
    for row in rows.values():
        assert row["per_frame_s"] > 0
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
    streaming = rows[("tae-causal-64", "streaming")]
    assert streaming["speedup"] == pytest.approx(svd["per_frame_s"] / streaming["per_frame_s"], rel=1e-3)


def test_bench_video_dtypes_and_channels_last_compare_like_for_like(tmp_path):
    """Several dtypes and --channels-last: SVD runs in both layouts, speed-ups use its faster one, per dtype."""
    import json

    from fastdec.cli import main

    out = tmp_path / "video.json"
    code = main(["bench", "--video", "--sizes", "32", "--video-frames", "2", "--decoders", "tae-causal-64",
                 "--dtype", "fp32", "bf16", "--channels-last", "--no-memory",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    svd = {(r["dtype"], r["channels_last"]): r for r in rows if r["name"] == "svd-vae"}
    assert set(svd) == {(d, cl) for d in ("fp32", "bf16") for cl in (False, True)}
    ours = [r for r in rows if r["name"] == "tae-causal-64"]
    assert {(r["dtype"], r["mode"]) for r in ours} == {(d, m) for d in ("fp32", "bf16") for m in ("parallel", "streaming")}
    for r in ours:
        assert r["channels_last"] is True
        fastest = {d: min(svd[d, False]["per_frame_s"], svd[d, True]["per_frame_s"]) for d in ("fp32", "bf16")}
        assert r["speedup"] == pytest.approx(fastest["fp32"] / r["per_frame_s"], rel=1e-6)
        assert r["speedup_same_dtype"] == pytest.approx(fastest[r["dtype"]] / r["per_frame_s"], rel=1e-6)


def test_channels_last_causal_decoder_gives_the_same_frames():
    """optimize(channels_last=True) on a video decoder: NHWC conv weights, same frames in parallel and streaming."""
    from fastdec.runtime import optimize

    decoder = _tiny_causal()
    z = torch.randn(1, 5, 4, 4, 4)
    with torch.inference_mode():
        reference = decoder(z)
        fast = optimize(decoder, channels_last=True, compile=False)
        convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        stream = fast.stream()
        streamed = torch.cat([stream.push(z[:, t]) for t in range(z.shape[1])], dim=1)
        torch.testing.assert_close(fast(z), reference, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(streamed, reference, atol=FP32_ATOL, rtol=0)


def test_bench_video_compile_backend_rows(tmp_path, monkeypatch):
    """--backends eager compile: compiled rows for the causal modes (the chunked temporal mode stays eager)."""
    import json

    from fastdec.cli import main

    compiled = []

    def fake_compile(fn, **kwargs):  # inductor's compile time is not what this test is about
        compiled.append(getattr(fn, "__name__", None))
        return fn

    resets = []
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(compiled)))
    out = tmp_path / "video.json"
    code = main(["bench", "--video", "--sizes", "32", "--video-frames", "2", "--baselines", "none", "--no-memory",
                 "--decoders", "tae-causal-64", "tae-temporal-192", "--backends", "eager", "compile",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    rows = {(r["name"], r["mode"], r["backend"]) for r in json.loads(out.read_text())["rows"]}
    assert rows == {("tae-causal-64", m, b) for m in ("parallel", "streaming") for b in ("eager", "compile")} | {
        ("tae-temporal-192", "chunked", "eager")}
    assert "run_frames" in compiled  # the streaming step, not only forward
    # each compiled row empties Dynamo's cache before it compiles: graphs of earlier rows count towards
    # recompile_limit, past which Dynamo would run the row eagerly
    assert len(resets) == 2 and resets[0] < resets[1] == len(compiled) - 2
    assert main(["bench", "--video", "--backends", "onnx"]) == 2
    assert main(["bench", "--video", "--svd-repeats", "0"]) == 2


def test_causal_turbo_starts_equal_to_tae_turbo_and_streams_what_it_decodes():
    """tae-causal-turbo: tae-turbo's per-stage widths and pixel-shuffle head with memory blocks (flux2-video-turbo)."""
    image = tiny_decoder("tae-turbo", "sd15", widths=(16, 8, 8, 8), seed=3).eval()
    video = CausalTAEDecoder.from_image_decoder(image).eval()
    assert video.config.head == "pixel_shuffle" and video.config.stage_widths == (16, 8, 8, 8)
    preset = create_decoder("tae-causal-turbo", "flux2")
    assert preset.config.stage_widths == (128, 64, 48, 32) and preset.config.head == "pixel_shuffle"
    z = torch.randn(1, 5, 4, 6, 7)
    with torch.no_grad():
        assert (video(z)[0] - image(z[0])).abs().max() <= FP32_ATOL  # zero memory: the image decoder per frame
        _randomise_memory(video, 0.1)
        whole = video(z)
        stream = video.stream()
        pushed = torch.cat([stream.push(z[:, t: t + 1]) for t in range(5)], dim=1)
    assert whole.shape == (1, 5, 3, 48, 56)
    assert (whole - pushed).abs().max() <= FP32_ATOL
    assert (whole[0] - image(z[0])).abs().max() > 1e-3  # the memory is live: the stream check can fail


def test_bench_video_push_frames_gives_one_streaming_row_per_push_size(tmp_path, capsys):
    """--push-frames 1 3: a streaming row per push size (the parallel row once), each pushing that many frames."""
    import json

    from fastdec.bench.video import _mode_call
    from fastdec.cli import main

    out = tmp_path / "video.json"
    code = main(["bench", "--video", "--sizes", "32", "--video-frames", "5", "2", "--baselines", "none",
                 "--no-memory", "--decoders", "tae-causal-64", "--push-frames", "1", "3", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    # a 2-frame clip goes in one push of 2, and its row says 2, not 3
    assert sorted((r["frames"], r["mode"], r["push_frames"]) for r in report["rows"]) == [
        (2, "parallel", None), (2, "streaming", 1), (2, "streaming", 2),
        (5, "parallel", None), (5, "streaming", 1), (5, "streaming", 3)]
    assert report["settings"]["push_frames"] == [1, 3]

    class Recorder:
        def __init__(self):
            self.pushed = []

        def stream(self):
            return self

        def push(self, z):
            self.pushed.append(z.shape[1])

    recorder = Recorder()
    _mode_call(recorder, "streaming", push=3)(torch.zeros(1, 8, 4, 2, 2))
    assert recorder.pushed == [3, 3, 2]  # the last push holds what is left
    assert main(["bench", "--video", "--push-frames", "0"]) == 2
    for flag in ("--video-frames", "--svd-frames", "--svd-chunk"):
        assert main(["bench", "--video", flag, "-4"]) == 2
        assert f"{flag} must be >= 1 (a number of latent frames), got -4" in capsys.readouterr().err

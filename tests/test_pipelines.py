"""fastdec in diffusers pipelines: FastVAE, swap_decoder/restore_decoder, PreviewCallback.

Every pipeline is tiny, random and built offline (tests/pipeline_fixtures.py); the VAEs keep the real latent
channels, scaling factors and 8x factor. The central check: what the pipeline returns equals decoding its final
latents (captured by a step callback) with the fast decoder and the pipeline's own post-processing.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import fastdec
from fastdec.errors import PipelineError
from fastdec.pipelines import FastVAE, PreviewCallback, detect_latent_space, restore_decoder, swap_decoder

import pipeline_fixtures as pf

NAMES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "svd"]  # flux2 = Flux2KleinPipeline
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def call_kwargs(name: str, steps: int = 2, height: int = SIZE, width: int = SIZE, **extra) -> dict:
    kwargs = dict(height=height, width=width, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    if name == "svd":
        image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        kwargs.update(image=image, num_frames=3, decode_chunk_size=2)
    elif name == "flux2dev":
        kwargs["prompt_embeds"] = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    else:
        kwargs["prompt"] = "a dog"
        if name in ("sd3", "flux1", "flux2"):
            kwargs["max_sequence_length"] = 16
        if name == "flux2":
            kwargs["text_encoder_out_layers"] = (1,)
    kwargs.update(extra)
    return kwargs


def run(pipe, name: str, **kwargs) -> torch.Tensor:
    out = pipe(**call_kwargs(name, **kwargs))
    return out.frames if name == "svd" else out.images


class Capture:
    """Step callback keeping the latents of the last step (pipeline space); chains another callback."""

    def __init__(self, then=None):
        self.latents = None
        self.then = then

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.latents = callback_kwargs["latents"].clone()
        return self.then(pipe, step, timestep, callback_kwargs) if self.then else callback_kwargs


def direct_decode(pipe, name: str, latents: torch.Tensor, decoder, bn_stats=None, height=SIZE, width=SIZE):
    """The reference: pipeline-space latents -> decoder input with the pipeline's OWN unpacking helpers ->
    fast decoder -> the pipeline's own post-processing."""
    if name == "flux1":
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    elif name in ("flux2", "flux2dev"):
        h, w = height // 16, width // 16
        ids = pipe._prepare_latent_ids(torch.zeros(latents.shape[0], 1, h, w))
        extra = (h, w) if len(inspect.signature(pipe._unpack_latents_with_ids).parameters) > 2 else ()
        grid = pipe._unpack_latents_with_ids(latents, ids, *extra)
        mean, var, eps = bn_stats
        grid = grid * torch.sqrt(var.view(1, -1, 1, 1) + eps) + mean.view(1, -1, 1, 1)
        z = pipe._unpatchify_latents(grid)
    elif name == "svd":
        z = latents.flatten(0, 1)
    else:
        z = latents
    # not deep in the decoder's soft clamp (3 * tanh(z / 3)), so a wrong scaling would show in the pixels
    assert z.abs().mean() < 8, f"{name}: test latents saturate the decoder (mean |z| {z.abs().mean():.1f})"
    with torch.no_grad():
        image = decoder(z) * 2 - 1
    if name == "svd":
        video = image.reshape(latents.shape[0], latents.shape[1], *image.shape[1:]).permute(0, 2, 1, 3, 4)
        return pipe.video_processor.postprocess_video(video, output_type="pt")
    return pipe.image_processor.postprocess(image, output_type="pt")


@pytest.fixture(scope="module")
def swapped():
    """name -> (pipeline with a tae-64 FastVAE, the decoder, the original VAE); built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            pipe = pf.PIPELINES[name]()
            pipe.set_progress_bar_config(disable=True)
            original = pipe.vae
            decoder = pf.tiny_decoder("flux2" if name == "flux2dev" else name)
            swap_decoder(pipe, decoder)
            cache[name] = (pipe, decoder, original)
        return cache[name]

    return get


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", [*NAMES, "flux2dev"])
def test_pipeline_output_equals_direct_decode_and_previews(swapped, name):
    pipe, decoder, original = swapped(name)
    assert isinstance(pipe.vae, FastVAE) and pipe.vae.decoder is decoder
    assert pipe.vae_scale_factor == 8
    previews = []
    preview = PreviewCallback(decoder, every=1, on_preview=lambda step, images: previews.append((step, images)))
    capture = Capture(then=preview)
    output = run(pipe, name, callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"])

    bn = (original.bn.running_mean, original.bn.running_var, original.config.batch_norm_eps) if name.startswith("flux2") else None
    expected = direct_decode(pipe, name, capture.latents, decoder, bn)
    assert output.shape == expected.shape
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=0)
    assert output.std() > 0.01  # a picture, not a constant

    # the preview of the last step is the final picture (PIL rounding aside)
    assert [step for step, _ in previews] == [0, 1]
    preview_pixels = np.stack([np.asarray(im) for im in previews[-1][1]]).astype(np.int16)
    final = (output.flatten(0, 1) if name == "svd" else output).permute(0, 2, 3, 1)  # SVD: (B, F, 3, H, W)
    final_pixels = (final * 255).round().to(torch.int16).numpy()
    assert preview_pixels.shape == final_pixels.shape
    assert np.abs(preview_pixels - final_pixels).max() <= 1


def test_fast_vae_differs_from_original_vae(swapped):
    # guards the comparison above: with the original VAE back, the same latents give another picture
    pipe, decoder, _ = swapped("sd15")
    fast_output = run(pipe, "sd15")
    restore_decoder(pipe)
    try:
        original_output = run(pipe, "sd15")
    finally:
        swap_decoder(pipe, decoder)
    assert (fast_output - original_output).abs().max() > 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_pipelines(name, dtype):
    pipe = pf.PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    swap_decoder(pipe, pf.tiny_decoder(name))
    pipe.to(dtype)
    assert pipe.vae.dtype == dtype and pipe.vae.decoder.dtype == dtype
    try:
        output = run(pipe, name)
    except RuntimeError as e:  # pragma: no cover - depends on the CPU kernels of the torch build
        if "not implemented for" in str(e):
            pytest.skip(f"{dtype} op missing on this CPU build: {e}")
        raise
    assert torch.isfinite(output.float()).all()
    assert output.shape[-2:] == (SIZE, SIZE)


def test_fast_vae_casts_bf16_latents_to_its_dtype():
    vae = pf.kl_vae(16, 0.3611, 0.1159)
    fast = FastVAE.from_decoder(pf.tiny_decoder("flux1"), vae=vae)
    raw = torch.randn(1, 16, 4, 4)
    ref = fast.decode(raw).sample
    out = fast.decode(raw.to(torch.bfloat16)).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- SVD
def test_svd_frames_chunks_and_original_encoder(swapped):
    pipe, decoder, original = swapped("svd")
    calls = []
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        calls.append((z.shape[0], kwargs.get("num_frames")))
        return decode(z, *args, **kwargs)

    encodes = []
    encode = pipe.vae.encode

    def encode_spy(x, *args, **kwargs):
        result = encode(x, *args, **kwargs)
        encodes.append(result)
        return result

    pipe.vae.decode, pipe.vae.encode = spy, encode_spy
    try:
        frames = run(pipe, "svd", num_frames=3, decode_chunk_size=2)
    finally:
        del pipe.vae.decode, pipe.vae.encode
    assert frames.shape == (1, 3, 3, SIZE, SIZE)
    assert calls == [(2, 2), (1, 1)]  # decode_chunk_size honoured, num_frames passed per chunk
    # image conditioning went through the original encoder: a real latent distribution, the original's numbers
    assert len(encodes) == 1 and hasattr(encodes[0], "latent_dist")
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(pipe.vae.encode(image).latent_dist.mode(), original.encode(image).latent_dist.mode())
    state = pipe.vae.state_dict()
    assert any(k.startswith("encoder_vae.encoder.") for k in state)
    assert not any(k.startswith("encoder_vae.decoder.") for k in state)  # the original decoder is not carried


def _video_decoder(kind: str):
    if kind == "mean-mix":
        return pf.MeanMixVideoDecoder.random("svd")
    torch.manual_seed(0)
    return fastdec.create_decoder(kind, "svd").eval()  # the zoo's temporal decoders, random weights


@pytest.mark.parametrize("kind", ["mean-mix", "tae-causal-64"])
def test_svd_with_video_decoder_groups_frames_per_chunk(kind):
    pipe = pf.svd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    decoder = _video_decoder(kind)
    swap_decoder(pipe, decoder)
    capture = Capture()
    frames = run(pipe, "svd", num_frames=3, decode_chunk_size=2, callback_on_step_end=capture)
    z = capture.latents.flatten(0, 1)
    with torch.no_grad():  # the pipeline decodes chunks [0, 1] and [2], each as one clip
        rgb = torch.cat([decoder(z[:2][None])[0], decoder(z[2:][None])[0]])
        as_one_clip = decoder(z[None])[0]
    expected = pipe.video_processor.postprocess_video((rgb * 2 - 1)[None].permute(0, 2, 1, 3, 4), output_type="pt")
    torch.testing.assert_close(frames, expected, atol=1e-4, rtol=0)
    if kind == "mean-mix":
        assert (rgb - as_one_clip).abs().max() > 1e-3  # grouping matters for this decoder


def test_video_decoder_decode_contract():
    fast = FastVAE.from_decoder(pf.MeanMixVideoDecoder.random("svd"), vae=pf.svd_vae())
    raw = torch.randn(6, 4, 4, 4)
    z = fast.latent_space.vae_to_decoder(raw)
    with torch.no_grad():
        out = fast.decode(raw, num_frames=3).sample
        expected = fast.decoder(z.view(2, 3, 4, 4, 4)).flatten(0, 1) * 2 - 1
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        fast.enable_slicing()
        torch.testing.assert_close(fast.decode(raw, num_frames=3).sample, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_frames=4"):
        fast.decode(raw, num_frames=4)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", ["sd15", "flux2", "svd"])
def test_save_pretrained_round_trip(swapped, name, tmp_path):
    pipe, _, _ = swapped(name)
    before = run(pipe, name)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, FastVAE)
    assert loaded.vae.config.encoder_class == type(swapped(name)[2]).__name__
    if name == "flux2":
        torch.testing.assert_close(loaded.vae.bn.running_var, pipe.vae.bn.running_var, atol=0, rtol=0)
    after = run(loaded, name)
    # a reloaded pipeline is a separately built set of modules: the same weights, but the CPU's kernels may
    # pick other code paths for other buffers (1.8e-7 seen on an AMD EPYC). fp32 pictures after a few
    # denoising steps through ~50 layers: 1e-5 is ~100 ulps of fp32 near 1, far below one 8-bit level (4e-3)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fast_vae_save_load_alone(tmp_path):
    vae = pf.kl_vae(4, 0.13025)
    fast = FastVAE.from_decoder(pf.tiny_decoder("sdxl"), vae=vae)
    fast.save_pretrained(tmp_path)
    loaded = FastVAE.from_pretrained(tmp_path)
    raw, image = torch.randn(2, 4, 4, 4), torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # separately built modules with the same weights: fp32 kernels may differ by a few ulps (see above)
        torch.testing.assert_close(loaded.decode(raw).sample, fast.decode(raw).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
    assert loaded.latent_space == fast.latent_space


# ----------------------------------------------------------------------------- swap / restore / errors
def test_restore_decoder_gives_back_the_original():
    pipe = pf.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    original = pipe.vae
    before = run(pipe, "sd15")
    swap_decoder(pipe, pf.tiny_decoder("sd15"))
    assert pipe.config.vae == ("fastdec.pipelines", "FastVAE") or list(pipe.config.vae) == ["fastdec.pipelines", "FastVAE"]
    restore_decoder(pipe)
    assert pipe.vae is original
    torch.testing.assert_close(run(pipe, "sd15"), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no original VAE"):
        restore_decoder(pipe)


def test_swap_real_taef2_checkpoint_into_flux2(taef2_decoder_path):
    pipe = pf.flux2_klein_pipeline()
    pipe.set_progress_bar_config(disable=True)
    swap_decoder(pipe, taef2_decoder_path)  # a path: loaded with fastdec.load_decoder for the pipeline's space
    assert pipe.vae.decoder.latent_space.name == "flux2" and pipe.vae.decoder.config.use_midblock_gn
    output = run(pipe, "flux2")
    assert torch.isfinite(output).all() and output.shape == (1, 3, SIZE, SIZE)


def test_swap_twice_keeps_the_original_and_accepts_paths(tmp_path):
    pipe = pf.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    original = pipe.vae
    swap_decoder(pipe, pf.tiny_decoder("sd15", seed=1))
    path = fastdec.save_decoder(pf.tiny_decoder("sd15", seed=2), tmp_path / "dec.safetensors")
    swap_decoder(pipe, str(path))
    torch.testing.assert_close(pipe.vae.decoder.layers[1].weight, pf.tiny_decoder("sd15", seed=2).layers[1].weight)
    restore_decoder(pipe)
    assert pipe.vae is original
    with pytest.raises(fastdec.CheckpointError, match="not found"):
        swap_decoder(pipe, tmp_path / "missing.safetensors")
    # swap_decoder takes no latent space: "leave the latent space out" was no fix here
    sdxl_file = fastdec.save_decoder(pf.tiny_decoder("sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(fastdec.CheckpointError, match="decodes 'sdxl' latents, not 'sd15' .*or a pipeline whose VAE "
                                                      "has that space$"):
        swap_decoder(pipe, sdxl_file)


@pytest.mark.parametrize(
    "pipe_name, decoder_space, message",
    [
        ("sdxl", "flux1", r"decoder expects 16 channels \(flux1\), pipeline VAE has 4: use a sdxl decoder"),
        ("flux1", "sdxl", r"decoder expects 4 channels \(sdxl\), pipeline VAE has 16: use a flux1 decoder"),
        ("sd3", "flux1", r"made for flux1 latents, pipeline VAE is sd3 .*use a sd3 decoder"),
        ("sd15", "sdxl", r"made for sdxl latents, pipeline VAE is sd15"),
        ("flux2", "sana", r"decoder upsamples 32x \(sana\), pipeline VAE is 8x: use a flux2 decoder"),
    ],
)
def test_mismatched_latent_space_raises(swapped, pipe_name, decoder_space, message):
    pipe = pf.PIPELINES[pipe_name]()
    before = pipe.vae
    with pytest.raises(ValueError, match=message):
        swap_decoder(pipe, fastdec.create_decoder("tae-64", decoder_space))
    assert pipe.vae is before  # nothing half-swapped


def test_compatible_spaces_and_force():
    svd = pf.svd_pipeline()
    swap_decoder(svd, fastdec.create_decoder("tae-64", "sd15"))  # SVD latents are SD2.1 latents
    sd3 = pf.sd3_pipeline()
    swap_decoder(sd3, fastdec.create_decoder("tae-64", "flux1"), force=True)
    assert isinstance(sd3.vae, FastVAE) and sd3.vae.latent_space.scaling_factor == pytest.approx(1.5305)
    with pytest.raises(ValueError, match="expects 4 channels"):
        swap_decoder(pf.sd3_pipeline(), fastdec.create_decoder("tae-64", "sdxl"), force=True)


def test_svd_needs_its_encoder():
    with pytest.raises(ValueError, match="keep_encoder=True"):
        swap_decoder(pf.svd_pipeline(), pf.tiny_decoder("svd"), keep_encoder=False)


def test_fast_vae_without_encoder_says_so():
    pipe = pf.sd15_pipeline()
    swap_decoder(pipe, pf.tiny_decoder("sd15"), keep_encoder=False)
    assert not pipe.vae.has_encoder
    assert not any(k.startswith("encoder_vae") for k in pipe.vae.state_dict())
    with pytest.raises(RuntimeError, match="keep_encoder=True"):
        pipe.vae.encode(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    "vae_factory, space",
    [
        (lambda: pf.kl_vae(4, 0.18215), "sd15"),
        (lambda: pf.kl_vae(4, 0.13025), "sdxl"),
        (lambda: pf.kl_vae(16, 1.5305, 0.0609), "sd3"),
        (lambda: pf.kl_vae(16, 0.3611, 0.1159), "flux1"),
        (pf.flux2_vae, "flux2"),
        (pf.svd_vae, "svd"),
    ],
)
def test_detect_latent_space(vae_factory, space):
    assert detect_latent_space(vae_factory()).name == space


# ----------------------------------------------------------------------------- FastVAE contract
@pytest.fixture(scope="module")
def sd_fast():
    return FastVAE.from_decoder(pf.tiny_decoder("sd15"), vae=pf.kl_vae(4, 0.18215))


def test_decode_contract(sd_fast):
    raw = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        out = sd_fast.decode(raw)
        expected = sd_fast.decoder(raw * 0.18215) * 2 - 1
    torch.testing.assert_close(out.sample, expected, atol=1e-5, rtol=0)
    assert out.sample.min() >= -1 and out.sample.max() <= 1
    (as_tuple,) = sd_fast.decode(raw, return_dict=False)
    torch.testing.assert_close(as_tuple, out.sample)
    assert sd_fast.config.force_upcast is False
    assert len(sd_fast.config.block_out_channels) == 4


def test_slicing_decodes_one_sample_at_a_time(sd_fast, monkeypatch):
    raw = torch.randn(3, 4, 4, 4)
    batched = sd_fast.decode(raw).sample
    seen = []
    forward = sd_fast.decoder.forward
    monkeypatch.setattr(sd_fast.decoder, "forward", lambda z: seen.append(z.shape[0]) or forward(z))
    sd_fast.enable_slicing()
    try:
        sliced = sd_fast.decode(raw).sample
    finally:
        sd_fast.disable_slicing()
    assert seen == [1, 1, 1]
    torch.testing.assert_close(sliced, batched, atol=1e-5, rtol=0)


def test_tiling_decodes_like_decode_tiled(sd_fast):
    from fastdec.runtime.tiling import decode_tiled

    raw = torch.randn(1, 4, 12, 12)
    sd_fast.enable_tiling(tile_size=8, overlap=2)  # explicit overlap: skips the receptive-field probe
    try:
        tiled = sd_fast.decode(raw).sample
    finally:
        sd_fast.disable_tiling()
    with torch.no_grad():
        expected = decode_tiled(sd_fast.decoder, raw * 0.18215, tile=8, overlap=2) * 2 - 1
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=0)
    # int("abc") raised, 64.9 was cut to 64, 0 failed at the first decode
    for tile_size in ("abc", None, 64.9, 0):
        with pytest.raises(ValueError, match="tile_size must be a whole number >= 1"):
            sd_fast.enable_tiling(tile_size=tile_size)
    with pytest.raises(ValueError, match="overlap must be a whole number >= 0"):
        sd_fast.enable_tiling(tile_size=8, overlap=-1)
    assert not sd_fast.use_tiling
    with pytest.raises(TypeError, match="FastVAE.encode takes images as a torch.Tensor"):  # AttributeError before
        sd_fast.encode(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize(
    "latents, error, message",
    [
        (torch.randn(1, 16, 4, 4), ValueError, r"expects 4 latent channels \(sd15\), got 16"),
        (torch.randn(1, 2, 4, 4, 4), ValueError, "num_frames"),
        (torch.full((1, 4, 4, 4), float("nan")), ValueError, "NaN"),
        (np.zeros((1, 4, 4, 4)), TypeError, "torch.Tensor"),
    ],
)
def test_decode_rejects_bad_latents(sd_fast, latents, error, message):
    with pytest.raises(error, match=message):
        sd_fast.decode(latents)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_decode_refuses_bad_frame_counts_and_integer_latents_before_decoding(kind):
    """The same answer from an image and a video decoder: a num_frames that is no count of frames per clip,
    or that cannot group the batch, and integer latents, are refused before any frame is decoded."""
    decoder = pf.MeanMixVideoDecoder.random("svd") if kind == "video" else pf.tiny_decoder("svd")
    fast = FastVAE.from_decoder(decoder, vae=pf.svd_vae())
    calls = []
    decoder.register_forward_hook(lambda *_: calls.append(1))
    raw = torch.randn(4, 4, 4, 4)
    for bad in (0, -1, -4, 2.0, "4", True):
        with pytest.raises(ValueError, match=f"num_frames must be a whole number >= 1.*got {bad!r}"):
            fast.decode(raw, num_frames=bad)
    with pytest.raises(ValueError, match="4 latent frames with num_frames=3"):
        fast.decode(raw, num_frames=3)
    with pytest.raises(TypeError, match="float tensor, got torch.int64"):
        fast.decode(torch.randint(0, 4, (4, 4, 4, 4)), num_frames=2)
    assert calls == []
    with torch.no_grad():
        assert fast.decode(raw, num_frames=2).sample.shape == (4, 3, 32, 32)


def test_flux2_needs_bn_statistics_and_sana_reports_32x():
    with pytest.raises(ValueError, match="batch-norm statistics"):
        FastVAE.from_decoder(pf.tiny_decoder("flux2"))
    sana = FastVAE.from_decoder(fastdec.create_decoder("tae-64", "sana"))
    # Sana pipelines derive vae_scale_factor from encoder_block_out_channels
    assert 2 ** (len(sana.config.encoder_block_out_channels) - 1) == 32


# ----------------------------------------------------------------------------- previews
def test_preview_every_k_writes_pngs_and_leaves_sampling_alone(swapped, tmp_path):
    pipe, decoder, _ = swapped("sd15")
    plain = run(pipe, "sd15", steps=4)
    preview = PreviewCallback(decoder, every=2, out_dir=tmp_path / "previews")
    seen = []

    def check_passthrough(p, step, t, kwargs):
        before = kwargs["latents"]
        result = preview(p, step, t, kwargs)
        seen.append(result is kwargs and result["latents"] is before)
        return result

    with_preview = run(pipe, "sd15", steps=4, callback_on_step_end=check_passthrough)
    torch.testing.assert_close(with_preview, plain, atol=0, rtol=0)
    assert all(seen) and len(seen) == 4
    assert preview.steps_previewed == [1, 3]
    files = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert files == ["step_0001_0.png", "step_0003_0.png"]


def test_a_video_decoder_previews_an_image_pipeline_frame_by_frame():
    """It failed at the first preview with "add a time dimension, e.g. z[None]", no advice inside a callback."""
    from fastdec.models.causal import CausalTAEDecoder

    image_decoder = pf.tiny_decoder("sd15", seed=3)
    video_decoder = CausalTAEDecoder.from_image_decoder(image_decoder)  # starts equal to it
    got = {}
    z = torch.randn(2, 4, 4, 4)
    for name, decoder in (("image", image_decoder), ("video", video_decoder)):
        PreviewCallback(decoder, on_preview=lambda step, images, n=name: got.setdefault(n, images))(
            None, 0, 0, {"latents": z})
    assert len(got["video"]) == 2
    for a, b in zip(got["image"], got["video"]):  # the same weights on the same latents, one frame per clip
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1  # 8-bit rounding


def test_preview_packed_latents_need_size_when_not_square(swapped):
    pipe, decoder, _ = swapped("flux1")
    previews = []
    capture = Capture(then=PreviewCallback(decoder, on_preview=lambda s, ims: previews.append(ims),
                                           height=32, width=64))
    output = run(pipe, "flux1", width=64, callback_on_step_end=capture)
    assert previews[-1][0].size == (64, 32)
    pixels = np.asarray(previews[-1][0]).astype(np.int16)
    final = (output[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    assert np.abs(pixels - final).max() <= 1
    blind = PreviewCallback(decoder, on_preview=lambda s, ims: None)
    with pytest.raises(ValueError, match="height= and width="):
        run(pipe, "flux1", width=64, callback_on_step_end=blind)


def test_preview_errors_are_clear():
    decoder = pf.tiny_decoder("sd15")
    with pytest.raises(ValueError, match="on_preview=fn or out_dir"):
        PreviewCallback(decoder)
    for every in (0, -1, "5", 2.5, float("nan"), float("inf"), True):  # nan and inf would never preview
        with pytest.raises(ValueError, match=r"every \(steps between previews\) must be a whole number >= 1"):
            PreviewCallback(decoder, every=every, on_preview=lambda s, ims: None)
    preview = PreviewCallback(decoder, on_preview=lambda s, ims: None)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs=\['latents'\]"):
        preview(None, 0, 0, {"prompt_embeds": torch.zeros(1)})


def test_preview_settings_are_checked_before_sampling(tmp_path):
    # each failed at the first preview, after the steps before it had run; height alone was dropped silently
    decoder = pf.tiny_decoder("sd15")
    with pytest.raises(TypeError, match="on_preview must be a function of \\(step, images\\), got str"):
        PreviewCallback(decoder, on_preview="previews/")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="out_dir '.*a_file' is a file, not a folder"):
        PreviewCallback(decoder, out_dir=tmp_path / "a_file")
    with pytest.raises(ValueError, match="height and width together"):
        PreviewCallback(decoder, on_preview=lambda s, ims: None, height=512)
    with pytest.raises(ValueError, match="width must be a whole number >= 1"):
        PreviewCallback(decoder, on_preview=lambda s, ims: None, height=512, width=0)
    with pytest.raises(TypeError, match="out_dir must be a path .*got int 5"):  # pathlib named no argument
        PreviewCallback(decoder, out_dir=5)
    assert PreviewCallback(decoder, out_dir=tmp_path / "new" / "previews").out_dir.is_dir()


def test_preview_unpacks_tokens_like_flux_without_its_helper():
    from diffusers import FluxPipeline

    decoder = pf.tiny_decoder("flux1")
    latents = torch.randn(2, 16, 4, 6)  # (B, C, h, w) decoder space, h/2 x w/2 = 2 x 3 tokens
    tokens = FluxPipeline._pack_latents(latents, 2, 16, 4, 6)

    class NoHelpers:  # a pipeline with packed latents but no _unpack_latents: fastdec's own unpacking
        vae_scale_factor = 8

    preview = PreviewCallback(decoder, on_preview=lambda s, ims: None, height=32, width=48)
    torch.testing.assert_close(preview.decoder_latents(NoHelpers(), tokens), latents, atol=0, rtol=0)
    with pytest.raises(ValueError, match="height= and width="):
        PreviewCallback(decoder, on_preview=lambda s, ims: None).decoder_latents(NoHelpers(), tokens)


def test_swap_refuses_a_vae_that_is_no_diffusers_vae():
    from types import SimpleNamespace

    pipe = SimpleNamespace(vae=torch.nn.Linear(2, 2), register_modules=lambda **modules: None)
    with pytest.raises(ValueError, match="vae is a Linear with no config: fastdec swaps and reads diffusers VAEs"):
        swap_decoder(pipe, pf.tiny_decoder("sd15"))
    assert isinstance(pipe.vae, torch.nn.Linear)  # left as it was


def test_swap_after_cpu_offload_is_refused():
    pipe = pf.sd15_pipeline()
    pipe.vae._hf_hook = object()  # what enable_model_cpu_offload() attaches (needs an accelerator to do for real)
    with pytest.raises(RuntimeError, match="before\\s+pipe.enable_model_cpu_offload"):
        swap_decoder(pipe, pf.tiny_decoder("sd15"), keep_encoder=False)


def test_from_decoder_names_a_vae_that_is_none_or_of_another_space():
    decoder = pf.tiny_decoder("sd15")
    with pytest.raises(TypeError, match="vae must be the pipeline's diffusers VAE.*got str"):
        FastVAE.from_decoder(decoder, vae="x")
    flux2 = fastdec.create_decoder("tae-64", "flux2")
    with pytest.raises(ValueError, match=r"decoder expects 32 channels \(flux2\), the VAE has 4"):
        FastVAE.from_decoder(flux2, vae=pf.svd_vae())
    # same channels, other scale: only channels were compared here, where swap_decoder refused the pairing
    sdxl_vae = pf.kl_vae(4, 0.13025)
    with pytest.raises(ValueError, match=r"decoder was made for sd15 latents, the VAE is sdxl .*pass force=True"):
        FastVAE.from_decoder(decoder, vae=sdxl_vae)
    assert isinstance(FastVAE.from_decoder(decoder, vae=sdxl_vae, force=True), FastVAE)  # a fine-tune, on purpose


@pytest.mark.parametrize("call", [
    lambda d: FastVAE.from_decoder(d, vae=pf.kl_vae(4, 0.13025), force="no"),
    lambda d: FastVAE.from_decoder(d, keep_encoder="no"),
    lambda d: swap_decoder(pf.sd15_pipeline(), d, force="no"),
    lambda d: swap_decoder(pf.sd15_pipeline(), d, keep_encoder=1),
    lambda d: fastdec.resolve_decoder("tae-64", random_weights="no"),
    lambda d: fastdec.list_decoders(video="yes"),
    lambda d: fastdec.create_decoder("tae-64", "sd15", use_midblock_gn="no"),
])
def test_switches_given_as_strings_are_refused(call):
    # "no" is truthy: it let a mismatched decoder in, kept the encoder, built random weights or a GroupNorm branch
    with pytest.raises(TypeError, match="must be True or False, got"):
        call(pf.tiny_decoder("sd15"))


def test_swap_decoder_refuses_an_object_that_is_no_pipeline_and_leaves_it_alone():
    # an object with a vae but no register_modules had its VAE's decoder moved to the CPU, then an AttributeError
    import types

    vae = pf.kl_vae(4, 0.18215)
    thing = types.SimpleNamespace(vae=vae)
    with pytest.raises(PipelineError, match="swap_decoder takes a diffusers pipeline .* got SimpleNamespace"):
        swap_decoder(thing, pf.tiny_decoder("sd15"))
    assert thing.vae is vae and not hasattr(thing, "_fastdec_original_vae")

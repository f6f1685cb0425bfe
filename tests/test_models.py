"""The decoder zoo's shared contract: presets per module, one upsampling factor, input checks, empty inputs,
non-finite outputs, config sizes and the TAE mid-block index."""
import importlib

import pytest
import torch

import fastdec
from factories import is_video
from fastdec import create_decoder, get_latent_space, list_decoders
from fastdec.errors import FastdecError, NonFiniteOutputError, UnknownNameError, UsageError
from fastdec.models import ARCHITECTURES, PRESETS
from fastdec.models.tae import TAEConfig, TAEEncoderConfig, mid_block_end, tae_layers

IMAGE_PRESETS = list_decoders(video=False)
ALL_PRESETS = list_decoders()
SPACES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "svd", "sana"]

pytestmark = pytest.mark.usefixtures("one_thread")


def latents_for(preset: str, space: str, n: int = 2, t: int = 3, h: int = 2, w: int = 3) -> torch.Tensor:
    channels = get_latent_space(space).channels
    return torch.randn(n, t, channels, h, w) if is_video(preset) else torch.randn(n, channels, h, w)


def test_required_presets_exist():
    for name in ("tae-64", "tae-192", "effvit-paper", "effvit-attn"):
        assert name in IMAGE_PRESETS


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_each_architecture_module_registers_its_own_presets(preset):
    cls = ARCHITECTURES[PRESETS[preset].architecture]
    assert PRESETS[preset].make_config.__module__ == cls.__module__
    assert cls.__module__ in {f"fastdec.models.{m}" for m in ("tae", "effvit", "temporal", "causal")}


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
@pytest.mark.parametrize("space", ["sdxl", "flux1", "flux2", "sana"])
def test_preset_decodes_to_rgb_in_unit_range(preset, space, make_decoder):
    decoder = make_decoder(preset, space)
    s = get_latent_space(space)
    h, w = (2, 3) if s.spatial_factor == 32 else (4, 6)
    with torch.no_grad():
        out = decoder(3 * torch.randn(2, s.channels, h, w))
    f = s.spatial_factor
    assert decoder.upsample_factor == f
    assert out.shape == (2, 3, f * h, f * w)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("preset", ALL_PRESETS)
@pytest.mark.parametrize("space", SPACES)
def test_upsample_factor_is_the_latent_spaces_for_every_preset(preset, space, make_decoder):
    decoder = make_decoder(preset, space)
    assert decoder.upsample_factor == get_latent_space(space).spatial_factor
    with torch.no_grad():
        out = decoder(latents_for(preset, space, n=1, t=2, h=1, w=2))
    assert out.shape[-2:] == (decoder.upsample_factor, 2 * decoder.upsample_factor)


@pytest.mark.parametrize("preset", ["tae-64", "tae-causal-64", "tae-temporal-192"])
def test_tae_layout_that_upsamples_by_another_factor_is_refused(preset):
    # three 2x stages give 8x pictures: Sana's 32x latents would come out at a quarter of their size
    with pytest.raises(UsageError, match=r"upsample x8 but latent space 'sana'.*x32.*stage_blocks.*needs 5"):
        create_decoder(preset, "sana", stage_blocks=(1, 1, 1))


def test_bad_latents_give_clear_errors(make_decoder):
    decoder = make_decoder("tae-64", "sdxl")
    with pytest.raises(UsageError, match=r"expects 4 latent channels \(sdxl\), got 16.*sd3"):
        decoder(torch.randn(1, 16, 4, 4))
    with pytest.raises(UsageError, match=r"\(N, C, h, w\).*batch dimension"):
        decoder(torch.randn(4, 4, 4))
    with pytest.raises(UsageError, match="video"):
        decoder(torch.randn(1, 2, 4, 4, 4))
    z = torch.randn(1, 4, 4, 4)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN or inf"):
        decoder(z)
    with pytest.raises(TypeError, match="floating point"):
        decoder(torch.ones(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decoder([[1.0]])


def test_other_input_dtypes_are_cast(make_decoder):
    decoder = make_decoder("tae-64", "sd15")
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        ref = decoder(z)
        out = decoder(z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the rounded input moves the output by well under 0.05
    assert (out - ref).abs().max() < 0.05


def test_unknown_preset_and_space():
    with pytest.raises(UnknownNameError, match="unknown decoder preset 'tae-65'.*tae-64"):
        create_decoder("tae-65", "sdxl")
    with pytest.raises(KeyError, match="unknown latent space"):
        create_decoder("tae-64", "sdxxl")


# -- empty inputs: batch 0 and T = 0 decode to empty results of the right shape ---------------------------
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_empty_batch_decodes_to_an_empty_result(preset, make_decoder):
    decoder = make_decoder(preset, "sdxl")
    z = latents_for(preset, "sdxl", n=0, t=3, h=2, w=3)
    with torch.no_grad():
        out = decoder(z)
    assert out.shape == z.shape[:-3] + (3, 16, 24) and out.dtype == torch.float32


@pytest.mark.parametrize("preset", list_decoders(video=True))
def test_clip_without_frames_decodes_to_an_empty_result(preset, make_decoder):
    decoder = make_decoder(preset, "svd")
    with torch.no_grad():
        assert decoder(torch.randn(2, 0, 4, 2, 3)).shape == (2, 0, 3, 16, 24)


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_latents_of_zero_height_or_width_are_refused(preset, make_decoder):
    decoder = make_decoder(preset, "sdxl")
    for h, w in ((0, 3), (2, 0)):
        with pytest.raises(UsageError, match="zero height or width"):
            decoder(latents_for(preset, "sdxl", h=h, w=w))


def test_empty_pushes_and_chunks(make_decoder):
    causal = make_decoder("tae-causal-64", "svd")
    stream = causal.stream()
    with torch.no_grad():
        assert stream.push(torch.randn(2, 0, 4, 2, 3)).shape == (2, 0, 3, 16, 24)
        assert stream.state is None and stream.frames_decoded == 0  # an empty push leaves the stream as it was
        stream.push(torch.randn(2, 1, 4, 2, 3))
        assert stream.push(torch.randn(2, 0, 4, 2, 3)).shape == (2, 0, 3, 16, 24)
        assert stream.frames_decoded == 1
    temporal = make_decoder("tae-temporal-192", "svd")
    with torch.no_grad():
        assert list(temporal.decode_chunks(torch.randn(1, 0, 4, 2, 3))) == []
        [(first, rgb)] = temporal.decode_chunks(torch.randn(0, 5, 4, 2, 3))
    assert first == 0 and rgb.shape == (0, 5, 3, 16, 24)


# -- non-finite output ---------------------------------------------------------------------------------
def poison(decoder: torch.nn.Module) -> torch.nn.Module:
    """One NaN weight in the last conv, as a corrupt checkpoint would hold."""
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.view(-1)[0] = float("nan")
    return decoder


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_nan_output_is_an_error_naming_the_decoder(preset, make_decoder):
    decoder = poison(make_decoder(preset, "flux1"))
    architecture = PRESETS[preset].architecture
    with pytest.raises(NonFiniteOutputError, match=rf"decoder '{architecture}' for 'flux1'.*NaN.*weights"):
        with torch.no_grad():
            decoder(latents_for(preset, "flux1"))
    assert issubclass(NonFiniteOutputError, FastdecError)


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_meta_tensors_infer_shapes_or_are_named(preset, make_decoder):
    """Meta latents failed as "Tensor.item() cannot be called on meta tensors" in the NaN check; a decoder on
    the meta device (accelerate's init_empty_weights) could not infer an output shape."""
    decoder = make_decoder(preset, "flux1")
    z = latents_for(preset, "flux1")
    with pytest.raises(UsageError, match="latents on meta for a decoder on cpu: meta tensors hold no values"):
        decoder(z.to("meta"))
    out = decoder.to("meta")(z.to("meta"))
    factor = decoder.upsample_factor
    assert out.is_meta and out.shape == (*z.shape[:-3], 3, z.shape[-2] * factor, z.shape[-1] * factor)


def test_nan_output_is_an_error_when_streaming_and_in_chunks(make_decoder):
    z = torch.randn(1, 3, 4, 2, 2)
    with torch.no_grad():
        with pytest.raises(NonFiniteOutputError, match="tae-causal"):
            poison(make_decoder("tae-causal-64", "svd")).stream().push(z)
        with pytest.raises(NonFiniteOutputError, match="tae-temporal"):
            next(poison(make_decoder("tae-temporal-192", "svd")).decode_chunks(z))


def test_output_check_leaves_the_training_path_alone_and_refuses_inf(make_decoder):
    # decode_layers is what training differentiates: no check, no clamp there
    decoder = poison(make_decoder("tae-64", "sdxl"))
    assert torch.isnan(decoder.decode_layers(torch.randn(1, 4, 2, 2))).any()
    healthy = make_decoder("tae-64", "sdxl")
    # values past 1 clamp to a saturated pixel; an inf is an overflow, which clamped would be a white picture
    assert torch.equal(healthy.finish(torch.tensor([7.0, -3.0, 0.25])), torch.tensor([1.0, 0.0, 0.25]))
    for overflow in (float("inf"), -float("inf")):
        with pytest.raises(NonFiniteOutputError, match="NaN or inf"):
            healthy.finish(torch.tensor([overflow, 0.25]))
    with torch.no_grad():  # weights of 1e38: every output overflows to inf (it was returned as all 1.0)
        for p in healthy.parameters():
            p.fill_(1e38)
        with pytest.raises(NonFiniteOutputError, match="NaN or inf"):
            healthy(torch.randn(1, 4, 4, 4))


# -- config sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, field, value", [
    ("tae-64", "width", 0), ("tae-64", "width", -8), ("tae-64", "width", 10**7), ("tae-64", "stage_blocks", (3, -1, 3)),
    ("tae-causal-64", "final_blocks", -1), ("effvit-attn", "widths", (128, 128, 128, 0)),
    ("effvit-attn", "depths", (0, 1, -2, 1)), ("effvit-attn", "head_dim", 0), ("tae-temporal-192", "head_dim", 0),
    ("tae-temporal-192", "chunk_size", 2.5),
])
def test_absurd_sizes_are_refused_naming_the_field(preset, field, value):
    overrides = {field: value}
    if preset.startswith("effvit") and field in ("widths", "depths"):  # the three per-stage lists go together
        overrides = {"widths": (128,) * 4, "depths": (0, 1, 1, 1), "block_types": ("res",) * 4, **overrides}
    with pytest.raises(UsageError, match=rf"{field}=.*{field} must (hold integers|be an integer)"):
        create_decoder(preset, "sdxl", **overrides)


@pytest.mark.parametrize("preset, field, value", [
    # '333' was read as (3, 3, 3) and 3.7 blocks as 3: a config typo built another decoder
    ("tae-64", "stage_blocks", "333"), ("tae-64", "stage_blocks", 3), ("tae-64", "widths", "64646464"),
    ("tae-causal-64", "stage_blocks", "111"), ("effvit-attn", "depths", "0111"),
])
def test_a_per_stage_field_that_is_not_a_list_is_refused(preset, field, value):
    with pytest.raises(UsageError, match=rf"{field}={value!r}; {field} must list one entry per stage"):
        create_decoder(preset, "sdxl", **{field: value})


def test_fractional_block_counts_are_refused_not_rounded():
    with pytest.raises(UsageError, match=r"stage_blocks=\(3\.7, 3, 3\); stage_blocks must hold integers"):
        create_decoder("tae-64", "sdxl", stage_blocks=(3.7, 3, 3))
    with pytest.raises(UsageError, match=r"TAE encoder config: stage_blocks='333'"):
        TAEEncoderConfig(stage_blocks="333")


# -- the mid-block index -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage_blocks", [(3, 3, 3), (1, 2, 3), (0, 1, 1), (2, 1, 1, 1, 1)])
@pytest.mark.parametrize("gn", [False, True])
def test_mid_block_end_follows_the_config(stage_blocks, gn):
    layers = tae_layers(TAEConfig(width=8, stage_blocks=stage_blocks, use_midblock_gn=gn))
    end = mid_block_end(layers)
    blocks = [m for m in layers[:end] if hasattr(m, "fuse")]
    assert len(blocks) == stage_blocks[0]
    assert isinstance(layers[end], torch.nn.Upsample)
    assert not any(isinstance(m, torch.nn.Upsample) for m in layers[:end])
    # TAEF2's GroupNorm branch sits in exactly these blocks
    assert [b.pool is not None for b in layers if hasattr(b, "pool")] == [gn] * stage_blocks[0] + [False] * (
        sum(stage_blocks[1:]) + 1)


def test_temporal_attention_runs_after_the_mid_blocks(make_decoder):
    decoder = make_decoder("tae-temporal-192", "svd", stage_blocks=(2, 1, 1))
    assert decoder.mid_index == 3 + 2  # Clamp, conv, ReLU, then the two latent-resolution blocks
    seen = []
    decoder.temporal_mid.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        decoder(torch.randn(1, 2, 4, 3, 5))
    assert seen == [(3, 5)]  # at the latent resolution


# -- modules and old paths -------------------------------------------------------------------------------
def test_tae64_matches_autoencoder_tiny_parameter_count():
    from diffusers import AutoencoderTiny

    n = sum(p.numel() for p in create_decoder("tae-64", "sd15").parameters())
    assert n == sum(p.numel() for p in AutoencoderTiny().decoder.parameters())
    n192 = sum(p.numel() for p in create_decoder("tae-192", "sd15").parameters())
    assert 10e6 < n192 < 12e6


def test_public_api_names():
    for name in ("LatentSpace", "create_decoder", "save_decoder", "load_decoder", "load_encoder"):
        assert hasattr(fastdec, name)


def test_causal_names_live_in_causal_and_keep_their_old_temporal_path():
    causal = importlib.import_module("fastdec.models.causal")
    temporal = importlib.import_module("fastdec.models.temporal")
    for name in ("MemBlock", "CausalTAEConfig", "CausalTAEDecoder", "CausalStream"):
        assert getattr(temporal, name) is getattr(causal, name)
        assert getattr(causal, name).__module__ == "fastdec.models.causal"
    for name in temporal.__all__:
        assert hasattr(temporal, name), name
    assert temporal.TemporalTAEDecoder.__module__ == "fastdec.models.temporal"


# -- per-stage widths and the pixel-shuffle head ------------------------------------------------------------
def test_per_stage_widths_map_one_stage_to_the_next():
    from fastdec.models.blocks import ResBlock

    config = TAEConfig(latent_channels=4, widths=(32, 16, 8, 4), stage_blocks=(1, 2, 1), final_blocks=2)
    layers = tae_layers(config)
    assert config.width == 32  # width is the first stage's
    # the stem, the conv after each upsampling (one stage's width to the next), the output conv
    convs = [(m.in_channels, m.out_channels) for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(4, 32), (32, 16), (16, 8), (8, 4), (4, 3)]
    assert [b.conv[0].in_channels for b in layers if isinstance(b, ResBlock)] == [32, 16, 16, 8, 4, 4]
    decoder = create_decoder("tae-64", "sdxl", **{k: getattr(config, k) for k in ("widths", "stage_blocks")},
                             width=None, final_blocks=2)
    with torch.no_grad():
        out = decoder(torch.randn(2, 4, 3, 5))
    assert out.shape == (2, 3, 24, 40) and out.min() >= 0 and out.max() <= 1


def test_widths_are_checked_and_have_one_spelling():
    with pytest.raises(UsageError, match=r"widths=\(8, 8\) has 2 entries.*needs one per stage plus one.*4"):
        TAEConfig(widths=(8, 8))
    with pytest.raises(UsageError, match=r"width=64 but widths=\(32, 16, 8, 8\) starts at 32"):
        TAEConfig(width=64, widths=(32, 16, 8, 8))
    with pytest.raises(UsageError, match=r"widths=\(32, 0, 8, 8\); widths must hold integers"):
        TAEConfig(widths=(32, 0, 8, 8))
    with pytest.raises(UsageError, match="head='shuffle'; choose one of conv, pixel_shuffle"):
        TAEConfig(head="shuffle")
    # uniform widths are the old single width: the same config, so the same checkpoints
    assert TAEConfig(widths=[8, 8, 8, 8]) == TAEConfig(width=8)
    assert TAEConfig(width=8).widths is None and TAEConfig().width == 64
    assert TAEConfig(widths=[32, 16, 8, 8]).widths == (32, 16, 8, 8)  # JSON lists become tuples


@pytest.mark.parametrize("space", ["sdxl", "flux2", "sana"])
def test_pixel_shuffle_head_runs_no_conv_at_full_resolution(space, make_decoder):
    decoder = make_decoder("tae-64", space, head="pixel_shuffle")
    s = get_latent_space(space)
    h, w = (2, 3) if s.spatial_factor == 32 else (3, 5)
    seen = []
    for m in decoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        out = decoder(3 * torch.randn(2, s.channels, h, w))
    f = s.spatial_factor
    assert out.shape == (2, 3, f * h, f * w) and out.min() >= 0 and out.max() <= 1
    assert max(seen) == (f * h // 2, f * w // 2)  # the last stage and the head run at half resolution
    assert isinstance(decoder.layers[-1], torch.nn.PixelShuffle) and decoder.layers[-2].out_channels == 12


def test_new_presets_flops_at_512px_in_the_flux2_space():
    """GFLOPs of one 512x512 image, counted by the bench's counter on the meta device (no arithmetic)."""
    from fastdec.bench.measure import count_flops

    flops = {}
    for name in ("tae-64", "tae-turbo", "tae-large"):
        with torch.device("meta"):
            decoder = create_decoder(name, "flux2")
            z = torch.empty(1, 32, 64, 64)
        flops[name] = count_flops(lambda: decoder.decode_layers(z)) / 1e9
    print({k: round(v, 1) for k, v in flops.items()})
    assert 142 < flops["tae-64"] < 143  # TAEF2's architecture: 142.3 GFLOPs
    assert flops["tae-turbo"] <= 0.5 * flops["tae-64"]  # measured 61.7 (0.43x)
    assert flops["tae-large"] <= 3 * flops["tae-64"]  # measured 293.6 (2.06x)
    for name, value in flops.items():  # the descriptions carry the figures
        assert f"{value:.1f} GFLOPs" in PRESETS[name].description, name
    # tae-large's extra capacity sits in the low-resolution stages; tae-turbo runs nothing at full resolution
    large, turbo = create_decoder("tae-large", "flux2").config, create_decoder("tae-turbo", "flux2").config
    assert large.stage_widths == (256, 128, 64, 64) and large.stage_blocks == (5, 4, 3) and large.use_midblock_gn
    assert turbo.head == "pixel_shuffle" and turbo.stage_widths == (128, 64, 48, 32)
    assert create_decoder("tae-large", "sana").config.stage_widths == (256, 128, 64, 64, 64, 64)


@pytest.mark.parametrize("preset", ["tae-causal-64", "tae-temporal-192"])
def test_video_decoders_start_equal_to_a_per_stage_width_image_decoder(preset, make_decoder):
    image = make_decoder("tae-64", "svd", widths=(16, 8, 8, 8), width=16, head="pixel_shuffle")
    cls = ARCHITECTURES[PRESETS[preset].architecture]
    overrides = {"head_dim": 8} if "temporal" in preset else {}
    video = cls.from_image_decoder(image, **overrides).eval()
    assert video.config.stage_widths == (16, 8, 8, 8) and video.config.head == "pixel_shuffle"
    z = torch.randn(1, 3, 4, 2, 3)
    with torch.no_grad():
        out = video(z)
        frames = image(z.flatten(0, 1)).unflatten(0, (1, 3))
    assert out.shape == (1, 3, 3, 16, 24)
    # the temporal parts start at zero: the same numbers, up to summation order in fp32
    assert (out - frames).abs().max() <= 1e-5

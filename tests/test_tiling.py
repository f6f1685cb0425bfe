"""Tiled decoding equals untiled decoding when the overlap covers the measured receptive field."""
from __future__ import annotations

import pytest
import torch

from fastdec import create_decoder
from fastdec.errors import GlobalReceptiveFieldError, UsageError
from fastdec.runtime import tiling
from fastdec.runtime.tiling import (ApproximateTilingWarning, decode_tiled, measure_receptive_field, receptive_field,
                                    tile_count)

# Tiled and untiled decodes run the same fp32 weights on differently sized inputs, so the conv kernels block the
# sums differently: ~1e-7 relative per layer. 1e-5 on [0, 1] RGB is well above that and well below what a tile
# that misses part of its context produces (the `overlap=2` check below).
FP32_TOLERANCE = 1e-5


def test_receptive_field_matches_a_perturbation_probe():
    # The full tae-64 preset, as the README states its field: TAESD layout, 10 3x3 convs at latent scale,
    # 10 at 2x, 10 at 4x, 5 at 8x -> 10 + 5 + 2.5 + 0.625 = 18.1 -> 19 cells
    decoder = create_decoder("tae-64", "sdxl").double().eval()
    radius = receptive_field(decoder)
    assert radius == 19
    size, c = 2 * radius + 9, radius + 4
    f = decoder.upsample_factor
    torch.manual_seed(0)
    z = torch.randn(1, 4, size, size, dtype=torch.float64)
    bumped = z.clone()
    bumped[0, :, c, c] += 5.0
    with torch.no_grad():
        changed = (decoder.decode_layers(bumped) - decoder.decode_layers(z)).abs().amax((0, 1)) > 0
    ys, xs = changed.nonzero(as_tuple=True)
    reach = int(torch.stack([(ys // f - c).abs(), (xs // f - c).abs()]).max())
    # random weights can leave the outermost ring dead behind a ReLU, never reach beyond the computed field
    assert radius - 2 <= reach <= radius


def test_receptive_field_is_measured_under_inference_mode_too(make_decoder):
    """Users decode (and export) under torch.inference_mode(); the measurement differentiates all the same."""
    decoder = make_decoder("tae-64", "sd15")
    tiling._CACHE.clear()
    expected = receptive_field(decoder)
    tiling._CACHE.clear()
    with torch.inference_mode():
        assert receptive_field(decoder) == expected > 0


@pytest.mark.parametrize("preset", ["tae-64", "effvit-paper"])
def test_tiled_equals_untiled(preset, make_decoder):
    decoder = make_decoder(preset, "sdxl")
    overlap = receptive_field(decoder)
    tile = 2 * overlap + 24
    torch.manual_seed(0)
    z = torch.randn(1, 4, tile + 12, tile + 4)
    assert tile_count(*z.shape[-2:], tile, overlap) >= 4
    with torch.no_grad():
        reference = decoder(z)
        tiled = decode_tiled(decoder, z, tile=tile)
        assert tiled.shape == reference.shape
        assert (tiled - reference).abs().max() <= FP32_TOLERANCE
        # a small overlap changes pixels: the tiles really are decoded separately
        short = decode_tiled(decoder, z, tile=tile, overlap=2)
        assert (short - reference).abs().max() > FP32_TOLERANCE


def test_latents_that_require_grad_get_the_untiled_gradient(make_decoder):
    # each tile decoded under no_grad: the tiled result had no graph, guidance through the decoder lost its gradient
    decoder = make_decoder("tae-64", "sd15").double()
    overlap = receptive_field(decoder)
    tile = 2 * overlap + 8
    torch.manual_seed(0)
    z = torch.randn(1, 4, tile + 8, tile, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(1, 3, 8 * (tile + 8), 8 * tile, dtype=torch.float64)
    (grad_untiled,) = torch.autograd.grad((decoder(z) * weight).sum(), z)
    tiled = decode_tiled(decoder, z, tile=tile)
    assert tiled.requires_grad
    (grad_tiled,) = torch.autograd.grad((tiled * weight).sum(), z)
    # float64 throughout: only the summation order of differently sized convs differs (~1e-15 relative)
    assert torch.allclose(grad_tiled, grad_untiled, rtol=1e-9, atol=1e-12)
    assert not decode_tiled(decoder, z.detach(), tile=tile).requires_grad  # no graph kept when none is asked for


def test_any_channel_count_and_small_inputs(make_decoder):
    decoder = make_decoder("tae-64", "flux2", use_midblock_gn=False)
    overlap = receptive_field(decoder)
    z = torch.randn(2, 32, 2 * overlap + 14, 2 * overlap + 10)
    with torch.no_grad():
        assert (decode_tiled(decoder, z, tile=2 * overlap + 6) - decoder(z)).abs().max() <= FP32_TOLERANCE
        # fits in one tile: the same module decodes the same tensor, so the result is bit-identical
        small = torch.randn(1, 32, 4, 4)
        assert torch.equal(decode_tiled(decoder, small, tile=64), decoder(small))
    with pytest.raises(ValueError, match="channels"):
        decode_tiled(decoder, torch.randn(1, 4, 80, 80), tile=64)


@pytest.mark.parametrize("tile, overlap, message", [
    (10, 5, "larger than 2 x overlap"), (0, 0, "tile must be"), (-4, 0, "tile must be"), (64, -1, "overlap must be"),
    # not met as '<' between str and int, range() of a float, or inf accepted
    (float("nan"), 0, "tile must be a whole number"), ("64", 0, "tile must be a whole number"),
    (True, 0, "tile must be a whole number"), (8.5, 0, "tile must be a whole number"),
    (float("inf"), 0, "tile must be a whole number"), (64, float("nan"), "overlap must be a whole number"),
])
def test_bad_tile_settings_are_usage_errors(make_decoder, tile, overlap, message):
    decoder = make_decoder("tae-64", "sdxl")
    with pytest.raises(UsageError, match=message):
        decode_tiled(decoder, torch.randn(1, 4, 16, 16), tile=tile, overlap=overlap)


def test_bad_latents_are_named_before_the_tile(make_decoder):
    """With a tile too small for the overlap, NaN, integer or wrong-channel latents were reported as the tile."""
    decoder = make_decoder("tae-64", "sdxl")
    nan = torch.randn(1, 4, 16, 16)
    nan[0, 0, 3, 3] = float("nan")
    for z, words in ((nan, "NaN"), (torch.ones(1, 4, 16, 16, dtype=torch.int64), "int64"),
                     (torch.randn(1, 16, 16, 16), "channels")):
        with pytest.raises(ValueError, match=words):
            decode_tiled(decoder, z, tile=8, overlap=19)


@pytest.mark.parametrize("overlap", [None, 4])
def test_what_is_no_decoder_is_named(overlap):
    """With overlap= given, a non-decoder got as far as the tiles: AttributeError 'upsample_factor'."""
    for not_a_decoder in ("flux2-turbo", torch.nn.Conv2d(4, 3, 1)):
        with pytest.raises(TypeError, match=f"{type(not_a_decoder).__name__}: expected a fastdec decoder"):
            decode_tiled(not_a_decoder, torch.randn(1, 4, 40, 40), tile=16, overlap=overlap)


def test_video_decoders_are_refused(make_decoder):
    decoder = make_decoder("tae-causal-64", "sdxl")
    with pytest.raises(UsageError, match="image decoders"):
        decode_tiled(decoder, torch.randn(1, 2, 4, 8, 8))
    with pytest.raises(UsageError, match="image decoders"):
        measure_receptive_field(decoder)


def test_groupnorm_branch_is_flagged_as_global(make_decoder):
    # TAEF2's mid-block GroupNorm sees the whole image: tiling can only approximate it
    decoder = make_decoder("tae-64", "flux2")
    field = measure_receptive_field(decoder)
    assert field.is_global and field.local_radius_known and any("GroupNorm" in n for n in field.global_layers)
    with pytest.raises(GlobalReceptiveFieldError, match="global receptive field"):
        receptive_field(decoder)
    z = torch.randn(1, 32, 40, 40)
    with pytest.warns(ApproximateTilingWarning, match="approximate"), torch.no_grad():
        out = decode_tiled(decoder, z, tile=2 * field.radius + 8)
    assert out.shape == (1, 3, 320, 320) and torch.isfinite(out).all()


def test_attention_preset_is_flagged_as_global(make_decoder):
    decoder = make_decoder("effvit-attn", "sdxl")
    with pytest.raises(GlobalReceptiveFieldError, match="Attention"):
        receptive_field(decoder)


def test_old_import_path_is_the_same_module():
    import fastdec.tiling

    assert fastdec.tiling.decode_tiled is decode_tiled
    assert fastdec.tiling.GlobalReceptiveFieldError is GlobalReceptiveFieldError

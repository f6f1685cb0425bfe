import pytest
import torch

import fastdec
from fastdec import create_decoder, get_latent_space, list_decoders

IMAGE_PRESETS = list_decoders(video=False)
SPACES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "svd", "sana"]


def test_required_presets_exist():
    for name in ("tae-64", "tae-192", "effvit-paper", "effvit-attn"):
        assert name in IMAGE_PRESETS


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
@pytest.mark.parametrize("space", ["sdxl", "flux1", "flux2", "sana"])
def test_preset_decodes_to_rgb_in_unit_range(preset, space):
    torch.manual_seed(0)
    decoder = create_decoder(preset, space).eval()
    s = get_latent_space(space)
    h, w = (2, 3) if s.spatial_factor == 32 else (4, 6)
    z = 3 * torch.randn(2, s.channels, h, w)
    with torch.no_grad():
        out = decoder(z)
    f = s.spatial_factor
    assert decoder.upsample_factor == f
    assert out.shape == (2, 3, f * h, f * w)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_bad_latents_give_clear_errors():
    decoder = create_decoder("tae-64", "sdxl")
    with pytest.raises(ValueError, match=r"expects 4 latent channels \(sdxl\), got 16.*sd3"):
        decoder(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, h, w\).*batch dimension"):
        decoder(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="video"):
        decoder(torch.randn(1, 2, 4, 4, 4))
    z = torch.randn(1, 4, 4, 4)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        decoder(z)
    with pytest.raises(TypeError, match="floating point"):
        decoder(torch.ones(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decoder([[1.0]])


def test_other_input_dtypes_are_cast():
    decoder = create_decoder("tae-64", "sd15").eval()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        ref = decoder(z)
        out = decoder(z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05


def test_unknown_preset_and_space():
    with pytest.raises(KeyError, match="unknown decoder preset 'tae-65'.*tae-64"):
        create_decoder("tae-65", "sdxl")
    with pytest.raises(KeyError, match="unknown latent space"):
        create_decoder("tae-64", "sdxxl")


def test_tae64_matches_autoencoder_tiny_parameter_count():
    from diffusers import AutoencoderTiny

    n = sum(p.numel() for p in create_decoder("tae-64", "sd15").parameters())
    assert n == sum(p.numel() for p in AutoencoderTiny().decoder.parameters())
    n192 = sum(p.numel() for p in create_decoder("tae-192", "sd15").parameters())
    assert 10e6 < n192 < 12e6


def test_public_api_names():
    for name in ("LatentSpace", "create_decoder", "save_decoder", "load_decoder", "load_encoder"):
        assert hasattr(fastdec, name)

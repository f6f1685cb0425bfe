import numpy as np
import pytest
import torch

from fastdec import LatentSpace, get_latent_space, list_latent_spaces
from fastdec.errors import LatentSpaceError


def test_presets_have_documented_constants():
    expected = {"sd15": (4, 8), "sdxl": (4, 8), "sd3": (16, 8), "flux1": (16, 8), "flux2": (32, 8), "svd": (4, 8), "sana": (32, 32)}
    assert set(list_latent_spaces()) == set(expected)
    for name, (channels, factor) in expected.items():
        space = get_latent_space(name)
        assert (space.channels, space.spatial_factor) == (channels, factor)
        assert space.source, f"{name} must document where its constants come from"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux1", "flux2", "svd", "sana"])
def test_vae_decoder_round_trip(name):
    space = get_latent_space(name)
    raw = torch.randn(2, space.channels, 5, 6, dtype=torch.float64)
    assert torch.allclose(space.decoder_to_vae(space.vae_to_decoder(raw)), raw)


def test_matches_diffusers_pipeline_formula():
    # SD3/FLUX.1 pipelines call vae.decode(latents / scaling_factor + shift_factor)
    z = torch.randn(1, 16, 4, 4)
    for name in ("sd3", "flux1"):
        s = get_latent_space(name)
        assert torch.allclose(s.decoder_to_vae(z), z / s.scaling_factor + s.shift_factor)
    sdxl = get_latent_space("sdxl")
    assert torch.allclose(sdxl.decoder_to_vae(z[:, :4]), z[:, :4] / 0.13025)


def test_latents_mean_std_from_vae_config():
    # Playground v2.5-style SDXL VAE config: raw = z * std / scaling + mean (the SDXL pipeline's formula)
    cfg = {"scaling_factor": 0.5, "latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}
    space = get_latent_space("sdxl").with_vae_config(cfg)
    z = torch.randn(2, 4, 3, 3)
    mean = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1)
    assert torch.allclose(space.decoder_to_vae(z), z * std / 0.5 + mean, atol=1e-6)
    assert torch.allclose(space.vae_to_decoder(space.decoder_to_vae(z)), z, atol=1e-5)


def test_vae_config_statistics_may_be_arrays_and_numpy_numbers():
    space = get_latent_space("sdxl").with_vae_config(
        {"latents_mean": np.zeros(4), "latents_std": torch.ones(4), "scaling_factor": np.float32(0.5)})
    assert space.latents_mean == (0.0,) * 4 and space.latents_std == (1.0,) * 4 and space.scaling_factor == 0.5
    assert type(space.scaling_factor) is float


@pytest.mark.parametrize("config, problem", [
    ({"scaling_factor": 0}, "'scaling_factor' is 0: it must be > 0"),
    ({"scaling_factor": float("nan")}, "'scaling_factor' is nan"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "one number per channel \\(4\\)"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 1.0, 0.0, 1.0]}, "standard deviations are > 0"),
    ({"shift_factor": "abc"}, "'shift_factor' is 'abc': it must be a finite number"),
    # float() read these as numbers: True as 1.0, the string "1234" as the statistics (1, 2, 3, 4)
    ({"scaling_factor": True}, "'scaling_factor' is True: it must be a finite number"),
    ({"latents_mean": "1234", "latents_std": "1111"}, "'latents_mean' is '1234': it must list one number per channel"),
])
def test_a_vae_config_that_describes_no_usable_latents_is_refused(config, problem):
    # taken as given, a scaling factor of 0 divided latents by zero and 3 statistics broadcast wrongly
    with pytest.raises(LatentSpaceError, match=f"the VAE config does not describe usable 'sdxl' latents: .*{problem}"):
        get_latent_space("sdxl").with_vae_config(config)
    with pytest.raises(LatentSpaceError, match="a VAE config is a mapping"):
        get_latent_space("sdxl").with_vae_config(None)


@pytest.mark.parametrize("fields, problem", [
    ({"channels": 0}, "'channels' is 0"), ({"channels": "4"}, "'channels' is '4'"),
    ({"channels": 4, "spatial_factor": 6}, "powers of 2"), ({"channels": 4, "scaling_factor": -1.0}, "> 0"),
])
def test_a_space_made_directly_is_checked_like_a_record(fields, problem):
    with pytest.raises(LatentSpaceError, match=problem):
        LatentSpace("custom", **fields)
    space = LatentSpace("custom", channels=4, scaling_factor=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    assert space.scaling_factor == 1.0 and space.latents_mean == (0.0,) * 4 and hash(space)  # a list made it unhashable


def test_integer_latents_are_converted_with_float_statistics():
    # the statistics were cast to the latents' dtype: an int64 tensor truncated a mean of 0.5 to 0
    space = get_latent_space("sdxl").with_vae_config({"latents_mean": [0.5] * 4, "latents_std": [2.0] * 4})
    raw = torch.ones(1, 4, 2, 2, dtype=torch.int64)
    expected = (1 - 0.5) * space.scaling_factor / 2.0
    assert torch.allclose(space.vae_to_decoder(raw), torch.full((1, 4, 2, 2), expected))


@pytest.mark.parametrize("given, missing", [("latents_mean", "latents_std"), ("latents_std", "latents_mean")])
def test_half_of_the_per_channel_statistics_is_refused(given, missing):
    # one without the other was dropped: the latents were converted with scaling_factor alone, a wrong picture
    record = {**get_latent_space("sdxl").to_dict(), given: [1.0] * 4}
    with pytest.raises(LatentSpaceError, match=f"'sdxl' has {given} but no {missing}.*give both, or neither"):
        LatentSpace.from_dict(record)
    with pytest.raises(LatentSpaceError, match=f"has {given} but no {missing}"):
        get_latent_space("sdxl").with_vae_config({given: [1.0] * 4})
    both = get_latent_space("sdxl").with_vae_config({"latents_mean": [1.0] * 4, "latents_std": [2.0] * 4})
    assert both.latents_mean == (1.0,) * 4 and both.latents_std == (2.0,) * 4


def test_flux2_batch_norm_view_round_trip():
    space = get_latent_space("flux2")
    raw = torch.randn(2, 32, 8, 6)
    packed = space.patchify(raw)
    assert packed.shape == (2, 128, 4, 3)
    assert torch.equal(space.unpatchify(packed), raw)
    mean, var = torch.randn(128), torch.rand(128) + 0.5
    normed = space.bn_normalize(raw, mean, var)
    assert torch.allclose(space.bn_denormalize(normed, mean, var), raw, atol=1e-5)
    bn = torch.nn.BatchNorm2d(128, eps=space.batch_norm_eps, affine=False).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    assert torch.allclose(bn(packed), normed, atol=1e-5)


def test_patchify_names_shapes_that_do_not_fit():
    """Each was a raw "shape '[...]' is invalid for input of size" from view()."""
    space = get_latent_space("flux2")
    with pytest.raises(LatentSpaceError, match="raw latents of 7x6 do not divide.*multiples of 16 pixels"):
        space.patchify(torch.randn(1, 32, 7, 6))
    with pytest.raises(LatentSpaceError, match="130 channels are not a multiple of 4.*128 channels"):
        space.unpatchify(torch.randn(1, 130, 4, 3))
    with pytest.raises(LatentSpaceError, match=r"patchify takes \(N, C, h, w\) raw VAE latents, got \(32, 8, 6\)"):
        space.patchify(torch.randn(32, 8, 6))
    with pytest.raises(LatentSpaceError, match="unpatchify takes .* got list"):
        space.unpatchify([1.0])


def test_conversions_name_latents_and_statistics_that_do_not_fit():
    """Each was a raw broadcasting or view error (from PreviewCallback too, given the wrong latents)."""
    flux2 = get_latent_space("flux2")
    with pytest.raises(LatentSpaceError, match="running_mean holds one value per patchified channel \\(128.*got 64"):
        flux2.bn_denormalize(torch.randn(1, 128, 2, 2), torch.zeros(64), torch.ones(128))
    with pytest.raises(LatentSpaceError, match="running_var holds .* got ndarray"):
        flux2.bn_normalize(torch.randn(1, 32, 4, 4), torch.zeros(128), np.ones(128))
    with pytest.raises(LatentSpaceError, match="pipeline latents have 128 patchified channels, got 100"):
        flux2.bn_denormalize(torch.randn(1, 100, 2, 2), torch.zeros(128), torch.ones(128))
    sdxl = get_latent_space("sdxl").with_vae_config({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(LatentSpaceError, match="expects 4 latent channels \\(sdxl\\), got 16"):
        sdxl.vae_to_decoder(torch.randn(1, 16, 2, 2))


def test_serialisation_and_unknown_names():
    space = get_latent_space("sdxl").with_vae_config({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    assert LatentSpace.from_dict(space.to_dict()) == space
    assert get_latent_space("SD-1.5") is get_latent_space("sd15")
    with pytest.raises(KeyError, match="unknown latent space 'sd4'.*choose one of"):
        get_latent_space("sd4")


def test_channel_mismatch_message_suggests_spaces():
    msg = get_latent_space("sdxl").channel_mismatch_message(16)
    assert "expects 4 latent channels (sdxl), got 16" in msg and "sd3" in msg and "flux1" in msg

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdec
from fastdec import CheckpointError, create_decoder, list_decoders, load_decoder, load_encoder, save_decoder


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * np.log10(1.0 / ((a - b) ** 2).mean().item()))


def test_taef2_real_weights_reconstruct_astronaut(taef2_encoder_path, taef2_decoder_path, astronaut):
    encoder = load_encoder(taef2_encoder_path)
    decoder = load_decoder(taef2_decoder_path)
    assert encoder.latent_space.name == decoder.latent_space.name == "flux2"
    assert decoder.config.use_midblock_gn and decoder.config.latent_channels == 32
    with torch.no_grad():
        z = encoder(astronaut)
        out = decoder(z)
    assert z.shape == (1, 32, 64, 64)
    value = psnr(out, astronaut)
    print(f"TAEF2 astronaut 512x512 PSNR: {value:.2f} dB")
    assert value >= 30.0


def test_taesana_encoder_loads_strictly():
    from conftest import shared_path

    encoder = load_encoder(shared_path("weights", "taesana_encoder.pth"))
    assert encoder.latent_space.name == "sana" and encoder.downsample_factor == 32
    with torch.no_grad():
        z = encoder(torch.rand(1, 3, 64, 96))
    assert z.shape == (1, 32, 2, 3)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 5, 7), (1, 4, 16, 12)])
def test_autoencoder_tiny_state_dict_matches_diffusers(tmp_path, shape):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny().eval()
    # random weights everywhere (default init leaves biases small): perturb so the test is sensitive
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    decoder = load_decoder(path, latent_space="sdxl").eval()
    z = torch.randn(shape) * 2
    with torch.no_grad():
        ours = decoder(z)
        theirs = ((tiny.decode(z).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_autoencoder_tiny_folder_and_encoder(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    tiny = AutoencoderTiny(latent_channels=16).eval()
    tiny.save_pretrained(tmp_path / "taef1-like")
    with pytest.warns(UserWarning, match="16-channel latents fit"):
        decoder = load_decoder(tmp_path / "taef1-like")
    assert decoder.latent_channels == 16
    encoder = load_encoder(tmp_path / "taef1-like", latent_space="flux1")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        # EncoderTiny takes [-1, 1] images; fastdec encoders take [0, 1]
        assert torch.allclose(encoder(x), tiny.encode(x * 2 - 1).latents, atol=1e-5)
        z = torch.randn(1, 16, 4, 4)
        assert torch.allclose(decoder(z), ((tiny.decode(z).sample + 1) / 2).clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("preset", list_decoders())
def test_save_load_round_trip_is_bit_exact(tmp_path, preset):
    torch.manual_seed(0)
    space = "sana" if preset.startswith("tae-") and "causal" not in preset and "temporal" not in preset else "flux1"
    decoder = create_decoder(preset, space)
    path = save_decoder(decoder, tmp_path / f"{preset}.safetensors")
    loaded = load_decoder(path)
    assert type(loaded) is type(decoder)
    assert loaded.config == decoder.config and loaded.latent_space == decoder.latent_space
    for (k1, v1), (k2, v2) in zip(decoder.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_round_trip_keeps_custom_latent_space(tmp_path):
    space = fastdec.get_latent_space("sdxl").with_vae_config({"latents_mean": [0.1] * 4, "latents_std": [2.0] * 4})
    decoder = create_decoder("tae-64", space)
    loaded = load_decoder(save_decoder(decoder, tmp_path / "d.safetensors"))
    assert loaded.latent_space == space


def test_truncated_file_error_names_the_file(tmp_path):
    path = save_decoder(create_decoder("tae-64", "sd15"), tmp_path / "d.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*truncated or corrupt"):
        load_decoder(bad)
    bad_pth = tmp_path / "truncated.pth"
    buf = tmp_path / "full.pth"
    torch.save(create_decoder("tae-64", "sd15").layers.state_dict(), buf)
    bad_pth.write_bytes(buf.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_decoder(bad_pth)


def test_wrong_architecture_errors(tmp_path, taef2_encoder_path):
    # weights of a width-64 decoder relabelled as a width-192 config
    decoder = create_decoder("tae-64", "sd15")
    path = save_decoder(decoder, tmp_path / "d.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg["width"] = 192
    meta["config"] = json.dumps(cfg)
    bad = tmp_path / "relabelled.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="relabelled.safetensors.*does not match"):
        load_decoder(bad)
    meta["architecture"] = "no-such-arch"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="no-such-arch"):
        load_decoder(bad)
    with pytest.raises(CheckpointError, match="looks like an encoder"):
        load_decoder(taef2_encoder_path)


def test_missing_path_and_offline_hub(monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        load_decoder("./no/such/file.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="(?s)Hugging Face Hub.*offline.*local folder"):
        load_decoder("madebyollin/taesdxl-does-not-exist-here")


def test_taesd_pth_detects_latent_space(tmp_path):
    decoder = create_decoder("tae-64", "sd3")
    path = tmp_path / "taesd3_decoder.pth"
    torch.save(decoder.layers.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file name settles the ambiguity: no warning
        loaded = load_decoder(path)
    assert loaded.latent_space.name == "sd3"
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        # two modules built apart with the same weights: fp32 kernels may differ by a few ulps between them
        torch.testing.assert_close(loaded(z), decoder(z), atol=1e-6, rtol=1e-5)

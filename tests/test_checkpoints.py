import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdec
from fastdec import CheckpointError, create_decoder, list_decoders, load_decoder, load_encoder, save_decoder
from fastdec.errors import InputTypeError, UsageError


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


def test_an_asked_latent_space_the_decoder_does_not_decode_is_refused(tmp_path):
    from fastdec.errors import DecoderSpecError

    # same channel count, other scale or factor: they were returned as if they fit (only channels were compared)
    sdxl = save_decoder(create_decoder("tae-64", "sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"'sdxl' latents, not 'sd15' \(scaling_factor 0.13025 vs 0.18215\)"):
        load_decoder(sdxl, latent_space="sd15")
    with pytest.raises(DecoderSpecError, match=r"the decoder object decodes 'sdxl' latents, not 'sd15'"):
        load_decoder(create_decoder("tae-64", "sdxl"), latent_space="sd15")
    with pytest.raises(DecoderSpecError, match=r"pretrained 'flux2-hifi' decodes 'flux2' latents, not 'sana' "
                                               r"\(spatial_factor 8 vs 32"):
        load_decoder("flux2-hifi", latent_space="sana")
    # what the same latents are under two names loads, and so does a fine-tuned VAE's variant of the space
    sd15 = save_decoder(create_decoder("tae-64", "sd15"), tmp_path / "sd15.safetensors")
    assert load_decoder(sd15, latent_space="svd").latent_space.name == "sd15"
    variant = fastdec.get_latent_space("sdxl").with_vae_config({"latents_mean": [0.1] * 4, "latents_std": [2.0] * 4})
    assert load_decoder(sdxl, latent_space=variant).latent_space.name == "sdxl"


def test_a_decoder_object_is_not_changed_by_loading_it_elsewhere():
    decoder = create_decoder("tae-64", "sdxl")
    half = load_decoder(decoder, dtype="fp16")
    # module.to converts in place: the caller's decoder came back fp16 (and a GPU one would move to the CPU)
    assert next(decoder.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.float16
    assert half is not decoder and load_decoder(decoder) is decoder  # nothing to move: no copy
    for (name, weight), (_, converted) in zip(decoder.state_dict().items(), half.state_dict().items()):
        assert torch.equal(converted, weight.half()), name  # the same weights, rounded once


def test_a_module_that_is_not_a_decoder_is_refused_as_the_spec(taef2_encoder_path):
    from fastdec.errors import DecoderSpecError

    with pytest.raises(DecoderSpecError, match="must be a fastdec decoder .*got a Linear"):
        load_decoder(torch.nn.Linear(2, 2))
    # an encoder was returned as the decoder, and failed later with "encoder expects RGB images"
    with pytest.raises(DecoderSpecError, match="got an encoder"):
        fastdec.resolve_decoder(load_encoder(taef2_encoder_path))


def test_save_decoder_reads_its_path_as_load_decoder_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    decoder = create_decoder("tae-64", "sdxl")
    path = save_decoder(decoder, "~/decoders/d.safetensors")  # it wrote ./~/decoders/d.safetensors
    assert path == tmp_path / "home" / "decoders" / "d.safetensors" and not (tmp_path / "~").exists()
    assert load_decoder("~/decoders/d.safetensors").config == decoder.config
    (tmp_path / "taken.safetensors").mkdir()
    with pytest.raises(UsageError, match="decoder file '.*taken.safetensors' is a folder"):  # was IsADirectoryError
        save_decoder(decoder, tmp_path / "taken.safetensors")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UsageError, match="'.*plain' is not a writable folder"):  # was FileExistsError
        save_decoder(decoder, tmp_path / "plain" / "d.safetensors")
    with pytest.raises(InputTypeError, match="save_decoder's path must be a path .*got NoneType"):
        save_decoder(decoder, None)
    with pytest.raises(InputTypeError, match="extra_metadata is a mapping of strings, got str"):
        save_decoder(decoder, tmp_path / "d.safetensors", extra_metadata="ab")


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
    # "use load_encoder" was no advice a command-line user could follow
    with pytest.raises(CheckpointError, match=r"looks like an encoder, not a decoder: give it where an encoder goes "
                                              r"\(--teacher; load_encoder in Python\)"):
        load_decoder(taef2_encoder_path)
    with pytest.raises(CheckpointError, match=r"looks like a decoder, not an encoder: give it where a decoder goes "
                                              r"\(--decoder, --teacher-decoder"):
        load_encoder(str(taef2_encoder_path).replace("encoder", "decoder"))


def test_a_preset_given_to_load_decoder_names_calls_that_take_it():
    """The message said random_weights=True, which load_decoder does not take (a TypeError for who tried)."""
    with pytest.raises(ValueError, match=r"create_decoder\('tae-64'\) or resolve_decoder\('tae-64', "
                                         r"random_weights=True\) \(load_decoder takes trained decoders only\)"):
        load_decoder("tae-64")
    assert fastdec.resolve_decoder("tae-64", random_weights=True).config == create_decoder("tae-64").config


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


# -- per-stage widths: the real TAESana decoder layout, round trips, old uniform files -----------------------
def taesd_decoder_layout(latent_channels, widths, stage_blocks, final_blocks):
    """A TAESD-family decoder state dict built key for key, with random weights, and its layer list.

    Written from madebyollin/taesd's taesd.py, independently of fastdec's model code: ``Decoder`` is
    nn.Sequential(Clamp(), conv(latent_channels, w0), ReLU(), then per stage Block(w, w) x n, Upsample(),
    conv(w, w_next, bias=False), then the final Block(s), conv(w_last, 3)); ``Block`` holds ``conv`` =
    Sequential(conv, ReLU, conv, ReLU, conv) (keys conv.0/2/4) and a 1x1 ``skip`` only when its in/out widths
    differ (never in these layouts: widths change in the conv after each upsampling). Its ``F32Decoder`` (TAESana,
    Sana's 32x DC-AE space) is Clamp, conv(32->256), ReLU, 3 blocks, Upsample, conv(256->128, no bias), 3 blocks,
    Upsample, conv(128->64), then three times (3 blocks, Upsample, conv(64->64)), 1 block, conv(64->3): widths
    (256, 128, 64, 64, 64, 64), 3 blocks in each of its 5 stages, 1 final block. (The issue described 1-block
    high-resolution stages; taesd.py has 3. The loader reads the counts from the keys: both are tested.)"""
    generator = torch.Generator().manual_seed(0)

    def conv(n_in, n_out, bias=True, k=3):
        # He-scaled so activations stay O(1) through 20 layers and every weight matters
        weight = torch.randn(n_out, n_in, k, k, generator=generator) * (2 / (n_in * k * k)) ** 0.5
        return {"weight": weight, **({"bias": 0.1 * torch.randn(n_out, generator=generator)} if bias else {})}

    def block(w):
        return ("block", {f"conv.{i}.{k}": v for i in (0, 2, 4) for k, v in conv(w, w).items()})

    layers = [("clamp", None), ("conv", conv(latent_channels, widths[0])), ("relu", None)]
    for stage, n_blocks in enumerate(stage_blocks):
        layers += [block(widths[stage]) for _ in range(n_blocks)]
        layers += [("up", None), ("conv", conv(widths[stage], widths[stage + 1], bias=False))]
    layers += [block(widths[-1]) for _ in range(final_blocks)] + [("conv", conv(widths[-1], 3))]
    state = {f"{index}.{key}": value for index, (_, params) in enumerate(layers) for key, value in (params or {}).items()}
    return state, layers


def reference_decode(layers, z):
    """The original nn.Sequential's forward, written out with torch.nn.functional (no fastdec code)."""
    import torch.nn.functional as F

    def conv(x, p):
        return F.conv2d(x, p["weight"], p.get("bias"), padding=1)

    x = z
    for kind, params in layers:
        if kind == "clamp":
            x = torch.tanh(x / 3) * 3
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        elif kind == "conv":
            x = conv(x, params)
        else:
            p = {i: {"weight": params[f"conv.{i}.weight"], "bias": params[f"conv.{i}.bias"]} for i in (0, 2, 4)}
            h = conv(F.relu(conv(F.relu(conv(x, p[0])), p[2])), p[4])
            x = F.relu(h + x)
    return x


TAESANA = dict(latent_channels=32, widths=(256, 128, 64, 64, 64, 64), stage_blocks=(3, 3, 3, 3, 3), final_blocks=1)


@pytest.mark.parametrize("layout", [
    TAESANA,  # taesd.py's F32Decoder
    dict(TAESANA, stage_blocks=(3, 3, 3, 1, 1)),  # the same widths with 1-block high-resolution stages
    dict(latent_channels=16, widths=(256, 128, 64, 64), stage_blocks=(3, 3, 3), final_blocks=1),  # TAEHV's widths
])
def test_taesana_decoder_layout_loads_strictly_and_decodes_as_the_original(tmp_path, layout):
    state, layers = taesd_decoder_layout(**layout)
    name = "taesana_decoder.pth" if layout["latent_channels"] == 32 else "taef1_decoder.pth"
    torch.save(state, tmp_path / name)
    decoder = load_decoder(tmp_path / name).eval()
    assert decoder.config.stage_widths == layout["widths"]
    assert decoder.config.stage_blocks == layout["stage_blocks"] and decoder.config.final_blocks == 1
    assert decoder.latent_space.name == ("sana" if layout["latent_channels"] == 32 else "flux1")
    z = 2 * torch.randn(1, layout["latent_channels"], 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = decoder.decode_layers(z), reference_decode(layers, z)
    assert ours.shape == theirs.shape == (1, 3, 2 * decoder.upsample_factor, 3 * decoder.upsample_factor)
    assert theirs.std() > 0.1  # a real picture, so a wrong layer would show
    # the same fp32 convolutions in the same order: equal up to rounding (~1e-6 on O(1) values)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # strict: a key too many (a skip conv in a block whose widths are equal) is refused
    torch.save({**state, "3.skip.weight": torch.zeros(256, 256, 1, 1)}, tmp_path / f"extra_{name}")
    with pytest.raises(CheckpointError, match=r"(?s)does not match.*Unexpected key.*layers\.3\.skip\.weight"):
        load_decoder(tmp_path / f"extra_{name}")


def test_real_taesana_encoder_latents_decode_with_the_taesana_layout(tmp_path):
    """A sanity check of the encoder side: the real TAESana encoder's latents fit the decoder layout."""
    from conftest import shared_path

    encoder = load_encoder(shared_path("weights", "taesana_encoder.pth"))
    state, _ = taesd_decoder_layout(**TAESANA)
    torch.save(state, tmp_path / "taesana_decoder.pth")
    decoder = load_decoder(tmp_path / "taesana_decoder.pth")
    assert encoder.latent_space.name == decoder.latent_space.name == "sana"
    with torch.no_grad():
        out = decoder(encoder(torch.rand(1, 3, 64, 96)))
    assert out.shape == (1, 3, 64, 96)


@pytest.mark.parametrize("preset", ["tae-turbo", "tae-large"])
def test_per_stage_widths_and_head_round_trip(tmp_path, preset, make_decoder):
    decoder = make_decoder(preset, "flux2")
    path = save_decoder(decoder, tmp_path / f"{preset}.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = json.loads(f.metadata()["config"])  # the metadata carries the layout
    assert tuple(stored["widths"]) == decoder.config.widths and stored["head"] == decoder.config.head
    loaded = load_decoder(path)
    assert loaded.config == decoder.config
    z = torch.randn(1, 32, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(z), decoder(z))


def test_uniform_checkpoints_written_before_per_stage_widths_load_unchanged(tmp_path, make_decoder):
    """Files from before the widths/head fields hold a config JSON with ``width`` only."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    decoder = make_decoder("tae-64", "flux2", width=16)
    path = save_decoder(decoder, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    assert config.pop("widths") is None and config.pop("head") == "conv"
    meta["config"] = json.dumps(config, sort_keys=True)
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    old = load_decoder(tmp_path / "old.safetensors")
    assert old.config == decoder.config and old.config.stage_widths == (16,) * 4 and old.config.head == "conv"
    z = torch.randn(1, 32, 3, 4)
    with torch.no_grad():
        assert torch.equal(old(z), decoder(z))


@pytest.mark.parametrize("content, kind", [
    (b"architecture: tae-64\nwidths: [64, 64]\n", "it is a text file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "it is an image"),
    (bytes([0x80, 0x02, 0x64]) + bytes(range(200)), "it is truncated, corrupt or in another format"),
])
def test_a_file_that_is_no_weights_says_what_it_is_not_torchs_unsafe_advice(tmp_path, content, kind):
    """torch's weights-only failure text advises weights_only=False (which would run the file's code); a
    YAML or an image given as a decoder is named as what it is instead."""
    path = tmp_path / "decoder.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_decoder(path)
    message = str(caught.value)
    assert kind in message and "is not a checkpoint fastdec can read" in message
    assert "weights_only" not in message and "file an issue" not in message


def test_extra_metadata_cannot_overwrite_the_description_or_hold_non_strings(tmp_path):
    decoder = create_decoder("tae-64", "sdxl")
    with pytest.raises(fastdec.FastdecError, match=r"may not set \['latent_space'\]"):
        save_decoder(decoder, tmp_path / "a.safetensors", extra_metadata={"latent_space": "junk"})
    with pytest.raises(TypeError, match=r"must be strings .* not for \['a'\]"):
        save_decoder(decoder, tmp_path / "b.safetensors", extra_metadata={"a": 1})
    assert not list(tmp_path.iterdir())
    path = save_decoder(decoder, tmp_path / "c.safetensors", extra_metadata={"trained_steps": "3"})
    assert load_decoder(path).latent_space.name == "sdxl"

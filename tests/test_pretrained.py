"""fastdec's shipped decoders (issue 13, item 4): flux2-hifi, flux2-turbo and flux2-large.

They are package data: these tests reach them through ``fastdec.pretrained`` (importlib.resources), never
through a source path, and check that the shipped file is the trained one (it decodes real TAEF2 latents
nearly as well as TAEF2 or better) and that its model card carries what the issue asks for."""
from __future__ import annotations

from importlib import resources

import pytest
import torch
from safetensors import safe_open

import fastdec
from fastdec.errors import DecoderSpecError, FastdecError
from fastdec.pretrained import PRETRAINED, list_pretrained, model_card

NAMES = ["flux2-hifi", "flux2-large", "flux2-turbo"]
CARD_FIELDS = {"name", "architecture", "started_from", "config", "params", "gflops_512", "weights", "data",
               "latents", "training", "evaluation", "speed", "trades"}


def test_the_three_are_listed_for_flux2():
    names = list_pretrained()
    assert set(NAMES) <= set(names) and names == sorted(names)
    assert list_pretrained("flux2") == names and list_pretrained("sdxl") == []


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_fp16_package_data(name):
    ref = resources.files("fastdec.pretrained").joinpath(f"{name}.safetensors")
    assert ref.is_file() and PRETRAINED[name].path() == type(PRETRAINED[name].path())(str(ref))
    with safe_open(str(ref), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    assert ref.stat().st_size < 40e6  # a few MB each: nothing but the weights


@pytest.fixture(scope="module")
def photo_latents():
    """TAEF2-encoder latents of a 256x256 crop of a BSDS val photo (shared data), the crop, and TAEF2."""
    from conftest import taef2_photo

    crop, z, taef2 = taef2_photo(3)
    return z, crop, taef2


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_are_the_trained_ones(name, photo_latents):
    z, crop, taef2 = photo_latents
    decoder = fastdec.load_decoder(name).eval()
    assert decoder.latent_space.name == "flux2" and decoder.dtype == torch.float32  # fp16 file, fp32 module
    with torch.no_grad():
        ours, theirs = psnr(decoder(z), crop), psnr(taef2(z), crop)
    print(f"{name}: {ours:.2f} dB, TAEF2 {theirs:.2f} dB")
    # the guard the issue asks for: an untrained file decodes to ~5 dB and TAEF2's weights moved into the
    # turbo layout untrained to ~17 dB (measured), far below this
    assert ours > theirs - 1.0


@pytest.mark.parametrize("name", NAMES)
def test_model_card_carries_the_issue_fields(name):
    card = model_card(name)
    assert CARD_FIELDS <= set(card), CARD_FIELDS - set(card)
    decoder = fastdec.load_decoder(name)
    assert card["name"] == name and card["params"] == sum(p.numel() for p in decoder.parameters())
    assert card["gflops_512"] > 0
    licences = " ".join(d["licence"] for d in card["data"])
    assert "research use" in licences  # BSDS500
    training = card["training"]
    assert training["steps"] > 0 and training["wall_time_min"] > 0 and training["hardware"].endswith("no GPU")
    assert training["validation_curve"] and all(p["val_psnr"] > 0 for p in training["validation_curve"])
    evaluation = card["evaluation"]
    for metric in ("psnr", "ssim", "ms_ssim", "vif"):
        m, d = evaluation["metrics"][metric], evaluation["vs_baseline"][metric]
        assert m["ci_low"] <= m["mean"] <= m["ci_high"] and d["ci_low"] <= d["mean"] <= d["ci_high"]
        assert m["n"] == 100 and d["n"] == 100  # all of BSDS val
    assert evaluation["baseline"] == "teacher"  # TAEF2, in the same run
    assert card["speed"] and all(r["ms"] > 0 and r["baseline_ms"] > 0 for r in card["speed"])
    assert name in card["latents"] and "--init" in card["latents"]


@pytest.mark.parametrize("name", NAMES)
def test_config_beside_the_weights_is_a_runnable_training_config(name):
    from fastdec.train.config import load_config_file

    ref = resources.files("fastdec.pretrained").joinpath(f"{name}.yaml")
    assert ref.is_file()
    with resources.as_file(ref) as path:
        values = load_config_file(path)
    assert values["teacher"].endswith("taef2_encoder.pth") and values["init"].endswith("taef2_decoder.pth")
    assert values["data"].endswith("images/train")  # BSDS val is for validation only
    assert values["steps"] == model_card(name)["training"]["steps"]
    shipped = fastdec.load_decoder(name)
    built = fastdec.create_decoder(values["decoder"], "flux2")
    assert built.config_dict() == shipped.config_dict()


def test_model_cards_markdown_is_shipped_and_names_each():
    text = resources.files("fastdec.pretrained").joinpath("MODEL_CARDS.md").read_text()
    for name in NAMES:
        assert f"## {name}" in text


def test_unknown_name_and_card_errors():
    with pytest.raises(DecoderSpecError, match=r"no pretrained decoder named 'flux2-nope'; shipped: flux2-hifi"):
        model_card("flux2-nope")
    with pytest.raises(DecoderSpecError, match=r"no pretrained decoder named '\['flux2-hifi'\]'"):
        model_card(["flux2-hifi"])  # not an unhashable-type TypeError
    assert list_pretrained("sdxl") == []  # a known space with none shipped
    with pytest.raises(FastdecError, match="unknown latent space 'foo'"):
        list_pretrained("foo")  # a typo is no empty list (`fastdec pretrained --latent-space foo` exited 0)


def test_card_with_a_latent_space_is_refused(capsys):
    # --latent-space sdxl was dropped and the flux2 card printed
    from fastdec.cli import main

    assert main(["pretrained", "--card", "flux2-turbo", "--latent-space", "sdxl"]) == 2
    captured = capsys.readouterr()
    assert "--latent-space filters the list, and --card names one decoder" in captured.err and not captured.out


def test_turbo_is_at_most_half_of_taef2s_flops_and_large_at_most_three_times():
    taef2 = fastdec.create_decoder("tae-64", "flux2")
    from fastdec.bench.measure import count_flops

    def gflops(decoder):
        z = torch.zeros(1, 32, 64, 64)
        with torch.no_grad():
            return count_flops(lambda: decoder(z)) / 1e9

    base = gflops(taef2)
    assert gflops(fastdec.load_decoder("flux2-turbo")) <= 0.5 * base
    assert gflops(fastdec.load_decoder("flux2-large")) <= 3 * base
    assert fastdec.load_decoder("flux2-hifi").config_dict() == taef2.config_dict()  # TAEF2's architecture


def test_swap_decoder_by_name_on_a_flux2_pipeline():
    import pipeline_fixtures as pf

    from fastdec.pipelines import FastVAE, restore_decoder, swap_decoder

    pipe = pf.PIPELINES["flux2"]()
    swap_decoder(pipe, "flux2-hifi")
    assert isinstance(pipe.vae, FastVAE)
    assert pipe.vae.decoder.config_dict() == fastdec.load_decoder("flux2-hifi").config_dict()
    restore_decoder(pipe)
    sd = pf.PIPELINES["sd15"]()
    with pytest.raises(Exception, match=r"flux2"):
        swap_decoder(sd, "flux2-hifi")

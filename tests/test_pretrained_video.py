"""fastdec's shipped video decoders (issue 14): flux2-video and flux2-video-turbo.

Loaded by name from the installed package; each is a causal decoder whose image part is a per-frame decoder
(zero the memory convs and it is one), that streams what it decodes in one call, and that decodes a real
shared clip nearly as well as the per-frame image decoder it was started from."""
from __future__ import annotations

import pytest
import torch

import fastdec
from fastdec.models.causal import CausalTAEDecoder
from fastdec.models.tae import IMAGE_FIELDS, TAEConfig, TAEDecoder
from fastdec.pretrained import PRETRAINED, list_pretrained, model_card

VIDEO = {"flux2-video": "flux2-hifi", "flux2-video-turbo": "flux2-turbo"}
HELD_OUT = ("02_cups.mp4", "04_coffee.mp4", "cockatoo.mp4")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def image_part(video: CausalTAEDecoder) -> TAEDecoder:
    """The per-frame decoder inside ``video``: its weights without the memory convs."""
    config = TAEConfig(**{name: getattr(video.config, name) for name in IMAGE_FIELDS})
    image = TAEDecoder(config, video.latent_space)
    image.load_state_dict({k: v for k, v in video.state_dict().items() if ".memory." not in k})
    return image.eval()


@pytest.fixture(scope="module")
def clip_latents():
    """16 frames of a held-out shared clip, 128x128 centre crop, and their TAEF2-encoder latents."""
    from conftest import shared_path

    from fastdec.io.video import read_video

    frames = read_video(shared_path("data", "video", "clips", HELD_OUT[0]), num_frames=16)  # (T, 3, H, W)
    h, w = frames.shape[-2:]
    crop = frames[..., (h - 128) // 2: (h + 128) // 2, (w - 128) // 2: (w + 128) // 2].float() / 255  # uint8
    encoder = fastdec.load_encoder(shared_path("weights", "taef2_encoder.pth"))
    with torch.no_grad():
        return crop, encoder(crop)[None]  # latents (1, T, C, h, w)


def test_video_names_are_listed_with_the_image_ones():
    assert set(VIDEO) | set(VIDEO.values()) <= set(list_pretrained("flux2"))


@pytest.mark.parametrize("name", VIDEO)
def test_loads_by_name_as_a_causal_decoder_with_trained_memory(name):
    decoder = fastdec.load_decoder(name)
    assert isinstance(decoder, CausalTAEDecoder) and decoder.latent_space.name == "flux2"
    memory = [v for k, v in decoder.state_dict().items() if ".memory." in k]
    assert memory and sum(float(m.abs().sum()) for m in memory) > 0  # trained: not the zero start
    assert PRETRAINED[name].path().suffix == ".safetensors"
    card = model_card(name)
    assert card["started_from"].startswith(VIDEO[name]) and card["training"]["steps"] > 0
    assert card["held_out"] == [f"clips/{clip}" for clip in HELD_OUT]  # never trained on


@pytest.mark.parametrize("name", VIDEO)
def test_zeroed_memory_is_its_image_decoder(name, clip_latents):
    _, z = clip_latents
    decoder = fastdec.load_decoder(name).eval()
    image = image_part(decoder)
    with torch.no_grad():
        for key, value in decoder.state_dict().items():
            if ".memory." in key:
                value.zero_()
        video = decoder(z[:, :6])
        per_frame = image(z[0, :6])
    # a zero memory conv adds exact zeros; the rest is the same convs on the same input shapes in fp32, but in
    # two separately built modules whose kernels may block the sums differently: 1e-5 on [0, 1] pixels (the
    # memory's trained effect on these frames is ~1e-2)
    assert (video[0] - per_frame).abs().max() <= 1e-5


@pytest.mark.parametrize("name", VIDEO)
def test_streaming_equals_one_call(name, clip_latents):
    _, z = clip_latents
    decoder = fastdec.load_decoder(name).eval()
    with torch.no_grad():
        whole = decoder(z[:, :8])
        stream = decoder.stream()
        pushed = torch.cat([stream.push(z[:, t: t + 1]) for t in range(8)], dim=1)
    # the same convs on the same frames; fp32, but batched vs one-frame calls may block the sums differently:
    # test_temporal's FP32_ATOL (1e-4, derived there) on [0, 1] pixels
    assert (whole - pushed).abs().max() <= 1e-4


@pytest.mark.parametrize("name", VIDEO)
def test_decodes_a_held_out_clip_within_1_db_of_the_per_frame_decoder(name, clip_latents):
    crop, z = clip_latents
    video, image = fastdec.load_decoder(name).eval(), fastdec.load_decoder(VIDEO[name]).eval()
    with torch.no_grad():
        ours, per_frame = psnr(video(z)[0], crop), psnr(image(z[0]), crop)
    print(f"{name}: {ours:.2f} dB; {VIDEO[name]} per frame: {per_frame:.2f} dB")
    assert ours > per_frame - 1.0


def test_swap_decoder_refuses_a_flux2_video_decoder_on_svd_naming_both_spaces():
    import pipeline_fixtures as pf

    from fastdec.errors import FastdecError
    from fastdec.pipelines import swap_decoder

    pipe = pf.PIPELINES["svd"]()
    with pytest.raises(FastdecError, match=r"flux2.*svd|svd.*flux2"):
        swap_decoder(pipe, "flux2-video")


def test_decode_video_and_preview_callback_take_the_names(tmp_path):
    from conftest import shared_path

    from fastdec.cli import main
    from fastdec.pipelines import PreviewCallback

    out = tmp_path / "clip.gif"
    code = main(["decode-video", str(shared_path("data", "video", "clips", "realshort.mp4")), "--decoder",
                 "flux2-video-turbo", "--teacher", str(shared_path("weights", "taef2_encoder.pth")), "--num-frames", "3",
                 "--out", str(out), "--quiet"])
    assert code == 0 and out.stat().st_size > 0
    from PIL import Image

    gif = Image.open(out)
    assert gif.n_frames == 3 and gif.size == (320, 240)
    assert isinstance(PreviewCallback("flux2-video", on_preview=print).decoder, CausalTAEDecoder)

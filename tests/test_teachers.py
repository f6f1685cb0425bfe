"""Teachers: TAESD-family encoders (real TAEF2 weights) and diffusers VAEs (tiny random configs)."""
from __future__ import annotations

import json

import pytest
import torch

from fastdec.errors import FastdecError, UsageError
from fastdec.metrics import psnr
from fastdec.teachers import DiffusersTeacher, TAETeacher, TeacherError, load_teacher, space_for_vae

TINY_KL = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4)


def test_taef2_teacher_gives_flux2_latents_and_decodes(taef2_encoder_path, taef2_decoder_path, astronaut):
    teacher = load_teacher(taef2_encoder_path, decoder=taef2_decoder_path)
    assert isinstance(teacher, TAETeacher)
    assert teacher.latent_space.name == "flux2" and teacher.spatial_factor == 8 and teacher.has_decoder
    image = astronaut[..., 128:384, 128:384]
    z = teacher.encode(image)
    assert z.shape == (1, 32, 32, 32) and z.dtype == torch.float32
    quality = float(psnr(teacher.decode(z), image))
    print(f"TAEF2 teacher round trip on a 256 px astronaut crop: {quality:.2f} dB")
    assert quality > 27


def test_teacher_without_decoder_says_how_to_add_one(taef2_encoder_path):
    teacher = load_teacher(taef2_encoder_path)
    assert not teacher.has_decoder
    with pytest.raises(TeacherError, match="teacher-decoder"):
        teacher.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(UsageError, match="multiple of"):
        teacher.encode(torch.rand(1, 3, 30, 30))


def _save_pipeline_vae(vae, root):
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


def test_autoencoderkl_pipeline_folder_teacher_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_KL, latent_channels=4, scaling_factor=0.13025).eval()
    teacher = load_teacher(_save_pipeline_vae(vae, tmp_path / "pipe"))  # a pipeline folder: its vae/ is used
    assert isinstance(teacher, DiffusersTeacher)
    assert teacher.latent_space.name == "sdxl" and teacher.latent_space.scaling_factor == pytest.approx(0.13025)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        raw = vae.encode(images * 2 - 1).latent_dist.mode()
        reference_rgb = (vae.decode(raw).sample + 1) / 2
    z = teacher.encode(images)
    torch.testing.assert_close(z, raw * 0.13025, rtol=1e-5, atol=1e-5)  # decoder space = scaled
    torch.testing.assert_close(teacher.decode(z), reference_rgb.clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_a_vae_teacher_refuses_a_latent_space_of_another_shape(tmp_path):
    """Channels were checked for a pipeline folder only, and the factor nowhere: a VAE labelled with a space of
    another factor encodes at its own factor, so frames came out the wrong size."""
    from diffusers import AutoencoderKL

    from fastdec.latent_spaces import LatentSpace

    torch.manual_seed(0)
    folder = _save_pipeline_vae(AutoencoderKL(**TINY_KL, latent_channels=4, scaling_factor=0.13025), tmp_path / "p")
    with pytest.raises(TeacherError, match=r"for 4-channel latents at /8, not 'sd3' \(16 channels, /8\)"):
        load_teacher(folder, latent_space="sd3")
    with pytest.raises(TeacherError, match=r"for 4-channel latents at /8, not 'x16' \(4 channels, /16\)"):
        load_teacher(folder, latent_space=LatentSpace("x16", 4, spatial_factor=16))
    assert load_teacher(folder, latent_space="sd15").latent_space.name == "sd15"  # same shape: the one asked for


def test_vae_classes_map_to_their_latent_spaces(tmp_path):
    from diffusers import AutoencoderDC, AutoencoderKLFlux2, AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    flux2 = AutoencoderKLFlux2(**TINY_KL, latent_channels=32)
    flux2.save_pretrained(tmp_path / "flux2")
    teacher = load_teacher(tmp_path / "flux2")
    assert teacher.latent_space.name == "flux2"
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        raw = flux2.eval().encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(teacher.encode(images), raw)  # FLUX.2 decoders take raw latents

    svd = AutoencoderKLTemporalDecoder(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                       layers_per_block=1, latent_channels=4)
    svd.save_pretrained(tmp_path / "svd")
    teacher = load_teacher(tmp_path / "svd")
    assert teacher.latent_space.name == "svd"
    frames = teacher.decode(teacher.encode(torch.rand(3, 3, 32, 32)))
    assert frames.shape == (3, 3, 32, 32) and 0 <= frames.min() and frames.max() <= 1

    dc = AutoencoderDC(latent_channels=32, attention_head_dim=8, encoder_block_out_channels=(8, 8, 16, 16, 32, 64),
                       decoder_block_out_channels=(8, 8, 16, 16, 32, 64), encoder_layers_per_block=(1,) * 6,
                       decoder_layers_per_block=(1,) * 6, scaling_factor=0.41407)
    dc.save_pretrained(tmp_path / "dc")
    teacher = load_teacher(tmp_path / "dc")
    assert teacher.latent_space.name == "sana" and teacher.spatial_factor == 32
    with torch.no_grad():
        raw = dc.eval().encode(torch.ones(1, 3, 64, 64) * 2 - 1).latent
    torch.testing.assert_close(teacher.encode(torch.ones(1, 3, 64, 64)), raw * 0.41407, rtol=1e-5, atol=1e-5)


def test_space_detection_uses_config_values():
    space = space_for_vae("AutoencoderKL", {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159})
    assert space.name == "flux1"
    space = space_for_vae("AutoencoderKL", {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609})
    assert space.name == "sd3"
    # an SDXL-derived VAE with per-channel statistics keeps them
    space = space_for_vae("AutoencoderKL", {"latent_channels": 4, "scaling_factor": 0.5,
                                            "latents_mean": [0.1] * 4, "latents_std": [2.0] * 4})
    assert space.latents_mean == (0.1,) * 4
    with pytest.raises(TeacherError, match="latent-space"):
        space_for_vae("AutoencoderKL", {"latent_channels": 7})


def test_bad_teacher_sources_are_named(tmp_path):
    with pytest.raises(TeacherError, match="missing_encoder.pth.*neither a diffusers VAE.*no such file"):
        load_teacher(tmp_path / "missing_encoder.pth")
    with pytest.raises(TeacherError, match="'tae-64' is neither"):  # a decoder preset is no teacher
        load_teacher("tae-64")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="junk.pth"):
        load_teacher(junk)


def test_tae_teacher_takes_a_dtype_name_and_a_decoder_object(tmp_path, make_decoder):
    from _train_helpers import tiny_encoder_file

    encoder = tiny_encoder_file(tmp_path / "taesdxl_encoder.pth")
    teacher = load_teacher(encoder, decoder=make_decoder("tae-64", "sdxl"), dtype="bf16")
    assert teacher.encoder.layers[0].weight.dtype == torch.bfloat16 and teacher.has_decoder
    assert teacher.decode(teacher.encode(torch.rand(1, 3, 16, 16))).shape == (1, 3, 16, 16)
    with pytest.raises(TeacherError, match="decodes 'sd3' latents, not 'sdxl'.*or the encoder of that space"):
        load_teacher(encoder, decoder=make_decoder("tae-64", "sd3"))
    # the same channel count was enough before: an SD 1.5 decoder was taken for SDXL latents
    with pytest.raises(TeacherError, match=r"decodes 'sd15' latents, not 'sdxl' \(scaling_factor 0.18215 vs 0.13025"):
        load_teacher(encoder, decoder=make_decoder("tae-64", "sd15"))
    assert issubclass(TeacherError, FastdecError)


def test_a_hub_teachers_fingerprint_names_the_commit_its_files_came_from():
    from fastdec.teachers import _hub_revision

    cached = "/home/u/.cache/huggingface/hub/models--org--vae/snapshots/0123abcd/vae/config.json"
    assert _hub_revision(cached) == "0123abcd"  # an update on the Hub is a new commit, so a new latent cache
    assert _hub_revision("/data/snapshots") == "unknown"


def test_a_latent_space_of_another_shape_than_the_encoder_is_refused(taef2_encoder_path):
    """--latent-space sdxl with TAEF2's encoder built a cache named sdxl holding 32-channel latents, and failed
    only at step 0: refused when the teacher loads, saying what the file encodes."""
    from fastdec.errors import LatentSpaceError

    for space, shape in (("sdxl", "4 channels, /8"), ("sana", "32 channels, /32")):
        with pytest.raises(LatentSpaceError, match=f"encodes 32-channel latents at /8, not '{space}' \\({shape}\\)"):
            load_teacher(taef2_encoder_path, latent_space=space)
    assert load_teacher(taef2_encoder_path, latent_space="flux2").latent_space.name == "flux2"

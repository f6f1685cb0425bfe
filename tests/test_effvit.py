"""EfficientViT-style decoder: presets, the linear attention against a naive reference, receptive
fields, precision, checkpoints and training."""
import re

import pytest
import torch
import torch.nn.functional as F

from fastdec import create_decoder, get_latent_space, load_decoder, save_decoder
from fastdec.errors import UsageError
from fastdec.models import PRESETS
from fastdec.models.blocks import GLUMBConv, ReLULinearAttention
from fastdec.models.effvit import EffViTConfig, EffViTDecoder

SPACES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "svd", "sana"]
EFFVIT_PRESETS = ["effvit-paper", "effvit-attn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unclamped(decoder, z):
    # random-weight outputs often saturate at 0 or 1: compare the layers' output before the final clamp
    return decoder.decode_layers(decoder.check_latents(z))


@pytest.mark.parametrize("preset", EFFVIT_PRESETS)
@pytest.mark.parametrize("space", SPACES)
def test_preset_decodes_every_space(preset, space, make_decoder):
    s = get_latent_space(space)
    decoder = make_decoder(preset, space)  # the preset's stages and block types at test width
    h, w = (2, 3) if s.spatial_factor == 32 else (3, 5)
    with torch.no_grad():
        out = decoder(3 * torch.randn(2, s.channels, h, w))
    f = s.spatial_factor
    assert isinstance(decoder, EffViTDecoder) and decoder.upsample_factor == f
    assert out.shape == (2, 3, f * h, f * w)
    assert out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert out.std() > 0


@pytest.mark.parametrize("space", SPACES)
def test_paper_preset_has_no_attention_and_attn_preset_has_it(space):
    paper = create_decoder("effvit-paper", space)
    attn = create_decoder("effvit-attn", space)
    assert paper.config.widths == (128, 128, 128, 256, 256, 256)
    assert paper.config.depths == (0, 5, 10, 0, 0, 0)
    assert not any(isinstance(m, (ReLULinearAttention, GLUMBConv)) for m in paper.modules())
    assert paper.num_attention_blocks == 0
    assert attn.num_attention_blocks == (8 if space == "sana" else 4)
    assert "NO attention" in PRESETS["effvit-paper"].description


@pytest.mark.parametrize("space", ["sdxl", "sana"])
def test_attention_runs_at_low_resolution_only(space):
    s = get_latent_space(space)
    decoder = create_decoder("effvit-attn", space).eval()
    sizes = []
    for m in decoder.modules():
        if isinstance(m, ReLULinearAttention):
            m.register_forward_hook(lambda mod, args, out: sizes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        decoder(torch.randn(1, s.channels, 2, 3))
    # 4 blocks at the latent resolution (1/8 or 1/32); sana also 2 at 1/16 and 2 at 1/8
    expected = [(2, 3)] * 4 if space != "sana" else [(2, 3)] * 2 + [(4, 6)] * 2 + [(8, 12)] * 4
    assert sizes == expected


def naive_linear_attention(qkv: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """out_p = sum_p' (relu(q_p) . relu(k_p')) v_p' / sum_p' (relu(q_p) . relu(k_p')), one head at a time."""
    n, c, h, w = qkv.shape
    out = torch.zeros(n, c // 3, h * w, dtype=qkv.dtype)
    for b in range(n):
        for head in range(c // (3 * head_dim)):
            chans = qkv[b, head * 3 * head_dim : (head + 1) * 3 * head_dim].reshape(3 * head_dim, h * w)
            q = F.relu(chans[:head_dim]).T  # (pixels, d)
            k = F.relu(chans[head_dim : 2 * head_dim]).T
            v = chans[2 * head_dim :].T
            scores = q @ k.T  # (pixels, pixels): the matrix linear attention never builds
            out[b, head * head_dim : (head + 1) * head_dim] = ((scores @ v) / (scores.sum(1, keepdim=True) + eps)).T
    return out.reshape(n, c // 3, h, w)


def test_linear_attention_matches_naive_reference():
    torch.manual_seed(0)
    attn = ReLULinearAttention(16, head_dim=8, scales=(3, 5))
    with torch.no_grad():  # non-trivial norm affine, so the projection path is tested too
        attn.proj[1].weight.normal_()
        attn.proj[1].bias.normal_()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        out = attn(x)
        a64 = attn.double()
        x64 = x.double()
        qkv = a64.qkv(x64)
        heads = [naive_linear_attention(qkv, 8, attn.eps)]
        heads += [naive_linear_attention(agg(qkv), 8, attn.eps) for agg in a64.aggregate]
        ref = x64 + a64.proj(torch.cat(heads, dim=1))
    assert out.shape == x.shape
    assert (out.double() - ref).abs().max() < 1e-5


def test_linear_attention_stays_fp32_under_autocast():
    torch.manual_seed(0)
    attn = ReLULinearAttention(64, head_dim=32)
    qkv = torch.randn(1, 192, 32, 32)
    with torch.no_grad():
        ref = attn.attend(qkv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn.attend(qkv)
    # bf16 matmuls would leave errors around 1e-2
    assert (out.float() - ref).abs().max() < 1e-5


def test_linear_attention_does_not_overflow_in_fp16():
    torch.manual_seed(0)
    attn = ReLULinearAttention(64, head_dim=32, scales=())
    x = 30 * torch.randn(1, 64, 64, 64)
    with torch.no_grad():
        ref = attn(x)
        half = attn.half()
        # the premise: summing k v^T over 4096 pixels in fp16 overflows
        qkv = half.qkv(x.half()).reshape(1, 2, 96, -1)
        assert torch.isinf(F.relu(qkv[:, :, 32:64]) @ qkv[:, :, 64:].transpose(-1, -2)).any()
        out = half(x.half())
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2


def test_fp16_decoder_matches_fp32():
    torch.manual_seed(0)
    decoder = create_decoder("effvit-attn", "sdxl").eval()
    z = 3 * torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = unclamped(decoder, z)
        out = unclamped(decoder.half(), z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_glumbconv_is_local():
    # its norm is per pixel: one changed input pixel changes only its 3x3 neighbourhood
    torch.manual_seed(0)
    block = GLUMBConv(16)
    x = torch.randn(1, 16, 9, 9)
    x2 = x.clone()
    x2[..., 4, 4] += 1
    with torch.no_grad():
        changed = (block(x2) - block(x)).abs().amax(1)[0] > 0
    assert changed[3:6, 3:6].all()
    changed[3:6, 3:6] = False
    assert not changed.any()


def test_attention_sees_far_pixels_conv_only_preset_does_not():
    torch.manual_seed(0)
    # effvit-paper's receptive field reaches 21.6 latent pixels (measured): pixel 23 is out of its reach
    z = torch.randn(1, 4, 24, 24)
    z2 = z.clone()
    z2[..., 0, 0] += 2  # top-left latent pixel
    for preset in EFFVIT_PRESETS:
        decoder = create_decoder(preset, "sdxl").eval()
        with torch.no_grad():
            diff = (unclamped(decoder, z2) - unclamped(decoder, z)).abs()
        near, far = diff[..., :8, :8].max(), diff[..., -8:, -8:].max()  # far: latent pixel (23, 23)
        assert near > 1e-3, preset
        if preset == "effvit-attn":
            assert far > 1e-6
        else:
            assert far == 0, "the conv-only preset's receptive field should be bounded"


def test_parameter_counts_match_descriptions():
    for preset in EFFVIT_PRESETS:
        description = PRESETS[preset].description
        documented = re.search(r"~([\d.]+)M params \(~([\d.]+)M for sana\)", description)
        assert documented, f"{preset}: description should state its parameter counts"
        for space, claimed in (("sdxl", documented[1]), ("sana", documented[2])):
            count = n_params(create_decoder(preset, space))
            print(f"{preset} {space}: {count / 1e6:.2f}M params")
            assert abs(count / 1e6 - float(claimed)) < 0.1, (preset, space, count)


@pytest.mark.parametrize("preset, space", [("effvit-paper", "flux1"), ("effvit-attn", "sana")])
def test_checkpoint_round_trip(preset, space, tmp_path):
    torch.manual_seed(0)
    decoder = create_decoder(preset, space).eval()
    path = save_decoder(decoder, tmp_path / f"{preset}.safetensors")
    loaded = load_decoder(path).eval()
    assert isinstance(loaded, EffViTDecoder)
    assert loaded.config == decoder.config and loaded.latent_space == decoder.latent_space
    state, loaded_state = decoder.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    s = get_latent_space(space)
    z = torch.randn(1, s.channels, 2, 3)
    with torch.no_grad():
        # the weights are bit-equal (above); the loaded copy is a separately built module whose fp32 kernels may
        # block sums differently: a few ulp (6e-8) per layer over ~20 conv layers stays far below 1e-5
        torch.testing.assert_close(loaded(z), decoder(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", EFFVIT_PRESETS)
def test_backward_reaches_every_parameter(preset, make_decoder):
    decoder = make_decoder(preset, "sdxl").train()
    unclamped(decoder, torch.randn(1, 4, 2, 2)).square().mean().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    # the effvit-attn layout at small widths: same code paths, a fraction of the time
    decoder = create_decoder("effvit-attn", "sdxl", widths=(16, 16, 16, 32), depths=(0, 2, 2, 2),
                             block_types=("res", "res", "res", "vit"), head_dim=16)
    z = torch.randn(2, 4, 4, 4)
    target = torch.rand(2, 3, 32, 32)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(unclamped(decoder, z), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_overrides_and_config_errors():
    decoder = create_decoder("effvit-attn", "sdxl", head_dim=64, attention_scales=(3, 5))
    attention = next(m for m in decoder.modules() if isinstance(m, ReLULinearAttention))
    assert attention.head_dim == 64 and len(attention.aggregate) == 2
    with pytest.raises(UsageError, match="one entry per stage"):
        EffViTConfig(widths=(64, 64), depths=(1,), block_types=("res", "res"))
    with pytest.raises(UsageError, match=r"block_types\[1\] is 'attn'"):
        EffViTConfig(widths=(64, 64), depths=(1, 1), block_types=("res", "attn"))
    with pytest.raises(UsageError, match="not a multiple of head_dim 32"):
        EffViTConfig(widths=(64, 48), depths=(1, 1), block_types=("res", "vit"))
    with pytest.raises(UsageError, match=r"stages \[4, 5\] lie below the latent resolution.*depths to 0"):
        create_decoder("effvit-attn", "sdxl", depths=(0, 4, 6, 4, 2, 2))
    with pytest.raises(UsageError, match="needs 6 stages.*has 4"):
        create_decoder("effvit-attn", "sana", widths=(8,) * 4, depths=(1,) * 4, block_types=("res",) * 4)


def test_channels_last_gives_the_same_picture(make_decoder):
    decoder = make_decoder("effvit-attn", "sdxl")
    z = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        ref = unclamped(decoder, z)
        out = unclamped(decoder.to(memory_format=torch.channels_last), z.to(memory_format=torch.channels_last))
    # NHWC kernels sum in another order: fp32 a few ulp per layer, far below 1e-5 on outputs of order 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.abs().max() > 0.1  # not a trivially zero picture

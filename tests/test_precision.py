"""fp16/bf16 decoding matches fp32, never overflows, and optimize() compiles (or falls back) without changing results."""
from __future__ import annotations

import pytest
import torch
from factories import tiny_decoder

import fastdec
from fastdec import create_decoder, list_decoders
from fastdec.errors import UsageError
from fastdec.runtime import OptimizedDecoder, fp16_headroom, optimize, parse_dtype

IMAGE_PRESETS = list_decoders(video=False)
# Stated tolerances (max |diff| on [0, 1] RGB vs fp32). fp16 keeps 11 mantissa bits, bf16 8: bf16 errors are ~8x larger.
# The presets are built full size here: rounding errors grow with depth, and these are the README's figures.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
MEAN_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
def test_presets_decode_in_half_precision(preset):
    torch.manual_seed(0)
    decoder = create_decoder(preset, "sdxl").eval()
    # 4x4 latents: the depth that rounding errors grow with is all there; CPUs without fp16 kernels (AMD EPYC)
    # run fp16 convs ~500x slower than bf16, and 8x8 took 35 s for tae-192 there
    z = torch.randn(1, decoder.latent_channels, 4, 4)
    with torch.no_grad():
        reference = decoder(z)
        for dtype in (torch.float16, torch.bfloat16):
            decoder.to(dtype)
            out = decoder(z)  # fp32 latents are cast, not rejected
            assert out.dtype == dtype
            assert (out.float() - reference).abs().max() <= TOLERANCE[dtype], (preset, dtype)
            extreme = decoder(10 * torch.randn_like(z).sign())
            assert torch.isfinite(extreme).all(), (preset, dtype)
            decoder.float()


@pytest.fixture(scope="module")
def taef2_real():
    from skimage import data

    from conftest import shared_path

    decoder_path = shared_path("weights", "taef2_decoder.pth")
    encoder = fastdec.load_encoder(shared_path("weights", "taef2_encoder.pth"))
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        z = encoder(image[:, :, 128:384, 128:384])
    return decoder_path, z


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trained_taef2_half_precision_matches_fp32(taef2_real, dtype):
    path, z = taef2_real
    # a 128 px (16x16 latent) region of the real image, extremes at 8x8: on CPUs without fp16 kernels (AMD EPYC)
    # the whole 256 px crop took 8 minutes in fp16
    z, small = z[..., 8:24, 8:24], z[..., 8:16, 8:16]
    reference_decoder = fastdec.load_decoder(path)
    decoder = fastdec.load_decoder(path, dtype=dtype)
    with torch.no_grad():
        reference, out = reference_decoder(z), decoder(z)
        diff = (out.float() - reference).abs()
        assert diff.max() <= TOLERANCE[dtype] and diff.mean() <= MEAN_TOLERANCE[dtype], (diff.max(), diff.mean())
        for extreme in (torch.full_like(small, 10), torch.full_like(small, -10), 10 * torch.randn_like(small).sign(),
                        small * 10):
            assert torch.isfinite(decoder(extreme)).all()


def test_trained_taef2_has_fp16_headroom_on_extreme_latents(taef2_real):
    # The input Clamp (tanh, |z| <= 3) bounds every activation: the largest is ~75, ~900x below fp16's 65504.
    path, z = taef2_real
    decoder = fastdec.load_decoder(path)
    for extreme in (10 * torch.randn_like(z).sign(), torch.full_like(z, -10), z * 10):
        headroom, layer = fp16_headroom(decoder, extreme)
        assert headroom > 100, f"{layer} comes within {headroom:.0f}x of fp16 overflow"


def test_other_input_dtypes_are_cast(make_decoder):
    decoder = make_decoder("tae-64", "sdxl")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = decoder(z)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            out = decoder(z.to(dtype))
            assert out.dtype == torch.float32
            # only the latents were rounded (to bf16 at worst: 8 mantissa bits, ~4e-3 relative): far under 2e-2
            assert (out - reference).abs().max() < 2e-2
        with pytest.raises(TypeError, match="floating point"):
            decoder(z.to(torch.int32))


def test_parse_dtype_is_the_one_vocabulary():
    from fastdec import dtypes

    assert parse_dtype is dtypes.parse_dtype  # fastdec.runtime.parse_dtype is the old path of the same function
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(UsageError, match="fp32, fp16, bf16"):
        parse_dtype("fp8")
    decoder = tiny_decoder("tae-64", "sdxl").train()
    with pytest.raises(UsageError, match="fp8"):
        optimize(decoder, compile=False, dtype="fp8")
    # refused before any change: the decoder was left frozen in eval mode
    assert decoder.training and all(p.requires_grad for p in decoder.parameters())


class _CountingCompile:
    """Stands in for torch.compile: records that the core was compiled and how often the compiled core runs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, **kwargs):
        def compiled(*args):
            self.calls += 1
            return fn(*args)

        return compiled


def test_optimize_routes_forward_and_decode_through_compiled_core(monkeypatch, make_decoder):
    counter = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counter)
    decoder = make_decoder("tae-64", "sdxl")
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        reference = decoder(z)
        fast = optimize(decoder)
        assert isinstance(fast, OptimizedDecoder) and fast.compiled
        out_call, out_decode, out_forward = fast(z), fast.decode(z), fast.forward(z)
    assert counter.calls == 3
    # channels_last runs other conv kernels on the same fp32 weights: ~1e-7 relative per layer, under 1e-5
    for out in (out_call, out_decode, out_forward):
        assert (out - reference).abs().max() < 1e-5
    assert fast.latent_space.name == "sdxl" and fast.upsample_factor == 8  # delegated attributes
    with pytest.raises(ValueError, match="latent channels|channels"):
        fast(torch.randn(1, 16, 8, 8))  # checks still run in eager
    with pytest.raises(ValueError, match="NaN"):
        fast(torch.full((1, 4, 8, 8), float("nan")))


def test_optimized_decoder_keeps_the_decoder_contract(monkeypatch, make_decoder):
    """Empty batches decode to empty results and NaN output is an error, compiled or not (issue 15)."""
    from fastdec.errors import NonFiniteOutputError

    monkeypatch.setattr(torch, "compile", _CountingCompile())
    decoder = make_decoder("tae-64", "sdxl")
    fast = optimize(decoder)
    with torch.no_grad():
        assert fast(torch.randn(0, 4, 8, 8)).shape == (0, 3, 64, 64)
        last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.fill_(float("nan"))  # as a corrupt checkpoint would
        with pytest.raises(NonFiniteOutputError, match="NaN"):
            fast(torch.randn(1, 4, 8, 8))


def test_a_decoder_with_its_own_forward_is_compiled_whole(monkeypatch, make_decoder):
    from fastdec.models.tae import TAEDecoder

    class Brighter(TAEDecoder):  # a user's decoder that overrides forward
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return (super().forward(z) + 0.25).clamp(0, 1)

    tiny = make_decoder("tae-64", "sdxl")
    decoder = Brighter(tiny.config, tiny.latent_space).eval()
    decoder.load_state_dict(tiny.state_dict())
    counter = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counter)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = decoder(z)
        fast = optimize(decoder)
        out = fast(z)
    assert counter.calls == 1
    # channels_last: other conv kernels on the same fp32 weights, ~1e-7 relative per layer
    assert (out - reference).abs().max() < 1e-5
    with pytest.raises(ValueError, match="NaN"):
        fast(torch.full((1, 4, 8, 8), float("nan")))  # the input checks still run in eager first


def test_optimize_falls_back_when_compile_is_unavailable(monkeypatch, make_decoder):
    def unavailable(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    decoder = make_decoder("tae-64", "sdxl")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = decoder(z)
        with pytest.warns(RuntimeWarning, match="eager"):
            fast = optimize(decoder, dtype="fp32")
        assert not fast.compiled
        assert (fast(z) - reference).abs().max() < 1e-5


def test_optimize_names_a_compile_option_torch_compile_lacks(make_decoder):
    # torch.compile's TypeError was caught as "unavailable here", and the decoder ran eagerly with a warning
    with pytest.raises(UsageError, match="torch.compile takes no option 'modee'; it takes .*mode"):
        optimize(make_decoder("tae-64", "sdxl"), modee="max-autotune")
    with pytest.raises(UsageError, match=r"compile options \['mode'\] need compile=True"):
        optimize(make_decoder("tae-64", "sdxl"), compile=False, mode="max-autotune")


def _broken_compile(fn, **kwargs):
    """Stands in for torch.compile on a machine without a C++ compiler: inductor fails at the first call."""
    def compiled(*args):
        raise RuntimeError("InductorError: CppCompileError: no C++ compiler")

    return compiled


def test_optimize_falls_back_when_compiled_core_fails_at_first_call(monkeypatch, make_decoder):
    monkeypatch.setattr(torch, "compile", _broken_compile)
    decoder = make_decoder("tae-64", "sdxl")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = decoder(z)
        fast = optimize(decoder)
        with pytest.warns(RuntimeWarning, match="C\\+\\+ compiler"):
            out = fast.decode(z)
        assert (out - reference).abs().max() < 1e-5
        assert not fast.compiled
        assert (fast(z) - reference).abs().max() < 1e-5  # later calls stay eager, no second warning needed


@pytest.mark.slow
def test_optimize_really_compiles_on_cpu(make_decoder):
    decoder = make_decoder("tae-64", "sdxl")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = decoder(z)
        fast = optimize(decoder)
        # inductor fuses and reorders fp32 sums (and may use other conv kernels): 1e-4 on [0, 1] RGB
        assert (fast.decode(z) - reference).abs().max() < 1e-4


# Streaming decodes a frame (or chunk) at a time where parallel decoding convolves all frames at once: the same
# fp32 weights on other shapes, ~1e-7 relative per layer. A 1e-5 bound was seen failing at 1.13e-5 on an AMD
# EPYC (issue 12) for a full-size causal decoder; 5e-5 covers such CPUs and is far below a wrong memory state.
STREAM_TOLERANCE = 5e-5


def _tiny_causal_with_memory():
    from fastdec.models.temporal import MemBlock

    decoder = tiny_decoder("tae-causal-64", "sd15", width=16)
    for block in decoder.modules():
        if isinstance(block, MemBlock):
            torch.nn.init.normal_(block.memory.weight, std=0.1)  # fresh memory convs are zero: make them matter
    return decoder


def test_optimize_compiles_the_streaming_step_of_a_causal_decoder(monkeypatch):
    counter = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counter)
    decoder = _tiny_causal_with_memory()
    z = torch.randn(1, 5, 4, 4, 4)
    with torch.inference_mode():
        reference = decoder(z)
        fast = optimize(decoder)
        stream = fast.stream()
        streamed = torch.cat([stream.push(z[:, t]) for t in range(z.shape[1])], dim=1)
    assert counter.calls == z.shape[1]  # every push ran the compiled step
    assert (streamed - reference).abs().max() < STREAM_TOLERANCE
    assert not hasattr(optimize(tiny_decoder("tae-64", "sdxl")), "stream")  # image decoders do not stream


def test_compiled_streaming_step_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", _broken_compile)
    decoder = _tiny_causal_with_memory()
    z = torch.randn(1, 3, 4, 4, 4)
    with torch.inference_mode():
        reference = decoder(z)
        stream = optimize(decoder).stream()
        with pytest.warns(RuntimeWarning, match="C\\+\\+ compiler"):
            first = stream.push(z[:, :1])
        rest = stream.push(z[:, 1:])
    assert (torch.cat([first, rest], dim=1) - reference).abs().max() < STREAM_TOLERANCE


@pytest.mark.slow
def test_compiled_streaming_really_compiles_and_equals_parallel():
    decoder = _tiny_causal_with_memory()
    z = torch.randn(1, 6, 4, 4, 4)
    with torch.inference_mode():
        reference = decoder(z)
        stream = optimize(decoder).stream()
        streamed = torch.cat([stream.push(z[:, t : t + 2]) for t in range(0, 6, 2)], dim=1)
    assert (streamed - reference).abs().max() < 1e-4


def test_optimize_refuses_switches_that_are_no_booleans(make_decoder):
    from fastdec.errors import InputTypeError

    for kwargs in ({"compile": "yes"}, {"channels_last": "no"}, {"compile": 0}):
        with pytest.raises(InputTypeError, match="must be True or False"):
            optimize(make_decoder("tae-64", "sdxl"), **kwargs)

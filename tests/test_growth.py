"""fastdec.grow: a wider and/or deeper TAE decoder that starts equal to a trained one (issue 13, item 2).

Function preservation is checked on the unclamped layer output (``decode_layers``), where a mismatch cannot hide
behind the clamp. Tolerance for random tiny decoders in fp32: growth adds exact zeros to the same sums, but a
convolution over more channels may sum in another order, which moves an O(1) result by ~1e-7; 1e-5 leaves two
orders of magnitude and still catches any real change (a single wrong weight moves the output by ~1e-2)."""
from __future__ import annotations

import csv

import pytest
import torch

import fastdec
from fastdec.errors import FastdecError, InputTypeError, TrainError
from fastdec.models.growth import (ChannelMap, NotASupersetError, grow, growth_changes, layer_roles,
                                   transfer_weights)
from fastdec.models.tae import TAEConfig, TAEDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # fp32, see the module docstring


def source_decoder(space: str = "sdxl", seed: int = 0, **overrides) -> TAEDecoder:
    """A tiny trained-looking decoder: random weights moved off their init, so every layer matters."""
    from factories import tiny_decoder

    decoder = tiny_decoder("tae-64", space, seed=seed, **{"stage_blocks": (1, 2, 1), **overrides})
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return decoder.eval()


def latents(decoder, n: int = 2, h: int = 5, w: int = 6, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, decoder.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def max_difference(a: TAEDecoder, b: TAEDecoder, z: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.decode_layers(z) - b.decode_layers(z)).abs().max())


GROWTHS = {
    "wider": dict(widths=(16, 12, 12, 8)),
    "deeper": dict(width=8, stage_blocks=(3, 3, 2), final_blocks=3),
    "wider and deeper": dict(widths=(24, 16, 8, 12), stage_blocks=(2, 2, 1), final_blocks=2),
}


@pytest.mark.parametrize("kind", list(GROWTHS))
@pytest.mark.parametrize("space", ["sdxl", "flux2"])  # flux2: TAEF2's GroupNorm branch in stage 0
def test_grow_preserves_the_function(kind, space):
    source = source_decoder(space)
    target = dict(GROWTHS[kind], use_midblock_gn=source.config.use_midblock_gn)
    if space == "flux2" and "widths" in target:  # the GroupNorm stage grows by an integer factor
        target["widths"] = (16,) + target["widths"][1:]
    torch.manual_seed(5)
    grown = grow(source, target)
    z = latents(source)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in source.parameters())
    with torch.no_grad():
        reference = source.decode_layers(z)
    assert reference.std() > 0.05  # the comparison is of real pictures, not of a constant
    assert max_difference(source, grown, z) <= TOLERANCE
    with torch.no_grad():
        out = grown(z)  # the checked path (input checks, clamp) runs too
    assert out.shape == (2, 3, 40, 48) and out.min() >= 0 and out.max() <= 1
    assert grown.latent_space == source.latent_space and grown.training == source.training


def test_new_channels_get_fresh_incoming_and_zero_outgoing_weights():
    source = source_decoder()
    grown = grow(source, dict(widths=(16, 8, 8, 8), stage_blocks=(1, 2, 1)))
    stem, first_block = grown.layers[1], grown.layers[3]
    assert torch.equal(stem.weight[:8], source.layers[1].weight)  # old channels: copied
    assert stem.weight[8:].abs().sum() > 0  # new channels: fresh incoming weights
    assert first_block.conv[0].weight[:8, 8:].abs().sum() == 0  # ... and nothing flows from them to old ones
    stage_conv = grown.layers[5]  # the conv after stage 0's upsampling: 16 -> 8
    assert stage_conv.weight.shape[:2] == (8, 16) and stage_conv.weight[:, 8:].abs().sum() == 0


def test_new_channels_can_learn():
    """Zero outgoing weights must not leave the new capacity dead: they get a gradient at the first step."""
    source = source_decoder()
    grown = grow(source, dict(widths=(16, 8, 8, 8), stage_blocks=(1, 2, 1)))
    grown.decode_layers(latents(source)).square().mean().backward()
    assert grown.layers[3].conv[0].weight.grad[:8, 8:].abs().sum() > 0


def test_new_blocks_start_as_the_identity():
    source = source_decoder()  # stage 1 has 2 blocks: blocks 2 and 3 are appended after them
    grown = grow(source, dict(width=8, stage_blocks=(1, 4, 1)))
    roles = layer_roles(grown.config)
    new = [grown.layers[i] for i, role in enumerate(roles) if role in (("block", 1, 2), ("block", 1, 3))]
    assert len(new) == 2 and [b.conv[-1].weight.abs().sum() for b in new] == [0, 0]
    assert all(b.conv[0].weight.abs().sum() > 0 for b in new)  # the rest of the block is fresh, not zero


def test_group_norm_branch_widens_by_whole_groups():
    source = source_decoder("flux2")
    grown = grow(source, dict(widths=(24, 8, 8, 8), stage_blocks=(1, 2, 1), use_midblock_gn=True))  # 3x
    assert max_difference(source, grown, latents(source)) <= TOLERANCE
    # each group of the widened branch holds copies of its source group: the same mean and variance
    hidden = ChannelMap.grouped(32, 96, groups=4)
    assert hidden.index[:24].tolist() == list(range(8)) * 3
    assert hidden.primary[:24].tolist() == [True] * 8 + [False] * 16  # only the first copy feeds the output
    with pytest.raises(NotASupersetError, match=r"stage 0 holds TAEF2's GroupNorm branch.*integer factor.*8 -> 12"):
        grow(source, dict(widths=(12, 8, 8, 8), stage_blocks=(1, 2, 1), use_midblock_gn=True))


def test_a_group_norm_branch_the_source_lacks_starts_at_zero():
    source = source_decoder("sdxl")
    grown = grow(source, dict(width=8, stage_blocks=(1, 2, 1), use_midblock_gn=True))
    assert grown.layers[3].pool is not None
    assert max_difference(source, grown, latents(source)) <= TOLERANCE
    assert "GroupNorm branch added (starts at zero)" in growth_changes(source, grown)


def test_targets_preset_config_dict_and_decoder():
    source = source_decoder(stage_blocks=(1, 1, 1))
    z = latents(source)
    by_preset = grow(source, "tae-large")  # widths (256, 128, 64, 64), stage_blocks (5, 4, 3)
    assert by_preset.config.stage_widths == (256, 128, 64, 64) and by_preset.config.stage_blocks == (5, 4, 3)
    by_config = grow(source, TAEConfig(latent_channels=4, width=16, stage_blocks=(1, 1, 1)))
    torch.manual_seed(3)
    target = TAEDecoder(TAEConfig(latent_channels=4, widths=(16, 8, 8, 8), stage_blocks=(2, 1, 1)),
                        source.latent_space)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    by_decoder = grow(source, target)
    for grown in (by_preset, by_config, by_decoder):
        assert max_difference(source, grown, z) <= TOLERANCE
    # a decoder passed in is copied, not changed; its weights are the fresh ones of the new channels
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert torch.equal(by_decoder.layers[1].weight[8:], target.layers[1].weight[8:])


@pytest.mark.parametrize("target, message", [
    (dict(width=8, stage_blocks=(1, 1, 1)), r"stage 1 drops from 2 to 1 blocks"),
    (dict(widths=(8, 4, 8, 8), stage_blocks=(1, 2, 1)), r"stage 1 narrows from width 8 to 4"),
    (dict(width=8, stage_blocks=(1, 2, 1), final_blocks=0), r"the final stage drops from 1 to 0 blocks"),
])
def test_a_target_that_is_not_a_superset_is_refused_naming_what_shrinks(target, message):
    source = source_decoder()
    with pytest.raises(NotASupersetError, match=message) as error:
        grow(source, target)
    assert isinstance(error.value, FastdecError) and "must keep everything its source has" in str(error.value)


def test_other_refusals():
    gn_source = source_decoder("flux2")
    with pytest.raises(NotASupersetError, match="drops TAEF2's GroupNorm branch"):
        grow(gn_source, dict(width=8, stage_blocks=(1, 2, 1)))
    with pytest.raises(NotASupersetError, match=r"latent space changes from 'sdxl'.*to 'flux1'"):
        grow(source_decoder("sdxl"), fastdec.create_decoder("tae-64", "flux1"))
    shuffled = source_decoder(head="pixel_shuffle")
    with pytest.raises(NotASupersetError, match="pixel-shuffle head would become a conv head"):
        grow(shuffled, dict(width=8, stage_blocks=(1, 2, 1)))
    # a block in a stage that had none would take the (possibly negative) conv output: it cannot be the identity
    with pytest.raises(NotASupersetError, match="stage 1 has no blocks in the source"):
        grow(source_decoder(stage_blocks=(1, 0, 1)), dict(width=8, stage_blocks=(1, 1, 1)))
    with pytest.raises(InputTypeError, match="TAE family.*effvit"):
        grow(source_decoder(), "effvit-paper")
    with pytest.raises(InputTypeError, match="needs a TAE image decoder"):
        grow(fastdec.create_decoder("tae-causal-64", "sdxl"), "tae-64")
    # an optimize()d TAE decoder reads as architecture 'tae': the refusal seemed to be of a TAE decoder
    with pytest.raises(InputTypeError, match="got OptimizedDecoder 'tae'.*grow the torch decoder first"):
        grow(fastdec.optimize(source_decoder(), compile=False), dict(width=8, stage_blocks=(1, 2, 1)))
    with pytest.raises(FastdecError, match=r"unknown fields \['bogus'\]; TAEConfig's are"):  # not TypeError
        grow(source_decoder(), dict(width=8, bogus=1))


def test_pixel_shuffle_growth_copies_the_shared_layers_and_warns():
    source = source_decoder()
    with pytest.warns(UserWarning, match="not function-preserving.*half resolution.*shared layer was copied"):
        grown = grow(source, dict(width=8, stage_blocks=(1, 2, 1), head="pixel_shuffle"))
    out_key = f"layers.{len(layer_roles(source.config)) - 1}.weight"
    grown_state, source_state = grown.state_dict(), source.state_dict()
    assert set(source_state) <= set(grown_state)
    for key, value in source_state.items():
        if not key.startswith(out_key.rsplit(".", 1)[0] + "."):
            assert torch.equal(grown_state[key], value), key
    # the new head starts as the source's output conv for each of the 2x2 sub-pixels of each colour
    assert torch.equal(grown_state[out_key], source_state[out_key].repeat_interleave(4, dim=0))
    z = latents(source, h=3, w=4)
    with torch.no_grad():
        out = grown(z)
    assert out.shape == (2, 3, 24, 32) and out.min() >= 0 and out.max() <= 1
    assert "head conv -> pixel_shuffle (not function-preserving)" in growth_changes(source, grown)


def test_grow_is_public_and_keeps_dtype():
    source = source_decoder().double()
    grown = fastdec.grow(source, dict(widths=(16, 8, 8, 8), stage_blocks=(1, 2, 1)))
    assert grown.dtype == torch.float64
    # fp64: only summation order differs, at ~1e-16
    assert max_difference(source, grown, latents(source).double()) <= 1e-12


def test_transfer_weights_copies_what_lines_up_into_a_narrower_decoder():
    """A warm start for a target that is not a superset: the first channels of a narrower stage, exact copies of
    the stages that keep their width (a wider one grows exactly), and fresh weights only where nothing lines up."""
    source = source_decoder()  # width 8, stage_blocks (1, 2, 1)
    target = dict(widths=(16, 8, 4, 4), stage_blocks=(1, 1, 1), head="pixel_shuffle")
    with pytest.raises(NotASupersetError):
        grow(source, target)
    student = transfer_weights(source, target)
    roles = layer_roles(student.config)
    layers = {role: layer for role, layer in zip(roles, student.layers) if role is not None}
    source_layers = {role: layer for role, layer in zip(layer_roles(source.config), source.layers) if role}
    # stage 0 widens 8 -> 16: the old channels are copied, the new ones feed nothing (as grow does)
    assert torch.equal(layers[("stem",)].weight[:8], source_layers[("stem",)].weight)
    assert layers[("block", 0, 0)].conv[0].weight[:8, 8:].abs().sum() == 0
    # stage 1 keeps width 8: its first block is the source's; the source's second block has no place
    for index in (0, 2, 4):
        assert torch.equal(layers[("block", 1, 0)].conv[index].weight, source_layers[("block", 1, 0)].conv[index].weight)
    # stage 2 narrows 8 -> 4: each conv keeps the source's first 4 output and input channels
    assert torch.equal(layers[("block", 2, 0)].conv[0].weight, source_layers[("block", 2, 0)].conv[0].weight[:4, :4])
    assert torch.equal(layers[("conv", 1)].weight, source_layers[("conv", 1)].weight[:4])
    z = latents(source)
    with torch.no_grad():
        out = student(z)
    assert out.shape == (2, 3, 40, 48) and out.min() >= 0 and out.max() <= 1
    # not function-preserving, and nothing claims it is
    assert max_difference(source, student, z) > 1e-3
    with pytest.raises(NotASupersetError, match=r"cannot transfer.*latent space changes from 'sdxl'.*to 'flux1'"):
        transfer_weights(source, fastdec.create_decoder("tae-64", "flux1"))


# -- real weights ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def taef2_latents():
    """TAEF2-encoder latents of a 256x256 crop of a BSDS val photo, and the TAEF2 decoder."""
    from conftest import taef2_photo

    _, z, decoder = taef2_photo(0)
    return decoder, z


@pytest.mark.parametrize("target", ["tae-large", "wider", "deeper"])
def test_grown_taef2_decodes_real_latents_as_taef2(taef2_latents, target):
    decoder, z = taef2_latents
    targets = {"wider": dict(widths=(128, 96, 64, 64), use_midblock_gn=True),
               "deeper": dict(width=64, stage_blocks=(4, 4, 4), final_blocks=2, use_midblock_gn=True)}
    torch.manual_seed(0)
    grown = grow(decoder, targets.get(target, target))
    with torch.no_grad():
        difference = float((grown(z) - decoder(z)).abs().max())
    print(f"TAEF2 grown into {target}: max |difference| on real latents {difference:.2e}")
    assert difference <= 1e-5  # the bar; measured 3.1e-6 (tae-large), 2.1e-6 (wider), 0 (deeper)


# -- fastdec train --init SRC --decoder TARGET --------------------------------------------------------------
def _metrics(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_training_grows_the_student_from_init(tmp_path, capsys):
    from _train_helpers import make_images, tiny_decoder_file, tiny_encoder_file
    from fastdec.train import TrainConfig, train

    source = tiny_decoder_file(tmp_path / "w" / "source.safetensors", width=8, seed=1)
    wider = fastdec.save_decoder(source_decoder(seed=2, width=16, stage_blocks=(1, 1, 2)),
                                 tmp_path / "w" / "wider.safetensors")
    common = dict(teacher=str(tiny_encoder_file(tmp_path / "w" / "taesdxl_encoder.pth")),
                  data=str(make_images(tmp_path / "train", 6)), val=str(make_images(tmp_path / "val", 2, seed=9)),
                  cache_dir=str(tmp_path / "cache"), resolution=32, batch_size=2, workers=0, warmup=1,
                  log_every=1, val_every=100, lr=2e-3)
    train(TrainConfig(**common, decoder=str(source), steps=1, out=str(tmp_path / "source")))
    capsys.readouterr()
    train(TrainConfig(**common, decoder=str(wider), init=str(source), steps=8, out=str(tmp_path / "grown")))
    assert "student grown from --init" in capsys.readouterr().out
    source_rows, grown_rows = _metrics(tmp_path / "source"), _metrics(tmp_path / "grown")
    # the grown student starts exactly where its source is (PSNR of outputs equal to ~1e-6: far below 0.01 dB)
    assert float(grown_rows[0]["val_psnr"]) == pytest.approx(float(source_rows[0]["val_psnr"]), abs=0.01)
    losses = [float(r["loss"]) for r in grown_rows if r.get("loss")]
    assert len(losses) >= 6 and sum(losses[-3:]) < sum(losses[:3])
    grown = fastdec.load_decoder(tmp_path / "grown" / "decoder.safetensors")
    assert grown.config.stage_widths == (16,) * 4 and grown.config.stage_blocks == (1, 1, 2)
    # a target that is not a superset is refused before any training, naming what shrinks
    with pytest.raises(TrainError, match=r"--init .* does not fit --decoder.*narrows from width 16 to 8.*--init-partial copies"):
        train(TrainConfig(**common, decoder=str(source), init=str(wider), steps=1, out=str(tmp_path / "shrunk")))
    assert not (tmp_path / "shrunk" / "metrics.csv").exists()
    # --init-partial takes the narrower decoder as a warm start instead, and says it is not equal to --init
    train(TrainConfig(**common, decoder=str(source), init=str(wider), init_partial=True, steps=2,
                      out=str(tmp_path / "shrunk")))
    assert "student partly transferred (not equal to it) from --init" in capsys.readouterr().out
    assert fastdec.load_decoder(tmp_path / "shrunk" / "decoder.safetensors").config.stage_widths == (8,) * 4
    # another kind altogether (a video decoder's weights into an image decoder): named as kinds, with the fix,
    # not as two config dicts
    from factories import tiny_decoder

    video = fastdec.save_decoder(tiny_decoder("tae-causal-64", "sdxl"), tmp_path / "w" / "video.safetensors")
    with pytest.raises(TrainError, match=r"is a video decoder \(tae-causal\) and --decoder .* an image decoder \(tae\)"
                                         r".*from a checkpoint of its own kind, or from random weights"):
        train(TrainConfig(**common, decoder=str(source), init=str(video), steps=1, out=str(tmp_path / "kinds")))

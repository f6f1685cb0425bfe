"""ONNX export: dynamic shapes, onnxruntime matches PyTorch, metadata, same errors, the CLI."""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

from factories import tiny_decoder  # noqa: E402

from fastdec import load_decoder  # noqa: E402
from fastdec.cli import main  # noqa: E402
from fastdec.errors import (CheckpointError, MissingDependencyError, NonFiniteOutputError, OnnxExportError,  # noqa: E402
                            UsageError)
from fastdec.io.checkpoints import save_decoder  # noqa: E402
from fastdec.runtime import onnx as runtime_onnx  # noqa: E402
from fastdec.runtime.onnx import OnnxDecoder, export_checked, export_onnx  # noqa: E402
from fastdec.runtime.tiling import measure_receptive_field  # noqa: E402

# onnxruntime and torch run the same fp32 graph with different conv kernels: ~1e-7 apart per layer, so 1e-4 on
# [0, 1] RGB is far above rounding and far below any wrong op or frozen shape.
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    decoder = tiny_decoder("tae-64", "sdxl")
    path = export_onnx(decoder, tmp_path_factory.mktemp("onnx") / "decoder.onnx")
    return decoder, path


@pytest.fixture
def checkpoint(tmp_path, make_decoder):
    """A tiny trained-looking decoder on disk: what `fastdec export onnx --decoder FILE` is for."""
    return save_decoder(make_decoder("tae-64", "sd15"), tmp_path / "tiny.safetensors")


def test_onnxruntime_matches_pytorch_at_new_resolutions(exported):
    decoder, path = exported
    onnx_decoder = OnnxDecoder(path)
    # export used 8x8; check other batch sizes and non-square sizes
    for shape in [(2, 4, 12, 20), (1, 4, 32, 24)]:
        z = torch.randn(*shape)
        with torch.no_grad():
            reference = decoder(z)
        out = onnx_decoder(z)
        assert isinstance(out, torch.Tensor) and out.shape == reference.shape
        assert (out - reference).abs().max() <= FP32_TOLERANCE
        assert out.min() >= 0 and out.max() <= 1


def test_metadata_and_validation(exported):
    decoder, path = exported
    onnx_decoder = OnnxDecoder(path)
    assert onnx_decoder.latent_space.name == "sdxl" and onnx_decoder.upsample_factor == 8
    assert onnx_decoder.receptive_field_info == measure_receptive_field(decoder)
    assert onnx_decoder.architecture == decoder.architecture
    assert onnx_decoder.config_dict() == json.loads(json.dumps(decoder.config_dict()))  # JSON: lists, not tuples
    with pytest.raises(ValueError, match="channels"):
        onnx_decoder(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="batch dimension"):
        onnx_decoder(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        onnx_decoder(torch.full((1, 4, 8, 8), float("nan")))
    assert onnx_decoder(torch.randn(1, 4, 8, 8, dtype=torch.float16)).dtype == torch.float32  # cast, not rejected
    # atomic write: nothing but the model in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["decoder.onnx"]


def test_empty_batch_and_nan_output_follow_the_decoder_contract(exported, tmp_path, make_decoder):
    _, path = exported
    assert OnnxDecoder(path)(torch.randn(0, 4, 8, 8)).shape == (0, 3, 64, 64)
    broken = make_decoder()
    last = [m for m in broken.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.fill_(float("nan"))  # as a corrupt checkpoint would
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        OnnxDecoder(export_onnx(broken, tmp_path / "nan.onnx"))(torch.randn(1, 4, 8, 8))
    # the checked export refuses it and leaves nothing behind
    with pytest.raises(NonFiniteOutputError):
        export_checked(broken, tmp_path / "checked" / "nan.onnx")
    assert not (tmp_path / "checked").exists() or list((tmp_path / "checked").iterdir()) == []


def test_an_onnx_decoder_is_not_exported_or_optimized_again(exported, tmp_path):
    from fastdec.runtime import optimize

    onnx_decoder = OnnxDecoder(exported[1])
    with pytest.raises(UsageError, match="already an ONNX model"):
        export_onnx(onnx_decoder, tmp_path / "again.onnx")
    with pytest.raises(UsageError, match="onnxruntime"):
        optimize(onnx_decoder)
    # it wrote a file of no tensors, which then failed to load as "tensors missing"
    with pytest.raises(UsageError, match="OnnxDecoder holds no weights to save"):
        save_decoder(onnx_decoder, tmp_path / "onnx.safetensors")
    assert not list(tmp_path.iterdir())


def test_dtype_and_device_moves_are_refused_not_ignored(exported):
    """.half() and .to(bfloat16) changed nothing (no parameters to convert): the output stayed fp32, no word."""
    import fastdec

    onnx_decoder = OnnxDecoder(exported[1])
    assert onnx_decoder.to("cpu") is onnx_decoder and onnx_decoder.float() is onnx_decoder
    for move in (onnx_decoder.half, onnx_decoder.bfloat16, lambda: onnx_decoder.to(torch.float16),
                 lambda: fastdec.resolve_decoder(onnx_decoder, dtype="fp16")):
        with pytest.raises(UsageError, match="graph runs in float32, fixed at export, not"):
            move()
    with pytest.raises(UsageError, match="runs where its onnxruntime providers run"):
        onnx_decoder.to("meta")
    assert onnx_decoder.dtype == torch.float32


def test_session_settings_are_checked(exported):
    # pybind's TypeError for "x" and 2.5, -1 taken, and providers=5 called the model file truncated or corrupt
    for threads in ("x", 2.5, -1, 0):
        with pytest.raises(UsageError, match="intra_op_threads must be a whole number >= 1"):
            OnnxDecoder(exported[1], intra_op_threads=threads)
    for providers in (5, [5], ["CPUExecutionProvider", None]):
        with pytest.raises(TypeError, match="providers is a list of onnxruntime provider names"):
            OnnxDecoder(exported[1], providers=providers)


def test_one_provider_may_be_named_as_a_string(exported):
    # list("CPUExecutionProvider") asked onnxruntime for providers 'C', 'P', 'U', ...
    assert OnnxDecoder(exported[1], providers="CPUExecutionProvider").providers == ["CPUExecutionProvider"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="fastdec export onnx"):
        OnnxDecoder(tmp_path / "nope.onnx")


def test_a_damaged_onnx_file_and_an_onnx_given_as_a_checkpoint_are_named(exported, tmp_path):
    """onnxruntime's InvalidProtobuf / InvalidArgument came out raw; an .onnx given as --decoder was called
    truncated or corrupt."""
    _, path = exported
    for name, content in (("empty.onnx", b""), ("cut.onnx", path.read_bytes()[:500]), ("junk.onnx", b"\x07" * 300)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}' is no ONNX model onnxruntime can load.*export it again"):
            OnnxDecoder(tmp_path / name)
    with pytest.raises(CheckpointError, match="is an ONNX model: --decoder and load_decoder take the checkpoint"):
        load_decoder(path)


@pytest.mark.parametrize("key, value", [("latent_space", "{not json"), ("latent_space", '{"channels": 0}'),
                                        ("config", "[1, 2]"), ("receptive_field", '{"radius": 3}'),
                                        ("receptive_field", '{"radius": "x", "is_global": false, "global_layers": [], '
                                                            '"local_radius_known": true}')])
def test_edited_onnx_metadata_is_named_with_its_key(exported, tmp_path, key, value):
    """Each came out raw (JSONDecodeError, a TypeError from SimpleNamespace, KeyError 'is_global')."""
    import onnx

    model = onnx.load(str(exported[1]))
    entry = next((p for p in model.metadata_props if p.key == key), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = key
    entry.value = value
    onnx.save(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(CheckpointError, match=f"edited.onnx's fastdec metadata '{key}' cannot be read.*export"):
        OnnxDecoder(tmp_path / "edited.onnx")
    with pytest.raises(TypeError, match="OnnxDecoder's path must be a path"):
        OnnxDecoder(None)


def test_unknown_exporter_is_refused_before_any_work(tmp_path, make_decoder):
    with pytest.raises(UsageError, match="torchscript, dynamo"):
        export_onnx(make_decoder(), tmp_path / "x.onnx", exporter="nope")
    assert list(tmp_path.iterdir()) == []


def test_an_exporter_that_writes_another_opset_is_an_error(tmp_path, make_decoder, monkeypatch):
    # the dynamo exporter falls back to opset 18 when it cannot convert down: the summary said "opset 13"
    real = runtime_onnx._export_graph
    monkeypatch.setattr(runtime_onnx, "_export_graph", lambda d, tmp, opset, exporter: real(d, tmp, 18, exporter))
    with pytest.raises(OnnxExportError, match="exporter wrote opset 18, not the 13 asked.*torchscript exporter"):
        export_checked(make_decoder("tae-64", "sd15"), tmp_path / "x.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, problem", [
    (lambda d, out: export_onnx(d.to(torch.bfloat16), out / "x.onnx"), "fp32 or fp16 decoder, got bfloat16"),
    (lambda d, out: export_onnx(d, out / "x.txt"), "the ONNX output must end in .onnx"),
    (lambda d, out: export_onnx(d, out / "x.onnx", opset=5), "opset must be a whole number >= 7"),
])
def test_exports_onnxruntime_cannot_load_are_refused(tmp_path, make_decoder, call, problem):
    # a bf16 graph was written that onnxruntime could not load; model.txt held an ONNX graph
    with pytest.raises((OnnxExportError, UsageError), match=problem):
        call(make_decoder("tae-64", "sd15"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_video_decoders_are_refused(tmp_path, make_decoder):
    with pytest.raises(OnnxExportError, match="image decoders"):
        export_onnx(make_decoder("tae-causal-64"), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_checked_reports_the_difference(tmp_path, make_decoder):
    result = export_checked(make_decoder("tae-64", "sd15"), tmp_path / "checked.onnx")
    assert result.path.is_file() and result.latent_space == "sd15" and result.upsample_factor == 8
    assert 0 <= result.max_difference <= FP32_TOLERANCE
    assert result.check_shape == (1, 4, 12, 20)
    assert "max |diff|" in result.summary() and "opset 17" in result.summary()


def test_cli_export_from_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "onnx", "--decoder", str(checkpoint), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "max |diff|" in captured.out and captured.err == ""
    assert OnnxDecoder(out).latent_space.name == "sd15"


def test_cli_export_of_a_preset_needs_random_weights(tmp_path, capsys):
    out = tmp_path / "preset.onnx"
    assert main(["export", "onnx", "--decoder", "tae-64", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "fastdec export onnx: error:" in captured.err and "untrained" in captured.err
    assert "--random-weights" in captured.err and captured.out == ""
    assert not out.exists()


@pytest.mark.slow
def test_cli_export_of_a_preset_with_random_weights(tmp_path, capsys):
    out = tmp_path / "preset.onnx"
    args = ["export", "onnx", "--decoder", "tae-64", "--latent-space", "sd15", "--random-weights", "--out", str(out)]
    assert main(args) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert OnnxDecoder(out).latent_space.name == "sd15"


@pytest.mark.parametrize("difference", [0.5, float("nan")])
def test_a_failed_check_leaves_no_file(checkpoint, tmp_path, capsys, monkeypatch, difference):
    """Issue 15: the model gets its name only after onnxruntime agrees with torch; a mismatch removes it."""
    monkeypatch.setattr(runtime_onnx, "onnx_torch_difference", lambda *args, **kwargs: difference)
    out = tmp_path / "out" / "bad.onnx"
    assert main(["export", "onnx", "--decoder", str(checkpoint), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "fastdec export onnx: error:" in captured.err and "differs from torch" in captured.err
    assert captured.out == ""
    assert list(out.parent.iterdir()) == []  # neither the model nor its temporary file


def test_a_wrong_graph_fails_the_real_comparison(tmp_path, make_decoder, monkeypatch):
    """The comparison itself (not a stand-in): a graph that computes something else is caught and removed."""
    def black(self, z):
        return torch.zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1])

    monkeypatch.setattr(OnnxDecoder, "decode_layers", black)
    with pytest.raises(OnnxExportError, match="differs from torch"):
        export_checked(make_decoder(), tmp_path / "wrong.onnx")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_folder_is_refused_before_export(checkpoint, tmp_path, capsys):
    assert main(["export", "onnx", "--decoder", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("missing, extra_words", [
    ("onnx", "ONNX export needs onnx"), ("onnxruntime", "checking the export against the torch decoder needs onnxruntime"),
])
def test_a_missing_onnx_extra_is_named_before_any_work(checkpoint, tmp_path, capsys, monkeypatch, missing, extra_words):
    # a wheel install without [onnx] printed a ModuleNotFoundError traceback from inside the export
    monkeypatch.setitem(sys.modules, missing, None)  # what `import onnx` meets where it is not installed
    out = tmp_path / "out.onnx"
    assert main(["export", "onnx", "--decoder", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fastdec export onnx: error:" in err and extra_words in err and 'pip install "fastdec[onnx]"' in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == [checkpoint]


def test_running_an_onnx_decoder_without_onnxruntime_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r'running an ONNX decoder needs onnxruntime.*fastdec\[onnx\]'):
        OnnxDecoder(exported[1])


def test_the_dynamo_exporter_on_a_torch_too_old_for_it_is_named(tmp_path, make_decoder, monkeypatch):
    # torch 2.4's export takes dynamo= but not dynamic_shapes= or optimize=: a TypeError after tracing
    def old_export(model, args, f=None, *, dynamo=False, opset_version=None, input_names=None, output_names=None):
        raise AssertionError("not to be called")

    monkeypatch.setattr(torch.onnx, "export", old_export)
    with pytest.raises(OnnxExportError, match=r"needs a newer torch.*no dynamic_shapes, optimize.*torchscript"):
        export_onnx(make_decoder(), tmp_path / "x.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []

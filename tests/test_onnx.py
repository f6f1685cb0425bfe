"""ONNX export: dynamic shapes, onnxruntime matches PyTorch, metadata, same errors, the CLI."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

from fastdec import create_decoder  # noqa: E402
from fastdec.cli import main  # noqa: E402
from fastdec.export import OnnxDecoder, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    decoder = create_decoder("tae-64", "sdxl").eval()
    path = export_onnx(decoder, tmp_path_factory.mktemp("onnx") / "decoder.onnx")
    return decoder, path


def test_onnxruntime_matches_pytorch_at_new_resolutions(exported):
    decoder, path = exported
    onnx_decoder = OnnxDecoder(path)
    assert onnx_decoder.providers == ["CPUExecutionProvider"]
    # export used 8x8; check other batch sizes and non-square sizes
    for shape in [(2, 4, 12, 20), (1, 4, 32, 24)]:
        z = torch.randn(*shape)
        with torch.no_grad():
            reference = decoder(z)
        out = onnx_decoder(z)
        assert isinstance(out, torch.Tensor) and out.shape == reference.shape
        assert (out - reference).abs().max() <= 1e-4
        assert out.min() >= 0 and out.max() <= 1


def test_metadata_and_validation(exported):
    _, path = exported
    onnx_decoder = OnnxDecoder(path)
    assert onnx_decoder.latent_space.name == "sdxl" and onnx_decoder.upsample_factor == 8
    assert onnx_decoder.receptive_field_info.radius == 19
    with pytest.raises(ValueError, match="channels"):
        onnx_decoder(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="batch dimension"):
        onnx_decoder(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        onnx_decoder(torch.full((1, 4, 8, 8), float("nan")))
    assert onnx_decoder(torch.randn(1, 4, 8, 8, dtype=torch.float16)).dtype == torch.float32  # cast, not rejected
    # atomic write: nothing but the model in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["decoder.onnx"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastdec export onnx"):
        OnnxDecoder(tmp_path / "nope.onnx")


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "onnx", "--decoder", "tae-64", "--latent-space", "sd15", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "max |diff|" in text
    assert OnnxDecoder(out).latent_space.name == "sd15"

"""`fastdec decode`: latents files -> PNGs equal to the decoder output; automatic tiling under a memory budget."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastdec import create_decoder, save_decoder
from fastdec.cli import main
from fastdec.decode import DecodeError, load_latents, parse_bytes


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    decoder = create_decoder("tae-64", "sdxl", stage_blocks=(1, 1, 1), final_blocks=0).eval()
    return decoder, save_decoder(decoder, tmp_path / "dec.safetensors")


def _png(path):
    return torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1).float() / 255


def test_decode_safetensors_batch_to_pngs(tmp_path, checkpoint):
    decoder, path = checkpoint
    z = torch.randn(2, 4, 8, 12)
    save_file({"latents": z}, str(tmp_path / "z.safetensors"))
    assert main(["decode", str(tmp_path / "z.safetensors"), "--decoder", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with torch.no_grad():
        reference = decoder(z)
    for i in range(2):
        image = _png(tmp_path / "out" / f"z_latents_{i}.png")
        assert image.shape == (3, 64, 96)
        assert (image - reference[i]).abs().max() <= 1 / 255 + 1e-6


def test_load_npy_pt_and_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.float32))
    torch.save({"x": torch.zeros(4, 8, 8), "y": torch.zeros(1, 4, 8, 8)}, tmp_path / "b.pt")
    assert [n for n, _ in load_latents(tmp_path / "a.npy")] == [""]
    assert [n for n, _ in load_latents(tmp_path / "b.pt")] == ["x", "y"]
    np.save(tmp_path / "bad.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DecodeError, match="expected"):
        load_latents(tmp_path / "bad.npy")
    with pytest.raises(DecodeError, match="safetensors"):
        load_latents(tmp_path / "a.txt") if (tmp_path / "a.txt").write_text("x") else None
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(DecodeError, match="2GB"):
        parse_bytes("lots")


_RSS = ("import resource, sys; from fastdec.cli import main; rc = main(sys.argv[1:]); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def _peak_rss_mb(args):
    result = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024, result.stdout


@pytest.mark.slow  # ~2.5 min on the shared 2-core machine: 9 tiles of a 1024 px image
def test_large_decode_stays_within_memory_budget(tmp_path):
    # 1024x1024 px with tae-64: untiled needs ~1.6 GB of RSS (estimate 1.8 GB); an 800MB budget forces tiles
    from fastdec.decode import activation_bytes_per_pixel

    decoder = create_decoder("tae-64", "sdxl")
    save_decoder(decoder, tmp_path / "dec.safetensors")
    assert activation_bytes_per_pixel(decoder) * 1024 * 1024 > 2 * 800 * 2**20
    np.save(tmp_path / "big.npy", np.random.randn(4, 128, 128).astype(np.float32))
    np.save(tmp_path / "tiny.npy", np.random.randn(4, 4, 4).astype(np.float32))
    common = ["--decoder", str(tmp_path / "dec.safetensors"), "--out", str(tmp_path / "out")]
    baseline, _ = _peak_rss_mb(["decode", str(tmp_path / "tiny.npy"), *common])
    peak, stdout = _peak_rss_mb(["decode", str(tmp_path / "big.npy"), *common, "--max-memory", "800MB"])
    assert "tiled" in stdout and (tmp_path / "out" / "big.png").exists()
    assert Image.open(tmp_path / "out" / "big.png").size == (1024, 1024)
    assert peak - baseline < 800, (peak, baseline)

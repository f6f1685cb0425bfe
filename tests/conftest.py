"""Shared test fixtures: the real assets in ../shared and small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASTDEC_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights"
DATA = SHARED / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent (users' machines)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real asset {path} is absent (it ships only with the fastdec dev machines: ../shared)")
    return path


def taef2_photo(index: int = 0, size: int = 256):
    """A ``size`` x ``size`` crop (1, 3, size, size) of the index-th BSDS val photo, its TAEF2-encoder latents and the
    TAEF2 decoder (eval mode): real FLUX.2-space latents for tests of trained weights."""
    import numpy as np
    from PIL import Image

    import fastdec

    photo = sorted(shared_path("data", "images", "val").glob("*.jpg"))[index]
    rgb = torch.from_numpy(np.array(Image.open(photo).convert("RGB"))).permute(2, 0, 1).float()
    crop = rgb[None, :, :size, :size] / 255
    encoder = fastdec.load_encoder(shared_path("weights", "taef2_encoder.pth"))
    decoder = fastdec.load_decoder(shared_path("weights", "taef2_decoder.pth")).eval()
    with torch.no_grad():
        return crop, encoder(crop), decoder


def assert_mean_ci(stat: dict, values: list[float]) -> None:
    """A report's statistic is the mean and 95% Student-t interval of exactly ``values``."""
    from fastdec.eval import metrics

    expected = metrics.mean_ci(values)
    assert stat["n"] == len(values) and stat["confidence"] == 0.95
    assert stat["mean"] == pytest.approx(expected.mean, rel=1e-6, abs=1e-12)
    assert stat["ci_low"] == pytest.approx(expected.low, rel=1e-6, abs=1e-12)
    assert stat["ci_high"] == pytest.approx(expected.high, rel=1e-6, abs=1e-12)


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: with 2 intra-op threads on a busy 2-core machine, OpenMP hand-offs cost more
    than the math (measured: a 3x4x4x4 decode took 3.5 s with 2 threads, 0.06 s with 1). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def taef2_encoder_path() -> Path:
    return shared_path("weights", "taef2_encoder.pth")


@pytest.fixture
def taef2_decoder_path() -> Path:
    return shared_path("weights", "taef2_decoder.pth")


@pytest.fixture
def astronaut() -> torch.Tensor:
    """scikit-image's astronaut (CC0, bundled in the wheel), (1, 3, 512, 512) in [0, 1]."""
    from skimage import data

    return torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture
def make_decoder():
    """The tiny-decoder factory (tests/factories.py): ``make_decoder("tae-64", "flux2", seed=1, width=16)``."""
    from factories import tiny_decoder

    return tiny_decoder

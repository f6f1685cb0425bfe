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

"""Small builders shared by the training tests: synthetic image folders, a tiny random teacher encoder, and tiny
decoders saved to disk (built by the one test factory, ``factories.tiny_decoder``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from factories import tiny_decoder


def make_images(folder: Path, count: int, size: tuple[int, int] = (40, 48), seed: int = 0, suffix: str = ".png") -> Path:
    """``count`` smooth random RGB images (height, width) = ``size``; smooth so a decoder can learn them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        coarse = rng.random((h // 8 + 1, w // 8 + 1, 3))
        image = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img_{i:03d}{suffix}")
    return folder


def tiny_encoder_file(path: Path, space: str = "sdxl", seed: int = 0) -> Path:
    """A random TAESD-layout encoder (width 8) saved like an original TAESD .pth."""
    from fastdec.latent_spaces import get_latent_space
    from fastdec.models.tae import TAEEncoder, TAEEncoderConfig

    torch.manual_seed(seed)
    latent_space = get_latent_space(space)
    encoder = TAEEncoder(TAEEncoderConfig(latent_channels=latent_space.channels, width=8, stage_blocks=(1, 1, 1)),
                         latent_space)
    state = {k[len("layers."):]: v for k, v in encoder.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def tiny_decoder_file(path: Path, space: str = "sdxl", width: int = 16, seed: int = 0) -> Path:
    """``factories.tiny_decoder`` (tae-64 at test size) saved as a fastdec checkpoint."""
    from fastdec import save_decoder

    return save_decoder(tiny_decoder("tae-64", space, seed=seed, width=width), path)

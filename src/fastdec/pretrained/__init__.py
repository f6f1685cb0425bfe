"""fastdec's own trained decoders: the name registry.

Each entry names an fp16 safetensors file shipped inside this package (package data, so ``pip install``
brings it) with its training config and model card beside it. Adding a packaged weight is one
:func:`register_pretrained` line below plus its files; :func:`fastdec.resolve_decoder` then finds it by
name everywhere a decoder is accepted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DecoderSpecError
from ..latent_spaces import get_latent_space


@dataclass(frozen=True)
class PretrainedDecoder:
    name: str
    file: str  # safetensors file inside this package
    latent_space: str
    description: str

    def path(self) -> Path:
        """The installed weights file (read through importlib.resources, not a source path)."""
        ref = resources.files(__name__).joinpath(self.file)
        if not ref.is_file():
            raise DecoderSpecError(
                f"pretrained decoder '{self.name}' is registered but its weights file {self.file} is missing from "
                "this install: reinstall fastdec"
            )
        return Path(str(ref))

    def card(self) -> dict[str, Any]:
        """The model card stored in the weights file's metadata: training config, data and licences, steps,
        wall time and hardware, params, GFLOPs, metrics against TAEF2 with CIs, speed against TAEF2."""
        from safetensors import safe_open

        with safe_open(str(self.path()), "pt") as f:
            text = (f.metadata() or {}).get("model_card")
        if text is None:
            raise DecoderSpecError(f"pretrained decoder '{self.name}': {self.file} carries no model card: reinstall "
                                   "fastdec")
        return json.loads(text)


PRETRAINED: dict[str, PretrainedDecoder] = {}


def register_pretrained(name: str, file: str, latent_space: str, description: str) -> PretrainedDecoder:
    entry = PretrainedDecoder(name, file, latent_space, description)
    PRETRAINED[name] = entry
    return entry


def model_card(name: str) -> dict[str, Any]:
    """The model card of one of fastdec's trained decoders (see ``MODEL_CARDS.md`` for all of them)."""
    entry = PRETRAINED.get(name) if isinstance(name, str) else None
    if entry is None:
        raise DecoderSpecError(f"no pretrained decoder named '{name}'; shipped: {', '.join(list_pretrained()) or 'none'}")
    return entry.card()


def list_pretrained(latent_space: str | None = None) -> list[str]:
    """Names of fastdec's trained decoders (for one latent space, or all); an unknown space is an error."""
    if latent_space is not None:
        latent_space = get_latent_space(latent_space).name
    return sorted(n for n, e in PRETRAINED.items() if latent_space is None or e.latent_space == latent_space)


# ----------------------------------------------------------------------------- the registry (one line each)
# FLUX.2 space, trained on TAEF2-encoder latents of BSDS500 train; cards in MODEL_CARDS.md
register_pretrained("flux2-hifi", "flux2-hifi.safetensors", "flux2",
                    "TAEF2's architecture and FLOPs, fine-tuned from TAEF2 for fidelity (L1 + TAEF2-output L1)")
register_pretrained("flux2-turbo", "flux2-turbo.safetensors", "flux2",
                    "tae-turbo: 0.43x TAEF2's GFLOPs (pixel-shuffle head), warm-started from TAEF2")
register_pretrained("flux2-large", "flux2-large.safetensors", "flux2",
                    "tae-large: 2.06x TAEF2's GFLOPs, capacity in the low-resolution stages, grown from TAEF2")
# FLUX.2-space causal video decoders (stream frame by frame), trained on real clips; held-out clips in the cards
register_pretrained("flux2-video", "flux2-video.safetensors", "flux2",
                    "causal tae-causal-64 started exactly from flux2-hifi, trained on video for less flicker")
register_pretrained("flux2-video-turbo", "flux2-video-turbo.safetensors", "flux2",
                    "causal tae-causal-turbo started exactly from flux2-turbo, trained on video for less flicker")

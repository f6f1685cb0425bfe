"""fastdec's own trained decoders: the name registry.

Each entry names an fp16 safetensors file shipped inside this package (package data, so ``pip install``
brings it) with its training config and model card beside it. Adding a packaged weight is one
:func:`register_pretrained` line below plus its files; :func:`fastdec.resolve_decoder` then finds it by
name everywhere a decoder is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import DecoderSpecError


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


PRETRAINED: dict[str, PretrainedDecoder] = {}


def register_pretrained(name: str, file: str, latent_space: str, description: str) -> PretrainedDecoder:
    entry = PretrainedDecoder(name, file, latent_space, description)
    PRETRAINED[name] = entry
    return entry


def list_pretrained(latent_space: str | None = None) -> list[str]:
    """Names of fastdec's trained decoders (for one latent space, or all)."""
    return sorted(n for n, e in PRETRAINED.items() if latent_space is None or e.latent_space == latent_space)


# ----------------------------------------------------------------------------- the registry (one line each)

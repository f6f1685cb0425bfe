"""The decode wing: ``fastdec decode`` (images), ``decode-video`` (video) and ``decode-batch`` (batch).

- ``images``: one latents file -> PNGs, tiled under a memory budget (``decode_file``)
- ``video``: latents or a teacher-encoded video -> .mp4/.gif, streamed (``decode_video``)
- ``batch``: many latent files -> images, sharded over processes, resumable (``decode_batch``)
- ``common``: the decoder the commands run (through ``resolve_decoder``) and the device check
- ``cli``: the three commands' flags

This package also answers to the old module path ``fastdec.decode`` (the names it had are re-exported).
"""
from __future__ import annotations

from ..errors import DecodeError
from ..io.latents import read_latents
from .cli import add_decode_command, decode_command
from .images import (
    PlannedImage,
    activation_bytes_per_pixel,
    choose_tile,
    decode_file,
    load_latents,
    parse_bytes,
)

# the old module's ``add_commands`` registered `fastdec decode` only (the old decode_video and bulk modules
# registered the other two); ``fastdec.decode.cli.add_commands``, which fastdec.cli uses, registers all three
add_commands = add_decode_command

__all__ = [
    "DecodeError", "PlannedImage", "activation_bytes_per_pixel", "add_commands", "choose_tile", "decode_command",
    "decode_file", "load_latents", "parse_bytes", "read_latents",
]

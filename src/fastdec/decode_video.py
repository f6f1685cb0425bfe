"""Old import path of ``fastdec decode-video``: the library is :mod:`fastdec.decode.video`, the command
:mod:`fastdec.decode.cli`. ``add_commands`` here registers ``decode-video`` only."""
from .decode.cli import add_decode_video_command as add_commands  # noqa: F401
from .decode.cli import decode_video_command  # noqa: F401
from .decode.video import (  # noqa: F401
    VideoSource,
    decode_stream,
    decode_video,
    encoded_video,
    load_any_decoder,
    load_clip,
    load_latents,
)
from .dtypes import DTYPES  # noqa: F401
from .errors import DecodeVideoError, VideoError  # noqa: F401
from .io.latents import LATENT_SUFFIXES  # noqa: F401

"""What the three decode commands share: the decoder they run and the device they run it on."""
from __future__ import annotations

from typing import Any

import torch

from ..devices import check_device  # noqa: F401  (the decode commands' name for it)
from ..errors import DecodeError
from ..models import LatentDecoder
from ..resolve import check_random_weights, describe, resolve_decoder


def build_decoder(
    spec: Any,
    *,
    latent_space: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    random_weights: bool = False,
    channels_last: bool = True,
) -> LatentDecoder:
    """The decoder ``spec`` names (through :func:`fastdec.resolve_decoder`), on ``device`` in ``dtype``, in
    eval mode, in channels_last memory layout unless asked otherwise."""
    from ..runtime import to_channels_last

    check_random_weights(spec, random_weights)
    decoder = resolve_decoder(spec, latent_space=latent_space, device=device, dtype=dtype,
                              random_weights=random_weights).eval()
    if channels_last:
        to_channels_last(decoder)
    return decoder


def describe_spec(spec: Any) -> str:
    """How messages name a decoder: its path or name as given, or its class for a decoder object."""
    return describe(spec)


def require_image_decoder(decoder: LatentDecoder, spec: Any, command: str) -> None:
    if decoder.is_video:
        raise DecodeError(f"'{describe_spec(spec)}' is a video decoder: {command} writes images; "
                          "use `fastdec decode-video`")

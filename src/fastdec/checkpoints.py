"""Old import path: decoders' files now live in :mod:`fastdec.io.checkpoints` and names in :mod:`fastdec.resolve`."""
from .errors import CheckpointError
from .io.checkpoints import FORMAT, FORMAT_VERSION, decoder_info, read_decoder, read_encoder, save_decoder
from .io.files import atomic_write
from .resolve import load_decoder, load_encoder

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "atomic_write", "decoder_info", "load_decoder",
           "load_encoder", "read_decoder", "read_encoder", "save_decoder"]

"""Old path of :mod:`fastdec.runtime.tiling` (tiled decoding with a measured receptive field)."""
from .errors import GlobalReceptiveFieldError
from .runtime.tiling import (ApproximateTilingWarning, ReceptiveField, decode_tiled, measure_receptive_field,
                             receptive_field, tile_count)

__all__ = ["ApproximateTilingWarning", "GlobalReceptiveFieldError", "ReceptiveField", "decode_tiled",
           "measure_receptive_field", "receptive_field", "tile_count"]

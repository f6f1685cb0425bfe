"""Old import path: training data now lives in :mod:`fastdec.train.data`."""
from .errors import DataError
from .train.data import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, Crop, GlobalBatches, ImageFolder, VideoFolder,
                         crops_to_json, open_folder)

__all__ = ["Crop", "DataError", "GlobalBatches", "IMAGE_SUFFIXES", "ImageFolder", "VIDEO_SUFFIXES", "VideoFolder",
           "crops_to_json", "open_folder"]

"""Old import path: the latent cache now lives in :mod:`fastdec.train.cache`."""
from .train.cache import CACHE_VERSION, INDEX, CachedCrops, LatentCache, build_cache, cache_key

__all__ = ["CACHE_VERSION", "INDEX", "CachedCrops", "LatentCache", "build_cache", "cache_key"]

"""Old import path: video I/O now lives in :mod:`fastdec.io.video`."""
from .io.video import *  # noqa: F401,F403
from .io.video import __all__  # noqa: F401

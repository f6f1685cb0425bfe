"""Decoders defined outside fastdec: a user's module or ``.py`` file that registers its own architectures
and presets (``register_architecture`` / ``register_preset``) is imported by ``fastdec --plugin FILE_OR_MODULE``
(repeatable) or by the ``FASTDEC_PLUGINS`` environment variable (``os.pathsep``-separated), so every
command, ``--decoder my-preset`` and ``load_decoder(checkpoint)`` know it. Nothing in fastdec is edited.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from .errors import UsageError

PLUGINS_ENV = "FASTDEC_PLUGINS"


_LOADED: dict[str, ModuleType] = {}  # by the spec as a child process is given it (a file's absolute path)


def load_plugin(spec: str) -> ModuleType:
    """Import a module by name (``my_pkg.decoders``) or a Python file by path (``my_decoder.py``), once."""
    if not spec.strip():
        raise UsageError("--plugin needs a .py file or an importable module name, got an empty one")
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UsageError(f"plugin file '{spec}' not found: pass a .py file or an importable module name")
        key = str(path.resolve())
        if key not in _LOADED:
            _LOADED[key] = _import_file(spec, path.resolve())
        return _LOADED[key]
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is not None and not (spec == e.name or spec.startswith(e.name + ".")):
            raise _failed(spec, e) from e  # the plugin is there; something it imports is not
        raise UsageError(f"plugin module '{spec}' cannot be imported ({e}): pass a .py file or put the module "
                         "on PYTHONPATH") from e
    except Exception as e:
        raise _failed(spec, e) from e
    _LOADED[spec] = module
    return module


def _import_file(spec: str, path: Path) -> ModuleType:
    # the folder in the name: two plugins both called decoders.py are two modules (the second was skipped)
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = f"fastdec_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, Exception):
            raise _failed(spec, e) from e
        raise
    return module


def loaded_plugins() -> list[str]:
    """The plugins this process imported (a file by its absolute path), for a process it starts (bench's
    isolated memory probe) to import too, so the child knows the same decoders."""
    return list(_LOADED)


def _failed(spec: str, error: Exception) -> UsageError:
    """The plugin's own error, located in its code (the line that raised), as one message without a traceback."""
    import traceback

    if isinstance(error, SyntaxError):
        where = f"{error.filename}:{error.lineno}"
    else:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else spec
    return UsageError(f"plugin '{spec}' failed while it was imported, at {where}: {type(error).__name__}: {error}. "
                      "Fix the plugin, or leave it out (--plugin, FASTDEC_PLUGINS)")


def load_plugins(specs: list[str] | None = None) -> list[ModuleType]:
    """The plugins named by ``specs`` and by ``$FASTDEC_PLUGINS``, each imported once."""
    from_env = [s for s in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if s]
    return [load_plugin(s) for s in [*from_env, *(specs or [])]]

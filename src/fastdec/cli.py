"""The ``fastdec`` command. Each wing's ``cli`` module adds its subcommands; this file only dispatches.

Errors: every :class:`~fastdec.errors.FastdecError` is caught here, once, and printed on stderr as
``fastdec <command>: error: <message>`` with exit status 2 (argparse's usage errors look the same).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .errors import FastdecError
from .plugins import load_plugins

# module -> registers one or more subcommands via add_commands(subparsers)
COMMAND_MODULES = [
    "fastdec.bench.cli",    # fastdec bench (images, --video, --pipeline)
    "fastdec.train.cli",    # fastdec train
    "fastdec.eval.cli",     # fastdec eval images|video
    "fastdec.decode.cli",   # fastdec decode, decode-video, decode-batch
    "fastdec.runtime.cli",  # fastdec export onnx
    "fastdec.pretrained.cli",  # fastdec pretrained
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastdec", description="Fast latent decoders for diffusion models.")
    parser.add_argument("--version", action="version", version=f"fastdec {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="import a module or .py file that registers your own decoders (repeatable; also "
                             "$FASTDEC_PLUGINS)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def _command_names(parser: argparse.ArgumentParser) -> dict[Callable, str]:
    """Each command's function -> its full name ("fastdec eval images"), for error prefixes."""
    names: dict[Callable, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                func = sub._defaults.get("func")
                if func is not None:
                    names[func] = sub.prog
                names.update(_command_names(sub))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        load_plugins(args.plugin)
        result = args.func(args)
    except FastdecError as e:
        print(f"{_command_names(parser).get(args.func, 'fastdec')}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: no traceback; 128 + SIGINT, as shells do
        print(f"{_command_names(parser).get(args.func, 'fastdec')}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

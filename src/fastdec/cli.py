"""The ``fastdec`` command. Each wing's ``cli`` module adds its subcommands; this file only dispatches.

Errors: every :class:`~fastdec.errors.FastdecError` is caught here, once, and printed on stderr as
``fastdec <command>: error: <message>`` with exit status 2 (argparse's usage errors look the same).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import FastdecError, UsageError
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


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it, each before its subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from iter_parsers(sub)


def _command_names(parser: argparse.ArgumentParser) -> dict[Callable, str]:
    """Each command's function -> its full name ("fastdec eval images"), for error prefixes."""
    return {sub._defaults["func"]: sub.prog for sub in iter_parsers(parser)
            if sub is not parser and sub._defaults.get("func") is not None}


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> how the user wrote it (``--latent-space``, or a positional's name), over every subcommand."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names.update(_flag_names(sub))
        else:
            names.setdefault(action.dest, max(action.option_strings, key=len) if action.option_strings else action.dest)
    return names


def check_no_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """No option or argument takes an empty string: `--decoder ''` was read as the current folder, and
    `--latent-space ''` as no latent space at all (an sdxl decoder was exported)."""
    names = None
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            names = names or _flag_names(parser)
            raise UsageError(f"{names.get(dest, dest)} is empty: give a value, or leave it out")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a job scheduler or ``kill`` sends) raised where the command is, as Ctrl-C is: the same
    cleanup runs (temporary files removed, no half-written output). Unhandled, the process died on the spot."""


def _raise_terminated(signum: int, frame: object) -> None:
    # a second SIGTERM during the cleanup, or one a process stuck in native code never got to handle (the handler
    # runs between bytecodes), kills it as before
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back from here
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        with _sigterm_as_interrupt():
            check_no_empty_values(parser, args)
            load_plugins(args.plugin)
            result = args.func(args)
    except FastdecError as e:
        print(f"{_command_names(parser).get(args.func, 'fastdec')}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the user's (or scheduler's) choice, not a crash: no traceback; 128 + the
        terminated = isinstance(e, Terminated)  # signal's number, as shells do
        print(f"{_command_names(parser).get(args.func, 'fastdec')}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

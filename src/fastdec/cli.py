"""The ``fastdec`` command. Each capability lives in its own module, which adds its subcommand here."""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> registers one or more subcommands via add_commands(subparsers)
COMMAND_MODULES = [
    "fastdec.bench",        # fastdec bench
    "fastdec.train",        # fastdec train
    "fastdec.evaluate",     # fastdec eval images|video
    "fastdec.decode",       # fastdec decode
    "fastdec.decode_video", # fastdec decode-video
    "fastdec.bulk",         # fastdec decode-batch
    "fastdec.export",       # fastdec export onnx
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastdec", description="Fast latent decoders for diffusion models.")
    parser.add_argument("--version", action="version", version=f"fastdec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # capability not built yet
                continue
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

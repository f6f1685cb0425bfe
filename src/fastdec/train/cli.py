"""``fastdec train``: every :class:`~fastdec.train.config.TrainConfig` field as a flag, translated into one
``train(config)`` call. Errors are :class:`~fastdec.errors.FastdecError`s, printed once by ``fastdec.cli``."""
from __future__ import annotations

import argparse
import dataclasses

from .config import CHOICES, HELP, TrainConfig, field_kind, flag, make_config

DESCRIPTION = "Distil a fast decoder from a teacher VAE. One loop, top to bottom."
CONVERT = {"int": int, "float": float, "str": str}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per config field; unset flags stay unset, so the config file can fill them."""
    parser.add_argument("--config", default=None, help="YAML/TOML file with these options (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = field_kind(f), HELP.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        default = f" (default: {f.default})" if f.default not in (None, "") else ""
        choices = CHOICES.get(f.name)
        parser.add_argument(flag(f.name), type=CONVERT[kind], default=argparse.SUPPRESS, choices=choices,
                            help=f"{help_text}{default}".strip())


def run_command(args: argparse.Namespace) -> int:
    from .loop import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # the top-level parser adds options of its own
    values = {k: v for k, v in vars(args).items() if k in fields}
    train(make_config(values, args.config))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="distil a fast decoder from a teacher VAE", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run_command)

"""``fastdec pretrained``: the trained decoders this install ships."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UsageError
from . import PRETRAINED, list_pretrained, model_card


def list_command(args: argparse.Namespace) -> int:
    if args.card:
        if args.latent_space:  # it filters the list; with --card it was dropped and another space's card printed
            raise UsageError("--latent-space filters the list, and --card names one decoder: give one of them")
        print(json.dumps(model_card(args.card), indent=2))
        return 0
    names = list_pretrained(args.latent_space)
    if not names:
        where = f" for latent space '{args.latent_space}'" if args.latent_space else ""
        print(f"no pretrained decoders{where} in this install; presets (untrained architectures): fastdec bench, "
              "or train one with fastdec train")
        return 0
    for name in names:
        entry = PRETRAINED[name]
        print(f"{name:20s} {entry.latent_space:8s} {entry.description}")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("pretrained", help="list fastdec's trained decoders (use the names with --decoder)",
                              description="fastdec's own trained decoders, shipped in the package: each name works "
                                          "with every --decoder, load_decoder(name) and swap_decoder(pipe, name).")
    p.add_argument("--latent-space", default=None, help="only decoders for this latent space (e.g. flux2)")
    p.add_argument("--card", metavar="NAME", help="print one decoder's model card (JSON: training, data and licences, "
                                                   "metrics and speed against TAEF2)")
    p.set_defaults(func=list_command)

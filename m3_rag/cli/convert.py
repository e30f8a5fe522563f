"""``m3-rag convert``: its arguments and its handler (the conversion is
:mod:`m3_rag.convert`, imported only when the command runs)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "cmd_convert"]


def add_parser(sub: Any) -> None:
    """Add the ``convert`` subcommand to ``sub`` (the parser's subparsers)."""
    p = sub.add_parser(
        "convert",
        help="convert a BGE-M3 checkpoint between the official layout and a "
        "transformers-native one (AutoModel returns all three outputs)",
    )
    p.add_argument("src", help="checkpoint directory (official or transformers-native layout)")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--sentence-transformers",
        action="store_true",
        help="also write a sentence-transformers dense model (CLS pooling + normalisation)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from m3_rag.convert import run_from_args

    return run_from_args(args)

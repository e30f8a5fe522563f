"""``m3-rag convert``: its arguments and its handler (the conversion is
:mod:`m3_rag.convert`, imported only when the command runs; it never imports the CLI)."""

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
    """Convert ``SRC`` to the other layout; print what was written.

    Raises:
        CliError: ``SRC`` is missing or neither layout, a file in it is unreadable, or
            ``OUT`` exists and is not empty (one line, exit code 2).
    """
    from m3_rag.cli.commands import CliError
    from m3_rag.convert import convert_checkpoint
    from m3_rag.errors import CheckpointError

    try:
        written = convert_checkpoint(
            args.src, args.out, sentence_transformers=args.sentence_transformers
        )
    except (OSError, CheckpointError) as e:
        raise CliError(str(e)) from None
    extra = " + sentence-transformers files" if args.sentence_transformers else ""
    print(f"wrote the {written} layout{extra} to {args.out}")
    return 0

"""The ``m3-rag convert`` command's work: convert, print what was written, or one line."""

from __future__ import annotations

import argparse

from m3_rag.convert.layouts import convert_checkpoint
from m3_rag.errors import CheckpointError

__all__ = ["run_from_args"]


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``m3-rag convert SRC OUT [--sentence-transformers]``; return the exit code.

    Raises:
        CliError: ``SRC`` is missing or neither layout, a file in it is unreadable, or
            ``OUT`` exists and is not empty (the CLI prints one line and exits 2).
    """
    from m3_rag.cli.commands import CliError

    try:
        written = convert_checkpoint(
            args.src, args.out, sentence_transformers=bool(args.sentence_transformers)
        )
    except (OSError, CheckpointError) as e:
        raise CliError(str(e)) from e
    extra = " + sentence-transformers files" if args.sentence_transformers else ""
    print(f"wrote the {written} layout{extra} to {args.out}")
    return 0

"""The ``m3-rag`` command line: the argument parser and :func:`main`.

Argument parsing and exit codes only: the commands are :mod:`m3_rag.cli.commands`,
ingestion is :mod:`m3_rag.ingest`. Every failure is one line on stderr with exit code 2
(130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from m3_rag.cli import convert as convert_cli
from m3_rag.cli import serve as serve_cli
from m3_rag.cli.commands import (
    DEFAULT_MODEL,
    CliError,
    Interrupted,
    cmd_demo,
    cmd_eval,
    cmd_index,
    cmd_migrate,
    cmd_search,
    one_line,
)
from m3_rag.codecs import DEFAULT_CODEC, DEFAULT_POOL_FACTOR
from m3_rag.spec import COLBERT_DTYPES

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m3-rag", description="BGE-M3 hybrid retrieval from the shell.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL) -> None:
        p.add_argument(
            "--model",
            default=model_default,
            help="hub id or local checkpoint dir (default: "
            + (model_default or "the model the index was built with")
            + ")",
        )
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
        p.add_argument(
            "--runtime",
            choices=["torch", "onnx"],
            default="torch",
            help="run the model with torch (default) or ONNX Runtime (pip install "
            "'m3-rag[onnx]'; exported once and cached)",
        )
        p.add_argument(
            "--int8",
            action="store_true",
            help="with --runtime onnx: int8 weights (dynamic quantisation; see docs/runtime.md)",
        )

    p = sub.add_parser(
        "demo", help="index the embedded multilingual demo corpus and run a few queries"
    )
    common(p)
    p.add_argument("-k", type=_count(1), default=3, help="hits per query")
    p.add_argument("--query", action="append", help="a query (repeatable)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="index a folder of text files or a JSONL file")
    p.add_argument("source", help="folder of text files (see --glob), or a .jsonl file")
    p.add_argument(
        "--out",
        required=True,
        help="index directory: new or empty; or the index this same command started, which "
        "is resumed (passages already committed are skipped)",
    )
    common(p)
    p.add_argument(
        "--chunk-size", type=_count(1), default=1000, help="characters per chunk (folders)"
    )
    p.add_argument("--chunk-overlap", type=_count(0), default=150, help="overlap between chunks")
    p.add_argument(
        "--glob",
        action="append",
        help="file pattern to index in a folder, repeatable (default: *.txt and *.md at any "
        "depth; a pattern with / is relative to the folder, e.g. 'docs/**/*.rst')",
    )
    p.add_argument(
        "--encoding-errors",
        choices=["skip", "strict", "replace"],
        default="skip",
        help="a file that is not UTF-8 text (or is binary, or has a name that is not "
        "UTF-8): skip it with a warning (default), stop, or decode it with replacement "
        "characters (binary files and bad names are still skipped)",
    )
    p.add_argument("--batch-size", type=_count(1), default=32, help="texts per forward pass (max)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing m3-rag index at --out (anything else is never replaced); "
        "the old index stays whole until the new one is complete",
    )
    p.add_argument(
        "--commit-every",
        type=_count(1),
        default=256,
        help="passages encoded and committed at a time (memory is bounded by this)",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="merge the index into one segment at the end (fewer files, faster searches)",
    )
    p.add_argument(
        "--colbert",
        choices=COLBERT_DTYPES,
        help=f"how ColBERT vectors are stored (default for a new index: {DEFAULT_CODEC}; "
        "a resumed index keeps its own); see docs/colbert.md",
    )
    p.add_argument(
        "--pool-factor",
        type=_count(1),
        help="token pooling of each passage's ColBERT vectors: at most t // N vectors are "
        f"kept (default for a new index: {DEFAULT_POOL_FACTOR} with the default --colbert, 1 "
        "with another one; 1: no pooling; a resumed "
        "index keeps its own)",
    )
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "migrate",
        help="convert an index saved by an older m3-rag (a format-2 snapshot) to the "
        "current format",
    )
    p.add_argument("old", help="the format-2 snapshot directory (left unchanged)")
    p.add_argument("new", help="the new index directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("search", help="search an index")
    p.add_argument("index", help="index directory written by `m3-rag index`")
    p.add_argument("query", help="the text to search for")
    common(p, model_default=None)
    p.add_argument("-k", type=_count(1), default=10, help="hits to print (default %(default)s)")
    p.add_argument(
        "--weights",
        help="dense,lexical,colbert fusion weights, e.g. 0.4,0.2,0.4 (default: the index's)",
    )
    p.add_argument(
        "--fusion",
        choices=["weighted", "rrf"],
        help="weighted sum of the scores, or reciprocal rank fusion (default: the index's)",
    )
    p.add_argument(
        "--candidates",
        type=_count(1),
        help="stage-1 candidates taken from each of the dense and lexical legs "
        "(default: the index's)",
    )
    p.add_argument(
        "--rerank",
        nargs="?",
        const="BAAI/bge-reranker-v2-m3",
        default=None,
        help="rerank with a cross-encoder (default BAAI/bge-reranker-v2-m3)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="evaluate retrieval modes on a BEIR-layout collection")
    p.add_argument("beir_dir", help="folder with corpus.jsonl, queries.jsonl, qrels/test.tsv")
    common(p)
    p.add_argument(
        "--modes",
        help="comma list of dense,lexical,colbert,hybrid,hybrid-rrf "
        "(default: every mode the model has)",
    )
    p.add_argument(
        "--candidates",
        type=_count(1),
        default=100,
        help="stage-1 candidates from each of the dense and lexical legs (default %(default)s)",
    )
    p.add_argument("--batch-size", type=_count(1), default=64, help="texts per forward pass (max)")
    p.add_argument(
        "--colbert",
        choices=COLBERT_DTYPES,
        help=f"the ColBERT code evaluated (default: a new index's, {DEFAULT_CODEC})",
    )
    p.add_argument(
        "--pool-factor",
        type=_count(1),
        help="token pooling evaluated (default: a new index's for the code)",
    )
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)

    serve_cli.add_parser(sub, common, _count)
    convert_cli.add_parser(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--weights -1,1,1`` -> ``--weights=-1,1,1`` (argparse takes ``-1,1,1`` for an option;
    the value is then refused with a clear message)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--weights":
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure is one line on stderr and exit 2 (130 on Ctrl-C,
    141 when the reader of stdout goes away, as ``| head`` does)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(_join_negative_values(raw))
        except SystemExit as e:  # --help (0) or a usage error, already printed in one line
            return e.code if isinstance(e.code, int) else 2
        return int(args.func(args))
    except CliError as e:
        print(f"m3-rag: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m3-rag: interrupted; nothing was changed on disk", file=sys.stderr)
        return 130
    except Interrupted as e:  # raised during a progress bar: start a fresh line
        print(f"\nm3-rag: {e}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `m3-rag search ... | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE, the shell's convention
    except Exception as e:  # a bug or an unforeseen error: still one line, never a traceback
        print(f"m3-rag: {type(e).__name__}: {one_line(str(e))[:500]}", file=sys.stderr)
        return 2

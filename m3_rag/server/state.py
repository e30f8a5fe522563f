"""What the routes share: the server's state, and running blocking work off the event loop
with errors mapped to HTTP statuses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from m3_rag.encoder import M3Encoder
from m3_rag.errors import WriteConflictError
from m3_rag.rerank import Reranker
from m3_rag.retriever import HybridRetriever
from m3_rag.server.batching import Batcher, Busy
from m3_rag.server.config import ServerConfig
from m3_rag.server.errors import ApiError
from m3_rag.server.metrics import Metrics

__all__ = ["ServerState", "as_api_error", "blocking", "wait"]

T = TypeVar("T")


@dataclass
class ServerState:
    """What the routes share."""

    encoder: M3Encoder
    reranker: Reranker | None
    retriever: HybridRetriever | None
    index_path: Path | None
    config: ServerConfig
    batcher: Batcher
    metrics: Metrics
    tokenizer_json: str | None = None

    def check_texts(self, texts: list[str], name: str = "input") -> None:
        """The per-request limits: not empty, at most ``max_texts``, ``max_chars`` each."""
        if not texts:
            raise ApiError(400, f"{name} is empty: send at least one text")
        if len(texts) > self.config.max_texts:
            raise ApiError(
                413,
                f"{name} has {len(texts)} texts, over the limit of {self.config.max_texts} "
                "per request: send them in several requests",
            )
        for i, t in enumerate(texts):
            if len(t) > self.config.max_chars:
                raise ApiError(
                    413,
                    f"{name}[{i}] has {len(t)} characters, over the limit of "
                    f"{self.config.max_chars}: split it into chunks",
                )

    def want(self, mode: str, asked: bool | None) -> bool:
        available = self.encoder.has_sparse if mode == "sparse" else self.encoder.has_colbert
        if asked and not available:
            raise ApiError(
                400,
                f"{self.encoder.model_name!r} is a dense-only model (no {mode} head); "
                f"send return_{mode}=false",
            )
        return available if asked is None else bool(asked)


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a worker thread (a search, a write, serialising a large body) and map
    the errors it raises for bad input to 4xx, and :class:`Busy` to 503."""
    from starlette.concurrency import run_in_threadpool

    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except BaseException as e:
        raise as_api_error(e) from None


async def wait(future: Any, batcher: Batcher | None = None) -> Any:
    """Await a batcher job, mapping its errors as :func:`blocking` does; ``batcher``: the
    job was queued with ``wake=False``, wake the worker once this loop turn is done."""
    if batcher is not None:
        asyncio.get_running_loop().call_soon(batcher.wake)
    try:
        return await asyncio.wrap_future(future)
    except BaseException as e:
        raise as_api_error(e) from None


def as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return ApiError(503, str(e), {"retry-after": "1"})
    if isinstance(e, WriteConflictError):
        return ApiError(409, str(e))
    if isinstance(e, KeyError):
        return ApiError(404, str(e.args[0]) if e.args else "unknown id")
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, " ".join(str(e).split()))
    return e

"""The served encoder and reranker as the retriever sees them: every model call goes through
the :class:`~m3_rag.server.batching.Batcher` (so searches and writes are batched with the
other requests, and the model runs in its one worker thread)."""

from __future__ import annotations

from typing import Any

import numpy as np

from m3_rag._inputs import check_pairs, check_texts
from m3_rag.encoder import EncodeOutput
from m3_rag.rerank import RerankResult
from m3_rag.server.batching import Batcher

__all__ = ["BatchedEncoder", "BatchedReranker"]


class BatchedEncoder:
    """An :class:`m3_rag.Encoder` whose model calls are jobs of ``batcher``."""

    def __init__(self, batcher: Batcher) -> None:
        enc = batcher.encoder
        self._batcher = batcher
        self.model_name = enc.model_name
        self.tokenizer = enc.tokenizer
        self.batch_size = enc.batch_size

    @property
    def has_sparse(self) -> bool:
        return self._batcher.encoder.has_sparse

    @property
    def has_colbert(self) -> bool:
        return self._batcher.encoder.has_colbert

    @property
    def dense_dim(self) -> int:
        return self._batcher.encoder.dense_dim

    @property
    def colbert_dim(self) -> int | None:
        return self._batcher.encoder.colbert_dim

    @property
    def vocab_size(self) -> int:
        return self._batcher.encoder.vocab_size

    def encode(
        self,
        texts: str | list[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool | None = None,
        return_colbert: bool | None = None,
        show_progress: bool | None = None,
    ) -> EncodeOutput:
        return self._run("document", texts, max_length, return_dense, return_sparse, return_colbert)

    def encode_queries(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        return self._run(
            "query",
            texts,
            kwargs.get("max_length"),
            kwargs.get("return_dense", True),
            kwargs.get("return_sparse"),
            kwargs.get("return_colbert"),
        )

    def encode_documents(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        return self._run(
            "document",
            texts,
            kwargs.get("max_length"),
            kwargs.get("return_dense", True),
            kwargs.get("return_sparse"),
            kwargs.get("return_colbert"),
        )

    def _run(
        self,
        role: str,
        texts: str | list[str],
        max_length: int | None,
        dense: bool,
        sparse: bool | None,
        colbert: bool | None,
    ) -> EncodeOutput:
        items = check_texts(texts)
        want_sparse = self.has_sparse if sparse is None else bool(sparse)
        want_colbert = self.has_colbert if colbert is None else bool(colbert)
        job = self._batcher.encode(items, role, max_length, bool(dense), want_sparse, want_colbert)
        result: EncodeOutput = job.result()
        return result


class BatchedReranker:
    """An :class:`m3_rag.CrossEncoder` whose model calls are jobs of ``batcher``."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    def compute_score(
        self,
        pairs: list[tuple[str, str]] | tuple[str, str],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[float]:
        items = check_pairs(pairs)
        if not items:
            return []
        scores: np.ndarray = self._batcher.rerank(items).result()
        if normalize:
            scores = 1.0 / (1.0 + np.exp(-scores))
        return [float(s) for s in scores]

    def rerank(
        self,
        query: str,
        texts: list[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
    ) -> list[RerankResult]:
        items = check_texts(texts)
        scores = self.compute_score([(query, t) for t in items], normalize=normalize)
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [RerankResult(int(i), scores[int(i)]) for i in order]

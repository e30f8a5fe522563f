"""LlamaIndex embeddings: dense (``M3Embedding``) and lexical (``M3SparseEmbedding``)."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.embeddings.base_sparse import BaseSparseEmbedding
from pydantic import PrivateAttr

from m3_rag import Encoder, M3Encoder
from m3_rag.cache import Role, encode_cached


def _encoder(
    encoder: Encoder | None, model_name: str, model_kwargs: dict[str, Any] | None
) -> Encoder:
    if encoder is not None:
        if not isinstance(encoder, Encoder):
            raise TypeError(
                "encoder must be an m3_rag.Encoder (M3Encoder or RemoteEncoder), "
                f"got {type(encoder).__name__}"
            )
        return encoder
    return M3Encoder(model_name, **(model_kwargs or {}))


class M3Embedding(BaseEmbedding):
    """Dense BGE-M3 vectors for LlamaIndex (``Settings.embed_model = M3Embedding(...)``).

    Args:
        model_name: Hub id or local directory (ignored when ``encoder`` is given).
        encoder: An existing :class:`m3_rag.M3Encoder` to share.
        model_kwargs: ``M3Encoder`` keyword arguments.
    """

    _encoder: Encoder = PrivateAttr()

    def __init__(
        self,
        model_name: str = "BAAI/bge-m3",
        encoder: Encoder | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        enc = _encoder(encoder, model_name, model_kwargs)
        kwargs.setdefault("embed_batch_size", enc.batch_size)
        super().__init__(model_name=enc.model_name, **kwargs)
        self._encoder = enc

    @classmethod
    def class_name(cls) -> str:
        return "M3Embedding"

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    def _dense(self, texts: list[str], query: bool) -> list[list[float]]:
        out = encode_cached(self._encoder, texts, "query" if query else "document")
        return [o.dense.tolist() for o in out]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._dense([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._dense([text], query=False)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._dense(texts, query=False)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)


class M3SparseEmbedding(BaseSparseEmbedding):
    """BGE-M3 lexical weights ``{token_id: weight}`` for LlamaIndex sparse retrieval.

    Args:
        model_name: Hub id or local directory (ignored when ``encoder`` is given).
        encoder: An existing :class:`m3_rag.M3Encoder` to share (must have the sparse head).
        model_kwargs: ``M3Encoder`` keyword arguments.
    """

    _encoder: Encoder = PrivateAttr()

    def __init__(
        self,
        model_name: str = "BAAI/bge-m3",
        encoder: Encoder | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        enc = _encoder(encoder, model_name, model_kwargs)
        if not enc.has_sparse:
            raise ValueError(
                f"{enc.model_name!r} is dense-only: M3SparseEmbedding needs a BGE-M3 checkpoint"
            )
        kwargs.setdefault("embed_batch_size", enc.batch_size)
        super().__init__(model_name=enc.model_name, **kwargs)
        self._encoder = enc

    @classmethod
    def class_name(cls) -> str:
        return "M3SparseEmbedding"

    def _sparse(self, texts: list[str], query: bool) -> list[dict[int, float]]:
        out = encode_cached(self._encoder, texts, "query" if query else "document")
        return [dict(o.sparse or {}) for o in out]

    # ------------------------------------------------------------------ store bridges
    def qdrant_doc_fn(self, texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """``sparse_doc_fn`` of ``llama_index.vector_stores.qdrant.QdrantVectorStore``:
        ``(indices, values)`` per document (the forward pass is shared with
        :class:`M3Embedding` on the same encoder)."""
        return self._pairs(texts, "document")

    def qdrant_query_fn(self, texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """``sparse_query_fn`` of the LlamaIndex Qdrant store (queries)."""
        return self._pairs(texts, "query")

    def _pairs(self, texts: list[str], role: Role) -> tuple[list[list[int]], list[list[float]]]:
        pairs = [c.sparse_pairs() for c in encode_cached(self._encoder, list(texts), role)]
        return [i for i, _ in pairs], [v for _, v in pairs]

    def encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        """``BaseSparseEmbeddingFunction.encode_documents`` of
        ``llama-index-vector-stores-milvus`` (pass this object as its
        ``sparse_embedding_function``)."""
        return self._sparse(list(documents), query=False)

    def encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        """``BaseSparseEmbeddingFunction.encode_queries`` of the LlamaIndex Milvus store."""
        return self._sparse(list(queries), query=True)

    async def async_encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        return await asyncio.to_thread(self.encode_documents, documents)

    async def async_encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        return await asyncio.to_thread(self.encode_queries, queries)

    def _get_query_embedding(self, query: str) -> dict[int, float]:
        return self._sparse([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> dict[int, float]:
        return self._sparse([text], query=False)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[dict[int, float]]:
        return self._sparse(texts, query=False)

    async def _aget_query_embedding(self, query: str) -> dict[int, float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> dict[int, float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

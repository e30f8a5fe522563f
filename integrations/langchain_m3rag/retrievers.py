"""``M3Retriever``: the m3-rag hybrid retriever as a LangChain ``BaseRetriever``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from m3_rag import (
    SCORES_KEY,
    CrossEncoder,
    Encoder,
    HybridRetriever,
    M3Encoder,
    SearchHit,
)
from m3_rag.backends.validate import id_list


def hit_to_document(hit: SearchHit) -> Document:
    """A LangChain ``Document`` with the hit's id, its metadata (a private copy) and
    ``metadata["m3_rag_scores"]`` = ``{"score": final, "dense", "lexical", "colbert",
    "fused", "rerank"?}`` (the key is reserved: the index refuses user metadata holding it)."""
    return Document(
        id=hit.id,
        page_content=hit.text,
        metadata={**hit.metadata, SCORES_KEY: {"score": hit.score, **hit.scores}},
    )


def document_ids(documents: Sequence[Document], ids: Sequence[str] | None) -> list[str] | None:
    """The ids to store: ``ids`` when given, else each document's own ``id``, a new UUID for
    the documents without one (``None`` when no document has one)."""
    if ids is not None:
        return id_list(ids)
    if not any(d.id for d in documents):
        return None
    return [d.id or uuid.uuid4().hex for d in documents]


class M3Retriever(BaseRetriever):
    """Dense + lexical + ColBERT (+ rerank) retrieval over BGE-M3.

    Example:
        .. code-block:: python

            from langchain_m3rag import M3Retriever

            retriever = M3Retriever.from_texts(["BGE-M3 is multilingual.", "..."], encoder=enc, k=4)
            docs = retriever.invoke("which languages?", k=2, filter={"lang": "en"})
            docs[0].metadata["m3_rag_scores"]   # score, dense, sparse, colbert, fused (rerank)

    Attributes:
        retriever: The core :class:`m3_rag.HybridRetriever` (holds the index).
        k: Documents returned (``invoke(query, k=...)`` overrides it).
        filter: Default metadata filter (dict of equality / any-of, or a callable).
        search_kwargs: Other ``HybridRetriever.search`` options (weights, fusion, rerank...).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: HybridRetriever
    k: int = 4
    filter: Any = None
    search_kwargs: dict[str, Any] = Field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        encoder: Encoder | None = None,
        *,
        metadatas: Sequence[dict[str, Any]] | None = None,
        ids: Sequence[str] | None = None,
        model_name_or_path: str = "BAAI/bge-m3",
        reranker: CrossEncoder | None = None,
        k: int = 4,
        retriever_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> M3Retriever:
        """Index texts in a new :class:`HybridRetriever` (``encoder`` shared when given)."""
        if encoder is None:
            encoder = M3Encoder(model_name_or_path)
        core = HybridRetriever(encoder, reranker=reranker, **(retriever_kwargs or {}))
        core.add_texts(list(texts), metadatas=metadatas, ids=ids)
        return cls(retriever=core, k=k, **kwargs)

    @classmethod
    def from_documents(
        cls, documents: Iterable[Document], encoder: Encoder | None = None, **kwargs: Any
    ) -> M3Retriever:
        """Index LangChain documents (their ``id`` is kept when set)."""
        docs = list(documents)
        ids = document_ids(docs, kwargs.pop("ids", None))
        return cls.from_texts(
            [d.page_content for d in docs],
            encoder,
            metadatas=[dict(d.metadata) for d in docs],
            ids=ids,
            **kwargs,
        )

    def add_documents(
        self, documents: Sequence[Document], ids: Sequence[str] | None = None
    ) -> list[str]:
        """Add (or replace, same id) documents; returns their ids (each document's own
        ``id`` is kept; a document without one gets a new UUID)."""
        return self.retriever.add_texts(
            [d.page_content for d in documents],
            metadatas=[d.metadata for d in documents],
            ids=document_ids(documents, ids),
        )

    def add_texts(
        self,
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        return self.retriever.add_texts(list(texts), metadatas=metadatas, ids=ids)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id (a list; an unknown id raises ``KeyError`` and deletes nothing)."""
        self.retriever.delete(ids)

    # ------------------------------------------------------------------ retrieval
    def _search(self, query: str, **kwargs: Any) -> list[Document]:
        k = kwargs.pop("k", self.k)
        flt = kwargs.pop("filter", self.filter)
        hits = self.retriever.search(query, k=k, filter=flt, **{**self.search_kwargs, **kwargs})
        return [hit_to_document(h) for h in hits]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._search(query, **kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return await asyncio.to_thread(self._search, query, **kwargs)

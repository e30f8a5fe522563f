"""``M3VectorStore``: the m3-rag hybrid index as a LangChain ``VectorStore``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from langchain_m3rag.embeddings import M3Embeddings
from m3_rag import SCORES_KEY, Encoder, HybridRetriever, SearchHit
from m3_rag.backends.validate import id_list

_SEARCH_OPTIONS = ("filter", "weights", "fusion", "candidates", "rerank")


class M3VectorStore(VectorStore):
    """Dense + lexical + ColBERT retrieval (one forward pass per text) as a ``VectorStore``.

    Example:
        .. code-block:: python

            from langchain_m3rag import M3Embeddings, M3VectorStore

            store = M3VectorStore.from_texts(texts, M3Embeddings(encoder=enc), metadatas=metas)
            store.similarity_search("which languages?", k=4, filter={"lang": "en"})
            store.similarity_search_with_score("which languages?", weights=(1, 0, 0))
            retriever = store.as_retriever(search_kwargs={"k": 5, "fusion": "rrf"})

    ``similarity_search`` returns the documents with their own metadata; the ``*_with_score``
    variants return the fused score and add the per-mode scores under the reserved
    ``metadata["m3_rag_scores"]``.

    Args:
        retriever: The core :class:`m3_rag.HybridRetriever` (holds the index; any backend:
            local, Milvus, Qdrant).
    """

    def __init__(self, retriever: HybridRetriever) -> None:
        if not isinstance(retriever, HybridRetriever):
            raise TypeError(
                f"retriever must be an m3_rag.HybridRetriever, got {type(retriever).__name__}"
            )
        self.retriever = retriever

    @classmethod
    def from_encoder(cls, encoder: Encoder, **retriever_kwargs: Any) -> M3VectorStore:
        """An empty store over a new :class:`HybridRetriever` (``retriever_kwargs`` go to it:
        weights, fusion, backend, analyzer...)."""
        return cls(HybridRetriever(encoder, **retriever_kwargs))

    @property
    def embeddings(self) -> Embeddings:
        return M3Embeddings(encoder=self.retriever.encoder)

    # ------------------------------------------------------------------ writing
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[Any, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Encode once and add (an existing id is replaced); a missing id gets a UUID."""
        items = list(texts)
        if ids is not None:
            ids = [i or uuid.uuid4().hex for i in id_list(ids)]
        return self.retriever.add_texts(items, metadatas=metadatas, ids=ids)

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Add documents; each keeps its ``id`` (or the ``ids`` given), others get a UUID."""
        ids = kwargs.pop("ids", None)
        if ids is None:
            ids = [d.id or uuid.uuid4().hex for d in documents]
        return self.add_texts(
            [d.page_content for d in documents],
            [d.metadata for d in documents],
            ids=list(ids),
        )

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by id; ids that are not stored are ignored. ``ids=None`` deletes nothing
        (use a new store to start empty)."""
        if ids is None:
            return False
        self.retriever.delete(ids, missing_ok=True)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents among ``ids`` (unknown ids are left out)."""
        return [Document(id=i, page_content=t, metadata=m) for i, t, m in self.retriever.get(ids)]

    # ------------------------------------------------------------------ search
    def _hits(self, query: str, k: int, kwargs: dict[str, Any]) -> list[SearchHit]:
        unknown = sorted(set(kwargs) - set(_SEARCH_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown search option(s) {unknown}; M3VectorStore takes k and "
                f"{', '.join(_SEARCH_OPTIONS)}"
            )
        return self.retriever.search(query, k=k, **kwargs)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """Top-``k`` documents by the fused score (``filter``, ``weights``, ``fusion``,
        ``candidates``, ``rerank`` as :meth:`HybridRetriever.search`)."""
        return [
            Document(id=h.id, page_content=h.text, metadata=h.metadata)
            for h in self._hits(query, k, kwargs)
        ]

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Top-``k`` ``(document, fused score)``; per-mode scores under
        ``metadata["m3_rag_scores"]``."""
        return [
            (
                Document(
                    id=h.id,
                    page_content=h.text,
                    metadata={**h.metadata, SCORES_KEY: {"score": h.score, **h.scores}},
                ),
                h.score,
            )
            for h in self._hits(query, k, kwargs)
        ]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Fused scores are already "higher is better"; weighted fusion of BGE-M3 scores is
        in ``[0, 1]`` for normalised vectors, so it is used as it is."""
        return lambda score: score

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[Any, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> M3VectorStore:
        """Index texts with the encoder behind ``embedding`` (an :class:`M3Embeddings`);
        other keyword arguments go to :class:`HybridRetriever`."""
        if not isinstance(embedding, M3Embeddings):
            raise TypeError(
                "M3VectorStore encodes with m3-rag's own encoder: pass "
                f"M3Embeddings(encoder=...), got {type(embedding).__name__}"
            )
        if embedding.encoder is None:  # pragma: no cover - M3Embeddings always sets it
            raise ValueError("the M3Embeddings has no encoder")
        store = cls.from_encoder(embedding.encoder, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

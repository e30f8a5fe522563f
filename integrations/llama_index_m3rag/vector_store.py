"""``M3VectorStore``: the m3-rag hybrid index as a LlamaIndex vector store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from llama_index_m3rag.retriever import to_core_filter
from m3_rag import Encoder, HybridRetriever
from m3_rag.backends.validate import id_list
from m3_rag.cache import as_encode_output, encode_cached
from m3_rag.filters import all_of

_MODES = {
    VectorStoreQueryMode.DEFAULT,
    VectorStoreQueryMode.SPARSE,
    VectorStoreQueryMode.HYBRID,
}


class M3VectorStore(BasePydanticVectorStore):
    """Dense + lexical + ColBERT over one BGE-M3 forward pass per node, for LlamaIndex.

    Example:
        .. code-block:: python

            store = M3VectorStore.from_encoder(enc)
            index = VectorStoreIndex.from_documents(
                docs,
                storage_context=StorageContext.from_defaults(vector_store=store),
                embed_model=M3Embedding(encoder=enc),
            )
            index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=5)

    Query modes: ``DEFAULT`` ranks by the dense score; ``SPARSE`` by the lexical score (M3
    weights or BM25), with ``sparse_top_k`` candidates; ``HYBRID`` fuses the retriever's
    own weights (dense, lexical and ColBERT rescoring) or, when ``alpha`` is given,
    ``alpha * dense + (1 - alpha) * lexical``. The store encodes the query itself; node
    encodings come from the encode cache shared with :class:`M3Embedding` on the same encoder
    (the model runs once per node).

    Args:
        retriever: The core :class:`m3_rag.HybridRetriever` (any backend).
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False

    _retriever: HybridRetriever = PrivateAttr()

    def __init__(self, retriever: HybridRetriever, **kwargs: Any) -> None:
        if not isinstance(retriever, HybridRetriever):
            raise TypeError(
                f"retriever must be an m3_rag.HybridRetriever, got {type(retriever).__name__}"
            )
        super().__init__(**kwargs)
        self._retriever = retriever

    @classmethod
    def from_encoder(cls, encoder: Encoder, **retriever_kwargs: Any) -> M3VectorStore:
        """An empty store over a new :class:`HybridRetriever` (``retriever_kwargs`` go to it)."""
        return cls(HybridRetriever(encoder, **retriever_kwargs))

    @classmethod
    def class_name(cls) -> str:
        return "M3VectorStore"

    @property
    def client(self) -> HybridRetriever:
        return self._retriever

    # ------------------------------------------------------------------ writing
    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Add (or replace, same id) nodes; returns their ids."""
        if not nodes:
            return []
        texts = [n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        # encode what the index embedded (content with its embed metadata, LlamaIndex's
        # convention): the encode cache then holds it already, one forward pass per node
        embedded = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        metas = [node_to_metadata_dict(n, remove_text=True, flat_metadata=False) for n in nodes]
        encoded = as_encode_output(encode_cached(self._retriever.encoder, embedded, "document"))
        return self._retriever.add_encoded(texts, encoded, metas, [n.node_id for n in nodes])

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        self._retriever.delete(self._retriever.select({"ref_doc_id": ref_doc_id}))

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete nodes by id and/or metadata filter (ids not stored are ignored)."""
        self._retriever.delete(self._ids(node_ids, filters), missing_ok=True)

    def clear(self) -> None:
        """Delete every node."""
        self._retriever.delete(self._retriever.select(None))

    def get_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """Stored nodes by id and/or metadata filter."""
        return [
            metadata_dict_to_node(m, text=t)
            for _, t, m in self._retriever.get(self._ids(node_ids, filters))
        ]

    def _ids(self, node_ids: list[str] | None, filters: MetadataFilters | None) -> list[str]:
        if node_ids is None and filters is None:
            raise ValueError("pass node_ids and/or filters (clear() deletes everything)")
        selected = None if filters is None else self._retriever.select(to_core_filter(filters))
        if node_ids is None:
            return selected or []
        keep = None if selected is None else set(selected)
        return [i for i in id_list(node_ids) if keep is None or i in keep]

    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Save the index to the directory ``persist_path`` with :meth:`HybridRetriever.save`
        (index format 3, committed atomically; a local-engine index, Milvus and Qdrant
        persist by themselves)."""
        if fs is not None:
            raise ValueError("M3VectorStore persists to a local directory only (fs=None)")
        self._retriever.save(persist_path)

    @classmethod
    def from_persist_path(
        cls, persist_path: str | os.PathLike[str], encoder: Encoder, **kwargs: Any
    ) -> M3VectorStore:
        """Load a store saved by :meth:`persist` (``kwargs`` go to
        :meth:`HybridRetriever.load`: ``reranker``, ``allow_model_mismatch``, ``analyzer``)."""
        return cls(HybridRetriever.load(persist_path, encoder, **kwargs))

    # ------------------------------------------------------------------ search
    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.query_str is None or not query.query_str.strip():
            raise ValueError("M3VectorStore encodes the query itself: it needs query_str")
        if query.mode not in _MODES:
            raise ValueError(
                f"query mode {query.mode!r} is not supported; use default, sparse or hybrid"
            )
        if query.node_ids:
            raise ValueError("M3VectorStore does not restrict a query to node_ids; use filters")
        flt: Any = to_core_filter(query.filters)
        if query.doc_ids:
            flt = all_of(flt, {"ref_doc_id": list(query.doc_ids)})
        k = query.similarity_top_k
        options: dict[str, Any] = {"filter": flt}
        if query.mode == VectorStoreQueryMode.DEFAULT:
            options["weights"] = (1.0, 0.0, 0.0)
        elif query.mode == VectorStoreQueryMode.SPARSE:
            if self._retriever.lexical is None:
                raise ValueError("this index has no lexical leg for sparse queries")
            options["weights"] = (0.0, 1.0, 0.0)
            options["candidates"] = max(k, query.sparse_top_k or k)
        else:
            if query.alpha is not None:
                a = float(query.alpha)
                options["weights"] = (a, 1.0 - a, 0.0)
            if query.sparse_top_k:
                options["candidates"] = max(self._retriever.candidates, query.sparse_top_k)
        hits = self._retriever.search(query.query_str, k=k, **options)
        return VectorStoreQueryResult(
            nodes=[metadata_dict_to_node(h.metadata, text=h.text) for h in hits],
            similarities=[h.score for h in hits],
            ids=[h.id for h in hits],
        )

"""``M3Retriever``: the m3-rag hybrid retriever as a LlamaIndex ``BaseRetriever``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import (
    BaseNode,
    Document,
    MetadataMode,
    NodeWithScore,
    QueryBundle,
    TextNode,
)
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from m3_rag import SCORES_KEY, CrossEncoder, Encoder, HybridRetriever


def _match(op: FilterOperator, have: Any, want: Any) -> bool:
    if op == FilterOperator.EQ:
        return bool(have == want)
    if op == FilterOperator.NE:
        return bool(have != want)
    if op == FilterOperator.IN:
        return have in want
    if op == FilterOperator.NIN:
        return have not in want
    if op == FilterOperator.IS_EMPTY:
        return have is None or have == [] or have == ""
    if have is None:
        return False
    try:
        if op == FilterOperator.GT:
            return bool(have > want)
        if op == FilterOperator.GTE:
            return bool(have >= want)
        if op == FilterOperator.LT:
            return bool(have < want)
        if op == FilterOperator.LTE:
            return bool(have <= want)
        if op == FilterOperator.CONTAINS:
            return want in have
        if op == FilterOperator.ANY:
            return any(v in have for v in want)
        if op == FilterOperator.ALL:
            return all(v in have for v in want)
        if op == FilterOperator.TEXT_MATCH:
            return str(want) in str(have)
    except TypeError:
        return False
    raise ValueError(f"unsupported metadata filter operator {op!r}")


def to_core_filter(
    filters: MetadataFilters | None,
) -> dict[str, Any] | Callable[[dict[str, Any]], bool] | None:
    """Map LlamaIndex ``MetadataFilters`` onto the core filter.

    An AND of ``EQ``/``IN`` filters becomes the core's dict filter (vectorised); anything else
    (``OR``/``NOT``, ranges, nested filters) becomes an equivalent callable.
    """
    if filters is None or not filters.filters:
        return None
    # EQ takes one value (EQ with a list means "equals that list", not any-of: the general
    # path below), IN takes a list of values
    simple = filters.condition in (None, FilterCondition.AND) and all(
        isinstance(f, MetadataFilter)
        and (
            (f.operator == FilterOperator.EQ and isinstance(f.value, (str, int, float, bool)))
            or (f.operator == FilterOperator.IN and isinstance(f.value, list))
        )
        for f in filters.filters
    )
    if simple:
        out: dict[str, Any] = {}
        for f in filters.filters:
            assert isinstance(f, MetadataFilter)
            value = list(f.value) if isinstance(f.value, list) else f.value
            if f.key in out:  # two conditions on one key: leave it to the general path
                simple = False
                break
            out[f.key] = value
        if simple:
            return out

    def check(meta: dict[str, Any], flt: MetadataFilters = filters) -> bool:
        results = [
            check(meta, f)
            if isinstance(f, MetadataFilters)
            else _match(f.operator, meta.get(f.key), f.value)
            for f in flt.filters
        ]
        if flt.condition == FilterCondition.OR:
            return any(results)
        if flt.condition == FilterCondition.NOT:
            return not any(results)
        return all(results)

    return check


class M3Retriever(BaseRetriever):
    """Dense + lexical + ColBERT (+ rerank) retrieval over BGE-M3 for LlamaIndex.

    Args:
        retriever: The core :class:`m3_rag.HybridRetriever` (holds the index).
        similarity_top_k: Nodes returned.
        filters: LlamaIndex ``MetadataFilters`` applied before top-k.
        search_kwargs: Other ``HybridRetriever.search`` options (weights, fusion, rerank...).
    """

    def __init__(
        self,
        retriever: HybridRetriever,
        similarity_top_k: int = 4,
        filters: MetadataFilters | None = None,
        search_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(retriever, HybridRetriever):
            raise TypeError(
                f"retriever must be an m3_rag.HybridRetriever, got {type(retriever).__name__}"
            )
        super().__init__(**kwargs)
        self.retriever = retriever
        self.similarity_top_k = similarity_top_k
        self.filters = filters
        self.search_kwargs = dict(search_kwargs or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_nodes(
        cls,
        nodes: Sequence[BaseNode],
        encoder: Encoder,
        *,
        reranker: CrossEncoder | None = None,
        retriever_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> M3Retriever:
        """Index nodes (their ``node_id`` becomes the document id)."""
        core = HybridRetriever(encoder, reranker=reranker, **(retriever_kwargs or {}))
        self = cls(core, **kwargs)
        self.insert_nodes(nodes)
        return self

    @classmethod
    def from_documents(
        cls, documents: Sequence[Document], encoder: Encoder, **kwargs: Any
    ) -> M3Retriever:
        """Index documents as one node each (split them first for long texts)."""
        return cls.from_nodes(list(documents), encoder, **kwargs)

    def insert_nodes(self, nodes: Sequence[BaseNode]) -> list[str]:
        """Add (or replace, same id) nodes; returns their ids."""
        texts = [n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        metas = [
            dict(n.metadata) | ({"ref_doc_id": n.ref_doc_id} if n.ref_doc_id else {}) for n in nodes
        ]
        return self.retriever.add_texts(texts, metadatas=metas, ids=[n.node_id for n in nodes])

    def delete(self, node_ids: Sequence[str]) -> None:
        """Delete nodes by id (a list; an unknown id raises ``KeyError``, nothing deleted)."""
        self.retriever.delete(node_ids)

    def persist(self, persist_dir: str | os.PathLike[str]) -> None:
        """Save the index with :meth:`HybridRetriever.save` (index format 3, committed
        atomically)."""
        self.retriever.save(persist_dir)

    @classmethod
    def from_persist_dir(
        cls,
        persist_dir: str | os.PathLike[str],
        encoder: Encoder,
        *,
        reranker: CrossEncoder | None = None,
        allow_model_mismatch: bool = False,
        **kwargs: Any,
    ) -> M3Retriever:
        """Load an index saved by :meth:`persist`."""
        core = HybridRetriever.load(
            persist_dir, encoder, reranker, allow_model_mismatch=allow_model_mismatch
        )
        return cls(core, **kwargs)

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.retriever.search(
            query_bundle.query_str,
            k=self.similarity_top_k,
            filter=to_core_filter(self.filters),
            **self.search_kwargs,
        )
        out = []
        for h in hits:
            node = TextNode(
                id_=h.id,
                text=h.text,
                metadata={**h.metadata, SCORES_KEY: {"score": h.score, **h.scores}},
                excluded_embed_metadata_keys=[SCORES_KEY],
                excluded_llm_metadata_keys=[SCORES_KEY],
            )
            out.append(NodeWithScore(node=node, score=float(h.score)))
        return out

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)

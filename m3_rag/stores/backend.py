"""The storage seam of :class:`~m3_rag.HybridRetriever`: what every backend provides.

A backend keeps documents (id, text, metadata) with their dense vector, lexical weights and
ColBERT vectors, generates stage-1 candidates for a query and scores them. Fusion, the
reranker and result objects live in the retriever, so every backend ranks identically.
Implementations: :class:`~m3_rag.stores.local.LocalBackend` (the embedded engine, in RAM or
memory-mapped from a directory; the default), :class:`~m3_rag.stores.milvus.MilvusBackend`
(Milvus Lite or a Milvus server) and :class:`~m3_rag.stores.qdrant.QdrantBackend` (Qdrant, or
qdrant-client's local mode). The retriever names none of them: it calls this protocol.

Consistency: ``candidates`` returns a :class:`Candidates` whose ``payload`` pins what the
later ``colbert_scores`` and ``documents`` calls read, so a search needs no lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp

from m3_rag.filters import Filter
from m3_rag.stores.base import check_ids
from m3_rag.stores.lexical import BM25Params

__all__ = ["Backend", "BackendSpec", "Candidates", "DocBatch", "check_batch"]


@dataclass
class Candidates:
    """Stage-1 candidates of one query, with the scores both legs gave them.

    Attributes:
        ids: ``[c]`` document ids.
        dense: ``[c]`` dense scores.
        lexical: ``[c]`` lexical scores (0 where the document shares no term), or ``None``
            when there is no lexical leg.
        rows: ``[c]`` backend-private row numbers.
        payload: backend-private data (the Milvus and Qdrant backends keep the fetched
            documents here).
        colbert: ``[c]`` ColBERT MaxSim scores when the engine computed them in the same
            request (``candidates(..., colbert_query=...)``), else ``None``: the retriever
            then calls :meth:`Backend.colbert_scores`.
    """

    ids: list[str]
    dense: np.ndarray
    lexical: np.ndarray | None
    rows: np.ndarray
    payload: Any = None
    colbert: np.ndarray | None = None

    @classmethod
    def empty(cls, lexical: bool) -> Candidates:
        z = np.zeros(0, dtype=np.float32)
        return cls([], z, z if lexical else None, np.zeros(0, dtype=np.int64))


class DocBatch(NamedTuple):
    """Documents with their stored encodings (what :meth:`Backend.add` takes).

    Attributes:
        ids, texts, metadatas: ``m`` of each.
        dense: ``[m, dense_dim]`` float32.
        lexical: ``[m, vocab_size]`` CSR (M3 weights or BM25 term counts), or ``None``.
        colbert: ``m`` arrays ``[t_i, colbert_dim]``, or ``None``.
    """

    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, Any]]
    dense: np.ndarray
    lexical: sp.csr_matrix | None
    colbert: list[np.ndarray] | None


@dataclass(frozen=True)
class BackendSpec:
    """What a retriever needs a backend to hold (fixed for the life of an index).

    Attributes:
        model: Encoder model name (an index refuses an encoder of another model).
        dense_dim: Dense vector size.
        colbert_dim: ColBERT vector size, ``None`` when the model has no ColBERT head.
        lexical: ``"m3"``, ``"bm25"`` or ``None``.
        vocab_size: Token-id space of the lexical leg.
        dense_dtype: Dense storage dtype.
        colbert_dtype: ColBERT storage dtype.
        bm25: BM25 parameters.
        analyzer: The BM25 analyzer's configuration (``"model"``, a
            :meth:`~m3_rag.analysis.UnicodeAnalyzer.config` dict, ``"callable"``), or ``None``.
    """

    model: str
    dense_dim: int
    colbert_dim: int | None
    lexical: str | None
    vocab_size: int
    dense_dtype: str = "float32"
    colbert_dtype: str = "float16"
    bm25: BM25Params | None = None
    analyzer: Any = None


class Backend(Protocol):
    """The operations :class:`~m3_rag.HybridRetriever` calls."""

    def __len__(self) -> int: ...

    def open(self, spec: BackendSpec, settings: Mapping[str, Any] | None = None) -> Backend:
        """Bind to a retriever (create or check the stored index); returns the backend.

        ``settings`` are the retriever's own settings, recorded where the engine can."""

    def known_empty(self) -> bool:
        """True only when the index is certainly empty and knowing it costs nothing."""

    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        dense: np.ndarray,
        lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
        colbert: Sequence[np.ndarray] | None,
    ) -> None:
        """Add (or replace by id) documents; validate everything before changing anything."""

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents; an unknown id raises ``KeyError`` and nothing is removed."""

    def candidates(
        self,
        dense_query: np.ndarray,
        lexical_query: Mapping[int, float] | None,
        n: int,
        flt: Filter,
        *,
        colbert_query: np.ndarray | None = None,
    ) -> Candidates:
        """Union of the dense top-``n`` and the lexical top-``n`` (score > 0) passing ``flt``.

        ``colbert_query`` (``[q, colbert_dim]``) is the ColBERT query when the retriever will
        rescore: an engine that can score it in the same request fills ``Candidates.colbert``
        (one round trip per search); the others ignore it."""

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        """MaxSim of ``query [q, dim]`` against each candidate -> ``[c]``."""

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """``(id, text, metadata copy)`` of the candidates at positions ``order``."""

    def select(self, flt: Filter) -> list[str]:
        """Ids of every stored document passing ``flt`` (all of them for ``None``)."""

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        """``(id, text, metadata copy)`` of the stored documents among ``ids``, in the order
        of ``ids`` (unknown ids are left out)."""


def check_batch(
    spec: BackendSpec,
    ids: Sequence[str],
    texts: Sequence[str],
    metadatas: Sequence[dict[str, Any]],
    lexical: object | None,
    colbert: object | None,
) -> list[str]:
    """The checks every :meth:`Backend.add` starts with -> ``ids`` as a list.

    Raises:
        TypeError, ValueError: bad or duplicate ids, counts that differ, or a lexical or
            ColBERT input present where ``spec`` has no such store (or missing where it has).
    """
    checked = check_ids(ids, len(texts))
    if len(metadatas) != len(checked):
        raise ValueError(f"got {len(metadatas)} metadatas for {len(checked)} texts")
    if (spec.lexical is None) != (lexical is None) or (spec.colbert_dim is None) != (
        colbert is None
    ):
        raise ValueError("the encoded outputs do not match the stores of this backend")
    return checked

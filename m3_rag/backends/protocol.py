"""The storage seam of :class:`~m3_rag.HybridRetriever`: what every backend provides.

A backend keeps documents (id, text, metadata) with their dense vector, lexical weights and
ColBERT vectors, generates stage-1 candidates for a query and scores them. Fusion, the
reranker and result objects live in the retriever, so every backend ranks identically.
Implementations: :class:`~m3_rag.backends.LocalBackend` (the embedded engine, in RAM or
memory-mapped from a directory; the default), :class:`~m3_rag.backends.MilvusBackend`
(Milvus Lite or a Milvus server) and :class:`~m3_rag.backends.QdrantBackend` (Qdrant, or
qdrant-client's local mode). The retriever names none of them: it calls this protocol.

Consistency: ``candidates`` returns a :class:`Candidates` whose ``payload`` pins what the
later ``colbert_scores`` and ``documents`` calls read, so a search needs no lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.validate import check_ids
from m3_rag.filters import Filter
from m3_rag.spec import IndexSpec

__all__ = [
    "Backend",
    "Candidates",
    "Compactable",
    "DocBatch",
    "DocumentChecking",
    "Exportable",
    "IndexSpec",
    "Savable",
    "check_batch",
]


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


@runtime_checkable
class Backend(Protocol):
    """The operations :class:`~m3_rag.HybridRetriever` calls."""

    def __len__(self) -> int: ...

    def open(
        self,
        spec: IndexSpec,
        settings: Mapping[str, Any] | None = None,
        *,
        allow_model_mismatch: bool = False,
    ) -> Backend:
        """Bind to a retriever (create the index, or check the stored one against ``spec``
        with :meth:`~m3_rag.spec.IndexSpec.check_stored`); returns the backend.

        ``settings`` are the retriever's own settings, recorded where the engine can.
        ``allow_model_mismatch`` accepts an index built under another model name (the
        retriever's option; engines take it here, not in their constructors).

        Raises:
            IndexMismatchError: the stored index was built for another spec.
            IndexFormatError: the stored index is unreadable."""

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


# ------------------------------------------------------------------ optional capabilities
# The retriever and the CLI check these with isinstance; an engine implements what it can.


@runtime_checkable
class Compactable(Protocol):
    """An engine that can merge its storage and drop deleted rows on request."""

    def compact(self) -> None:
        """Merge everything into the fewest units, dropping deleted documents."""


@runtime_checkable
class Exportable(Protocol):
    """An engine that can hand out every stored document with its encodings."""

    def export(self, batch_size: int = 1000) -> Iterator[DocBatch]:
        """Every live document with its stored encodings, ``batch_size`` at a time."""


@runtime_checkable
class DocumentChecking(Protocol):
    """An engine that can refuse documents it cannot hold before anything is encoded or
    written (Milvus, Qdrant: ids, text sizes, metadata values)."""

    def check_documents(
        self, ids: Sequence[str], texts: Sequence[str], metadatas: Sequence[dict[str, Any]]
    ) -> None:
        """Raise ``ValueError`` naming the first document the engine cannot hold."""


@runtime_checkable
class Savable(Protocol):
    """An engine that can write its index to a directory (index format 3)."""

    def save(self, path: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
        """Write the live documents and ``settings`` (the retriever's) to ``path``."""


def check_batch(
    spec: IndexSpec,
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

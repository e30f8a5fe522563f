"""Lexical store: learned M3 sparse weights, or BM25 (rank-bm25's Okapi) for dense-only models.

Documents are rows of a doc x term CSR matrix (weights for M3, term counts for BM25). Search
uses the term x doc transpose: a query touches only the posting lists of its own terms, so
scoring costs the length of those lists, not the size of the corpus.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.validate import IdRows, check_ids
from m3_rag.bm25 import BM25Params, bm25_idf, bm25_tf
from m3_rag.persist import IndexFormatError
from m3_rag.scoring import sparse_matrix

__all__ = ["LexicalStore"]


class LexicalStore(IdRows):
    """Sparse lexical index.

    Args:
        vocab_size: Number of token ids (columns).
        kind: ``"m3"``: documents are M3 lexical weights and a score is the sparse dot product
            (FlagEmbedding's lexical matching score). ``"bm25"``: documents are token counts,
            a query is its token counts, and a score equals ``rank_bm25.BM25Okapi.get_scores``.
        bm25: BM25 parameters (``kind="bm25"`` only).
    """

    def __init__(self, vocab_size: int, kind: str = "m3", bm25: BM25Params | None = None) -> None:
        super().__init__()
        if kind not in ("m3", "bm25"):
            raise ValueError(f"kind must be 'm3' or 'bm25', got {kind!r}")
        self.vocab_size = int(vocab_size)
        self.kind = kind
        self.bm25 = bm25 or BM25Params()
        self._docs = sp.csr_matrix((0, self.vocab_size), dtype=np.float32)
        self._pending: list[sp.csr_matrix] = []
        self._term_major: sp.csr_matrix | None = None
        self._terms = np.zeros(0, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        m = self._matrix()
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def add(
        self, ids: Sequence[str], weights: Sequence[Mapping[int, float]] | sp.csr_matrix
    ) -> None:
        """Add one ``{token_id: weight or count}`` per document (dicts, or a CSR matrix
        ``[m, vocab_size]``); known ids are replaced."""
        ids, block = self._prepare(ids, weights)
        old = self._existing_rows(ids)
        if len(old):
            self._delete_rows(old)
        self._insert(ids, block)

    def _prepare(
        self, ids: Sequence[str], weights: Sequence[Mapping[int, float]] | sp.csr_matrix
    ) -> tuple[list[str], sp.csr_matrix]:
        """Validate without changing anything."""
        if sp.issparse(weights):
            block = sp.csr_matrix(weights, dtype=np.float32)
            if block.shape[1] != self.vocab_size:
                raise ValueError(
                    f"lexical matrix has {block.shape[1]} columns, expected {self.vocab_size}"
                )
        else:
            block = sparse_matrix(weights, self.vocab_size)
        if block.nnz and (not np.isfinite(block.data).all() or block.data.min() < 0):
            raise ValueError("lexical weights must be finite and >= 0")
        return check_ids(ids, block.shape[0]), block

    def _insert(self, ids: list[str], block: sp.csr_matrix) -> None:
        self._pending.append(block)
        self._append_ids(ids)
        self._term_major = None

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ids (all known, else ``KeyError`` and nothing removed)."""
        self._delete_rows(self.rows(list(ids)))

    def _delete_rows(self, rows: np.ndarray) -> None:
        keep = self._keep_mask(rows)
        self._docs = self._matrix()[keep]
        self._drop_ids(keep)
        self._term_major = None

    def _matrix(self) -> sp.csr_matrix:
        """The doc x term matrix with pending additions merged."""
        if self._pending:
            self._docs = sp.vstack([self._docs, *self._pending], format="csr", dtype=np.float32)
            self._pending = []
        return self._docs

    def _index(self) -> sp.csr_matrix:
        """term x doc matrix of the scoring weights over the terms present (built lazily
        after a change): row ``j`` is term ``self._terms[j]``, so its size does not depend
        on the id space (hashed term ids go up to 2**31)."""
        if self._term_major is None:
            docs = self._matrix()
            terms, local = np.unique(docs.indices, return_inverse=True)
            compact = sp.csr_matrix(
                (docs.data, local.astype(np.int64).reshape(-1), docs.indptr),
                shape=(docs.shape[0], len(terms)),
            )
            weights = self._bm25_weights(compact) if self.kind == "bm25" else compact
            self._terms = terms.astype(np.int64)
            self._term_major = sp.csr_matrix(weights.T, dtype=np.float32)
        return self._term_major

    def _bm25_weights(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """Per (doc, term) BM25 weight ``idf * tf (k1+1) / (tf + k1 (1 - b + b dl/avgdl))``."""
        n = counts.shape[0]
        if n == 0 or counts.nnz == 0:
            return counts
        doc_len = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
        avgdl = doc_len.sum() / n or 1.0
        df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
        idf = bm25_idf(df, n, self.bm25)
        rows = np.repeat(np.arange(n), np.diff(counts.indptr))
        tf_part = bm25_tf(counts.data, doc_len[rows], avgdl, self.bm25)
        data = idf[counts.indices] * tf_part
        return sp.csr_matrix(
            (data.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape
        )

    def scores(self, query: Mapping[int, float]) -> np.ndarray:
        """Score of every document for a ``{token_id: weight or count}`` query -> ``[n]``."""
        out = np.zeros(len(self), dtype=np.float32)
        terms = np.fromiter((t for t in query if 0 <= t < self.vocab_size), dtype=np.int64)
        if len(terms) == 0 or len(self) == 0:
            return out
        weights = np.fromiter((query[int(t)] for t in terms), dtype=np.float32, count=len(terms))
        index = self._index()
        pos = np.searchsorted(self._terms, terms)
        found = pos < len(self._terms)
        found[found] = self._terms[pos[found]] == terms[found]
        if not found.any():
            return out
        postings = index[pos[found]]  # [q, n] sparse
        return np.asarray(postings.T @ weights[found], dtype=np.float32).reshape(-1)

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "kind": self.kind, "bm25": self.bm25.as_dict()}

    def state(self) -> dict[str, np.ndarray]:
        m = self._matrix()
        return {
            "indptr": m.indptr.astype(np.int64),
            "indices": m.indices.astype(np.int32),
            "data": m.data,
        }

    @classmethod
    def from_state(
        cls,
        ids: list[str],
        arrays: dict[str, np.ndarray],
        vocab_size: int,
        kind: str,
        bm25: BM25Params | dict[str, float] | None = None,
    ) -> LexicalStore:
        store = cls(vocab_size, kind, BM25Params(**bm25) if isinstance(bm25, dict) else bm25)
        indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
        if (
            indptr.ndim != 1
            or indices.ndim != 1
            or data.ndim != 1
            or indptr.dtype.kind not in "iu"
            or indices.dtype.kind not in "iu"
            or data.dtype.kind != "f"
        ):
            raise IndexFormatError("lexical_*.npy must be 1-d integer indptr/indices, float data")
        if len(indptr) != len(ids) + 1 or len(indices) != len(data) or int(indptr[-1]) != len(data):
            raise IndexFormatError(
                "lexical_indptr.npy is inconsistent with the number of documents and terms"
            )
        if int(indptr[0]) != 0 or (np.diff(indptr) < 0).any():
            raise IndexFormatError("lexical_indptr.npy must start at 0 and never decrease")
        if len(indices) and (int(indices.max()) >= vocab_size or int(indices.min()) < 0):
            raise IndexFormatError("lexical_indices.npy has token ids outside the vocabulary")
        if len(data) and (not np.isfinite(data).all() or float(data.min()) < 0):
            raise IndexFormatError("lexical_data.npy must hold finite weights >= 0")
        store._docs = sp.csr_matrix(
            (data.astype(np.float32), indices, indptr), shape=(len(ids), vocab_size)
        )
        store._append_ids(ids)
        return store

"""The in-memory backend: documents + dense, lexical and ColBERT stores kept row-aligned."""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.filters import Filter, filter_mask
from m3_rag.persist import IndexFormatError, read_index, write_index
from m3_rag.stores.backend import Candidates, DocBatch
from m3_rag.stores.base import IdRows, check_ids, top_k
from m3_rag.stores.colbert import DTYPES as COLBERT_DTYPES
from m3_rag.stores.colbert import ColbertStore
from m3_rag.stores.dense import DenseStore
from m3_rag.stores.lexical import BM25Params, LexicalStore

__all__ = ["Candidates", "MemoryBackend"]


class MemoryBackend(IdRows):
    """Row-aligned in-memory stores for a :class:`~m3_rag.HybridRetriever`.

    Args:
        dense_dim: Dense vector size.
        colbert_dim: ColBERT vector size, ``None`` for no ColBERT store.
        lexical: ``"m3"``, ``"bm25"`` or ``None`` (no lexical leg).
        vocab_size: Token-id space of the lexical store.
        dense_dtype: ``"float32"`` or ``"float16"``.
        colbert_dtype: ``"float16"``, ``"float32"`` or ``"int8"`` (+ a scale per vector).
        bm25: BM25 parameters.
    """

    def __init__(
        self,
        dense_dim: int,
        colbert_dim: int | None,
        lexical: str | None,
        vocab_size: int,
        *,
        dense_dtype: str = "float32",
        colbert_dtype: str = "float16",
        bm25: BM25Params | None = None,
    ) -> None:
        super().__init__()
        self.dense = DenseStore(dense_dim, dense_dtype)
        self.lexical = LexicalStore(vocab_size, lexical, bm25) if lexical else None
        self.colbert = ColbertStore(colbert_dim, colbert_dtype) if colbert_dim else None
        self._texts: list[str] = []
        self._metadatas: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- mutation
    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        dense: np.ndarray,
        lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
        colbert: Sequence[np.ndarray] | None,
    ) -> None:
        """Add (or replace) documents in every store.

        Every input is validated before anything changes: on error nothing stored is lost.
        """
        ids = check_ids(ids, len(texts))
        if len(metadatas) != len(ids):
            raise ValueError(f"got {len(metadatas)} metadatas for {len(ids)} texts")
        if (self.lexical is None) != (lexical is None) or (self.colbert is None) != (
            colbert is None
        ):
            raise ValueError("the encoded outputs do not match the stores of this backend")
        _, dense_block = self.dense._prepare(ids, dense)
        lex_block = (
            self.lexical._prepare(ids, lexical)[1]
            if self.lexical is not None and lexical is not None
            else None
        )
        col = (
            self.colbert._prepare(ids, colbert)
            if self.colbert is not None and colbert is not None
            else None
        )
        self._delete_rows(self._existing_rows(ids))
        self.dense._insert(ids, dense_block)
        if self.lexical is not None and lex_block is not None:
            self.lexical._insert(ids, lex_block)
        if self.colbert is not None and col is not None:
            self.colbert._insert(ids, col[1], col[2], col[3])
        self._texts.extend(texts)
        self._metadatas.extend(metadatas)
        self._append_ids(ids)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents; unknown ids raise ``KeyError`` and nothing is removed."""
        ids = check_ids(ids)
        self._delete_rows(self.rows(ids))

    def _delete_rows(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        keep = self._keep_mask(rows)
        for store in (self.dense, self.lexical, self.colbert):
            if store is not None:
                store._delete_rows(rows)
        self._texts = [t for t, k in zip(self._texts, keep.tolist(), strict=True) if k]
        self._metadatas = [m for m, k in zip(self._metadatas, keep.tolist(), strict=True) if k]
        self._drop_ids(keep)

    # ---------------------------------------------------------------- reading
    def get(self, rows: np.ndarray) -> list[tuple[str, str, dict[str, Any]]]:
        """``(id, text, metadata copy)`` of each row."""
        return [
            (self._ids[r], self._texts[r], copy.deepcopy(self._metadatas[r])) for r in rows.tolist()
        ]

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        return self.get(cands.rows[order])

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        return self.get(self._existing_rows(ids))

    def select(self, flt: Filter) -> list[str]:
        mask = self.mask(flt)
        return self.ids if mask is None else [self._ids[r] for r in np.flatnonzero(mask)]

    def mask(self, flt: Filter) -> np.ndarray | None:
        return filter_mask(self._metadatas, flt)

    def candidates(
        self,
        dense_query: np.ndarray,
        lexical_query: Mapping[int, float] | None,
        n: int,
        flt: Filter = None,
    ) -> Candidates:
        """Union of the dense top-``n`` and the lexical top-``n`` (lexical score > 0), both
        restricted to the documents that pass ``flt``."""
        mask = self.mask(flt)
        if len(self) == 0 or (mask is not None and not mask.any()):
            return Candidates.empty(self.lexical is not None and lexical_query is not None)
        dense = self.dense.scores(dense_query)
        rows = top_k(dense, n, mask)
        lex = None
        if self.lexical is not None and lexical_query is not None:
            lex = self.lexical.scores(lexical_query)
            allowed = lex > 0 if mask is None else (lex > 0) & mask
            rows = np.union1d(rows, top_k(lex, n, allowed))
        return Candidates(
            ids=[self._ids[r] for r in rows.tolist()],
            dense=dense[rows],
            lexical=None if lex is None else lex[rows],
            rows=rows,
        )

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        if self.colbert is None:
            raise ValueError("this index has no ColBERT vectors")
        return self.colbert.scores(query, cands.rows)

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        arrays = {f"dense_{k}": v for k, v in self.dense.state().items()}
        if self.lexical is not None:
            arrays |= {f"lexical_{k}": v for k, v in self.lexical.state().items()}
        if self.colbert is not None:
            arrays |= {f"colbert_{k}": v for k, v in self.colbert.state().items()}
        return arrays

    def export(self, batch_size: int = 1000) -> Iterator[DocBatch]:
        """Every document with its stored encodings, ``batch_size`` at a time (to copy an
        index to another backend without encoding again)."""
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            colbert = None
            if self.colbert is not None:
                packed, offsets = self.colbert.vectors(rows)
                colbert = [packed[a:b] for a, b in itertools.pairwise(offsets)]
            yield DocBatch(
                ids=[self._ids[r] for r in rows.tolist()],
                texts=[self._texts[r] for r in rows.tolist()],
                metadatas=[copy.deepcopy(self._metadatas[r]) for r in rows.tolist()],
                dense=self.dense.vectors[rows].astype(np.float32),
                lexical=None if self.lexical is None else self.lexical._matrix()[rows],
                colbert=colbert,
            )

    def docs(self) -> Iterator[dict[str, Any]]:
        for i, t, m in zip(self._ids, self._texts, self._metadatas, strict=True):
            yield {"id": i, "text": t, "metadata": m}

    def config(self) -> dict[str, Any]:
        return {
            "count": len(self),
            "dense_dim": self.dense.dim,
            "dense_dtype": str(self.dense.dtype),
            "colbert_dim": None if self.colbert is None else self.colbert.dim,
            "colbert_dtype": None if self.colbert is None else str(self.colbert.dtype),
            "lexical": None if self.lexical is None else self.lexical.kind,
            "vocab_size": None if self.lexical is None else self.lexical.vocab_size,
            "bm25": None if self.lexical is None else self.lexical.bm25.as_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the backend (documents and every store) to a directory, atomically."""
        write_index(path, {"store": "MemoryBackend", **self.config()}, self.state(), self.docs())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MemoryBackend:
        """Read a backend written by :meth:`save` (or a ``HybridRetriever`` index)."""
        manifest, arrays, docs = read_index(path)
        if manifest.get("store", "MemoryBackend") != "MemoryBackend":
            raise ValueError(f"{path} holds a {manifest.get('store')!r}, not a MemoryBackend")
        return cls.from_state(manifest, arrays, docs)

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], docs: list[dict[str, Any]]
    ) -> MemoryBackend:
        """Rebuild a backend from :func:`~m3_rag.persist.read_index` output.

        Raises:
            IndexFormatError: a configuration value of the wrong type, or arrays that are
                inconsistent, non-finite or out of range (the message names the file).
        """
        check_config(config)
        ids = [d["id"] for d in docs]

        def pick(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        for prefix, need in (("dense_", ("vectors",)), ("lexical_", ("indptr", "indices", "data"))):
            if prefix == "lexical_" and not config["lexical"]:
                continue
            missing = [n for n in need if n not in pick(prefix)]
            if missing:
                raise IndexFormatError(f"the index has no {prefix}{missing[0]}.npy")
        if config["colbert_dim"] and not {"vectors", "offsets"} <= set(pick("colbert_")):
            raise IndexFormatError("the index has no colbert_vectors.npy / colbert_offsets.npy")
        self = cls(
            config["dense_dim"],
            config["colbert_dim"],
            config["lexical"],
            config["vocab_size"] or 1,
            dense_dtype=config["dense_dtype"],
            colbert_dtype=config["colbert_dtype"] or "float16",
            bm25=BM25Params(**config["bm25"]) if config.get("bm25") else None,
        )
        self.dense = DenseStore.from_state(
            ids, pick("dense_"), config["dense_dtype"], config["dense_dim"]
        )
        if config["lexical"]:
            self.lexical = LexicalStore.from_state(
                ids, pick("lexical_"), config["vocab_size"], config["lexical"], config.get("bm25")
            )
        if config["colbert_dim"]:
            self.colbert = ColbertStore.from_state(
                ids, pick("colbert_"), config["colbert_dtype"], config["colbert_dim"]
            )
        self._texts = [d["text"] for d in docs]
        self._metadatas = [d.get("metadata") or {} for d in docs]
        self._append_ids(ids)
        return self


def _is_int(x: Any, minimum: int = 1) -> bool:
    return type(x) is int and x >= minimum


def check_config(config: Mapping[str, Any]) -> None:
    """Check the types and ranges of a saved memory backend's configuration.

    Raises:
        IndexFormatError: naming the first bad key.
    """
    checks: dict[str, Any] = {
        "dense_dim": _is_int,
        "dense_dtype": lambda x: x in ("float32", "float16"),
        "colbert_dim": lambda x: x is None or _is_int(x),
        "colbert_dtype": lambda x: x is None or x in COLBERT_DTYPES,
        "lexical": lambda x: x in (None, "m3", "bm25"),
        "vocab_size": lambda x: x is None or _is_int(x),
        "bm25": lambda x: (
            x is None
            or (
                isinstance(x, dict)
                and set(x) == {"k1", "b", "epsilon"}
                and all(type(v) in (int, float) and np.isfinite(v) for v in x.values())
            )
        ),
    }
    for key, ok in checks.items():
        if key not in config or not ok(config[key]):
            raise IndexFormatError(f"manifest.json: bad or missing {key!r}: {config.get(key)!r}")
    if config["lexical"] and not config["vocab_size"]:
        raise IndexFormatError("manifest.json: a lexical index needs 'vocab_size'")
    if config["colbert_dim"] and not config["colbert_dtype"]:
        raise IndexFormatError("manifest.json: a ColBERT index needs 'colbert_dtype'")

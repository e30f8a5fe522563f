"""Dense store: one contiguous matrix, exact top-k by matrix product + argpartition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m3_rag.backends.validate import IdRows, check_ids
from m3_rag.persist import IndexFormatError
from m3_rag.scoring import dense_scan

__all__ = ["DenseStore"]


class DenseStore(IdRows):
    """Exact inner-product search over ``[n, dim]`` vectors.

    Args:
        dim: Vector size.
        dtype: ``"float32"`` (default) or ``"float16"`` (half the memory; scores in float32).
    """

    def __init__(self, dim: int, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self._data = np.zeros((0, self.dim), dtype=self.dtype)

    @property
    def vectors(self) -> np.ndarray:
        """``[n, dim]`` view of the stored vectors."""
        return self._data[: len(self)]

    @property
    def nbytes(self) -> int:
        return int(len(self) * self.dim * self.dtype.itemsize)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors ``[m, dim]``; an id already stored is replaced."""
        ids, vecs = self._prepare(ids, vectors)
        old = self._existing_rows(ids)
        if len(old):
            self._delete_rows(old)
        self._insert(ids, vecs)

    def _prepare(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Validate without changing anything."""
        vecs = np.asarray(vectors)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape [m, {self.dim}], got {vecs.shape}")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain NaN or inf")
        return check_ids(ids, len(vecs)), vecs

    def _insert(self, ids: list[str], vecs: np.ndarray) -> None:
        n = len(self)
        if n + len(vecs) > len(self._data):  # amortised growth
            grown = np.zeros((max(n + len(vecs), 2 * len(self._data), 64), self.dim), self.dtype)
            grown[:n] = self._data[:n]
            self._data = grown
        self._data[n : n + len(vecs)] = vecs
        self._append_ids(ids)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ids (all known, else ``KeyError`` and nothing removed)."""
        self._delete_rows(self.rows(list(ids)))

    def _delete_rows(self, rows: np.ndarray) -> None:
        keep = self._keep_mask(rows)
        kept = self._data[: len(self)][keep]
        self._data = np.ascontiguousarray(kept)
        self._drop_ids(keep)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Inner product of ``query [dim]`` with every stored vector -> ``[n]`` float32."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dims, the store {self.dim}")
        return dense_scan(self.vectors, q)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "dtype": str(self.dtype)}

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist."""
        return {"vectors": self.vectors}

    @classmethod
    def from_state(
        cls,
        ids: list[str],
        arrays: dict[str, np.ndarray],
        dtype: str = "float32",
        dim: int | None = None,
    ) -> DenseStore:
        vecs = arrays["vectors"]
        if vecs.ndim != 2 or len(vecs) != len(ids) or (dim is not None and vecs.shape[1] != dim):
            raise IndexFormatError(
                f"dense_vectors.npy of shape {vecs.shape} does not fit {len(ids)} ids of dim {dim}"
            )
        if vecs.dtype.kind != "f" or not np.isfinite(vecs).all():
            raise IndexFormatError("dense_vectors.npy must hold finite floats (NaN or inf found)")
        store = cls(vecs.shape[1], dtype)
        store._data = np.ascontiguousarray(vecs, dtype=store.dtype)
        store._append_ids(ids)
        return store

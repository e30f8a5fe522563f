"""ColBERT store: every document's token vectors packed in one array, with row offsets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m3_rag.backends.validate import IdRows, check_ids
from m3_rag.persist import IndexFormatError
from m3_rag.scoring import colbert_scores_rows

__all__ = ["DTYPES", "ColbertStore", "quantize_int8"]

DTYPES = ("float16", "float32", "int8")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8 quantisation.

    Args:
        x: ``[T, dim]`` float vectors.

    Returns:
        ``[T, dim]`` int8 codes and ``[T]`` float32 scales, ``x ~= codes * scales[:, None]``
        (absolute error at most ``scale / 2`` per component).
    """
    x = np.asarray(x, dtype=np.float32)
    scales = np.abs(x).max(axis=1) / 127 if len(x) else np.zeros(0, np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


class ColbertStore(IdRows):
    """Multi-vector store; scores a candidate set by MaxSim.

    Document ``i`` owns rows ``offsets[i]:offsets[i+1]`` of the packed ``[T, dim]`` array.

    Args:
        dim: Vector size.
        dtype: ``"float16"`` (default, 2 bytes per dimension), ``"float32"``, or ``"int8"``
            (1 byte per dimension plus one float32 scale per vector: symmetric per-vector
            quantisation, ``x ~= scale * q`` with ``scale = max|x| / 127``).
    """

    def __init__(self, dim: int, dtype: str = "float16") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self._data = np.zeros((0, self.dim), dtype=self.dtype)
        self._scales: np.ndarray | None = np.zeros(0, np.float32) if dtype == "int8" else None
        self._n_rows = 0
        self._offsets = np.zeros(1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        scales = 0 if self._scales is None else self._n_rows * 4
        return int(self._n_rows * self.dim * self.dtype.itemsize + scales + self._offsets.nbytes)

    @property
    def n_vectors(self) -> int:
        return self._n_rows

    def add(self, ids: Sequence[str], vectors: Sequence[np.ndarray]) -> None:
        """Add one ``[t_i, dim]`` array per document; known ids are replaced."""
        ids, block, lengths, scales = self._prepare(ids, vectors)
        old = self._existing_rows(ids)
        if len(old):
            self._delete_rows(old)
        self._insert(ids, block, lengths, scales)

    def _prepare(
        self, ids: Sequence[str], vectors: Sequence[np.ndarray]
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
        """Validate and pack without changing anything -> ids, ``[T, dim]`` block in the
        storage dtype, ``[m]`` lengths, ``[T]`` scales (int8 only, else ``None``)."""
        ids = check_ids(ids, len(vectors))
        mats = [np.asarray(v) for v in vectors]
        for i, m in enumerate(mats):
            if m.ndim != 2 or m.shape[1] != self.dim:
                raise ValueError(f"vectors[{i}] must have shape [t, {self.dim}], got {m.shape}")
        lengths = np.fromiter((len(m) for m in mats), dtype=np.int64, count=len(mats))
        store = np.float32 if self._scales is not None else self.dtype
        if lengths.sum():
            block = np.concatenate(mats).astype(store)
        else:
            block = np.zeros((0, self.dim), store)
        if not np.isfinite(block).all():
            raise ValueError("vectors contain NaN or inf (or overflow float16)")
        if self._scales is None:
            return ids, block, lengths, None
        q, scales = quantize_int8(block)
        return ids, q, lengths, scales

    def _insert(
        self,
        ids: list[str],
        block: np.ndarray,
        lengths: np.ndarray,
        scales: np.ndarray | None = None,
    ) -> None:
        need = self._n_rows + len(block)
        if need > len(self._data):
            grown = np.zeros((max(need, 2 * len(self._data), 1024), self.dim), self.dtype)
            grown[: self._n_rows] = self._data[: self._n_rows]
            self._data = grown
        self._data[self._n_rows : need] = block
        if self._scales is not None:
            assert scales is not None and len(scales) == len(block)
            self._scales = np.concatenate([self._scales[: self._n_rows], scales])
        self._offsets = np.concatenate([self._offsets, self._offsets[-1] + np.cumsum(lengths)])
        self._n_rows = need
        self._append_ids(ids)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ids (all known, else ``KeyError`` and nothing removed)."""
        self._delete_rows(self.rows(list(ids)))

    def _delete_rows(self, rows: np.ndarray) -> None:
        keep = self._keep_mask(rows)
        lengths = np.diff(self._offsets)
        token_keep = np.repeat(keep, lengths)
        self._data = np.ascontiguousarray(self._data[: self._n_rows][token_keep])
        if self._scales is not None:
            self._scales = self._scales[: self._n_rows][token_keep]
        self._n_rows = len(self._data)
        self._offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        self._drop_ids(keep)

    def vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed vectors of the given rows -> (``[T', dim]``, ``[len(rows)+1]`` offsets)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self._offsets[rows]
        lengths = self._offsets[rows + 1] - starts
        new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(int(new_offsets[-1]))
        if self._scales is not None:  # dequantised
            return self._data[index] * self._scales[index, None], new_offsets
        return self._data[index], new_offsets

    def get(self, doc_id: str) -> np.ndarray:
        """The ``[t, dim]`` vectors of one document (float32 copy)."""
        (row,) = self.rows([doc_id])
        return self.vectors(np.asarray([row]))[0].astype(np.float32)

    def scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """MaxSim of ``query [q, dim]`` against the documents at ``rows`` -> ``[len(rows)]``."""
        return colbert_scores_rows(
            query, self._data[: self._n_rows], self._offsets, rows, scales=self._scales
        )

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "dtype": str(self.dtype)}

    def state(self) -> dict[str, np.ndarray]:
        out = {"vectors": self._data[: self._n_rows], "offsets": self._offsets}
        if self._scales is not None:
            out["scales"] = self._scales[: self._n_rows]
        return out

    @classmethod
    def from_state(
        cls,
        ids: list[str],
        arrays: dict[str, np.ndarray],
        dtype: str = "float16",
        dim: int | None = None,
    ) -> ColbertStore:
        vecs, offsets = arrays["vectors"], arrays["offsets"]
        if vecs.ndim != 2 or offsets.ndim != 1 or offsets.dtype.kind not in "iu":
            raise IndexFormatError("colbert_vectors.npy must be 2-d, colbert_offsets.npy 1-d ints")
        offsets = offsets.astype(np.int64)
        if (
            len(offsets) != len(ids) + 1
            or int(offsets[0]) != 0
            or int(offsets[-1]) != len(vecs)
            or (np.diff(offsets) < 0).any()
        ):
            raise IndexFormatError("colbert_offsets.npy is inconsistent with the stored vectors")
        if dim is not None and vecs.shape[1] != dim:
            raise IndexFormatError(f"colbert_vectors.npy has dim {vecs.shape[1]}, expected {dim}")
        if vecs.dtype != np.dtype(dtype):
            raise IndexFormatError(
                f"colbert_vectors.npy is {vecs.dtype}, the manifest says {dtype}"
            )
        store = cls(vecs.shape[1], dtype)
        if store._scales is not None:
            scales = arrays.get("scales")
            if scales is None or scales.ndim != 1 or len(scales) != len(vecs):
                raise IndexFormatError(
                    "int8 ColBERT vectors need colbert_scales.npy, one per vector"
                )
            if scales.dtype.kind != "f" or not (np.isfinite(scales).all() and (scales > 0).all()):
                raise IndexFormatError("colbert_scales.npy must hold finite scales > 0")
            store._scales = np.ascontiguousarray(scales, dtype=np.float32)
        elif not np.isfinite(vecs).all():
            raise IndexFormatError("colbert_vectors.npy holds NaN or inf")
        store._data = np.ascontiguousarray(vecs, dtype=store.dtype)
        store._n_rows = len(vecs)
        store._offsets = offsets
        store._append_ids(ids)
        return store

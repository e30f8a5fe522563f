"""Row encoding for the Milvus backend: sparse dicts, ColBERT blobs, BM25 term recovery.

Pure functions, no pymilvus import, so they are unit-tested without a server.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.bm25 import BM25Params, bm25_norm

__all__ = [
    "CHUNK_CHARS",
    "MAX_CHUNKS",
    "decode_blobs",
    "decode_sparse",
    "encode_blob",
    "encode_sparse",
    "recover_tf",
]

CHUNK_CHARS = 65532  # base64 characters per VARCHAR element (multiple of 4, <= 65535)
MAX_CHUNKS = 4096  # Milvus's largest ARRAY capacity


def encode_sparse(row: sp.csr_matrix | None, sentinel: int) -> dict[int, float]:
    """One CSR row ``[1, V]`` -> ``{term: weight}`` with only weights > 0.

    Milvus refuses an empty sparse vector, so an empty row becomes ``{sentinel: 1.0}`` with
    ``sentinel`` outside the vocabulary: no query ever contains it, :func:`decode_sparse`
    drops it.
    """
    if row is None or row.nnz == 0:
        return {sentinel: 1.0}
    keep = row.data > 0
    if not keep.any():
        return {sentinel: 1.0}
    return dict(zip(row.indices[keep].tolist(), row.data[keep].tolist(), strict=True))


def decode_sparse(rows: Sequence[Mapping[int, float]], vocab_size: int) -> sp.csr_matrix:
    """Sparse vectors as Milvus returns them -> CSR ``[len(rows), vocab_size]`` float32,
    without the sentinel."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    cols = np.fromiter((int(t) for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    vals = np.fromiter(
        (float(w) for r in rows for w in r.values()), dtype=np.float32, count=int(lengths.sum())
    )
    row_ids = np.repeat(np.arange(len(rows)), lengths)
    keep = cols < vocab_size
    m = sp.csr_matrix(
        (vals[keep], (row_ids[keep], cols[keep])), shape=(len(rows), vocab_size), dtype=np.float32
    )
    m.sort_indices()
    return m


def encode_blob(vectors: np.ndarray, scales: np.ndarray | None = None) -> list[str]:
    """``[t, width]`` codes (their storage dtype: float vectors, int8 codes with ``[t]``
    float32 ``scales`` appended, binary sign bits) -> base64 chunks for an ARRAY<VARCHAR>.

    Raises:
        ValueError: more than ``MAX_CHUNKS`` chunks (a document too long for one row).
    """
    raw = np.ascontiguousarray(vectors).tobytes()
    if scales is not None:
        raw += np.ascontiguousarray(scales, dtype=np.float32).tobytes()
    text = base64.b64encode(raw).decode("ascii")
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(
            f"a document with {len(vectors)} ColBERT vectors needs {len(chunks)} chunks, more "
            f"than Milvus's {MAX_CHUNKS}; split long texts (m3_rag.sources.chunk_text)"
        )
    return chunks


def decode_blobs(
    blobs: Sequence[Sequence[str]], dim: int, dtype: np.dtype[Any], scaled: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each document's chunks -> packed ``[T, dim]`` codes, ``[n + 1]`` offsets and, for a
    scaled codec (``scaled``; default: int8 ``dtype``), ``[T]`` scales (else ``None``).
    ``dim`` is the stored width (``ceil(dim / 8)`` bytes for binary codes)."""
    quantized = dtype == np.int8 if scaled is None else scaled
    per_vector = dim * dtype.itemsize + (4 if quantized else 0)
    mats, scales = [], []
    for b in blobs:
        raw = base64.b64decode("".join(b))
        t = len(raw) // per_vector
        mats.append(np.frombuffer(raw, dtype=dtype, count=t * dim).reshape(t, dim))
        if quantized:
            scales.append(np.frombuffer(raw, dtype=np.float32, offset=t * dim * dtype.itemsize))
    lengths = np.fromiter((len(m) for m in mats), dtype=np.int64, count=len(mats))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    packed = np.concatenate(mats) if lengths.sum() else np.zeros((0, dim), dtype=dtype)
    if not quantized:
        return packed, offsets, None
    return packed, offsets, np.concatenate(scales) if scales else np.zeros(0, np.float32)


def recover_tf(
    weights: sp.csr_matrix, doc_len: np.ndarray, avgdl_written: np.ndarray, p: BM25Params
) -> sp.csr_matrix:
    """Invert the stored BM25 document side ``w = tf (k1+1) / (tf + K)`` back to term counts.

    ``K = k1 (1 - b + b dl / avgdl_written)`` with the corpus mean length at write time, so
    ``tf = w K / (k1 + 1 - w)``; counts are integers and are rounded.

    Args:
        weights: ``[m, V]`` stored weights.
        doc_len: ``[m]`` document lengths.
        avgdl_written: ``[m]`` mean length when each row was written.
        p: BM25 parameters.

    Returns:
        ``[m, V]`` float32 term counts.
    """
    rows = np.repeat(np.arange(weights.shape[0]), np.diff(weights.indptr))
    avg = np.asarray(avgdl_written, dtype=np.float64)
    k = bm25_norm(doc_len, np.where(avg > 0, avg, 1.0), p)
    w = weights.data.astype(np.float64)
    tf = np.rint(w * k[rows] / (p.k1 + 1 - w))
    return sp.csr_matrix(
        (tf.astype(np.float32), weights.indices, weights.indptr), shape=weights.shape
    )

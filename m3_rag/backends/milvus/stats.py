"""The side collection of a Milvus collection and the BM25 statistics it keeps.

``<name>_m3meta`` holds one row per key (``key``, JSON ``value``, sparse ``vec``):
``config`` is the index record (:func:`~m3_rag.backends.milvus.schema.record`); for BM25,
``bm25`` holds ``{"n", "total_len", "dirty"}`` and the document frequencies as the sparse
vector (a vocabulary-sized vector is never allocated: hashed term ids go to 2**31).
``dirty`` marks a write in progress: a reader that finds it recomputes the statistics from
the stored rows (:func:`recompute`).

BM25 rows store the document side ``tf (k1+1) / (tf + K)`` with ``dl`` and the mean
length at write time (``avgdl``), from which :func:`stored_tf` recovers the term counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_literal
from m3_rag.bm25 import BM25Params, BM25Stats, bm25_tf

__all__ = [
    "bm25_rows",
    "doc_freqs",
    "read_meta",
    "read_stats",
    "recompute",
    "stored_tf",
    "with_rows",
    "without_rows",
    "write_meta",
    "write_stats",
]


def read_meta(client: Any, meta_collection: str, key: str) -> dict[str, Any] | None:
    """The side collection's row ``key`` (``key``, ``value``, ``vec``), ``None`` if absent."""
    rows = client.query(
        meta_collection,
        filter=f"key == {milvus_literal(key)}",
        output_fields=["key", "value", "vec"],
    )
    return dict(rows[0]) if rows else None


def write_meta(
    client: Any, meta_collection: str, key: str, value: dict[str, Any], vec: Mapping[int, float]
) -> None:
    """Write the side collection's row ``key`` (a non-empty sparse ``vec``: Milvus refuses an
    empty one)."""
    client.upsert(meta_collection, [{"key": key, "value": json.dumps(value), "vec": dict(vec)}])


def read_stats(client: Any, meta_collection: str, vocab_size: int) -> tuple[BM25Stats, bool]:
    """The stored BM25 statistics and their dirty flag (empty statistics when none are
    stored yet)."""
    row = read_meta(client, meta_collection, "bm25")
    if row is None:
        return BM25Stats(), False
    stats = json.loads(row["value"])
    df = codec.decode_sparse([row["vec"]], vocab_size)
    df.sum_duplicates()
    terms, counts = df.indices.astype(np.int64), np.rint(df.data).astype(np.int64)
    keep = counts > 0
    return (
        BM25Stats(int(stats["n"]), float(stats["total_len"]), terms[keep], counts[keep]),
        bool(stats.get("dirty", False)),
    )


def write_stats(
    client: Any, meta_collection: str, stats: BM25Stats, vocab_size: int, *, dirty: bool
) -> None:
    """Store ``stats``; ``dirty=True`` marks a write in progress."""
    keep = stats.df > 0
    vec = dict(zip(stats.terms[keep].tolist(), stats.df[keep].astype(float).tolist(), strict=True))
    value = {"n": stats.n, "total_len": stats.total_len, "dirty": dirty}
    write_meta(client, meta_collection, "bm25", value, vec or {vocab_size: 1.0})


def doc_freqs(tf: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(terms, counts)``: the sorted term ids the rows of ``tf`` hold and how many rows
    hold each."""
    cols = tf.indices[tf.data > 0] if tf.nnz else tf.indices
    terms, counts = np.unique(cols, return_counts=True)
    return terms.astype(np.int64), counts.astype(np.int64)


def stored_tf(
    rows: list[dict[str, Any]], field: str, vocab_size: int, p: BM25Params
) -> sp.csr_matrix:
    """The term counts of stored BM25 rows (with ``field``, ``dl`` and ``avgdl``)."""
    weights = codec.decode_sparse([r[field] for r in rows], vocab_size)
    dl = np.asarray([float(r["dl"]) for r in rows])
    written = np.asarray([float(r["avgdl"]) for r in rows])
    return codec.recover_tf(weights, dl, written, p)


def with_rows(stats: BM25Stats, tf: sp.csr_matrix) -> BM25Stats:
    """``stats`` with documents of term counts ``tf`` added."""
    terms, counts = doc_freqs(tf)
    return stats.updated(terms, counts, tf.shape[0], float(tf.sum()), 1)


def without_rows(
    stats: BM25Stats, rows: list[dict[str, Any]], field: str, vocab_size: int, p: BM25Params
) -> BM25Stats:
    """``stats`` without the stored rows ``rows`` (with ``field``, ``dl``, ``avgdl``)."""
    if not rows:
        return stats
    terms, counts = doc_freqs(stored_tf(rows, field, vocab_size, p))
    known = np.isin(terms, stats.terms)  # statistics out of step never shift another term
    length = float(sum(float(r["dl"]) for r in rows))
    return stats.updated(terms[known], counts[known], len(rows), length, -1)


def recompute(
    pages: Iterable[list[dict[str, Any]]], field: str, vocab_size: int, p: BM25Params
) -> BM25Stats:
    """The statistics of every stored row, from ``pages`` of rows (with ``field``, ``dl``,
    ``avgdl``): O(corpus), after a failed or killed write only."""
    stats = BM25Stats()
    for batch in pages:
        tf = stored_tf(batch, field, vocab_size, p)
        terms, counts = doc_freqs(tf)
        length = float(sum(float(r["dl"]) for r in batch))
        stats = stats.updated(terms, counts, len(batch), length, 1)
    return stats


def bm25_rows(
    stats: BM25Stats,
    old: list[dict[str, Any]],
    counts: sp.csr_matrix,
    field: str,
    vocab_size: int,
    p: BM25Params,
) -> tuple[sp.csr_matrix, np.ndarray, float, BM25Stats]:
    """What a write of documents with term ``counts`` stores, replacing the stored rows
    ``old`` (with ``field``, ``dl``, ``avgdl``) of a corpus of statistics ``stats``.

    Returns:
        ``(weights, dl, avgdl, after)``: the document side ``[m, V]`` to store, each
        document's length, the mean length it is written with, and the statistics once the
        write is done.
    """
    after = with_rows(without_rows(stats, old, field, vocab_size, p), counts)
    dl = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
    avgdl = after.total_len / after.n if after.n else 1.0
    doc_rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    data = bm25_tf(counts.data, dl[doc_rows], avgdl, p).astype(np.float32)
    weights = sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)
    return weights, dl, avgdl, after

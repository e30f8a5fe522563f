"""Pure, vectorised scoring functions (numpy / scipy / torch), the conventions of BGE-M3.

* dense: dot product of L2-normalised vectors.
* sparse (lexical matching): ``sum_{t in q & p} q_t * p_t``.
* ColBERT (MaxSim): mean over query vectors of the max dot product with the document's vectors.
* fusion: weighted mean ``(w_d*d + w_s*s + w_c*c) / (w_d + w_s + w_c)`` or reciprocal-rank fusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from m3_rag._parallel import run_split
from m3_rag.codecs import ColbertCodec, get_codec

__all__ = [
    "colbert_scores_packed",
    "colbert_scores_rows",
    "dense_scan",
    "dense_scores",
    "pair_mode_scores",
    "pairwise_colbert",
    "pairwise_dense",
    "pairwise_sparse",
    "rrf_fusion",
    "sparse_dot_rows",
    "sparse_matrix",
    "sparse_scores",
    "weighted_fusion",
]


def dense_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """All-pairs dense scores.

    Args:
        queries: ``[m, d]`` float array.
        docs: ``[n, d]`` float array.

    Returns:
        ``[m, n]`` float32 dot products.
    """
    return np.asarray(queries, dtype=np.float32) @ np.asarray(docs, dtype=np.float32).T


def dense_scan(docs: np.ndarray, query: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Inner product of one query with every stored vector (the dense leg of a search).

    Memory-bound: the rows are split over one worker per torch thread (see
    :mod:`m3_rag._parallel`), which reads at the machine's bandwidth without numpy's
    OpenBLAS threads, whose spinning after each call slowed the torch stages that follow.

    Args:
        docs: ``[n, d]`` float32 or float16 vectors (float16 is converted to float32
            ``chunk`` rows at a time, so scores are the float32 products of the stored values).
        query: ``[d]`` vector.
        chunk: rows converted at a time for float16 ``docs``.

    Returns:
        ``[n]`` float32 scores.
    """
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32).reshape(-1))
    if docs.ndim != 2 or docs.shape[1] != q.shape[0]:
        raise ValueError(f"query has {q.shape[0]} dims, the vectors have shape {tuple(docs.shape)}")
    # a read-only (memory-mapped) array is copied chunk by chunk, never wrapped
    direct = docs.flags.writeable and docs.flags.c_contiguous and docs.dtype == np.float32
    data = torch.from_numpy(docs) if direct else None
    out = torch.empty(len(docs))

    def scan(start: int, stop: int) -> None:
        if data is not None:
            torch.mv(data[start:stop], q, out=out[start:stop])
            return
        buf = torch.empty(min(chunk, stop - start), docs.shape[1])
        view = buf.numpy()
        for s in range(start, stop, chunk):
            n = min(chunk, stop - s)
            np.copyto(view[:n], docs[s : s + n], casting="same_kind")
            torch.mv(buf[:n], q, out=out[s : s + n])

    run_split(scan, len(docs), min_rows=8192)
    return out.numpy()


def pairwise_dense(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Row-wise dense scores of aligned pairs: ``[n, d] x [n, d] -> [n]``."""
    return np.einsum("nd,nd->n", np.asarray(queries, np.float32), np.asarray(docs, np.float32))


def sparse_matrix(
    weights: Sequence[Mapping[int, float]], n_cols: int | None = None
) -> sp.csr_matrix:
    """Pack lexical weights into a CSR matrix ``[len(weights), n_cols]`` (float32).

    Args:
        weights: One ``{token_id: weight}`` dict per row.
        n_cols: Number of columns (vocabulary size); default ``max id + 1``.
    """
    lengths = np.fromiter((len(w) for w in weights), dtype=np.int64, count=len(weights))
    indptr = np.zeros(len(weights) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cols = np.fromiter((k for w in weights for k in w), dtype=np.int64, count=int(indptr[-1]))
    vals = np.fromiter(
        (v for w in weights for v in w.values()), dtype=np.float32, count=int(indptr[-1])
    )
    if n_cols is None:
        n_cols = int(cols.max()) + 1 if cols.size else 1
    elif cols.size and int(cols.max()) >= n_cols:
        raise ValueError(f"token id {int(cols.max())} is out of range for {n_cols} columns")
    if cols.size and int(cols.min()) < 0:
        raise ValueError("token ids must be >= 0")
    mat = sp.csr_matrix((vals, cols, indptr), shape=(len(weights), n_cols))
    mat.sum_duplicates()
    return mat


def sparse_dot_rows(docs: sp.csr_matrix, query: Mapping[int, float]) -> np.ndarray:
    """Lexical score of every row of ``docs`` for one query: ``sum_t q_t * d_t``.

    Costs O(nnz log q) whatever the number of columns (hashed term ids go to 2**31, where
    a transpose of ``docs`` would cost O(columns)).

    Args:
        docs: ``[n, V]`` CSR weights.
        query: ``{term_id: weight}``.

    Returns:
        ``[n]`` float32 scores.
    """
    n = docs.shape[0]
    if not query or docs.nnz == 0:
        return np.zeros(n, dtype=np.float32)
    terms = np.fromiter(query, dtype=np.int64, count=len(query))
    order = np.argsort(terms)
    terms = terms[order]
    weights = np.fromiter(query.values(), dtype=np.float64, count=len(query))[order]
    pos = np.searchsorted(terms, docs.indices)
    hit = pos < len(terms)
    hit[hit] = terms[pos[hit]] == docs.indices[hit]
    rows = np.repeat(np.arange(n), np.diff(docs.indptr))
    contrib = np.where(hit, docs.data * weights[np.minimum(pos, len(terms) - 1)], 0.0)
    return np.bincount(rows, weights=contrib, minlength=n).astype(np.float32)


def sparse_scores(queries: sp.spmatrix, docs: sp.spmatrix) -> np.ndarray:
    """All-pairs lexical matching scores: ``[m, V] x [n, V] -> [m, n]`` float32 (dense array)."""
    cols = max(queries.shape[1], docs.shape[1])
    q = sp.csr_matrix(queries, dtype=np.float32)
    d = sp.csr_matrix(docs, dtype=np.float32)
    q.resize((q.shape[0], cols))
    d.resize((d.shape[0], cols))
    return np.asarray((q @ d.T).toarray(), dtype=np.float32)


def pairwise_sparse(
    queries: Sequence[Mapping[int, float]], docs: Sequence[Mapping[int, float]]
) -> np.ndarray:
    """Row-wise lexical matching scores of aligned pairs -> ``[n]`` float32."""
    if len(queries) != len(docs):
        raise ValueError(f"{len(queries)} queries but {len(docs)} documents")
    q = sparse_matrix(queries)
    d = sparse_matrix(docs)
    cols = max(q.shape[1], d.shape[1])
    q.resize((q.shape[0], cols))
    d.resize((d.shape[0], cols))
    return np.asarray(q.multiply(d).sum(axis=1), dtype=np.float32).reshape(-1)


def colbert_scores_packed(query: np.ndarray, packed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """MaxSim of one query against documents whose vectors are packed in one array.

    Args:
        query: ``[q, d]`` query vectors.
        packed: ``[T, d]`` the documents' vectors, document ``i`` in rows
            ``offsets[i]:offsets[i+1]`` (float16 or float32).
        offsets: ``[n + 1]`` int row offsets, non-decreasing.

    Returns:
        ``[n]`` float32: mean over query vectors of the max similarity; 0 for a
        document with no vectors.
    """
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    q = np.asarray(query, dtype=np.float32)
    if q.shape[0] == 0:
        return np.zeros(n, dtype=np.float32)
    sims = np.asarray(packed, dtype=np.float32) @ q.T  # [T, q]
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    nonempty = lengths > 0
    out = np.zeros(n, dtype=np.float32)
    if nonempty.any():
        # reduceat over the non-empty segments only (empty ones would read the next row)
        maxes = np.maximum.reduceat(sims, starts[nonempty], axis=0)  # [n_nonempty, q]
        out[nonempty] = maxes.mean(axis=1)
    return out


def colbert_scores_rows(
    query: np.ndarray,
    packed: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    chunk: int = 256,
    scales: np.ndarray | None = None,
    codec: ColbertCodec | None = None,
    prepared: Any = None,
) -> np.ndarray:
    """MaxSim of one query against some documents of a packed store, without copying them out.

    Same result as ``colbert_scores_packed`` on the selected documents. The selected vectors
    are gathered, converted to float32 and multiplied ``chunk`` rows at a time (torch, so the
    float32 copy stays in cache): about 4x faster than a numpy gather + convert on float16.
    (Splitting the vectors over the scan workers of :mod:`m3_rag._parallel` was 10% slower
    than torch's own threads here: this stage is compute-bound.)

    Args:
        query: ``[q, d]`` query vectors.
        packed: ``[T, w]`` all documents' vectors or codes (``codec``'s storage).
        offsets: ``[n + 1]`` row offsets of all documents.
        rows: ``[c]`` the documents to score.
        chunk: vectors per matrix product (256 keeps the float32 copy in cache; 1.5x faster
            than 1024 in isolation at 10k docs x 200 tokens).
        scales: ``[T]`` per-vector scales of int8 ``packed`` (``None`` for float data).
        codec: How ``packed`` is coded (default: float, or int8 with ``scales``); a binary
            codec scores ``max(chunk, 4096)`` vectors at a time (no float copy is made).
        prepared: ``codec.prepare(query, d)``, when the caller scores several blocks with
            one query (computed here otherwise).

    Returns:
        ``[c]`` float32 scores; 0 for a document with no vectors.
    """
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    out = np.zeros(len(rows), dtype=np.float32)
    total = int(lengths.sum())
    if total == 0 or len(query) == 0:
        return out
    local = np.concatenate([[0], np.cumsum(lengths)])
    index = torch.from_numpy(np.repeat(starts - local[:-1], lengths) + np.arange(total))
    data = torch.from_numpy(np.ascontiguousarray(packed))
    if codec is None:
        codec = get_codec("int8" if scales is not None else "float32")
    if prepared is None:
        prepared = codec.prepare(query, int(np.shape(query)[1]))
    if codec.dtype.kind == "u":  # bit codes: no float copy of the block is made
        chunk = max(chunk, 4096)
    scale_t = None
    if scales is not None:
        scale_t = torch.from_numpy(np.ascontiguousarray(scales, np.float32))
    sims = torch.empty(total, len(query))
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        at = index[s:e]
        part = None if scale_t is None else scale_t[at]
        codec.similarities(prepared, data.index_select(0, at), part, sims[s:e])
    nonempty = lengths > 0
    maxes = torch.segment_reduce(sims, "max", lengths=torch.from_numpy(lengths[nonempty]), axis=0)
    out[nonempty] = maxes.mean(dim=1).numpy()
    return out


def pairwise_colbert(
    queries: Sequence[np.ndarray], docs: Sequence[np.ndarray], chunk: int = 256
) -> np.ndarray:
    """Row-wise MaxSim of aligned pairs (padded batched matmul, chunked) -> ``[n]`` float32."""
    if len(queries) != len(docs):
        raise ValueError(f"{len(queries)} queries but {len(docs)} documents")
    out = np.zeros(len(queries), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        qs = [torch.from_numpy(np.asarray(x, np.float32)) for x in queries[start : start + chunk]]
        ds = [torch.from_numpy(np.asarray(x, np.float32)) for x in docs[start : start + chunk]]
        q = torch.nn.utils.rnn.pad_sequence(qs, batch_first=True)  # [b, Lq, d]
        d = torch.nn.utils.rnn.pad_sequence(ds, batch_first=True)  # [b, Lp, d]
        q_len = torch.tensor([len(x) for x in qs])
        d_len = torch.tensor([len(x) for x in ds])
        sims = torch.bmm(q, d.transpose(1, 2))  # [b, Lq, Lp]
        d_pad = torch.arange(d.shape[1])[None, :] >= d_len[:, None]
        sims.masked_fill_(d_pad[:, None, :], float("-inf"))
        best = sims.max(dim=2).values if sims.shape[2] else torch.zeros(q.shape[:2])
        q_valid = torch.arange(q.shape[1])[None, :] < q_len[:, None]
        best = torch.where(q_valid & (d_len[:, None] > 0), best, torch.zeros(()))
        res = best.sum(dim=1) / q_len.clamp(min=1)
        out[start : start + len(qs)] = res.numpy()
    return out


def weighted_fusion(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """``sum_m w_m * s_m / sum_m w_m`` over the modes present in both mappings.

    Args:
        scores: mode name -> ``[n]`` scores.
        weights: mode name -> weight (modes absent from ``scores`` are ignored).

    Raises:
        ValueError: no mode with a positive total weight.
    """
    modes = [m for m in scores if weights.get(m, 0.0) != 0.0]
    total = float(sum(weights[m] for m in modes))
    if not modes or total <= 0:
        raise ValueError(f"weights {dict(weights)} give no positive weight to modes {list(scores)}")
    # float64: a weight near the float32 maximum cannot overflow to inf or NaN
    fused = sum(np.asarray(scores[m], np.float64) * float(weights[m]) for m in modes)
    return np.asarray(np.asarray(fused) / total, dtype=np.float32)


def rrf_fusion(
    scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None, k: int = 60
) -> np.ndarray:
    """Reciprocal-rank fusion: ``sum_m w_m / (k + rank_m)`` with ranks from 1 (best).

    Tied scores share the best rank of their group (competition ranking, "1224"), so the
    result does not depend on the order of the candidates (e.g. documents with no lexical
    match all tie at 0).

    Args:
        scores: mode name -> ``[n]`` scores over the same candidates (higher is better).
        weights: optional per-mode multipliers (default 1 for every mode).
        k: the RRF constant (60 in Cormack et al.).

    Returns:
        ``[n]`` float32 fused scores.
    """
    fused: np.ndarray | None = None
    for mode, s in scores.items():
        w = 1.0 if weights is None else float(weights.get(mode, 0.0))
        if w == 0.0:
            continue
        s = np.asarray(s, dtype=np.float64)
        # rank = 1 + number of strictly better scores
        ranks = 1.0 + np.searchsorted(np.sort(-s), -s, side="left")
        part = w / (k + ranks)
        fused = part if fused is None else fused + part
    if fused is None:
        raise ValueError("rrf_fusion needs at least one mode with a non-zero weight")
    return fused.astype(np.float32)


def pair_mode_scores(
    weights: Sequence[float],
    dense: tuple[np.ndarray, np.ndarray],
    sparse: tuple[Sequence[Mapping[int, float]], Sequence[Mapping[int, float]]] | None,
    colbert: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None,
) -> dict[str, list[float]]:
    """``BGEM3FlagModel.compute_score``'s modes for ``n`` (query, passage) pairs, from their
    encodings (each argument: the queries' then the passages').

    Args:
        weights: ``(dense, sparse, colbert)`` weights of the combined modes (checked; dense
            + sparse > 0).
        dense: ``[n, d]`` and ``[n, d]`` unit vectors.
        sparse, colbert: The lexical weights and ColBERT matrices, ``None`` for a dense-only
            model.

    Returns:
        ``{'dense', 'sparse', 'colbert', 'sparse+dense', 'colbert+sparse+dense'}`` -> ``n``
        scores (``{'dense'}`` only for a dense-only model).
    """
    w = weights
    d = pairwise_dense(dense[0], dense[1])
    result: dict[str, list[float]] = {"dense": d.tolist()}
    if sparse is None or colbert is None:
        return result
    lex = pairwise_sparse(sparse[0], sparse[1])
    col = pairwise_colbert(colbert[0], colbert[1])
    result["sparse"] = lex.tolist()
    result["colbert"] = col.tolist()
    result["sparse+dense"] = ((w[1] * lex + w[0] * d) / (w[0] + w[1])).tolist()
    result["colbert+sparse+dense"] = ((w[0] * d + w[1] * lex + w[2] * col) / sum(w)).tolist()
    return result

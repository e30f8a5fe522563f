"""A Milvus search: both legs' candidates in one round trip, checked against the filter and
scored client-side.

A ``hybrid_search`` of the dense and lexical legs (a plain ``search`` when there is no
lexical query) returns the union of their top-``n`` with the stored vectors, and the
ColBERT vectors when few enough candidates come back. The scores are computed here with
the local engine's functions, so per-mode scores and rankings agree with it (Milvus's
rankers return one fused score).

Milvus filters rows with an expression (:func:`~m3_rag.backends.milvus.filters.milvus_expr`),
which Milvus Lite evaluates in Python, where ``True == 1 == 1.0``: every returned row is
checked again with :func:`m3_rag.filters.filter_mask`, so a filter compares as JSON does, on
every engine. When that check drops rows, the search is repeated with a larger limit until
each leg holds ``n`` rows that pass (or all those Milvus matched), then each leg is cut back
to its top ``n``; a search whose rows all pass stays one round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_expr
from m3_rag.backends.milvus.stats import stored_tf
from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.bm25 import BM25Params, BM25Stats, bm25_tf
from m3_rag.codecs import get_codec
from m3_rag.filters import Filter, filter_mask
from m3_rag.scoring import colbert_scores_rows, dense_scan, sparse_dot_rows

__all__ = ["MAX_TOPK", "Target", "candidates", "colbert_of", "passing"]

MAX_TOPK = 16384  # Milvus's largest search limit


@dataclass(frozen=True)
class Target:
    """What a search reads: an open collection.

    Attributes:
        client: The ``MilvusClient``.
        collection: The document collection.
        spec: Its index specification.
        lexical_field: Its lexical field (``"lexical"``; ``"sparse"`` in format 1).
        stats: The BM25 corpus statistics (``None`` unless the lexical leg is BM25).
        colbert_inline: Up to this many candidates, the reply carries their ColBERT vectors.
    """

    client: Any
    collection: str
    spec: IndexSpec
    lexical_field: str
    stats: BM25Stats | None
    colbert_inline: int


def candidates(
    t: Target,
    dense_query: np.ndarray,
    lexical_query: Mapping[int, float] | None,
    n: int,
    flt: Filter,
    colbert_query: np.ndarray | None,
) -> Candidates:
    """The union of the dense top-``n`` and the lexical top-``n`` passing ``flt``, with
    their dense and lexical scores and, inline, their ColBERT scores."""
    expr = milvus_expr(flt)
    n = min(int(n), MAX_TOPK)
    use_lex = t.spec.lexical is not None and lexical_query is not None
    lex_q = _lexical_query(t, lexical_query) if use_lex and lexical_query is not None else None
    colbert = colbert_query is not None and bool(t.spec.colbert_dim)
    dq = np.asarray(dense_query, np.float32).tolist()
    limit = n
    while True:
        found, inline = _round_trip(t, dq, lex_q, expr, limit, colbert)
        rows = passing(found, flt)
        dropped = len(found) - len(rows)
        # each leg returned at most `limit` rows, of which at most `dropped` fail: a leg
        # holds its top n once limit - dropped >= n, or all its rows when fewer came back
        if not dropped or len(found) < limit or limit - dropped >= n or limit >= MAX_TOPK:
            break
        limit = min(MAX_TOPK, max(2 * limit, n + 2 * dropped))
    if not rows:
        return Candidates.empty(use_lex)
    dense = dense_scan(np.asarray([r["dense"] for r in rows], dtype=np.float32), dense_query)
    lexical = _lexical_scores(t, rows, lex_q) if lex_q is not None else None
    if limit > n:  # searched deeper than n: keep each leg's top n
        keep = _top_n_each(dense, lexical, n)
        rows, dense = [rows[i] for i in keep], dense[keep]
        lexical = None if lexical is None else lexical[keep]
    scores = None
    if inline and colbert_query is not None:
        scores = colbert_of(t.spec, [r["colbert"] for r in rows], colbert_query)
    return Candidates(
        ids=[r["id"] for r in rows],
        dense=dense,
        lexical=lexical,
        rows=np.arange(len(rows), dtype=np.int64),
        payload=[(r["id"], r["text"], r["metadata"] or {}) for r in rows],
        colbert=scores,
    )


def passing(rows: list[dict[str, Any]], flt: Filter) -> list[dict[str, Any]]:
    """The rows (with ``metadata``) whose metadata passes ``flt``, compared as JSON does."""
    mask = filter_mask([r["metadata"] or {} for r in rows], flt)
    return rows if mask is None else [r for r, ok in zip(rows, mask.tolist(), strict=True) if ok]


def _round_trip(
    t: Target,
    dq: list[float],
    lex_q: dict[int, float] | None,
    expr: str,
    limit: int,
    colbert: bool,
) -> tuple[list[dict[str, Any]], bool]:
    """One request for each leg's top ``limit`` matching ``expr`` -> the rows, and whether
    they carry their ColBERT vectors."""
    from pymilvus import AnnSearchRequest, RRFRanker

    spec, lex = t.spec, t.lexical_field
    ip = {"metric_type": "IP"}
    reqs = [AnnSearchRequest([dq], "dense", ip, limit, expr=expr)]
    nz = {k: w for k, w in (lex_q or {}).items() if w > 0}  # every hit then scores > 0
    if nz:
        reqs.append(AnnSearchRequest([nz], lex, ip, limit, expr=expr))
    bound = min(len(reqs) * limit, MAX_TOPK)
    inline = colbert and bound <= t.colbert_inline
    fields = ["id", "text", "metadata", "dense"]
    fields += ([lex] if spec.lexical else []) + (["colbert"] if inline else [])
    fields += ["dl", "avgdl"] if spec.lexical == "bm25" else []
    if len(reqs) == 1:
        res = t.client.search(
            t.collection,
            data=[dq],
            anns_field="dense",
            limit=limit,
            filter=expr,
            output_fields=fields,
            search_params=ip,
        )
    else:
        res = t.client.hybrid_search(
            t.collection, reqs, RRFRanker(), limit=bound, output_fields=fields
        )
    return [dict(h["entity"]) | {"id": h["id"]} for h in res[0]], inline


def _top_n_each(dense: np.ndarray, lexical: np.ndarray | None, n: int) -> np.ndarray:
    """Positions (ascending) of the dense top ``n`` and the lexical top ``n`` (score > 0)."""
    keep = np.zeros(len(dense), dtype=bool)
    keep[np.argsort(-dense, kind="stable")[:n]] = True
    if lexical is not None:
        pos = np.flatnonzero(lexical > 0)
        keep[pos[np.argsort(-lexical[pos], kind="stable")[:n]]] = True
    return np.flatnonzero(keep)


def _bm25(spec: IndexSpec) -> BM25Params:
    return spec.bm25 or BM25Params()


def _lexical_query(t: Target, query: Mapping[int, float]) -> dict[int, float]:
    """M3: the query weights. BM25: query term counts times IDF (the document side is
    stored), for the terms the corpus holds."""
    spec = t.spec
    q = {int(k): float(w) for k, w in query.items() if 0 <= int(k) < spec.vocab_size}
    if spec.lexical != "bm25":
        return q
    stats = t.stats or BM25Stats()
    terms = np.fromiter(q, dtype=np.int64, count=len(q))
    present = stats.doc_freq(terms) > 0
    idf = stats.idf(terms, _bm25(spec))
    return {
        k: c * float(w)
        for (k, c), w, hit in zip(q.items(), idf.tolist(), present.tolist(), strict=True)
        if hit
    }


def _lexical_scores(t: Target, rows: list[dict[str, Any]], q: dict[int, float]) -> np.ndarray:
    """Exact lexical scores of ``rows`` for the query weights ``q`` (BM25 with the current
    mean length, whatever the length the rows were written with)."""
    spec = t.spec
    if spec.lexical == "bm25":
        p = _bm25(spec)
        tf = stored_tf(rows, t.lexical_field, spec.vocab_size, p)
        dl = np.asarray([float(r["dl"]) for r in rows])
        doc_rows = np.repeat(np.arange(len(rows)), np.diff(tf.indptr))
        stats = t.stats or BM25Stats()
        avgdl = stats.total_len / stats.n if stats.n else 1.0
        w = bm25_tf(tf.data, dl[doc_rows], avgdl, p).astype(np.float32)
        docs = sp.csr_matrix((w, tf.indices, tf.indptr), shape=tf.shape)
    else:
        docs = codec.decode_sparse([r[t.lexical_field] for r in rows], spec.vocab_size)
    return sparse_dot_rows(docs, q)


def colbert_of(spec: IndexSpec, blobs: list[Any], query: np.ndarray) -> np.ndarray:
    """MaxSim of ``query [q, dim]`` against stored ColBERT blobs -> ``[len(blobs)]``."""
    if not spec.colbert_dim:
        raise ValueError("this index has no ColBERT vectors")
    code = get_codec(spec.colbert_dtype)
    width = code.width(spec.colbert_dim)
    packed, offsets, scales = codec.decode_blobs(blobs, width, code.dtype, code.scaled)
    rows = np.arange(len(blobs))
    return colbert_scores_rows(query, packed, offsets, rows, scales=scales, codec=code)

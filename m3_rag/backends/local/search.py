"""The local engine's reads: candidates of both legs, ColBERT scores, documents, export.

Pure functions of an immutable :class:`~m3_rag.backends.local.view.View` (and the index
spec): a search takes the view once and never locks, so it runs alongside writes.

Every score computed from stored values is checked for NaN and inf
(:func:`~m3_rag.backends.local.segment.check_finite`, O(scores): the files over the size
hashed on open are not checked when opened, and a flipped byte there must not silently drop
or top a document); vectors exported from such files are checked too.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from m3_rag.backends.local import pruning
from m3_rag.backends.local.segment import Segment, check_finite
from m3_rag.backends.local.view import View
from m3_rag.backends.protocol import Candidates, DocBatch
from m3_rag.backends.validate import top_k
from m3_rag.bm25 import bm25_tf
from m3_rag.filters import Filter, filter_mask
from m3_rag.spec import IndexSpec

__all__ = [
    "EXACT_FILTERED",
    "candidates",
    "colbert_scores",
    "doc",
    "documents",
    "export",
    "masks",
]

EXACT_FILTERED = 20_000  # a filter leaving fewer rows than this scans them exactly
# M3 lexical top-n of segments this large by exact dynamic pruning (pruning.top_n): equal
# time at 100k rows, half at 1M (benchmarks/bench_scale_realistic.py --lexical-only); BM25's
# bound is too loose to pay (its p95 was 1.5x the exhaustive leg's at 1M)
PRUNE_ROWS = 100_000


def masks(view: View, flt: Filter) -> list[np.ndarray | None]:
    """Per segment, the rows that are live and pass ``flt`` (``None``: all of them)."""
    out = []
    for seg, dead in zip(view.segments, view.dead, strict=True):
        m = filter_mask(seg.docs.metadatas(), flt) if flt is not None else None
        if dead is not None:
            m = ~dead if m is None else m & ~dead
        out.append(m)
    return out


def candidates(
    view: View,
    spec: IndexSpec,
    dense_query: np.ndarray,
    lexical_query: Mapping[int, float] | None,
    n: int,
    flt: Filter = None,
) -> Candidates:
    """Union of the dense top-``n`` and the lexical top-``n`` (score > 0) passing ``flt``,
    scored on both legs; the candidates pin ``view`` for :func:`colbert_scores` and
    :func:`documents`."""
    use_lex = spec.lexical is not None and lexical_query is not None
    if view.count == 0:
        return Candidates.empty(use_lex)
    q = np.ascontiguousarray(dense_query, dtype=np.float32).reshape(-1)
    if q.shape[0] != spec.dense_dim:
        raise ValueError(f"query has {q.shape[0]} dims, the index {spec.dense_dim}")
    if not np.isfinite(q).all():
        raise ValueError("the dense query holds NaN or inf")
    allowed_rows = masks(view, flt)
    bases = view.bases
    d_rows, d_scores = [], []
    lex_full: list[np.ndarray | None] = []
    l_rows, l_scores = [], []
    lq = _lexical_query(view, spec, lexical_query) if use_lex else None
    bm25 = _bm25_doc(view, spec)
    for i, seg in enumerate(view.segments):
        allowed = allowed_rows[i]
        if allowed is not None and not allowed.any():
            lex_full.append(None)
            continue
        rows, scores = _dense_top(seg, q, n, allowed)
        d_rows.append(rows + bases[i])
        d_scores.append(scores)
        if lq is None or seg.lexical is None:
            lex_full.append(None)
            continue
        pruned = None
        if bm25 is None and len(seg) >= PRUNE_ROWS:
            where = seg.file("lex_tdata.npy")
            pruned = pruning.top_n(seg.lexical, lq[0], lq[1], n, allowed, bm25=bm25, where=where)
        if pruned is not None:  # exact: the rows and float32 scores of the exhaustive leg
            lex_full.append(None)  # the other candidates' lexical scores are probed below
            l_rows.append(pruned.rows + bases[i])
            l_scores.append(pruned.scores)
            continue
        s = _lexical_scores(seg, lq, view, spec)
        lex_full.append(s)
        ok = s > 0 if allowed is None else (s > 0) & allowed
        top = top_k(s, n, ok)
        l_rows.append(top + bases[i])
        l_scores.append(s[top])
    rows = _global_top(d_rows, d_scores, n)
    if lq is not None:
        rows = np.union1d(rows, _global_top(l_rows, l_scores, n))
    if len(rows) == 0:
        return Candidates.empty(use_lex)
    seg_of, local = view.locate(rows)
    dense = np.zeros(len(rows), np.float32)
    lexical = np.zeros(len(rows), np.float32) if use_lex else None  # 0 without terms
    for i in np.unique(seg_of).tolist():
        at = np.flatnonzero(seg_of == i)
        dense[at] = _dense(view.segments[i], q, local[at])
        full, seg = lex_full[i], view.segments[i]
        if lexical is not None and full is not None:
            lexical[at] = full[local[at]]
        elif lexical is not None and lq is not None and seg.lexical is not None:
            lexical[at] = pruning.row_scores(
                seg.lexical, lq[0], lq[1], local[at], bm25=bm25, where=seg.file("lex_tdata.npy")
            )
    return Candidates(
        ids=[view.segments[s].ids[r] for s, r in zip(seg_of.tolist(), local.tolist(), strict=True)],
        dense=dense,
        lexical=lexical,
        rows=rows,
        payload=view,
    )


def _dense(seg: Segment, q: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Dense scores of ``rows`` (all rows when ``None``) of ``seg``, checked finite."""
    with np.errstate(invalid="ignore", over="ignore"):  # reported below
        scores = seg.dense_scores(q, rows)
    return check_finite(scores, seg.file("dense.npy"))


def _dense_top(
    seg: Segment, q: np.ndarray, n: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense top-``n`` rows of one segment with their exact scores."""
    if seg.ann is not None:
        n_allowed = len(seg) if allowed is None else int(allowed.sum())
        if n_allowed >= EXACT_FILTERED:  # faiss is never asked for more rows than there are
            rows = np.sort(seg.ann.search(q, min(2 * n, n_allowed), allowed))
            scores = _dense(seg, q, rows)
            top = top_k(scores, n)
            return rows[top], scores[top]
        if allowed is not None:
            rows = np.flatnonzero(allowed)
            scores = _dense(seg, q, rows)
            top = top_k(scores, n)
            return rows[top], scores[top]
    scores = _dense(seg, q)
    rows = top_k(scores, n, allowed)
    return rows, scores[rows]


def _lexical_query(
    view: View, spec: IndexSpec, query: Mapping[int, float] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(terms, weights)`` of a lexical query (BM25: weights times the terms' IDF)."""
    if not query:
        return None
    terms = np.fromiter((t for t in query if 0 <= t < spec.vocab_size), dtype=np.int64)
    if len(terms) == 0:
        return None
    weights = np.fromiter((query[int(t)] for t in terms), np.float64, count=len(terms))
    if not np.isfinite(weights).all():
        raise ValueError("the lexical query holds a NaN or infinite weight")
    if spec.lexical == "bm25" and view.stats is not None:
        weights = weights * view.stats.idf(terms, spec.bm25_params)
    return terms, weights


def _bm25_doc(view: View, spec: IndexSpec) -> pruning.BM25Doc | None:
    """The BM25 document side :func:`_lexical_scores` scores with (``None``: M3 weights)."""
    if spec.lexical == "bm25" and view.stats is not None:
        return pruning.BM25Doc(view.stats.avgdl, spec.bm25_params)
    return None


def _lexical_scores(
    seg: Segment, lq: tuple[np.ndarray, np.ndarray], view: View, spec: IndexSpec
) -> np.ndarray:
    """``[len(seg)]`` lexical scores of one segment (dead rows included, masked later).

    Term at a time: each query term's postings are read (one range) and added into a
    float32 accumulator; a term's rows are unique, so a plain scatter-add is exact."""
    assert seg.lexical is not None
    out = np.zeros(len(seg), np.float32)
    bm25 = spec.lexical == "bm25" and view.stats is not None
    avgdl = view.stats.avgdl if bm25 and view.stats is not None else 1.0
    for q, rows, values in seg.lexical.term_postings(lq[0]):
        w = lq[1][q]
        if bm25:
            length = np.asarray(seg.lexical.length[rows], np.float64)
            contrib = w * bm25_tf(values, length, avgdl, spec.bm25_params)
            out[rows] += contrib.astype(np.float32)
        else:
            out[rows] += np.float32(w) * values
    return check_finite(out, seg.file("lex_tdata.npy"))


def colbert_scores(query: np.ndarray, cands: Candidates) -> np.ndarray:
    """MaxSim of ``query [q, dim]`` against each candidate (read from its pinned view)."""
    view: View = cands.payload
    out = np.zeros(len(cands.ids), np.float32)
    if not np.isfinite(query).all():
        raise ValueError("the ColBERT query holds NaN or inf")
    seg_of, local = view.locate(cands.rows)
    prepared: dict[str, Any] = {}  # per codec (one per index): the query prepared once
    for i in np.unique(seg_of).tolist():
        seg = view.segments[i]
        col = seg.colbert
        if col is None:
            raise ValueError("this index has no ColBERT vectors")
        coder = col.coder
        if coder.name not in prepared:
            prepared[coder.name] = coder.prepare(query, int(query.shape[1]))
        at = np.flatnonzero(seg_of == i)
        file = "colbert_vectors.npy" if col.scales is None else "colbert_scales.npy"
        scores = col.scores(query, local[at], prepared[coder.name])
        out[at] = check_finite(scores, seg.file(file))
    return out


def documents(cands: Candidates, order: np.ndarray) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, text, metadata copy)`` of the candidates at positions ``order``."""
    view: View = cands.payload
    seg_of, local = view.locate(cands.rows[order])
    return [doc(view.segments[s], r) for s, r in zip(seg_of.tolist(), local.tolist(), strict=True)]


def doc(seg: Segment, row: int) -> tuple[str, str, dict[str, Any]]:
    """``(id, text, metadata copy)`` of one stored row."""
    return seg.ids[row], seg.docs.text(row), copy.deepcopy(seg.docs.metadata(row))


def _global_top(rows: list[np.ndarray], scores: list[np.ndarray], n: int) -> np.ndarray:
    """Top ``n`` global rows by score (ties by row) from per-segment picks."""
    if not rows:
        return np.zeros(0, np.int64)
    r = np.concatenate(rows)
    s = np.concatenate(scores)
    order = np.argsort(r, kind="stable")
    r, s = r[order], s[order]
    return np.sort(r[top_k(s, n)])


def export(view: View, spec: IndexSpec, batch_size: int) -> Iterator[DocBatch]:
    """Every live document of ``view`` with its stored encodings (ColBERT vectors as
    float32: the vectors the codes stand for, e.g. int8 codes scaled back, binary codes as
    ``±1 / sqrt(dim)``), ``batch_size`` at a time."""
    for i, seg in enumerate(view.segments):
        live = view.live_rows(i)
        for s in range(0, len(live), batch_size):
            rows = live[s : s + batch_size]
            colbert = None
            if seg.colbert is not None:
                packed, offsets, scales = seg.colbert.gather(rows)
                vecs = seg.colbert.coder.decode(packed, scales, int(spec.colbert_dim or 0))
                _checked(seg, "colbert_vectors.npy", vecs)
                _checked(seg, "colbert_scales.npy", vecs)
                colbert = [vecs[a:b] for a, b in itertools.pairwise(offsets.tolist())]
            lexical = None
            if seg.lexical is not None:
                lexical = seg.lexical.rows_csr(rows, spec.vocab_size)
                _checked(seg, "lex_data.npy", lexical.data)
            yield DocBatch(
                ids=[seg.ids[r] for r in rows.tolist()],
                texts=[seg.docs.text(r) for r in rows.tolist()],
                metadatas=[copy.deepcopy(seg.docs.metadata(r)) for r in rows.tolist()],
                dense=_checked(seg, "dense.npy", np.asarray(seg.dense[rows], dtype=np.float32)),
                lexical=lexical,
                colbert=colbert,
            )


def _checked(seg: Segment, file: str, values: np.ndarray) -> np.ndarray:
    """``values`` read from ``file`` of ``seg``, checked finite when the file was not
    checked on open."""
    return check_finite(values, seg.file(file)) if file in seg.unchecked else values

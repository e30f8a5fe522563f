"""Exact dynamic pruning of the lexical leg: the top-``n`` rows of a segment without reading
every posting of every query term (MaxScore over term-at-a-time postings, with block maxima).

The exhaustive leg (``search._lexical_scores``) reads every posting of every query term and
adds each term's float32 contributions into a float32 accumulator, in query order. Here:

1. **Bounds.** Each term's postings (rows ascending) are cut into blocks of :data:`BLOCK`;
   one pass per segment (cached, :func:`term_blocks`) keeps each block's first row, the max
   and min of its values and the min length of its rows. A term's upper bound is the max
   contribution any of its postings can make (M3: ``w * max value``; BM25: the tf part at
   the block's max count and min length, which bounds it for ``k1 > 0``, ``0 <= b <= 1``).
2. **Essential terms** (highest bound first) are read whole into a float64 accumulator of
   lower bounds, keeping ``theta``, a lower bound of the ``n``-th best score, until the
   bounds of the terms left sum below ``theta``: a row in none of the terms read cannot
   reach the top ``n``; those terms are *non-essential*.
3. **Candidates** (rows of the essential terms, allowed, score > 0) whose score plus the
   block maxima of the non-essential terms' blocks they would fall in stays below ``theta``
   are dropped; the others are **probed**: only the blocks holding them are read
   (``np.searchsorted`` on the block rows; blocks close together as one range; the whole
   term when they would cover half of it), term by term, pruning again after each. When
   the candidates are a quarter of the rows or more, the other terms are read whole.
4. The survivors' scores are summed **in query order in float32** from the very float32
   contributions the exhaustive leg computes, so they are bit-identical to it; every row
   dropped has a score strictly below the ``n``-th best, so the top ``n`` (ties by row, as
   :func:`~m3_rag.backends.validate.top_k`) is the exhaustive one.

Bounds carry a rounding margin: float32 recursive summation of ``m`` non-negative terms is
within ``m * 2**-24`` (relative) of the exact sum, so lower bounds are shrunk and upper
bounds grown by ``(m + 1) * 2**-23`` and an absolute ``m * 2**-148`` (subnormals).

:func:`top_n` returns ``None`` (use the exhaustive leg) where pruning is not exact: a
negative weight, a term whose stored values are not finite and >= 0 (the exhaustive leg
then reports the corrupt file), BM25 parameters outside ``k1 > 0, 0 <= b <= 1``, or bounds
that could overflow float32. :func:`row_scores` gives the same exact scores for given rows
(the dense leg's candidates) by probing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from m3_rag.backends.local.segment import LexicalPostings, check_finite, read_ranges
from m3_rag.backends.validate import top_k
from m3_rag.bm25 import BM25Params, bm25_tf

__all__ = ["BLOCK", "BM25Doc", "LexicalTop", "TermBlocks", "row_scores", "term_blocks", "top_n"]

BLOCK = 128  # postings per block: a probe reads at most this many per (candidate, term)
_GAP = 8 * BLOCK  # probed blocks closer than this are read as one range
_CHUNK = 1 << 22  # postings read at a time while computing the block bounds
_U = 2.0**-24  # float32 unit roundoff
_TINY = 2.0**-148
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class BM25Doc:
    """The document side of BM25 scoring at query time (the live view's ``avgdl``)."""

    avgdl: float
    params: BM25Params


@dataclass(frozen=True, eq=False)
class TermBlocks:
    """Block summaries of a segment's term-major postings (``nb`` blocks, ``u`` terms).

    Attributes:
        bptr: ``[u + 1]`` int64: term ``i``'s blocks are ``bptr[i]:bptr[i + 1]``.
        start: ``[nb]`` int64 position of each block's first posting.
        stop: ``[nb]`` int64 position after its last posting.
        first: ``[nb]`` int64 row of each block's first posting.
        vmax: ``[nb]`` float64 max value in the block (NaN if one is NaN).
        lmin: ``[nb]`` float64 min length of the block's rows.
        tmax: ``[u]`` float64 max value of each term; ``tlmin``: min row length.
        safe: ``[u]`` bool: every value of the term is finite and > 0 (``>= 0`` for M3
            weights: ``safe0``).
    """

    bptr: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    first: np.ndarray
    vmax: np.ndarray
    lmin: np.ndarray
    tmax: np.ndarray
    tlmin: np.ndarray
    safe: np.ndarray
    safe0: np.ndarray


class LexicalTop(NamedTuple):
    """A segment's exact lexical top ``n`` and what finding it read.

    Attributes:
        rows: ``[k]`` int64 rows, best first (ties by row), ``k <= n``.
        scores: ``[k]`` float32 their scores (equal to the exhaustive leg's).
        read: Postings read (whole essential terms and probed blocks).
        exhaustive: Postings the exhaustive leg reads for the same query.
        essential: Query terms read whole.
    """

    rows: np.ndarray
    scores: np.ndarray
    read: int
    exhaustive: int
    essential: int


_CACHE: weakref.WeakKeyDictionary[LexicalPostings, TermBlocks] = weakref.WeakKeyDictionary()


def term_blocks(lex: LexicalPostings) -> TermBlocks:
    """The block summaries of ``lex`` (one pass over its postings, cached per segment)."""
    got = _CACHE.get(lex)
    if got is None:
        got = _CACHE.setdefault(lex, _build_blocks(lex))
    return got


def _build_blocks(lex: LexicalPostings) -> TermBlocks:
    tptr = np.asarray(lex.tptr, np.int64)
    counts = np.diff(tptr)
    nblocks = -(-counts // BLOCK)
    bptr = np.concatenate([[0], np.cumsum(nblocks)]).astype(np.int64)
    nb = int(bptr[-1])
    within = np.arange(nb, dtype=np.int64) - np.repeat(bptr[:-1], nblocks)
    start = np.repeat(tptr[:-1], nblocks) + within * BLOCK
    stop = np.minimum(start + BLOCK, np.repeat(tptr[1:], nblocks))
    first = np.zeros(nb, np.int64)
    vmax, vmin, lmin = (np.zeros(nb, np.float64) for _ in range(3))
    length = np.asarray(lex.length, np.float64)
    k = 0
    while k < nb:  # whole blocks, about _CHUNK postings at a time
        end = int(np.searchsorted(start, start[k] + _CHUNK, side="right"))
        end = max(end, k + 1)
        a, b = int(start[k]), int(stop[end - 1])
        rows = np.asarray(lex.trows[a:b], np.int64)
        vals = np.asarray(lex.tdata[a:b], np.float64)
        at = start[k:end] - a
        first[k:end] = rows[at]
        vmax[k:end] = np.maximum.reduceat(vals, at)
        vmin[k:end] = np.minimum.reduceat(vals, at)
        lmin[k:end] = np.minimum.reduceat(length[rows], at)
        k = end
    ok = np.isfinite(vmax) & np.isfinite(vmin)
    nonempty = nblocks > 0
    tmax = np.zeros(len(counts), np.float64)
    tlmin = np.zeros(len(counts), np.float64)
    tmin = np.zeros(len(counts), np.float64)
    bad = np.zeros(len(counts), bool)
    if nb:
        starts = bptr[:-1][nonempty]
        with np.errstate(invalid="ignore"):
            tmax[nonempty] = np.maximum.reduceat(vmax, starts)
            tmin[nonempty] = np.minimum.reduceat(vmin, starts)
            tlmin[nonempty] = np.minimum.reduceat(lmin, starts)
        bad[nonempty] = np.logical_or.reduceat(~ok, starts)
    safe0 = ~bad & (tmin >= 0)
    return TermBlocks(bptr, start, stop, first, vmax, lmin, tmax, tlmin, safe0 & (tmin > 0), safe0)


# ---------------------------------------------------------------------------- contributions
def _contrib(
    w: float, rows: np.ndarray, values: np.ndarray, lex: LexicalPostings, bm25: BM25Doc | None
) -> np.ndarray:
    """Float32 contributions of one term's postings, computed exactly as the exhaustive leg."""
    if bm25 is None:
        return np.float32(w) * np.asarray(values, np.float32)
    length = np.asarray(lex.length[rows], np.float64)
    return (w * bm25_tf(values, length, bm25.avgdl, bm25.params)).astype(np.float32)


def _bound(
    w: float | np.ndarray, vmax: np.ndarray, lmin: np.ndarray, bm25: BM25Doc | None
) -> np.ndarray:
    """Float64 upper bounds of the float32 contributions in blocks (or terms) of maxima
    ``vmax`` and min lengths ``lmin``, for query weight(s) ``w``."""
    if bm25 is None:
        return np.asarray(w, np.float32).astype(np.float64) * vmax * (1 + 2 * _U)
    return w * bm25_tf(vmax, lmin, bm25.avgdl, bm25.params) * (1 + 2 * _U)


def _usable(lex: LexicalPostings, weights: np.ndarray, bm25: BM25Doc | None) -> bool:
    """Whether pruning is exact for these weights and parameters (see the module docstring)."""
    if lex.tdata.dtype != np.float32:  # (the exhaustive leg's float32 arithmetic is mirrored)
        return False
    if bm25 is not None:
        p = bm25.params
        if not (p.k1 > 0 and 0 <= p.b <= 1 and bm25.avgdl > 0):
            return False
        return bool((weights >= 0).all())
    return bool((weights.astype(np.float32) >= 0).all())


def _found(lex: LexicalPostings, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Query positions of the terms present in ``lex`` (ascending) and their term index."""
    pos = np.searchsorted(lex.terms, terms)
    found = pos < len(lex.terms)
    found[found] = np.asarray(lex.terms)[pos[found]] == terms[found]
    q = np.flatnonzero(found)
    return q, pos[q]


def _nth(values: np.ndarray, n: int) -> float:
    """The ``n``-th largest of ``values`` (0.0 when there are fewer)."""
    if len(values) < n:
        return 0.0
    return float(np.partition(values, len(values) - n)[len(values) - n])


# ---------------------------------------------------------------------------- probing
class _Probe(NamedTuple):
    rows: np.ndarray  # probed rows present in the term (sorted)
    contrib: np.ndarray  # their float32 contributions
    read: int


def _probe(
    lex: LexicalPostings,
    blocks: TermBlocks,
    t: int,
    w: float,
    cand: np.ndarray,
    bm25: BM25Doc | None,
    idx: np.ndarray | None = None,
) -> _Probe:
    """Contributions of term ``t`` (its index in ``lex.terms``) to the sorted rows ``cand``,
    reading only the blocks that may hold them (the whole term when that is less work).
    ``idx``: the block of the term each candidate falls in, when known."""
    b0, b1 = int(blocks.bptr[t]), int(blocks.bptr[t + 1])
    a, b = int(blocks.start[b0]), int(blocks.stop[b1 - 1])
    if _whole(len(cand), b - a):
        rows = np.asarray(lex.trows[a:b], np.int64)
        vals = np.asarray(lex.tdata[a:b])
        n_rows = len(lex.length)
        if len(cand) * 16 >= n_rows:  # many candidates: a dense lookup, not a search each
            where = np.full(n_rows, -1, np.int64)
            where[rows] = np.arange(len(rows))
            at = where[cand]
            hit = at >= 0
            at = at[hit]
            return _Probe(cand[hit], _contrib(w, rows[at], vals[at], lex, bm25), len(rows))
    else:
        if idx is None:
            idx = np.searchsorted(blocks.first[b0:b1], cand, side="right") - 1
        need = idx[idx >= 0]  # non-decreasing (``cand`` is sorted): distinct blocks by diff
        need = need[np.concatenate([[True], need[1:] != need[:-1]])[: len(need)]] + b0
        # blocks less than _GAP postings apart are read as one range (a read per block
        # costs more than the postings between them)
        gap = blocks.start[need[1:]] - blocks.stop[need[:-1]]
        cut = np.concatenate([[0], np.flatnonzero(gap > _GAP) + 1])
        starts = blocks.start[need[cut]]
        lengths = blocks.stop[need[np.concatenate([cut[1:] - 1, [len(need) - 1]])]] - starts
        rows = np.asarray(read_ranges(lex.trows, starts, lengths), np.int64)
        vals = np.asarray(read_ranges(lex.tdata, starts, lengths))
    pos = np.minimum(np.searchsorted(rows, cand), max(len(rows) - 1, 0))
    hit = (rows[pos] == cand) if len(rows) else np.zeros(len(cand), bool)
    at = pos[hit]
    return _Probe(cand[hit], _contrib(w, rows[at], vals[at], lex, bm25), len(rows))


def _whole(k: int, postings: int) -> bool:
    """Whether ``k`` candidates are probed by reading a term of ``postings`` whole (their
    blocks would hold a good part of it)."""
    return k * BLOCK >= postings // 2


def _add_sorted(s: np.ndarray, rows: np.ndarray, src_rows: np.ndarray, src: np.ndarray) -> None:
    """``s[i] += src[j]`` (float32) where ``rows[i] == src_rows[j]`` (both sorted)."""
    if len(src_rows) == 0 or len(rows) == 0:
        return
    pos = np.minimum(np.searchsorted(src_rows, rows), len(src_rows) - 1)
    hit = src_rows[pos] == rows
    s[hit] += src[pos[hit]]


def row_scores(
    lex: LexicalPostings,
    terms: np.ndarray,
    weights: np.ndarray,
    rows: np.ndarray,
    *,
    bm25: BM25Doc | None = None,
    where: str = "lex_tdata.npy",
) -> np.ndarray:
    """Exact lexical scores of ``rows`` (the exhaustive leg's, bit for bit), probing blocks.

    Args:
        lex: The segment's postings.
        terms: ``[q]`` int64 query term ids; ``weights``: ``[q]`` float64 (BM25: IDF applied).
        rows: ``[r]`` int64 rows of the segment, any order.
        bm25: The BM25 document side, or ``None`` for M3 weights.
        where: The file named if a score is not finite.

    Returns:
        ``[r]`` float32 scores.
    """
    rows = np.asarray(rows, np.int64)
    uniq, inverse = np.unique(rows, return_inverse=True)
    s = np.zeros(len(uniq), np.float32)
    if len(uniq):
        blocks = term_blocks(lex)
        qs, ts = _found(lex, np.asarray(terms, np.int64))
        for q, t in zip(qs.tolist(), ts.tolist(), strict=True):
            p = _probe(lex, blocks, t, float(weights[q]), uniq, bm25)
            _add_sorted(s, uniq, p.rows, p.contrib)
    return check_finite(s[inverse.reshape(-1)], where)


# ---------------------------------------------------------------------------- top n
def top_n(
    lex: LexicalPostings,
    terms: np.ndarray,
    weights: np.ndarray,
    n: int,
    allowed: np.ndarray | None = None,
    *,
    bm25: BM25Doc | None = None,
    where: str = "lex_tdata.npy",
) -> LexicalTop | None:
    """The segment's lexical top ``n`` among ``allowed`` rows with a score > 0, exactly as
    ``top_k(scores, n, (scores > 0) & allowed)`` over the exhaustive scores.

    Args:
        lex: The segment's postings (arrays in RAM, memory-mapped or read on demand).
        terms: ``[q]`` int64 query term ids, ``weights``: ``[q]`` float64 (as the exhaustive
            leg gets them: BM25 weights with the IDF applied).
        n: How many rows.
        allowed: ``[len(lex.length)]`` bool mask of the rows that may be returned, or ``None``.
        bm25: The BM25 document side, or ``None`` for M3 weights.
        where: The file named if a score is not finite.

    Returns:
        The rows, their float32 scores and read counts; ``None`` where pruning is not exact
        (see the module docstring): score exhaustively then.
    """
    weights = np.asarray(weights, np.float64)
    terms = np.asarray(terms, np.int64)
    if n <= 0 or not _usable(lex, weights, bm25):
        return None
    blocks = term_blocks(lex)
    qs, ts = _found(lex, terms)
    safe = blocks.safe if bm25 is not None else blocks.safe0
    if not safe[ts].all() or (bm25 is not None and not (blocks.tlmin[ts] >= 0).all()):
        return None
    m = len(qs)
    gamma = (m + 1) * 2 * _U
    tiny = (m + 1) * _TINY
    ub = _bound(weights[qs], blocks.tmax[ts], blocks.tlmin[ts], bm25)
    if not np.isfinite(ub).all() or float(ub.sum()) * (1 + gamma) >= _F32_MAX:
        return None
    tptr = lex.tptr
    exhaustive = int(sum(int(tptr[t + 1]) - int(tptr[t]) for t in ts.tolist()))
    order = np.argsort(-ub, kind="stable").tolist()  # positions into qs/ts
    rest = np.concatenate([np.cumsum(ub[order][::-1])[::-1], [0.0]])  # rest[j]: order[j:]
    acc = np.zeros(len(lex.length), np.float64)
    theta, read = 0.0, 0
    pool = np.zeros(0, np.int64)  # the (up to) n best allowed rows so far
    ess: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    j = 0
    while j < m:
        if theta > 0 and rest[j] * (1 + gamma) + tiny < theta:
            break
        i = order[j]
        t = int(ts[i])
        a, b = int(tptr[t]), int(tptr[t + 1])
        rows = np.asarray(lex.trows[a:b], np.int64)
        c = _contrib(float(weights[qs[i]]), rows, lex.tdata[a:b], lex, bm25)
        acc[rows] += c
        ess[i] = (rows, c)
        read += b - a
        new = rows if allowed is None else rows[allowed[rows]]
        if len(new) > n:  # the rest of new cannot be better (ties: the same n-th value)
            new = new[np.argpartition(acc[new], len(new) - n)[len(new) - n :]]
        pool = np.union1d(pool, new)
        if len(pool) > n:
            pool = pool[top_k(acc[pool], n)]
            pool.sort()
        theta = max(theta, _nth(acc[pool], n) * (1 - gamma) - tiny)
        j += 1
    ne = order[j:]
    # candidates: rows of the essential terms, allowed, with a positive partial score
    cand = np.flatnonzero(acc > 0)
    if ne and len(cand) * 4 >= len(acc):  # most rows are candidates: probing costs more
        for i in ne:  # than reading the other terms whole
            t = int(ts[i])
            a, b = int(tptr[t]), int(tptr[t + 1])
            rows = np.asarray(lex.trows[a:b], np.int64)
            c = _contrib(float(weights[qs[i]]), rows, lex.tdata[a:b], lex, bm25)
            acc[rows] += c
            ess[i] = (rows, c)
            read += b - a
        ne = []
        cand = np.flatnonzero(acc > 0)
    if allowed is not None:
        cand = cand[allowed[cand]]
    part = acc[cand]
    del acc
    if not ne:
        theta = max(theta, _nth(part, n) * (1 - gamma) - tiny)
    # rest_ne[k]: bound of what terms ne[k:] can still add (sums of non-negative terms: their
    # float64 rounding is far inside the margin)
    rest_ne = np.concatenate([np.cumsum(ub[ne][::-1])[::-1], [0.0]]) if ne else np.zeros(1)
    probes: dict[int, _Probe] = {}
    for k, i in enumerate(ne):
        keep = (part + rest_ne[k]) * (1 + gamma) + tiny >= theta
        cand, part = cand[keep], part[keep]
        if len(cand) == 0:
            break
        t, w = int(ts[i]), float(weights[qs[i]])
        idx = None
        if not _whole(len(cand), int(tptr[t + 1]) - int(tptr[t])):
            # this term's block maximum at each candidate, instead of its maximum
            b0, b1 = int(blocks.bptr[t]), int(blocks.bptr[t + 1])
            idx = np.searchsorted(blocks.first[b0:b1], cand, side="right") - 1
            bb = _bound(w, blocks.vmax[b0:b1], blocks.lmin[b0:b1], bm25)
            here = np.where(idx >= 0, bb[np.maximum(idx, 0)], 0.0)
            keep = (part + here + rest_ne[k + 1]) * (1 + gamma) + tiny >= theta
            cand, part, idx = cand[keep], part[keep], idx[keep]
            if len(cand) == 0:
                break
        p = _probe(lex, blocks, t, w, cand, bm25, idx)
        probes[i] = p
        read += p.read
        part[np.searchsorted(cand, p.rows)] += p.contrib
        theta = max(theta, _nth(part, n) * (1 - gamma) - tiny)
    cand = cand[part * (1 + gamma) + tiny >= theta] if len(probes) == len(ne) else cand[:0]
    # exact float32 scores of the survivors, summed in query order
    s = np.zeros(len(cand), np.float32)
    for i in range(m) if len(cand) else ():
        src = ess[i] if i in ess else (probes[i].rows, probes[i].contrib)
        _add_sorted(s, cand, *src)
    check_finite(s, where)
    top = top_k(s, n, s > 0)
    return LexicalTop(cand[top], s[top], read, exhaustive, len(ess))

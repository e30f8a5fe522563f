"""What one search of the local engine reads: an immutable view of its segments.

The engine (:mod:`m3_rag.backends.local.engine`) publishes a new :class:`View` for every
write; the directory side (:mod:`m3_rag.backends.local.disk`) builds the view an index opens
with. Both import this module; neither imports the other's internals.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from m3_rag.backends.local.segment import LexicalPostings, Segment
from m3_rag.bm25 import BM25Stats
from m3_rag.errors import IndexFormatError

__all__ = ["IdMap", "View", "merge_plan", "rebind", "stats_update", "tier", "tombstone"]

IdMap = dict[str, tuple[Segment, int]]  # live id -> (segment, row)


def stats_update(
    stats: BM25Stats, lex: LexicalPostings, rows: np.ndarray | None, sign: int
) -> BM25Stats:
    """``stats`` with rows ``rows`` of ``lex`` (all when ``None``) added (``sign=1``) or
    removed (``sign=-1``)."""
    if rows is None:
        terms, counts = lex.terms, np.diff(lex.tptr)
        n, length = len(lex.length), float(np.asarray(lex.length, np.float64).sum())
    else:
        sub = lex.rows_csr(rows, 1 << 31)
        terms, counts = np.unique(sub.indices.astype(np.int64), return_counts=True)
        n, length = len(rows), float(np.asarray(lex.length[rows], np.float64).sum())
    return stats.updated(terms, counts, n, length, sign)


@dataclass(frozen=True)
class View:
    """The segments, their tombstones and the BM25 statistics of the live documents.

    Attributes:
        segments: The segments, oldest first.
        dead: Per segment, a ``[len(segment)]`` bool mask of deleted rows, or ``None``.
        count: Live documents.
        stats: BM25 statistics of the live documents (a BM25 index), else ``None``.
    """

    segments: tuple[Segment, ...] = ()
    dead: tuple[np.ndarray | None, ...] = ()
    count: int = 0
    stats: BM25Stats | None = None

    @classmethod
    def empty(cls, bm25: bool) -> View:
        return cls(stats=BM25Stats() if bm25 else None)

    @classmethod
    def of(cls, segments: list[Segment], dead: list[np.ndarray | None], bm25: bool) -> View:
        """The view of stored segments and tombstones (count and statistics computed)."""
        view = cls.empty(bm25)
        for seg, mask in zip(segments, dead, strict=True):
            view = view.with_segment(seg)
            if mask is not None:
                view = view.with_dead(len(view.segments) - 1, np.flatnonzero(mask))
        return view

    @property
    def bases(self) -> np.ndarray:
        """``[s + 1]`` int64 global row of each segment's first row (and the total)."""
        return np.concatenate([[0], np.cumsum([len(s) for s in self.segments])]).astype(np.int64)

    def live_rows(self, i: int) -> np.ndarray:
        d = self.dead[i]
        return np.arange(len(self.segments[i])) if d is None else np.flatnonzero(~d)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (segment index, row in the segment)."""
        bases = self.bases
        seg = np.searchsorted(bases, rows, side="right") - 1
        return seg, rows - bases[seg]

    def with_segment(self, seg: Segment) -> View:
        """This view with ``seg`` appended (all its rows live)."""
        stats = self.stats
        if stats is not None and seg.lexical is not None:
            stats = stats_update(stats, seg.lexical, None, 1)
        return View((*self.segments, seg), (*self.dead, None), self.count + len(seg), stats)

    def with_dead(self, i: int, rows: np.ndarray) -> View:
        """This view with rows ``rows`` (sorted, live) of segment ``i`` deleted."""
        if len(rows) == 0:
            return self
        old = self.dead[i]
        mask = np.zeros(len(self.segments[i]), bool) if old is None else old.copy()
        mask[rows] = True
        dead = list(self.dead)
        dead[i] = mask
        stats = self.stats
        lex = self.segments[i].lexical
        if stats is not None and lex is not None:
            stats = stats_update(stats, lex, rows, -1)
        return replace(self, dead=tuple(dead), count=self.count - len(rows), stats=stats)

    def pruned(self) -> tuple[View, list[Segment]]:
        """This view without its segments whose rows are all dead -> (view, those)."""
        keep = [i for i, d in enumerate(self.dead) if d is None or not bool(d.all())]
        gone = [s for i, s in enumerate(self.segments) if i not in set(keep)]
        segments = tuple(self.segments[i] for i in keep)
        return replace(self, segments=segments, dead=tuple(self.dead[i] for i in keep)), gone

    def id_map(self, where: Any) -> IdMap:
        """Every live id -> (segment, row).

        Raises:
            IndexFormatError: an id live in two segments (``where`` names the index).
        """
        ids: IdMap = {}
        live = 0
        for i, s in enumerate(self.segments):
            if self.dead[i] is None:
                ids.update(zip(s.ids, zip(itertools.repeat(s), range(len(s))), strict=True))
                live += len(s)
            else:
                rows = self.live_rows(i).tolist()
                ids.update((s.ids[r], (s, r)) for r in rows)
                live += len(rows)
        if len(ids) != live:  # an id live twice (each segment's ids are unique)
            seen: set[str] = set()
            for i, s in enumerate(self.segments):
                for r in self.live_rows(i).tolist():
                    if s.ids[r] in seen:
                        raise IndexFormatError(f"{where}: id {s.ids[r]!r} is live in two segments")
                    seen.add(s.ids[r])
        return ids


def tombstone(
    view: View, ids: IdMap, doc_ids: Sequence[str]
) -> tuple[View, dict[Segment, np.ndarray]]:
    """``view`` with the stored rows of ``doc_ids`` (located by ``ids``, those of the view)
    marked dead -> (view, {segment: its rows newly dead})."""
    pos = {id(s): i for i, s in enumerate(view.segments)}
    by_seg: dict[int, list[int]] = {}
    for doc_id in doc_ids:
        loc = ids.get(doc_id)
        if loc is not None:
            by_seg.setdefault(pos[id(loc[0])], []).append(loc[1])
    changed: dict[Segment, np.ndarray] = {}
    for i, rows in by_seg.items():
        r = np.asarray(sorted(rows), dtype=np.int64)
        view = view.with_dead(i, r)
        changed[view.segments[i]] = r
    return view, changed


def rebind(
    ids: IdMap,
    removed: Sequence[Segment],
    changed: Mapping[Segment, np.ndarray],
    added: Sequence[Segment],
) -> None:
    """Update ``ids`` in place after a write: the ids of ``removed`` segments and of the
    rows ``changed`` (newly dead) go, unless they point elsewhere; those of ``added`` point
    there."""
    for s in removed:
        for r, doc_id in enumerate(s.ids):
            if ids.get(doc_id) == (s, r):
                del ids[doc_id]
    for s, rows in changed.items():
        for r in rows.tolist():
            if ids.get(s.ids[r]) == (s, r):
                del ids[s.ids[r]]
    for s in added:
        for r, doc_id in enumerate(s.ids):
            ids[doc_id] = (s, r)


def tier(size: int, factor: int) -> int:
    """Size tier of a segment of ``size`` rows: ``floor(log_factor(size))`` (0 for 0)."""
    t = 0
    while size >= factor:
        size //= factor
        t += 1
    return t


def merge_plan(sizes: list[int], factor: int) -> range | None:
    """The segments to merge next (a range of positions, always at the end), or ``None``.

    Keeps two invariants, whatever the sizes of the adds: tiers never increase from the
    oldest segment to the newest, and no tier holds ``factor`` segments. So ``n`` stored
    rows sit in at most ``(factor - 1) * (floor(log_factor(n)) + 1)`` segments, and a row
    is rewritten O(log n) times. Rules, applied until neither does:

    1. the newest segment is of a higher tier than the one before it: merge it with every
       segment of a lower tier just before it;
    2. the newest ``factor`` segments share a tier: merge them.

    Args:
        sizes: Rows of each segment, oldest first.
        factor: The merge factor (>= 2).
    """
    n = len(sizes)
    tiers = [tier(s, factor) for s in sizes]
    if n >= 2 and tiers[-1] > tiers[-2]:
        a = n - 1
        while a > 0 and tiers[a - 1] < tiers[-1]:
            a -= 1
        return range(a, n)
    if n >= factor and len(set(tiers[-factor:])) == 1:
        return range(n - factor, n)
    return None

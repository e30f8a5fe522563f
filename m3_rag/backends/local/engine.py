"""The local engine: documents in immutable segments, in RAM or memory-mapped from a directory.

Writes (add, delete, merge) build a new immutable :class:`_View` and publish it with one
attribute store; a search takes the view once and never locks, so searches run alongside
each other and alongside writes, and never see a document deleted before they started.

* **Segments.** Each add becomes a new segment; every ``merge_factor`` segments of the same
  size tier merge into one (a log-structured merge), so a corpus of ``n`` documents has
  ``O(merge_factor * log n)`` segments. :meth:`LocalBackend.compact` merges all of them.
* **Tombstones.** A delete or a replacement marks rows dead (a copy of one segment's bool
  mask, O(1) in the index size); merges drop dead rows.
* **On disk** (``LocalBackend(path)``): every write is a commit: the new segment (or a
  segment's tombstone file) and a small manifest are written and fsynced, then ``CURRENT``
  is swapped atomically (see :mod:`m3_rag.backends.local.disk`). A commit writes O(new data).
* **Approximate dense leg.** Segments of at least ``ann_threshold`` rows carry a faiss IVF
  index that proposes the dense candidates; their scores are recomputed exactly.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag._memory import release_free_memory
from m3_rag.backends.legacy.colbert import DTYPES as COLBERT_DTYPES
from m3_rag.backends.legacy.colbert import ColbertStore
from m3_rag.backends.legacy.dense import DenseStore
from m3_rag.backends.legacy.lexical import LexicalStore
from m3_rag.backends.local.segment import ColbertBlock, DocTable, LexicalPostings, Segment
from m3_rag.backends.local.segment_io import SegmentOptions, build_segment
from m3_rag.backends.protocol import Candidates, DocBatch, IndexSpec, check_batch
from m3_rag.backends.validate import check_ids, top_k
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.filters import Filter, filter_mask

__all__ = ["ANN_THRESHOLD", "LocalBackend"]

ANN_THRESHOLD = 20_000  # measured: benchmarks/bench_ann_threshold.py (exact <= 2 ms below it)
_EXACT_FILTERED = 20_000  # a filter leaving fewer rows than this scans them exactly


@dataclass
class _Stats:
    """BM25 corpus statistics over the live documents (immutable once published)."""

    n: int = 0
    total_len: float = 0.0
    terms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    df: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _mean_idf: float | None = None

    def add(self, lex: LexicalPostings, rows: np.ndarray | None, sign: int) -> _Stats:
        """Stats with the given rows (all when ``None``) added (``sign=1``) or removed."""
        if rows is None:
            terms, counts = lex.terms, np.diff(lex.tptr)
            n, length = len(lex.length), float(np.asarray(lex.length, np.float64).sum())
        else:
            sub = lex.rows_csr(rows, 1 << 31)
            terms, counts = np.unique(sub.indices.astype(np.int64), return_counts=True)
            n, length = len(rows), float(np.asarray(lex.length[rows], np.float64).sum())
        union = np.union1d(self.terms, terms) if sign > 0 else self.terms
        df = np.zeros(len(union), np.int64)
        df[np.searchsorted(union, self.terms)] += self.df
        df[np.searchsorted(union, terms)] += sign * counts.astype(np.int64)
        return _Stats(self.n + sign * n, self.total_len + sign * length, union, df)

    def mean_idf(self) -> float:
        if self._mean_idf is None:
            df = self.df[self.df > 0].astype(np.float64)
            idf = np.log(self.n - df + 0.5) - np.log(df + 0.5)
            self._mean_idf = float(idf.mean()) if len(idf) else 0.0
        return self._mean_idf

    def idf(self, terms: np.ndarray, p: BM25Params) -> np.ndarray:
        """rank-bm25 Okapi IDF of the query terms (0 for an absent term)."""
        pos = np.minimum(np.searchsorted(self.terms, terms), max(len(self.terms) - 1, 0))
        df = np.zeros(len(terms), np.float64)
        if len(self.terms):
            hit = self.terms[pos] == terms
            df[hit] = self.df[pos[hit]]
        out = np.zeros(len(terms), np.float64)
        present = df > 0
        out[present] = np.log(self.n - df[present] + 0.5) - np.log(df[present] + 0.5)
        out[present & (out < 0)] = p.epsilon * self.mean_idf()
        return out


@dataclass(frozen=True)
class _View:
    """What one search reads: the segments, their tombstones and the BM25 stats."""

    segments: tuple[Segment, ...] = ()
    dead: tuple[np.ndarray | None, ...] = ()
    count: int = 0
    stats: _Stats | None = None

    @property
    def bases(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(s) for s in self.segments])]).astype(np.int64)

    def live_rows(self, i: int) -> np.ndarray:
        d = self.dead[i]
        return np.arange(len(self.segments[i])) if d is None else np.flatnonzero(~d)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bases = self.bases
        seg = np.searchsorted(bases, rows, side="right") - 1
        return seg, rows - bases[seg]


class LocalBackend:
    """Embedded storage engine for a :class:`~m3_rag.HybridRetriever`.

    Args:
        path: Index directory for a disk-backed index (created when missing; segments are
            memory-mapped and every write commits), or ``None`` for an in-memory index
            (``HybridRetriever.save`` writes it as a snapshot).
        ann_threshold: Segments with at least this many documents get an approximate dense
            index (faiss IVF-SQ8; needs ``m3-rag[ann]``); ``None`` keeps the exact scan.
        ann_nprobe: Inverted lists visited per query (recall vs speed).
        merge_factor: Segments of one size tier merged together.
        verify: ``"auto"`` or ``"full"`` checksum verification when opening (see
            :class:`~m3_rag.backends.local.segment_io.SegmentOptions`).
        allow_model_mismatch: Open a directory built with another model name (same shape).
        io: ``"pread"`` (default) or ``"mmap"``: how large segment arrays are read (see
            :class:`~m3_rag.backends.local.segment_io.SegmentOptions`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        ann_threshold: int | None = ANN_THRESHOLD,
        ann_nprobe: int = 32,
        merge_factor: int = 10,
        verify: str = "auto",
        allow_model_mismatch: bool = False,
        io: str = "pread",
    ) -> None:
        if ann_threshold is not None and (type(ann_threshold) is not int or ann_threshold < 1):
            raise ValueError(f"ann_threshold must be an int >= 1 or None, got {ann_threshold!r}")
        if type(merge_factor) is not int or merge_factor < 2:
            raise ValueError(f"merge_factor must be an int >= 2, got {merge_factor!r}")
        if io not in ("pread", "mmap"):
            raise ValueError(f"io must be 'pread' or 'mmap', got {io!r}")
        if verify not in ("auto", "full"):
            raise ValueError(f"verify must be 'auto' or 'full', got {verify!r}")
        if ann_threshold is not None and importlib.util.find_spec("faiss") is None:
            ann_threshold = None  # exact scan; the README says how to enable ANN
        self.path = None if path is None else Path(path)
        self.ann_threshold, self.ann_nprobe = ann_threshold, int(ann_nprobe)
        self.merge_factor, self.verify = merge_factor, verify
        self.allow_model_mismatch = bool(allow_model_mismatch)
        self.io = io
        self.spec: IndexSpec | None = None
        self.settings: dict[str, Any] = {}
        self._view = _View()
        self._ids: dict[str, tuple[Segment, int]] = {}
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._next = 1
        self._disk: Any = None  # m3_rag.backends.local.disk.DiskState when path is set

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return f"LocalBackend({where}, {len(self)} docs, {len(self._view.segments)} segments)"

    # ---------------------------------------------------------------- setup
    def open(self, spec: IndexSpec, settings: Mapping[str, Any] | None = None) -> LocalBackend:
        """Bind to a retriever's spec (and open or create the directory)."""
        if spec.dense_dtype not in ("float32", "float16"):
            raise ValueError(
                f"dense_dtype must be 'float32' or 'float16', got {spec.dense_dtype!r}"
            )
        if spec.colbert_dtype not in COLBERT_DTYPES:
            raise ValueError(
                f"colbert_dtype must be one of {COLBERT_DTYPES}, got {spec.colbert_dtype!r}"
            )
        if self.path is None and self.spec is not None:  # restored from a snapshot
            mine = self.config()
            self.spec, self.settings = spec, dict(settings or {})
            for key, value in self.config().items():
                if key != "count" and value != mine[key]:
                    raise ValueError(f"this index has {key}={mine[key]!r}, the retriever {value!r}")
            return self
        self.spec, self.settings = spec, dict(settings or {})
        if self.path is not None:
            from m3_rag.backends.local.disk import DiskState

            self._disk = DiskState(self.path)
            self._disk.open_or_create(self)
        else:
            self._view = _View(stats=_Stats() if spec.lexical == "bm25" else None)
        return self

    @property
    def options(self) -> SegmentOptions:
        assert self.spec is not None
        return SegmentOptions(
            dense_dtype=self.spec.dense_dtype,
            colbert_dtype=self.spec.colbert_dtype,
            ann_threshold=self.ann_threshold,
            ann_nprobe=self.ann_nprobe,
            verify=self.verify,
            io=self.io,
        )

    def _need_spec(self) -> IndexSpec:
        if self.spec is None:
            raise RuntimeError("use the backend through HybridRetriever(encoder, backend=...)")
        return self.spec

    def __len__(self) -> int:
        return self._view.count

    def known_empty(self) -> bool:
        return self._view.count == 0

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and doc_id in self._ids

    @property
    def ids(self) -> list[str]:
        """Every live id, in storage order."""
        view = self._view
        return [
            view.segments[i].ids[r]
            for i in range(len(view.segments))
            for r in view.live_rows(i).tolist()
        ]

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._view.segments

    # ---------------------------------------------------------------- writes
    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        dense: np.ndarray,
        lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
        colbert: Sequence[np.ndarray] | None,
    ) -> None:
        """Add (or replace by id) documents as one new segment; validated first, so an
        error changes nothing."""
        spec = self._need_spec()
        ids = check_batch(spec, ids, texts, metadatas, lexical, colbert)
        _, vecs = DenseStore(spec.dense_dim)._prepare(ids, dense)
        lex = None
        if spec.lexical is not None and lexical is not None:
            block = LexicalStore(spec.vocab_size, spec.lexical)._prepare(ids, lexical)[1]
            lex = LexicalPostings.from_csr(block)
        col = None
        if spec.colbert_dim is not None and colbert is not None:
            _, packed, lengths, scales = ColbertStore(
                spec.colbert_dim, spec.colbert_dtype
            )._prepare(ids, colbert)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            col = ColbertBlock(packed.astype(spec.colbert_dtype, copy=False), offsets, scales)
        if not ids:
            return
        seg = Segment(
            "",
            list(ids),
            np.ascontiguousarray(vecs, dtype=spec.dense_dtype),
            lex,
            col,
            DocTable(texts=list(texts), metas=list(metadatas)),
        )
        with self._lock, self._writing():
            name = self._name()
            new = build_segment(
                name,
                [(seg, np.arange(len(seg)))],
                self.options,
                spec.vocab_size,
                self._seg_dir(name),
            )
            view, deleted = self._tombstone(self._view, ids)
            view = self._with_segment(view, new)
            self._publish(view, deleted, added=[new])
            self._maybe_merge()

    def delete(self, ids: Sequence[str]) -> None:
        """Tombstone documents; an unknown id raises ``KeyError`` and nothing is removed."""
        ids = check_ids(ids)
        with self._lock, self._writing():
            missing = [i for i in ids if i not in self._ids]
            if missing:
                raise KeyError(f"unknown ids: {missing[:5]}")
            view, deleted = self._tombstone(self._view, ids)
            self._publish(view, deleted)

    def compact(self) -> None:
        """Merge every segment into one, dropping deleted rows (and build its ANN index)."""
        with self._lock, self._writing():
            self._merge(list(range(len(self._view.segments))))

    def _writing(self) -> Any:
        return contextlib.nullcontext() if self._disk is None else self._disk.writing()

    def _name(self) -> str:
        name = f"seg-{self._next:08d}"
        self._next += 1
        return name

    def _seg_dir(self, name: str) -> Path | None:
        return None if self._disk is None else self._disk.new_segment_dir(name)

    def _tombstone(
        self, view: _View, ids: Sequence[str]
    ) -> tuple[_View, dict[Segment, np.ndarray]]:
        """``view`` with the stored rows of ``ids`` marked dead -> (view, {segment: rows})."""
        pos = {id(s): i for i, s in enumerate(view.segments)}
        by_seg: dict[int, list[int]] = {}
        for doc_id in ids:
            loc = self._ids.get(doc_id)
            if loc is not None:
                by_seg.setdefault(pos[id(loc[0])], []).append(loc[1])
        if not by_seg:
            return view, {}
        dead = list(view.dead)
        stats = view.stats
        changed: dict[Segment, np.ndarray] = {}
        for i, rows in by_seg.items():
            r = np.asarray(sorted(rows), dtype=np.int64)
            old = dead[i]
            mask = np.zeros(len(view.segments[i]), bool) if old is None else old.copy()
            mask[r] = True
            dead[i] = mask
            changed[view.segments[i]] = r
            lex = view.segments[i].lexical
            if stats is not None and lex is not None:
                stats = stats.add(lex, r, -1)
        count = view.count - sum(len(r) for r in changed.values())
        return replace(view, dead=tuple(dead), count=count, stats=stats), changed

    def _with_segment(self, view: _View, seg: Segment) -> _View:
        stats = view.stats
        if stats is not None and seg.lexical is not None:
            stats = stats.add(seg.lexical, None, 1)
        return _View((*view.segments, seg), (*view.dead, None), view.count + len(seg), stats)

    def _publish(
        self,
        view: _View,
        changed: dict[Segment, np.ndarray],
        added: Sequence[Segment] = (),
        removed: Sequence[Segment] = (),
    ) -> None:
        """Commit (on disk), then make ``view`` the one searches read and update the ids.

        Args:
            view: The new view.
            changed: Rows newly tombstoned, by segment.
            added: New segments (their ids now point there).
            removed: Segments merged away.
        """
        keep = [i for i, d in enumerate(view.dead) if d is None or not bool(d.all())]
        gone = [s for i, s in enumerate(view.segments) if i not in set(keep)]
        view = _View(
            tuple(view.segments[i] for i in keep),
            tuple(view.dead[i] for i in keep),
            view.count,
            view.stats,
        )
        if self._disk is not None:
            self._disk.commit(self, view, [s for s in changed if s in view.segments])
        for s in [*removed, *gone]:
            for r, doc_id in enumerate(s.ids):
                if self._ids.get(doc_id) == (s, r):
                    del self._ids[doc_id]
        for s, rows in changed.items():
            for r in rows.tolist():
                if self._ids.get(s.ids[r]) == (s, r):
                    del self._ids[s.ids[r]]
        for s in added:
            for r, doc_id in enumerate(s.ids):
                self._ids[doc_id] = (s, r)
        self._view = view

    # ---------------------------------------------------------------- merging
    def _maybe_merge(self) -> None:
        """Merge the newest ``merge_factor`` segments while they share a size tier."""
        f = self.merge_factor
        while len(self._view.segments) >= f:
            n = len(self._view.segments)
            sizes = [len(self._view.live_rows(i)) for i in range(n - f, n)]
            if len({int(np.log(max(s, 1)) / np.log(f)) for s in sizes}) != 1:
                return
            self._merge(list(range(n - f, n)))

    def _merge(self, which: list[int]) -> None:
        """Merge the contiguous segments ``which`` into one (dropping dead rows)."""
        view = self._view
        if not which or (len(which) == 1 and view.dead[which[0]] is None):
            return
        spec = self._need_spec()
        parts = [(view.segments[i], view.live_rows(i)) for i in which]
        parts = [(s, r) for s, r in parts if len(r)]
        name = self._name()
        merged = (
            build_segment(name, parts, self.options, spec.vocab_size, self._seg_dir(name))
            if parts
            else None
        )
        a, b = which[0], which[-1] + 1
        mid: tuple[Segment, ...] = (merged,) if merged is not None else ()
        new = _View(
            view.segments[:a] + mid + view.segments[b:],
            view.dead[:a] + (None,) * len(mid) + view.dead[b:],
            view.count,
            view.stats,
        )
        self._publish(new, {}, added=list(mid), removed=list(view.segments[a:b]))
        release_free_memory()  # a merge's buffers are large: hand them back

    # ---------------------------------------------------------------- reads
    def _masks(self, view: _View, flt: Filter) -> list[np.ndarray | None]:
        out = []
        for seg, dead in zip(view.segments, view.dead, strict=True):
            m = filter_mask(seg.docs.metadatas(), flt) if flt is not None else None
            if dead is not None:
                m = ~dead if m is None else m & ~dead
            out.append(m)
        return out

    def candidates(
        self,
        dense_query: np.ndarray,
        lexical_query: Mapping[int, float] | None,
        n: int,
        flt: Filter = None,
        *,
        colbert_query: np.ndarray | None = None,
    ) -> Candidates:
        """Union of the dense top-``n`` and the lexical top-``n`` (score > 0) passing ``flt``
        (``colbert_query`` is unused: :meth:`colbert_scores` reads the pinned view)."""
        view = self._view
        spec = self._need_spec()
        use_lex = spec.lexical is not None and lexical_query is not None
        if view.count == 0:
            return Candidates.empty(use_lex)
        q = np.ascontiguousarray(dense_query, dtype=np.float32).reshape(-1)
        if q.shape[0] != spec.dense_dim:
            raise ValueError(f"query has {q.shape[0]} dims, the index {spec.dense_dim}")
        masks = self._masks(view, flt)
        bases = view.bases
        d_rows, d_scores = [], []
        lex_full: list[np.ndarray | None] = []
        l_rows, l_scores = [], []
        lq = self._lexical_query(view, lexical_query) if use_lex else None
        for i, seg in enumerate(view.segments):
            allowed = masks[i]
            if allowed is not None and not allowed.any():
                lex_full.append(None)
                continue
            rows, scores = self._dense_top(seg, q, n, allowed)
            d_rows.append(rows + bases[i])
            d_scores.append(scores)
            if lq is None or seg.lexical is None:
                lex_full.append(None)
                continue
            s = self._lexical_scores(seg, lq, view)
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
            dense[at] = view.segments[i].dense_scores(q, local[at])
            full = lex_full[i]
            if lexical is not None and full is not None:
                lexical[at] = full[local[at]]
        return Candidates(
            ids=[
                view.segments[s].ids[r]
                for s, r in zip(seg_of.tolist(), local.tolist(), strict=True)
            ],
            dense=dense,
            lexical=lexical,
            rows=rows,
            payload=view,
        )

    def _dense_top(
        self, seg: Segment, q: np.ndarray, n: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense top-``n`` rows of one segment with their exact scores."""
        if seg.ann is not None:
            n_allowed = len(seg) if allowed is None else int(allowed.sum())
            if n_allowed >= _EXACT_FILTERED:
                rows = np.sort(seg.ann.search(q, 2 * n, allowed))
                scores = seg.dense_scores(q, rows)
                top = top_k(scores, n)
                return rows[top], scores[top]
            if allowed is not None:
                rows = np.flatnonzero(allowed)
                scores = seg.dense_scores(q, rows)
                top = top_k(scores, n)
                return rows[top], scores[top]
        scores = seg.dense_scores(q)
        rows = top_k(scores, n, allowed)
        return rows, scores[rows]

    def _lexical_query(
        self, view: _View, query: Mapping[int, float] | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        spec = self._need_spec()
        if not query:
            return None
        terms = np.fromiter((t for t in query if 0 <= t < spec.vocab_size), dtype=np.int64)
        if len(terms) == 0:
            return None
        weights = np.fromiter((query[int(t)] for t in terms), np.float64, count=len(terms))
        if spec.lexical == "bm25" and view.stats is not None:
            weights = weights * view.stats.idf(terms, spec.bm25 or BM25Params())
        return terms, weights

    def _lexical_scores(
        self, seg: Segment, lq: tuple[np.ndarray, np.ndarray], view: _View
    ) -> np.ndarray:
        """``[len(seg)]`` lexical scores of one segment (dead rows included, masked later).

        Term at a time: each query term's postings are read (one range) and added into a
        float32 accumulator; a term's rows are unique, so a plain scatter-add is exact."""
        assert seg.lexical is not None
        spec = self._need_spec()
        out = np.zeros(len(seg), np.float32)
        bm25 = spec.lexical == "bm25" and view.stats is not None
        avgdl = 1.0
        if bm25 and view.stats is not None:
            avgdl = view.stats.total_len / max(view.stats.n, 1) or 1.0
        for q, rows, values in seg.lexical.term_postings(lq[0]):
            w = lq[1][q]
            if bm25:
                length = np.asarray(seg.lexical.length[rows], np.float64)
                contrib = w * bm25_tf(values, length, avgdl, spec.bm25 or BM25Params())
                out[rows] += contrib.astype(np.float32)
            else:
                out[rows] += np.float32(w) * values
        return out

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        view: _View = cands.payload
        out = np.zeros(len(cands.ids), np.float32)
        seg_of, local = view.locate(cands.rows)
        for i in np.unique(seg_of).tolist():
            col = view.segments[i].colbert
            if col is None:
                raise ValueError("this index has no ColBERT vectors")
            at = np.flatnonzero(seg_of == i)
            out[at] = col.scores(query, local[at])
        return out

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        view: _View = cands.payload
        seg_of, local = view.locate(cands.rows[order])
        return [
            _doc(view.segments[s], r) for s, r in zip(seg_of.tolist(), local.tolist(), strict=True)
        ]

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for doc_id in ids:
            loc = self._ids.get(doc_id)
            if loc is not None:
                out.append(_doc(*loc))
        return out

    def select(self, flt: Filter) -> list[str]:
        view = self._view
        out: list[str] = []
        for i, m in enumerate(self._masks(view, flt)):
            seg = view.segments[i]
            out.extend(seg.ids if m is None else [seg.ids[r] for r in np.flatnonzero(m)])
        return out

    # ---------------------------------------------------------------- copying out
    def export(self, batch_size: int = 1000) -> Iterator[DocBatch]:
        """Every live document with its stored encodings, ``batch_size`` at a time."""
        view = self._view
        spec = self._need_spec()
        for i, seg in enumerate(view.segments):
            live = view.live_rows(i)
            for s in range(0, len(live), batch_size):
                rows = live[s : s + batch_size]
                colbert = None
                if seg.colbert is not None:
                    packed, offsets, scales = seg.colbert.gather(rows)
                    vecs = packed.astype(np.float32)
                    if scales is not None:
                        vecs *= scales[:, None]
                    colbert = [vecs[a:b] for a, b in itertools.pairwise(offsets.tolist())]
                yield DocBatch(
                    ids=[seg.ids[r] for r in rows.tolist()],
                    texts=[seg.docs.text(r) for r in rows.tolist()],
                    metadatas=[copy.deepcopy(seg.docs.metadata(r)) for r in rows.tolist()],
                    dense=np.asarray(seg.dense[rows], dtype=np.float32),
                    lexical=None
                    if seg.lexical is None
                    else seg.lexical.rows_csr(rows, spec.vocab_size),
                    colbert=colbert,
                )

    def docs(self) -> Iterator[dict[str, Any]]:
        view = self._view
        for i, seg in enumerate(view.segments):
            for r in view.live_rows(i).tolist():
                yield {"id": seg.ids[r], "text": seg.docs.text(r), "metadata": seg.docs.metadata(r)}

    def config(self) -> dict[str, Any]:
        spec = self._need_spec()
        return {
            "count": len(self),
            "dense_dim": spec.dense_dim,
            "dense_dtype": spec.dense_dtype,
            "colbert_dim": spec.colbert_dim,
            "colbert_dtype": spec.colbert_dtype if spec.colbert_dim else None,
            "lexical": spec.lexical,
            "vocab_size": spec.vocab_size if spec.lexical else None,
            "bm25": (spec.bm25 or BM25Params()).as_dict() if spec.lexical else None,
        }

    def save(self, path: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
        """Write the live documents as one snapshot (format 2) to ``path``, atomically."""
        from m3_rag.backends.local.snapshot import snapshot
        from m3_rag.persist import write_index

        if self.path is not None and Path(path).resolve() == self.path.resolve():
            return  # every write is already committed there
        spec = self._need_spec()
        config, arrays = snapshot(self)
        manifest = {"model": spec.model, "backend": "memory", **config, "retriever": dict(settings)}
        write_index(path, manifest, arrays, self.docs())

    def close(self) -> None:
        """Release the segments (an in-process index stays usable until then)."""
        self._view = _View(stats=self._view.stats)
        self._ids = {}


def _doc(seg: Segment, row: int) -> tuple[str, str, dict[str, Any]]:
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

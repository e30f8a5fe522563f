"""The local engine: documents in immutable segments, in RAM or memory-mapped from a directory.

Writes (add, delete, merge) build a new immutable view
(:class:`~m3_rag.backends.local.view.View`) and publish it with one attribute store; a
search takes the view once and never locks, so searches run alongside each other and
alongside writes, and never see a document deleted before they started.

* **Segments.** Each add becomes a new segment; ``merge_factor`` segments of the same size
  tier merge into one (a log-structured merge, :func:`~m3_rag.backends.local.view.merge_plan`),
  so ``n`` documents sit in ``O(merge_factor * log n)`` segments whatever the sizes of the
  adds. :meth:`LocalBackend.compact` merges all of them.
* **Tombstones.** A delete or a replacement marks rows dead (a copy of one segment's bool
  mask, O(1) in the index size); merges drop dead rows.
* **On disk** (``LocalBackend(path)``): every write is a commit: the new segment (or a
  segment's tombstone file) and a small manifest are written and fsynced, then ``CURRENT``
  is swapped atomically (see :mod:`m3_rag.backends.local.manifest`). A commit writes O(new
  data).
* **Approximate dense leg.** Segments of at least ``ann_threshold`` rows carry a faiss IVF
  index that proposes the dense candidates; their scores are recomputed exactly.
* **Other handles' commits.** A read (search, ``len``, ``fetch``...) of a disk-backed
  index first reads ``CURRENT``; when another handle or process committed since, it opens
  that commit (only its new segments and tombstones) and reads it (``refresh=False``: the
  handle keeps the commit it opened). Writes never do: a write after another handle's
  commit that this handle has not read raises :class:`~m3_rag.errors.WriteConflictError`.

(Over 450 lines: the engine's setup, its whole write path under one lock and the refresh
of its view stay together; the reads are in :mod:`~m3_rag.backends.local.search`, the
commits in :mod:`~m3_rag.backends.local.disk`.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag._memory import release_free_memory
from m3_rag.backends.local import search
from m3_rag.backends.local.build import batch_segment, build_segment
from m3_rag.backends.local.disk import DiskState, Stored
from m3_rag.backends.local.save import save_view
from m3_rag.backends.local.segment import Segment
from m3_rag.backends.local.segment_io import SegmentOptions
from m3_rag.backends.local.view import IdMap, View, merge_plan, rebind, tombstone
from m3_rag.backends.protocol import Candidates, DocBatch, IndexSpec
from m3_rag.backends.validate import PreparedBatch, check_ids, prepare_batch
from m3_rag.codecs import get_codec
from m3_rag.errors import MergeWarning
from m3_rag.filters import Filter
from m3_rag.persist import reader_lock, remove

__all__ = ["ANN_THRESHOLD", "LocalBackend", "MergeWarning"]

ANN_THRESHOLD = 20_000  # measured: benchmarks/bench_ann_threshold.py (exact <= 2 ms below it)


class LocalBackend:
    """Embedded storage engine for a :class:`~m3_rag.HybridRetriever`.

    Args:
        path: Index directory for a disk-backed index (created when missing; segments are
            read from disk and every write commits), or ``None`` for an in-memory index
            (:meth:`save` writes it to a directory).
        ann_threshold: Segments with at least this many documents get an approximate dense
            index (faiss IVF-SQ8; needs ``m3-rag[ann]``); ``None`` keeps the exact scan.
        ann_nprobe: Inverted lists visited per query (recall vs speed), an int >= 1.
        merge_factor: Segments of one size tier merged together.
        verify: ``"auto"`` or ``"full"`` checksum verification when opening (see
            :class:`~m3_rag.backends.local.segment_io.SegmentOptions`).
        io: ``"pread"`` (default) or ``"mmap"``: how large segment arrays are read (see
            :class:`~m3_rag.backends.local.segment_io.SegmentOptions`).
        refresh: Reads (a search, ``len``, ``fetch``, ``select``, ``export``) of a
            disk-backed index first read ``CURRENT`` and, when another handle or process
            committed since this one last read or wrote, read that commit (its new
            segments are opened, the others kept). ``False``: the handle keeps the commit
            it opened, and its own writes, until it is opened again. Either way a write
            after another handle's commit that this handle has not read raises
            :class:`~m3_rag.errors.WriteConflictError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        ann_threshold: int | None = ANN_THRESHOLD,
        ann_nprobe: int = 32,
        merge_factor: int = 10,
        verify: str = "auto",
        io: str = "pread",
        refresh: bool = True,
    ) -> None:
        if ann_threshold is not None and (type(ann_threshold) is not int or ann_threshold < 1):
            raise ValueError(f"ann_threshold must be an int >= 1 or None, got {ann_threshold!r}")
        if type(ann_nprobe) is not int or ann_nprobe < 1:
            raise ValueError(f"ann_nprobe must be an int >= 1, got {ann_nprobe!r}")
        if type(merge_factor) is not int or merge_factor < 2:
            raise ValueError(f"merge_factor must be an int >= 2, got {merge_factor!r}")
        if io not in ("pread", "mmap"):
            raise ValueError(f"io must be 'pread' or 'mmap', got {io!r}")
        if verify not in ("auto", "full"):
            raise ValueError(f"verify must be 'auto' or 'full', got {verify!r}")
        if type(refresh) is not bool:
            raise TypeError(f"refresh must be a bool, got {type(refresh).__name__}")
        if ann_threshold is not None and importlib.util.find_spec("faiss") is None:
            ann_threshold = None  # exact scan; the README says how to enable ANN
        self.path = None if path is None else Path(path)
        self.ann_threshold, self.ann_nprobe = ann_threshold, ann_nprobe
        self.merge_factor, self.verify = merge_factor, verify
        self.io, self.refresh = io, refresh
        self.spec: IndexSpec | None = None
        self.settings: dict[str, Any] = {}
        self._view = View()
        self._ids: IdMap = {}
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._next = 1
        self._allow_mismatch = False
        self._closed = False
        self._disk: DiskState | None = None  # the directory side when path is set
        self._stored: Stored | None = None  # read by read_stored(), bound by the next open()

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        view = self._view  # (no refresh: a repr never reads the directory)
        return f"LocalBackend({where}, {view.count} docs, {len(view.segments)} segments)"

    # ---------------------------------------------------------------- setup
    def open(
        self,
        spec: IndexSpec,
        settings: Mapping[str, Any] | None = None,
        *,
        allow_model_mismatch: bool = False,
    ) -> LocalBackend:
        """Bind to a retriever's spec: create the index, or check the stored one.

        Args:
            spec: What the index must hold.
            settings: The retriever's settings (recorded with every commit and save).
            allow_model_mismatch: Accept an index built under another model name (every
                shape must still match).

        Returns:
            This backend.

        Raises:
            TypeError: ``spec`` is not an IndexSpec, ``allow_model_mismatch`` not a bool.
            IndexMismatchError: the stored index was built for another spec.
            IndexFormatError: the directory holds an unreadable or older-format index.
            ValueError: ``path`` is a file, a symlink or an unrelated non-empty directory.
        """
        if not isinstance(spec, IndexSpec):
            raise TypeError(f"spec must be an IndexSpec, got {type(spec).__name__}")
        if type(allow_model_mismatch) is not bool:
            raise TypeError(
                f"allow_model_mismatch must be a bool, got {type(allow_model_mismatch).__name__}"
            )
        kept = dict(settings or {})
        self._allow_mismatch = allow_model_mismatch
        stored, self._stored = self._stored, None
        if stored is not None:  # read by read_stored(): check it, do not read it again
            spec.check_stored(
                stored.record, str(self.path), allow_model_mismatch=allow_model_mismatch
            )
            with self._lock:
                self.spec, self.settings = spec, kept
            return self
        if self.path is None:
            with self._lock:
                if self.spec is not None:  # already holds documents (a converted snapshot)
                    spec.check_stored(
                        self.spec.to_json(),
                        "this in-memory index",
                        allow_model_mismatch=allow_model_mismatch,
                    )
                else:
                    self._view = View.empty(spec.lexical == "bm25")
                self.spec, self.settings = spec, kept
            return self
        disk = DiskState(self.path, self._options_for())
        self._take(disk, disk.open(spec, kept, allow_model_mismatch))
        with self._lock:
            self.spec, self.settings = spec, kept
        return self

    def read_stored(self) -> tuple[IndexSpec, dict[str, Any]]:
        """Open the directory's current commit as it is stored, without a spec.

        The next :meth:`open` checks its spec against the stored one and binds to this
        commit without reading the directory again (what ``open_saved`` needs: the
        settings it returns are those of the documents the backend then serves, until a
        read of it takes a later commit; ``refresh=False`` keeps this one).

        Returns:
            ``(stored spec, stored retriever settings)``.

        Raises:
            RuntimeError: an in-memory backend.
            FileNotFoundError: no index in the directory.
            IndexFormatError: an unreadable, tampered or older-format index.
        """
        if self.path is None:
            raise RuntimeError("read_stored() reads a directory: LocalBackend(path)")
        disk = DiskState(self.path, self._options_for())
        stored = disk.load()
        self._take(disk, stored)
        self._stored = stored
        return stored.spec, stored.settings

    def _take(self, disk: DiskState, stored: Stored) -> None:
        with self._lock:
            self._disk, self._view, self._next = disk, stored.view, stored.next_segment
            self._ids = stored.ids

    def _fresh(self) -> View:
        """The view a read uses: the latest commit's when another handle (or process)
        committed since this one last read or wrote (one read of ``CURRENT``; only the new
        segments are opened). A read that starts while this handle is writing or already
        refreshing uses the view it has.

        Raises:
            IndexMismatchError: the directory now holds an index of another spec.
            IndexFormatError: the new commit is unreadable.
        """
        disk, spec = self._disk, self.spec
        if disk is None or spec is None or not self.refresh or self._closed:
            return self._view
        if disk.changed() and self._lock.acquire(blocking=False):
            try:
                if disk.changed():  # (not read by another thread meanwhile)
                    stored = disk.load(spec, self._allow_mismatch, self._view.segments)
                    self._ids, self._view, self._next = stored.ids, stored.view, stored.next_segment
            finally:
                self._lock.release()
        return self._view

    def adopt(
        self, spec: IndexSpec, settings: Mapping[str, Any], segments: Sequence[Segment]
    ) -> LocalBackend:
        """Make this new in-memory backend hold ``segments`` (built for ``spec`` with
        :meth:`segment_options`, ids unique), opened with ``spec``: how a converted snapshot
        becomes an index.

        Raises:
            RuntimeError: the backend has a directory or was opened already.
            IndexFormatError: an id in two segments.
        """
        if self.path is not None or self.spec is not None:
            raise RuntimeError("adopt() fills a new in-memory LocalBackend()")
        view = View.of(list(segments), [None] * len(segments), spec.lexical == "bm25")
        ids = view.id_map("the converted index")
        self.open(spec, settings)
        with self._lock:
            self._view, self._ids = view, ids
            self._next = max((int(s.name[4:]) for s in segments), default=0) + 1
        return self

    @property
    def options(self) -> SegmentOptions:
        return self.segment_options(self._need_spec())

    def segment_options(self, spec: IndexSpec) -> SegmentOptions:
        """How this backend builds and opens the segments of an index of ``spec``."""
        return SegmentOptions(
            dense_dtype=spec.dense_dtype,
            colbert_dtype=spec.colbert_dtype,
            ann_threshold=self.ann_threshold,
            ann_nprobe=self.ann_nprobe,
            verify=self.verify,
            io=self.io,
        )

    def _options_for(self) -> Callable[[IndexSpec], SegmentOptions]:
        """:meth:`segment_options` for the :class:`DiskState` this backend owns, without a
        reference back to the backend: a cycle would keep a dropped index (its ANN indexes,
        ~1 GB at 1M rows) in RAM until the garbage collector ran."""
        ref = weakref.ref(self)

        def options_for(spec: IndexSpec) -> SegmentOptions:
            backend = ref()
            if backend is None:
                raise RuntimeError("the LocalBackend of this index was dropped")
            return backend.segment_options(spec)

        return options_for

    def _need_spec(self) -> IndexSpec:
        if self.spec is None:
            raise RuntimeError("use the backend through HybridRetriever(encoder, backend=...)")
        return self.spec

    def __len__(self) -> int:
        return self._fresh().count

    def known_empty(self) -> bool:
        return self._fresh().count == 0

    def __contains__(self, doc_id: object) -> bool:
        self._fresh()
        return isinstance(doc_id, str) and doc_id in self._ids

    @property
    def ids(self) -> list[str]:
        """Every live id, in storage order."""
        view = self._fresh()
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
        """Add (or replace by id) documents as one new segment; validated first
        (:func:`~m3_rag.backends.validate.prepare_batch`).

        An error means nothing was committed. The merges the add then starts are not part
        of it: one that fails (e.g. a full disk) is reported as a :class:`MergeWarning`,
        the add stands, and the merge is tried again by the next write or :meth:`compact`.

        Raises:
            TypeError / ValueError: bad input (nothing is added).
            WriteConflictError: another handle committed since this one last read the index.
            OSError: the new segment or the commit could not be written (nothing is added).
        """
        spec = self._need_spec()
        self.add_prepared(prepare_batch(spec, ids, texts, metadatas, dense, lexical, colbert))

    def add_prepared(self, batch: PreparedBatch) -> None:
        """Add (or replace by id) a batch that :func:`~m3_rag.backends.validate.prepare_batch`
        checked for this backend's spec, as one new segment (as :meth:`add`).

        Raises:
            ValueError: the batch was prepared for other shapes or dtypes.
        """
        spec = self._need_spec()
        if batch.dense.ndim != 2 or (batch.dense.shape[1], str(batch.dense.dtype)) != (
            spec.dense_dim,
            spec.dense_dtype,
        ):
            raise ValueError("the batch was prepared for another index specification")
        codec = get_codec(spec.colbert_dtype)
        if batch.colbert is not None and batch.colbert.dtype != codec.dtype:
            raise ValueError("the batch's ColBERT codes were prepared for another codec")
        if not batch.ids:
            return
        seg = batch_segment(batch, spec.colbert_dtype)
        ids = seg.ids
        with self._lock, self._writing():
            new = self._build([(seg, np.arange(len(seg)))])
            view, deleted = tombstone(self._view, self._ids, ids)
            view = view.with_segment(new)
            self._publish(view, deleted, added=[new])
            self._merge_after_commit()

    def delete(self, ids: Sequence[str]) -> None:
        """Tombstone documents; an unknown id raises ``KeyError`` and nothing is removed.

        An error means nothing was committed; a merge left over from an earlier write runs
        after the commit, as after :meth:`add`.
        """
        ids = check_ids(ids)
        with self._lock, self._writing():
            missing = [i for i in ids if i not in self._ids]
            if missing:
                raise KeyError(f"unknown ids: {missing[:5]}")
            view, deleted = tombstone(self._view, self._ids, ids)
            self._publish(view, deleted)
            self._merge_after_commit()

    def compact(self) -> None:
        """Merge every segment into one, dropping deleted rows (and build its ANN index);
        an error (e.g. a full disk) leaves the index as it was."""
        with self._lock, self._writing():
            self._merge(list(range(len(self._view.segments))))

    def _writing(self) -> Any:
        if self._closed:
            raise RuntimeError("this LocalBackend was closed: open the index again to write")
        return contextlib.nullcontext() if self._disk is None else self._disk.writing()

    def _name(self) -> str:
        name = f"seg-{self._next:08d}"
        self._next += 1
        return name

    def _build(self, parts: list[tuple[Segment, np.ndarray]]) -> Segment:
        """A new segment of ``parts`` (in RAM, or written to its directory); a failure
        (e.g. a full disk) removes what it wrote."""
        name = self._name()
        d = None if self._disk is None else self._disk.new_segment_dir(name)
        try:
            return build_segment(name, parts, self.options, self._need_spec().vocab_size, d)
        except BaseException:
            if d is not None:
                remove(d)  # never committed: free its space now
            raise

    def _publish(
        self,
        view: View,
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
        view, gone = view.pruned()
        if self._disk is not None:
            changed_kept = [s for s in changed if s in view.segments]
            spec = self._need_spec()
            self._disk.commit(view, changed_kept, spec, self.settings, self._next)
        rebind(self._ids, [*removed, *gone], changed, added)
        self._view = view

    # ---------------------------------------------------------------- merging
    def _merge_after_commit(self) -> None:
        """Run the merges the policy asks for after a committed write: a failure does not
        fail the write (see :class:`MergeWarning`)."""
        try:
            self._maybe_merge()
        except Exception as e:
            where = "this in-memory index" if self.path is None else str(self.path)
            warnings.warn(
                MergeWarning(
                    f"a merge of {where} failed after the write was committed "
                    f"({type(e).__name__}: {e}); the write stands, and the merge is tried "
                    "again by the next write or compact()"
                ),
                stacklevel=3,
            )

    def _maybe_merge(self) -> None:
        """Merge while the merge policy asks for it (:func:`~.view.merge_plan`: at most
        ``(merge_factor - 1)`` segments per size tier, whatever the batch sizes)."""
        f = self.merge_factor
        while (plan := merge_plan([len(s) for s in self._view.segments], f)) is not None:
            self._merge(list(plan))

    def _merge(self, which: list[int]) -> None:
        """Merge the contiguous segments ``which`` into one (dropping dead rows)."""
        view = self._view
        if not which or (len(which) == 1 and view.dead[which[0]] is None):
            return
        parts = [(view.segments[i], view.live_rows(i)) for i in which]
        parts = [(s, r) for s, r in parts if len(r)]
        merged = self._build(parts) if parts else None
        a, b = which[0], which[-1] + 1
        mid: tuple[Segment, ...] = (merged,) if merged is not None else ()
        new = View(
            view.segments[:a] + mid + view.segments[b:],
            view.dead[:a] + (None,) * len(mid) + view.dead[b:],
            view.count,
            view.stats,
        )
        self._publish(new, {}, added=list(mid), removed=list(view.segments[a:b]))
        release_free_memory()  # a merge's buffers are large: hand them back

    # ---------------------------------------------------------------- reads
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
        spec = self._need_spec()
        return search.candidates(self._fresh(), spec, dense_query, lexical_query, n, flt)

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        return search.colbert_scores(query, cands)

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        return search.documents(cands, order)

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        self._fresh()
        out = []
        known = self._ids
        for doc_id in ids:
            loc = known.get(doc_id)
            if loc is not None:
                out.append(search.doc(*loc))
        return out

    def select(self, flt: Filter) -> list[str]:
        view = self._fresh()
        out: list[str] = []
        for i, m in enumerate(search.masks(view, flt)):
            seg = view.segments[i]
            out.extend(seg.ids if m is None else [seg.ids[r] for r in np.flatnonzero(m)])
        return out

    # ---------------------------------------------------------------- copying out
    def export(self, batch_size: int = 1000) -> Iterator[DocBatch]:
        """Every live document with its stored encodings, ``batch_size`` at a time."""
        spec = self._need_spec()
        return search.export(self._fresh(), spec, batch_size)

    def save(self, path: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
        """Write the live documents and ``settings`` as a new index (format 3) at ``path``.

        Streaming and atomic: a disk-backed index copies its segment files (checksums
        verified as they stream), an in-memory one writes each segment with the streaming
        segment builder; ``path`` holds no index (or its previous one) until the new
        ``CURRENT`` is written. Saving a disk-backed index to its own directory does
        nothing (every write is committed there already).

        Raises:
            ValueError: ``path`` is a file, a symlink or an unrelated non-empty directory.
            IndexFormatError: a segment file changed on disk since it was opened.
        """
        spec = self._need_spec()
        target = Path(path)
        if self.path is None or self._disk is None:
            save_view(target, self._view, spec, settings, self.options)
            return
        if target.resolve() == self.path.resolve():
            return
        self._fresh()
        with reader_lock(self.path):  # no commit removes our segments while they are copied
            with self._lock:
                view, entries = self._view, dict(self._disk.entries)
            save_view(target, view, spec, settings, self.options, (self.path, entries))

    def close(self) -> None:
        """Release the segments (an in-process index stays usable until then); later writes
        raise ``RuntimeError``."""
        self._closed = True
        self._view = View(stats=self._view.stats)
        self._ids = {}

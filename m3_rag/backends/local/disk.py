"""The directory side of a disk-backed :class:`~m3_rag.backends.LocalBackend`: opening
an index, committing writes, and reading other handles' commits (index format 3, laid out
as :mod:`m3_rag.backends.local.manifest` describes).

A write holds the writer lock from before it builds its segment until ``CURRENT`` names the
new manifest, and first checks that no other process committed since this one read the
index. A commit writes only the new segment or tombstone file and the manifest (O(new
data)); a crash at any point leaves ``CURRENT`` naming the last complete commit, and what a
killed writer left behind is removed by the next writer (or when no reader is active).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from m3_rag.backends.local.manifest import (
    MANIFEST,
    VERSION,
    current_pointer,
    manifest_record,
    new_manifest,
    pointer_bytes,
    read_commit,
    read_manifest,
    refuse_other_format,
    sweep,
    write_commit,
)
from m3_rag.backends.local.segment import Segment
from m3_rag.backends.local.segment_io import (
    SEGMENT,
    SegmentOptions,
    deletes_of,
    open_segment,
    verify_file,
)
from m3_rag.backends.local.view import IdMap, View
from m3_rag.errors import IndexFormatError, WriteConflictError
from m3_rag.persist import (
    check_target,
    fsync_dir,
    read_bytes,
    read_json,
    reader_lock,
    remove,
    write_file,
    writer_lock,
)
from m3_rag.spec import IndexSpec

__all__ = [  # (the commit functions are re-exported for earlier importers)
    "MANIFEST",
    "VERSION",
    "DiskState",
    "Stored",
    "current_pointer",
    "manifest_record",
    "read_manifest",
    "refuse_other_format",
    "sweep",
    "write_commit",
]


class Stored(NamedTuple):
    """What an index directory holds when it is opened (the engine takes it over).

    Attributes:
        view: Its segments, tombstones and statistics.
        next_segment: The number of the next segment to write.
        record: The index specification as stored (for ``IndexSpec.check_stored``).
        spec: That specification, read.
        settings: The retriever's settings stored with it.
        ids: Every live id -> (segment, row).
    """

    view: View
    next_segment: int
    record: Mapping[str, Any]
    spec: IndexSpec
    settings: dict[str, Any]
    ids: IdMap


class DiskState:
    """The directory side of a disk-backed LocalBackend: opening, commits, clean-up.

    Args:
        root: The index directory.
        options_for: How segments of an index of a given spec are opened.
    """

    def __init__(self, root: Path, options_for: Callable[[IndexSpec], SegmentOptions]) -> None:
        self.root = root
        self.options_for = options_for
        self.options: SegmentOptions | None = None
        self.generation = 0
        self.entries: dict[str, dict[str, Any]] = {}  # segment name -> manifest entry
        self.pointer: bytes | None = None  # CURRENT as this handle last read or wrote it

    # ------------------------------------------------------------ open
    def open(
        self,
        spec: IndexSpec,
        settings: Mapping[str, Any],
        allow_model_mismatch: bool = False,
    ) -> Stored:
        """Open the index (creating an empty one when the directory has none).

        Raises:
            ValueError: a place an index must not be written to (see
                :func:`~m3_rag.persist.check_target`).
            IndexMismatchError: the index was built for another spec.
            IndexFormatError: an unreadable, tampered or older-format index.
        """
        check_target(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if current_pointer(self.root) is None:
            with writer_lock(self.root):
                if current_pointer(self.root) is None:
                    check_target(self.root)
                    empty = View.empty(spec.lexical == "bm25")
                    self.commit(empty, [], spec, settings, 1)
                    return Stored(empty, 1, spec.to_json(), spec, dict(settings), {})
        return self.load(spec, allow_model_mismatch)

    def load(
        self,
        spec: IndexSpec | None = None,
        allow_model_mismatch: bool = False,
        reuse: Sequence[Segment] = (),
    ) -> Stored:
        """Open the current commit, holding the reader lock from ``CURRENT`` to the last
        segment file (a concurrent commit cannot remove what is being opened).

        Args:
            spec: Refuse (before opening any segment) an index stored for another spec;
                ``None``: open it as stored.
            allow_model_mismatch: See :meth:`~m3_rag.spec.IndexSpec.check_stored`.
            reuse: Segments this state opened before: one the commit still names (same
                name and ``segment.json`` hash) is taken as it is, not opened again (a
                segment never changes; open files stay readable after a sweep).

        Raises:
            FileNotFoundError: no index in the directory.
            IndexMismatchError: the index was built for another ``spec``.
            IndexFormatError: an unreadable, tampered or older-format index.
        """
        known = {(s.name, self.entries.get(s.name, {}).get("meta_sha256")): s for s in reuse}
        with reader_lock(self.root):
            return self._load(spec, allow_model_mismatch, known)

    def changed(self) -> bool:
        """Whether another handle committed since this one last read or wrote the index
        (one read of ``CURRENT``; ``False`` when it cannot be read, e.g. a removed
        directory: the open segments stay readable)."""
        now = pointer_bytes(self.root)
        return now is not None and now != self.pointer

    def _load(
        self,
        spec: IndexSpec | None,
        allow_model_mismatch: bool,
        known: Mapping[tuple[str, Any], Segment],
    ) -> Stored:
        raw, m = read_commit(self.root)
        record = m.get("spec", m)
        stored, settings = manifest_record(m, self.root)
        if spec is not None:
            spec.check_stored(record, str(self.root), allow_model_mismatch=allow_model_mismatch)
        self.options = self.options_for(spec or stored)
        entries = m.get("segments")
        if not isinstance(entries, list):
            raise IndexFormatError(f"{self.root}: manifest has no segment list")
        segs: list[Segment] = []
        dead: list[np.ndarray | None] = []
        for e in entries:
            seg, mask = self._open_entry(e, known)
            segs.append(seg)
            dead.append(mask)
        view = View.of(segs, dead, stored.lexical == "bm25")
        ids = view.id_map(self.root)  # refuses an id live twice
        nxt = m.get("next_segment")
        if type(nxt) is not int or nxt < 1:
            raise IndexFormatError(f"{self.root}: manifest has a bad next_segment")
        self.generation = int(m["generation"])
        self.entries = {e["name"]: e for e in entries}
        self.pointer = raw
        return Stored(view, nxt, record, stored, settings, ids)

    def _open_entry(
        self, e: Any, known: Mapping[tuple[str, Any], Segment]
    ) -> tuple[Segment, np.ndarray | None]:
        name = e.get("name") if isinstance(e, dict) else None
        if not isinstance(name, str) or not SEGMENT.match(name):
            raise IndexFormatError(f"{self.root}: manifest names a bad segment {name!r}")
        d = self.root / name
        seg = known.get((name, e.get("meta_sha256")))
        if seg is None:
            if d.is_symlink() or not d.is_dir():
                raise IndexFormatError(f"{d} is missing or not a directory (symlinks are refused)")
            body = read_bytes(d / "segment.json", 1 << 20)
            if hashlib.sha256(body).hexdigest() != e.get("meta_sha256"):
                raise IndexFormatError(f"{d}/segment.json does not match its checksum")
            assert self.options is not None
            seg = open_segment(self.root, name, read_json(body, d), self.options)
        if e.get("deleted") is None:
            return seg, None
        fmeta = {"sha256": e.get("deleted_sha256"), "bytes": e.get("deleted_bytes")}
        verify_file(d / str(e["deleted"]), fmeta, "full")
        mask = np.zeros(len(seg), bool)
        mask[deletes_of(d, str(e["deleted"]), len(seg))] = True
        return seg, mask

    # ------------------------------------------------------------ write
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock; refuse when another writer committed since we read.

        Raises:
            WriteConflictError: the index changed since it was opened.
        """
        with writer_lock(self.root):
            cur = current_pointer(self.root)
            if cur is None or int(read_manifest(self.root)["generation"]) != self.generation:
                raise WriteConflictError(
                    f"the index at {self.root} was changed by another writer since it was "
                    "opened; open it again to write"
                )
            sweep(self.root, self.generation, self._referenced())
            yield

    def new_segment_dir(self, name: str) -> Path:
        """Where segment ``name`` goes; what a killed writer left there is removed (no
        manifest names it: segment numbers only grow, and it was never committed)."""
        d = self.root / name
        if name in self.entries:  # pragma: no cover - an internal error
            raise RuntimeError(f"segment {name} is already committed")
        remove(d)
        return d

    def commit(
        self,
        view: View,
        changed: list[Segment],
        spec: IndexSpec,
        settings: Mapping[str, Any],
        next_segment: int,
    ) -> None:
        """Write tombstones of ``changed`` segments and a manifest of ``view``; swap CURRENT."""
        gen = self.generation + 1
        entries = []
        for seg, dead in zip(view.segments, view.dead, strict=True):
            e = dict(self.entries.get(seg.name) or self._new_entry(seg.name))
            if seg in changed and dead is not None:
                fname = f"del-{gen:08d}.npy"
                rows = np.flatnonzero(dead).astype(np.int64)
                meta = write_file(self.root / seg.name / fname, _npy_writer(rows))
                fsync_dir(self.root / seg.name)
                e |= {
                    "deleted": fname,
                    "deleted_sha256": meta["sha256"],
                    "deleted_bytes": meta["bytes"],
                }
            entries.append(e)
        self.pointer = write_commit(
            self.root, new_manifest(gen, view.count, spec, settings, next_segment, entries)
        )
        self.generation = gen
        self.entries = {e["name"]: e for e in entries}
        sweep(self.root, gen, self._referenced())

    def _new_entry(self, name: str) -> dict[str, Any]:
        body = read_bytes(self.root / name / "segment.json", 1 << 20)
        return {"name": name, "meta_sha256": hashlib.sha256(body).hexdigest(), "deleted": None}

    def _referenced(self) -> dict[str, str | None]:
        return {n: e.get("deleted") for n, e in self.entries.items()}


def _npy_writer(a: np.ndarray) -> Callable[[Any], None]:
    """``write(file)`` saving ``a`` as ``.npy`` (no pickle)."""

    def write(f: Any) -> None:
        np.save(f, a, allow_pickle=False)

    return write

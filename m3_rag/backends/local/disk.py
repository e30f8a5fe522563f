"""Commits of a disk-backed :class:`~m3_rag.backends.LocalBackend` (index format 3).

Layout::

    DIR/CURRENT                      {"format", "version": 3, "manifest", "manifest_sha256"}
    DIR/manifest-00000012.json       {"format", "version", "generation", "count", "spec"
                                     (IndexSpec.to_json), "retriever" (its settings),
                                     "next_segment", "segments": [{"name", "meta_sha256",
                                     "deleted", "deleted_sha256", "deleted_bytes"}]}
    DIR/seg-00000007/...             immutable segments (see m3_rag.backends.local.segment_io)
    DIR/.m3-rag.lock, .m3-rag.readers  the writer and reader locks (m3_rag.persist)

A write holds the writer lock from before it builds its segment until ``CURRENT`` names the
new manifest, and first checks that no other process committed since this one read the
index. A commit writes only the new segment or tombstone file and the manifest (O(new
data)); a crash at any point leaves ``CURRENT`` naming the last complete commit, and what a
killed writer left behind is removed by the next writer (or when no reader is active).
Manifests written before the ``"spec"`` key hold the specification's keys at top level;
they open the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from m3_rag.backends.local.segment import Segment
from m3_rag.backends.local.segment_io import (
    DELETES,
    SEGMENT,
    SegmentOptions,
    deletes_of,
    open_segment,
    verify_file,
)
from m3_rag.backends.local.view import View
from m3_rag.errors import IndexFormatError, WriteConflictError
from m3_rag.persist import (
    FORMAT,
    POINTER,
    check_target,
    fsync_dir,
    no_readers,
    read_bytes,
    read_json,
    reader_lock,
    remove,
    write_file,
    writer_lock,
)
from m3_rag.spec import IndexSpec

__all__ = [
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

VERSION = 3
MANIFEST = re.compile(r"^manifest-(\d{8})\.json$")
_SNAPSHOT = re.compile(r"^(\.tmp-)?snap-\d{8}T\d{6}-[0-9a-f]{8}$")  # format 2 (replaced)


def current_pointer(root: Path) -> dict[str, Any] | None:
    """``CURRENT`` of an index directory (``None`` when there is none).

    Raises:
        IndexFormatError: ``CURRENT`` is not an m3-rag index pointer.
    """
    p = root / POINTER
    if not p.exists() and not p.is_symlink():
        return None
    cur = read_json(read_bytes(p, 1 << 16), p)
    if not isinstance(cur, dict) or cur.get("format") != FORMAT:
        raise IndexFormatError(f"{p} is not an m3-rag index pointer")
    return cur


def refuse_other_format(root: Path, cur: Mapping[str, Any]) -> None:
    """Raise what opening a directory of an older format in place gets.

    Raises:
        IndexFormatError: a snapshot (format 1 or 2) or an unknown version.
    """
    if cur.get("version") == VERSION:
        return
    if "snapshot" in cur:
        raise IndexFormatError(
            f"{root} holds an index snapshot of an earlier format, which is not opened in "
            f"place: convert it with `m3-rag migrate {root} NEW` (or "
            "m3_rag.backends.local.migrate.migrate), or load it with HybridRetriever.load"
        )
    raise IndexFormatError(
        f"{root}/CURRENT: index format version {cur.get('version')!r}, this m3-rag reads "
        f"version {VERSION}; rebuild the index"
    )


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The current manifest of a format-3 index, checked against its hash in ``CURRENT``
    (hold the reader or the writer lock while calling it: it reads two files).

    Raises:
        FileNotFoundError: no index at ``root``.
        IndexFormatError: another format, a bad pointer, or a changed manifest.
    """
    root = Path(root)
    cur = current_pointer(root)
    if cur is None:
        raise FileNotFoundError(f"no m3-rag index at {root} (missing {POINTER})")
    refuse_other_format(root, cur)
    name = cur.get("manifest")
    if not isinstance(name, str) or not MANIFEST.match(name):
        raise IndexFormatError(f"{root}/CURRENT names a bad manifest {name!r}")
    body = read_bytes(root / name, 1 << 30)
    if hashlib.sha256(body).hexdigest() != cur.get("manifest_sha256"):
        raise IndexFormatError(f"{root}/{name} does not match its checksum (changed or corrupt)")
    manifest = read_json(body, root / name)
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise IndexFormatError(f"{root}/{name}: bad manifest")
    gen = manifest.get("generation")
    if type(gen) is not int or gen < 0:
        raise IndexFormatError(f"{root}/{name}: bad generation {gen!r}")
    return manifest


def manifest_record(manifest: Mapping[str, Any], where: Any) -> tuple[IndexSpec, dict[str, Any]]:
    """The index specification and the retriever's settings a manifest records.

    Raises:
        IndexFormatError: a bad specification or settings that are not an object.
    """
    spec = IndexSpec.from_json(manifest.get("spec", manifest), str(where))
    settings = manifest.get("retriever") or {}
    if not isinstance(settings, dict):
        raise IndexFormatError(f"{where}: the manifest's 'retriever' must be an object")
    return spec, settings


def write_commit(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``manifest-<generation>.json`` and point ``CURRENT`` at it
    (atomic: ``os.replace``), both fsynced. Call under the writer lock."""
    body = json.dumps(manifest, indent=1, allow_nan=False).encode("utf-8")
    name = f"manifest-{manifest['generation']:08d}.json"
    remove(root / name)  # a killed writer's uncommitted manifest of this number
    write_file(root / name, lambda f: f.write(body))
    current = {
        "format": FORMAT,
        "version": VERSION,
        "manifest": name,
        "manifest_sha256": hashlib.sha256(body).hexdigest(),
    }
    tmp = root / f".CURRENT.{uuid.uuid4().hex[:8]}"
    write_file(tmp, lambda f: f.write(json.dumps(current).encode("utf-8")))
    os.replace(tmp, root / POINTER)
    fsync_dir(root)


def sweep(root: Path, generation: int, keep: Mapping[str, str | None]) -> None:
    """Remove what the commit ``generation`` does not reference: other manifests, segments
    not in ``keep`` (segment -> its tombstone file), stale tombstones, an earlier format's
    snapshots. Call under the writer lock; old files go only while no reader is opening
    the index (else the next writer removes them)."""
    current = f"manifest-{generation:08d}.json"
    with no_readers(root) as alone:
        for p in root.iterdir():
            n = p.name
            if n.startswith(".CURRENT."):
                remove(p)  # a killed writer's pointer, never read
            elif not alone:
                continue
            elif (
                (MANIFEST.match(n) and n != current)
                or (SEGMENT.match(n) and n not in keep)
                or _SNAPSHOT.match(n)
            ):
                remove(p)
            elif SEGMENT.match(n) and p.is_dir() and not p.is_symlink():
                for f in p.iterdir():
                    if DELETES.match(f.name) and f.name != keep[n]:
                        remove(f)


class Stored(NamedTuple):
    """What an index directory holds when it is opened (the engine takes it over).

    Attributes:
        view: Its segments, tombstones and statistics.
        next_segment: The number of the next segment to write.
        record: The index specification as stored (for ``IndexSpec.check_stored``).
        spec: That specification, read.
        settings: The retriever's settings stored with it.
    """

    view: View
    next_segment: int
    record: Mapping[str, Any]
    spec: IndexSpec
    settings: dict[str, Any]


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
                    return Stored(empty, 1, spec.to_json(), spec, dict(settings))
        return self.load(spec, allow_model_mismatch)

    def load(self, spec: IndexSpec | None = None, allow_model_mismatch: bool = False) -> Stored:
        """Open the current commit, holding the reader lock from ``CURRENT`` to the last
        segment file (a concurrent commit cannot remove what is being opened).

        Args:
            spec: Refuse (before opening any segment) an index stored for another spec;
                ``None``: open it as stored.
            allow_model_mismatch: See :meth:`~m3_rag.spec.IndexSpec.check_stored`.

        Raises:
            FileNotFoundError: no index in the directory.
            IndexMismatchError: the index was built for another ``spec``.
            IndexFormatError: an unreadable, tampered or older-format index.
        """
        with reader_lock(self.root):
            return self._load(spec, allow_model_mismatch)

    def _load(self, spec: IndexSpec | None, allow_model_mismatch: bool) -> Stored:
        m = read_manifest(self.root)
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
            seg, mask = self._open_entry(e)
            segs.append(seg)
            dead.append(mask)
        view = View.of(segs, dead, stored.lexical == "bm25")
        view.id_map(self.root)  # refuses an id live twice
        nxt = m.get("next_segment")
        if type(nxt) is not int or nxt < 1:
            raise IndexFormatError(f"{self.root}: manifest has a bad next_segment")
        self.generation = int(m["generation"])
        self.entries = {e["name"]: e for e in entries}
        return Stored(view, nxt, record, stored, settings)

    def _open_entry(self, e: Any) -> tuple[Segment, np.ndarray | None]:
        name = e.get("name") if isinstance(e, dict) else None
        if not isinstance(name, str) or not SEGMENT.match(name):
            raise IndexFormatError(f"{self.root}: manifest names a bad segment {name!r}")
        d = self.root / name
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
        write_commit(
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


def new_manifest(
    generation: int,
    count: int,
    spec: IndexSpec,
    settings: Mapping[str, Any],
    next_segment: int,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """A format-3 manifest (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "generation": generation,
        "count": count,
        "spec": spec.to_json(),
        "retriever": dict(settings),
        "next_segment": next_segment,
        "segments": entries,
    }

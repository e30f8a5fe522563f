"""Writing a whole index into a directory at once: ``LocalBackend.save`` and migration.

:class:`IndexWriter` holds the target's writer lock, hands out fresh segment directories,
and commits them with one manifest and one ``CURRENT`` swap: until then the directory
holds no index (or its previous one, untouched); a killed writer leaves only uncommitted
files, removed by the next writer. :func:`save_view` writes the live documents of a view:
a committed segment of a disk index is copied file by file (checksums verified while the
bytes stream), a segment in RAM is written by the streaming segment builder; memory stays
bounded by one segment's postings, never by the index.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from m3_rag.backends.local.build import build_segment, copy_segment
from m3_rag.backends.local.manifest import (
    MANIFEST,
    current_pointer,
    new_manifest,
    sweep,
    write_commit,
)
from m3_rag.backends.local.segment_io import SEGMENT, SegmentOptions
from m3_rag.backends.local.view import View
from m3_rag.errors import IndexFormatError
from m3_rag.persist import check_target, read_bytes, read_json, remove, writer_lock
from m3_rag.spec import IndexSpec

__all__ = ["IndexWriter", "save_view"]


class IndexWriter:
    """Write a complete index into ``root`` and commit it at once, replacing what is there.

    Use as a context manager: the writer lock is held inside; segments written and not
    committed are removed on the way out.

    Raises:
        ValueError: ``root`` is a place an index must not be written to (see
            :func:`~m3_rag.persist.check_target`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: list[dict[str, Any]] = []
        self._created: list[Path] = []
        self._stack = contextlib.ExitStack()
        self._committed = False
        self._generation = 0
        self._next = 1

    def __enter__(self) -> IndexWriter:
        check_target(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(writer_lock(self.root))
        try:
            check_target(self.root)  # another writer may have changed it meanwhile
            names = [p.name for p in self.root.iterdir()]
            gens = [int(m.group(1)) for n in names if (m := MANIFEST.match(n))]
            with contextlib.suppress(IndexFormatError, OSError):
                cur = current_pointer(self.root) or {}
                m = MANIFEST.match(str(cur.get("manifest", "")))
                gens += [int(m.group(1))] if m else []
            self._generation = max(gens, default=0) + 1
            self._next = max((int(n[4:]) for n in names if SEGMENT.match(n)), default=0) + 1
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                for d in self._created:
                    remove(d)
        finally:
            self._stack.close()

    def segment_dir(self) -> tuple[str, Path]:
        """A fresh segment name and its directory (not created)."""
        name = f"seg-{self._next:08d}"
        self._next += 1
        d = self.root / name
        self._created.append(d)
        return name, d

    def add(self, name: str, entry: Mapping[str, Any] | None = None) -> None:
        """Record segment ``name`` (written) for the commit; ``entry``: its tombstone keys
        when it has some (copied with it)."""
        body = read_bytes(self.root / name / "segment.json", 1 << 20)
        e = {"deleted": None, **(entry or {})}
        self.entries.append({**e, "name": name, "meta_sha256": hashlib.sha256(body).hexdigest()})

    def commit(self, spec: IndexSpec, settings: Mapping[str, Any], count: int) -> None:
        """Make the recorded segments the index (manifest, then ``CURRENT``)."""
        manifest = new_manifest(
            self._generation, count, spec, settings, self._next, list(self.entries)
        )
        write_commit(self.root, manifest)
        self._committed = True
        keep = {e["name"]: e.get("deleted") for e in self.entries}
        sweep(self.root, self._generation, keep)


def save_view(
    target: Path,
    view: View,
    spec: IndexSpec,
    settings: Mapping[str, Any],
    options: SegmentOptions,
    source: tuple[Path, Mapping[str, Mapping[str, Any]]] | None = None,
) -> None:
    """Write the live documents of ``view`` as a new index at ``target`` (one commit).

    Args:
        target: The index directory (created; an index there is replaced atomically).
        view: What to write (immutable: searches and writes may go on meanwhile).
        spec: The index specification recorded with it.
        settings: The retriever's settings recorded with it.
        options: How new segments are built.
        source: ``(directory, manifest entries by segment name)`` when the segments of
            ``view`` are committed there: their files are copied (tombstones included).

    Raises:
        ValueError: ``target`` is a place an index must not be written to.
        IndexFormatError: a source file that is missing or does not match its checksum
            (nothing is committed then).
    """
    with IndexWriter(target) as w:
        for i, seg in enumerate(view.segments):
            live = view.live_rows(i)
            if len(live) == 0:
                continue
            name, d = w.segment_dir()
            if source is None:
                build_segment(name, [(seg, live)], options, spec.vocab_size, d)
                w.add(name)
                continue
            root, entries = source
            e = entries[seg.name]
            files = _segment_files(root / seg.name, e)
            copy_segment(root / seg.name, d, files)
            tomb = {k: e.get(k) for k in ("deleted", "deleted_sha256", "deleted_bytes")}
            w.add(name, tomb if e.get("deleted") is not None else None)
        w.commit(spec, settings, view.count)


def _segment_files(d: Path, entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file of a committed segment with its checksum (``segment.json`` checked
    against the manifest entry)."""
    body = read_bytes(d / "segment.json", 1 << 20)
    if hashlib.sha256(body).hexdigest() != entry.get("meta_sha256"):
        raise IndexFormatError(f"{d}/segment.json does not match its checksum")
    meta = read_json(body, d / "segment.json")
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise IndexFormatError(f"{d}/segment.json: bad 'files'")
    out = dict(files)
    out["segment.json"] = {"sha256": entry["meta_sha256"], "bytes": len(body)}
    if entry.get("deleted") is not None:
        out[str(entry["deleted"])] = {
            "sha256": entry.get("deleted_sha256"),
            "bytes": entry.get("deleted_bytes"),
        }
    return out

"""Commits of a disk-backed :class:`~m3_rag.backends.LocalBackend` (index format 3).

Layout::

    DIR/CURRENT                      {"format", "version": 3, "manifest", "manifest_sha256"}
    DIR/manifest-00000012.json       model, dims, settings, and every live segment with the
                                     SHA-256 of its segment.json and its tombstone file
    DIR/seg-00000007/...             immutable segments (see m3_rag.backends.local.segment_io)
    DIR/.m3-rag.lock, .m3-rag.readers  the writer and reader locks of m3_rag.persist

A write holds the writer lock from before it builds its segment until ``CURRENT`` names the
new manifest, and first checks that no other process committed since this one read the
index. A commit writes only the new segment or tombstone file and the manifest (O(new
data)); a crash at any point leaves ``CURRENT`` naming the last complete commit, and what a
killed writer left behind is removed by the next writer (or when no reader is active).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3_rag.backends.local.segment_io import SEGMENT, deletes_of, open_segment
from m3_rag.persist import (
    FORMAT,
    IndexFormatError,
    _flock,
    _fsync_dir,
    _json,
    _read_bytes,
    _remove,
    _write_file,
    check_target,
    reader_lock,
    writer_lock,
)

if TYPE_CHECKING:
    from m3_rag.backends.local.engine import LocalBackend, _View

__all__ = ["VERSION", "DiskState", "current_pointer", "read_manifest"]

VERSION = 3
_MANIFEST = re.compile(r"^manifest-\d{8}\.json$")
_SPEC_KEYS = ("dense_dim", "colbert_dim", "lexical", "vocab_size", "dense_dtype", "colbert_dtype")


def current_pointer(root: Path) -> dict[str, Any] | None:
    """``CURRENT`` of an index directory (``None`` when there is none)."""
    p = root / "CURRENT"
    if not p.exists():
        return None
    cur = _json(_read_bytes(p, 1 << 16), p)
    if not isinstance(cur, dict) or cur.get("format") != FORMAT:
        raise IndexFormatError(f"{p} is not an m3-rag index pointer")
    return cur


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The current manifest of a format-3 index (checked against its hash in ``CURRENT``)."""
    root = Path(root)
    cur = current_pointer(root)
    if cur is None:
        raise FileNotFoundError(f"no m3-rag index at {root}")
    if cur.get("version") != VERSION:
        raise IndexFormatError(f"{root}/CURRENT: not a segmented (version 3) index")
    name = cur.get("manifest")
    if not isinstance(name, str) or not _MANIFEST.match(name):
        raise IndexFormatError(f"{root}/CURRENT names a bad manifest {name!r}")
    body = _read_bytes(root / name, 1 << 30)
    if hashlib.sha256(body).hexdigest() != cur.get("manifest_sha256"):
        raise IndexFormatError(f"{root}/{name} does not match its checksum (changed or corrupt)")
    manifest = _json(body, root / name)
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise IndexFormatError(f"{root}/{name}: bad manifest")
    return manifest


class DiskState:
    """The directory side of a disk-backed LocalBackend."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.entries: dict[str, dict[str, Any]] = {}  # segment name -> manifest entry

    # ------------------------------------------------------------ open
    def open_or_create(self, backend: LocalBackend) -> None:
        from m3_rag.backends.local.engine import _Stats, _View

        spec = backend.spec
        assert spec is not None
        check_target(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if current_pointer(self.root) is None:
            with writer_lock(self.root):
                if current_pointer(self.root) is None:
                    backend._view = _View(stats=_Stats() if spec.lexical == "bm25" else None)
                    self.commit(backend, backend._view, [])
                    return
        with reader_lock(self.root):
            self._load(backend)

    def _load(self, backend: LocalBackend) -> None:
        from m3_rag.backends.local.engine import _Stats, _View

        spec = backend.spec
        assert spec is not None
        m = read_manifest(self.root)
        if m.get("model") != spec.model and not backend.allow_model_mismatch:
            raise ValueError(
                f"index {self.root} was built with model {m.get('model')!r}, the encoder is "
                f"{spec.model!r}; pass allow_model_mismatch=True if they are the same model"
            )
        want = backend.config()
        for key in _SPEC_KEYS:
            if m.get(key) != want[key]:
                raise ValueError(
                    f"index {self.root} has {key}={m.get(key)!r}, this retriever needs "
                    f"{want[key]!r}: open it with the settings it was built with"
                )
        if spec.lexical == "bm25" and m.get("analyzer") != spec.analyzer:
            raise ValueError(
                f"index {self.root} was built with BM25 analyzer {m.get('analyzer')!r}, not "
                f"{spec.analyzer!r}: their term ids differ"
            )
        segs, dead = [], []
        stats = _Stats() if spec.lexical == "bm25" else None
        entries = m.get("segments")
        if not isinstance(entries, list):
            raise IndexFormatError(f"{self.root}: manifest has no segment list")
        for e in entries:
            name = e.get("name") if isinstance(e, dict) else None
            if not isinstance(name, str) or not SEGMENT.match(name):
                raise IndexFormatError(f"{self.root}: manifest names a bad segment {name!r}")
            body = _read_bytes(self.root / name / "segment.json", 1 << 20)
            if hashlib.sha256(body).hexdigest() != e.get("meta_sha256"):
                raise IndexFormatError(
                    f"{self.root}/{name}/segment.json does not match its checksum"
                )
            seg = open_segment(self.root, name, _json(body, self.root / name), backend.options)
            mask = None
            if e.get("deleted") is not None:
                fmeta = {"sha256": e.get("deleted_sha256"), "bytes": e.get("deleted_bytes")}
                from m3_rag.backends.local.segment_io import _verify

                _verify(self.root / name / str(e["deleted"]), fmeta, "full")
                rows = deletes_of(self.root / name, str(e["deleted"]), len(seg))
                mask = np.zeros(len(seg), bool)
                mask[rows] = True
            if stats is not None and seg.lexical is not None:
                stats = stats.add(seg.lexical, None, 1)
                if mask is not None:
                    stats = stats.add(seg.lexical, np.flatnonzero(mask), -1)
            segs.append(seg)
            dead.append(mask)
        count = sum(
            len(s) - (0 if d is None else int(d.sum())) for s, d in zip(segs, dead, strict=True)
        )
        ids: dict[str, Any] = {}
        for s, d in zip(segs, dead, strict=True):
            for r, doc_id in enumerate(s.ids):
                if d is not None and d[r]:
                    continue
                if doc_id in ids:
                    raise IndexFormatError(f"{self.root}: id {doc_id!r} is live in two segments")
                ids[doc_id] = (s, r)
        nxt = m.get("next_segment")
        if type(nxt) is not int or nxt < 1:
            raise IndexFormatError(f"{self.root}: manifest has a bad next_segment")
        self.generation = int(m.get("generation", 0))
        self.entries = {e["name"]: e for e in entries}
        backend._view = _View(tuple(segs), tuple(dead), count, stats)
        backend._ids = ids
        backend._next = nxt

    # ------------------------------------------------------------ write
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock; refuse when another process committed since we read."""
        with writer_lock(self.root):
            cur = current_pointer(self.root)
            if (
                cur is None
                or int(read_manifest(self.root).get("generation", -1)) != self.generation
            ):
                raise RuntimeError(
                    f"the index at {self.root} was changed by another writer since it was "
                    "opened; open it again to write"
                )
            self._sweep(self._referenced())
            yield

    def new_segment_dir(self, name: str) -> Path:
        """Where segment ``name`` goes; what a killed writer left there is removed (no
        manifest names it: segment numbers only grow, and it was never committed)."""
        d = self.root / name
        if name in self.entries:  # pragma: no cover - an internal error
            raise RuntimeError(f"segment {name} is already committed")
        _remove(d)
        return d

    def commit(self, backend: LocalBackend, view: _View, changed: list[Any]) -> None:
        """Write tombstones of ``changed`` segments and a manifest of ``view``; swap CURRENT."""
        gen = self.generation + 1
        entries = []
        for seg, dead in zip(view.segments, view.dead, strict=True):
            e = dict(self.entries.get(seg.name) or self._new_entry(seg.name))
            if seg in changed and dead is not None:
                fname = f"del-{gen:08d}.npy"
                rows = np.flatnonzero(dead).astype(np.int64)
                meta = _write_file(
                    self.root / seg.name / fname,
                    lambda f, rows=rows: np.save(f, rows, allow_pickle=False),
                )
                _fsync_dir(self.root / seg.name)
                e |= {
                    "deleted": fname,
                    "deleted_sha256": meta["sha256"],
                    "deleted_bytes": meta["bytes"],
                }
            entries.append(e)
        spec = backend.spec
        assert spec is not None
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "generation": gen,
            "model": spec.model,
            "backend": "local",
            **backend.config(),
            "analyzer": spec.analyzer,
            "retriever": backend.settings,
            "next_segment": backend._next,
            "segments": entries,
        }
        body = json.dumps(manifest, indent=1).encode("utf-8")
        name = f"manifest-{gen:08d}.json"
        _write_file(self.root / name, lambda f: f.write(body))
        current = {
            "format": FORMAT,
            "version": VERSION,
            "manifest": name,
            "manifest_sha256": hashlib.sha256(body).hexdigest(),
        }
        tmp = self.root / f".CURRENT.{uuid.uuid4().hex[:8]}"
        _write_file(tmp, lambda f: f.write(json.dumps(current).encode("utf-8")))
        os.replace(tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        self.generation = gen
        self.entries = {e["name"]: e for e in entries}
        self._sweep(self._referenced())

    def _new_entry(self, name: str) -> dict[str, Any]:
        body = _read_bytes(self.root / name / "segment.json", 1 << 20)
        return {"name": name, "meta_sha256": hashlib.sha256(body).hexdigest(), "deleted": None}

    def _referenced(self) -> dict[str, str | None]:
        return {n: e.get("deleted") for n, e in self.entries.items()}

    def _sweep(self, keep: dict[str, str | None]) -> None:
        """Remove what no commit references (under the writer lock; old segments and
        manifests only while no reader is opening the index)."""
        current = f"manifest-{self.generation:08d}.json"
        with _flock(self.root / ".m3-rag.readers", exclusive=True, blocking=False) as alone:
            for p in self.root.iterdir():
                n = p.name
                if n.startswith(".CURRENT."):
                    _remove(p)
                elif not alone:
                    continue
                elif (_MANIFEST.match(n) and n != current) or (SEGMENT.match(n) and n not in keep):
                    _remove(p)
                elif SEGMENT.match(n):
                    for f in p.iterdir():
                        if f.name.startswith("del-") and f.name != keep[n]:
                            _remove(f)

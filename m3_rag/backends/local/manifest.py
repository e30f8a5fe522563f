"""Commits of an index directory (format 3): ``CURRENT``, manifests, and the clean-up.

Layout::

    DIR/CURRENT                      {"format", "version": 3, "manifest", "manifest_sha256"}
    DIR/manifest-00000012.json       {"format", "version", "generation", "count", "spec"
                                     (IndexSpec.to_json), "retriever" (its settings),
                                     "next_segment", "segments": [{"name", "meta_sha256",
                                     "deleted", "deleted_sha256", "deleted_bytes"}]}
    DIR/seg-00000007/...             immutable segments (see m3_rag.backends.local.segment_io)
    DIR/.m3-rag.lock, .m3-rag.readers  the writer and reader locks (m3_rag.persist)

A commit writes the manifest, then swaps ``CURRENT`` atomically (:func:`write_commit`);
every commit writes a new ``CURRENT`` (it names the manifest's generation and hash), so a
handle tells another handle's commit from one read of it (:func:`pointer_bytes`).
Manifests written before the ``"spec"`` key hold the specification's keys at top level;
they open the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3_rag.backends.local.segment_io import DELETES, SEGMENT
from m3_rag.errors import IndexFormatError
from m3_rag.persist import (
    FORMAT,
    POINTER,
    fsync_dir,
    no_readers,
    read_bytes,
    read_json,
    remove,
    write_file,
)
from m3_rag.spec import IndexSpec

__all__ = [
    "MANIFEST",
    "VERSION",
    "current_pointer",
    "manifest_record",
    "new_manifest",
    "pointer_bytes",
    "read_commit",
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
    return _pointer(read_bytes(p, 1 << 16), p)


def _pointer(raw: bytes, p: Path) -> dict[str, Any]:
    cur = read_json(raw, p)
    if not isinstance(cur, dict) or cur.get("format") != FORMAT:
        raise IndexFormatError(f"{p} is not an m3-rag index pointer")
    return cur


def pointer_bytes(root: Path) -> bytes | None:
    """The bytes of ``CURRENT`` (one small read; ``None`` when it cannot be read): every
    commit writes a new one (it names the manifest's generation and hash)."""
    try:
        fd = os.open(root / POINTER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)


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
    return read_commit(Path(root))[1]


def read_commit(root: Path) -> tuple[bytes, dict[str, Any]]:
    """:func:`read_manifest` -> (the bytes of ``CURRENT`` read, the manifest they name)."""
    p = root / POINTER
    if not p.exists() and not p.is_symlink():
        raise FileNotFoundError(f"no m3-rag index at {root} (missing {POINTER})")
    raw = read_bytes(p, 1 << 16)
    cur = _pointer(raw, p)
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
    return raw, manifest


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


def write_commit(root: Path, manifest: dict[str, Any]) -> bytes:
    """Write ``manifest`` as ``manifest-<generation>.json`` and point ``CURRENT`` at it
    (atomic: ``os.replace``), both fsynced. Call under the writer lock.

    Returns:
        The bytes written to ``CURRENT``.
    """
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
    raw = json.dumps(current).encode("utf-8")
    tmp = root / f".CURRENT.{uuid.uuid4().hex[:8]}"
    write_file(tmp, lambda f: f.write(raw))
    os.replace(tmp, root / POINTER)
    fsync_dir(root)
    return raw


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

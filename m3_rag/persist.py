"""Index persistence: a JSON manifest + ``.npy`` arrays, no pickle, atomic snapshots.

Layout of an index directory::

    DIR/CURRENT                 {"format": "m3-rag-index", "snapshot": "snap-..."}
    DIR/snap-.../manifest.json  format version, model, dims, counts, array shapes
    DIR/snap-.../docs.jsonl     one {"id", "text", "metadata"} per line, in row order
    DIR/snap-.../*.npy          the stores' arrays (np.load(allow_pickle=False))

A save writes a new snapshot directory, fsyncs it, then swaps ``CURRENT`` with ``os.replace``
(atomic). A crash at any point leaves ``CURRENT`` naming a complete snapshot: the old one or
the new one. Stale snapshots are removed after the swap, or by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "VERSION", "IndexFormatError", "read_index", "write_index"]

FORMAT = "m3-rag-index"
VERSION = 1
_POINTER = "CURRENT"


class IndexFormatError(ValueError):
    """The directory is not a readable m3-rag index (wrong format, version or shapes)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    docs: Iterator[dict[str, Any]],
) -> Path:
    """Write a snapshot and make it current, atomically.

    Raises:
        ValueError: ``path`` is an existing non-empty directory that is not an m3-rag index
            (refuses to write into unrelated data), or an existing file.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; pass a directory for the index")
    if root.is_dir() and any(root.iterdir()) and not (root / _POINTER).is_file():
        raise ValueError(
            f"{root} is a non-empty directory that is not an m3-rag index; pick another path"
        )
    root.mkdir(parents=True, exist_ok=True)
    name = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    try:
        shapes = {}
        for key, arr in arrays.items():
            a = np.ascontiguousarray(arr)
            np.save(tmp / f"{key}.npy", a, allow_pickle=False)
            _fsync_file(tmp / f"{key}.npy")
            shapes[key] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        full = {"format": FORMAT, "version": VERSION, **manifest, "arrays": shapes}
        (tmp / "manifest.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        os.rename(tmp, root / name)
        pointer = root / f".{_POINTER}.{uuid.uuid4().hex[:8]}"
        pointer.write_text(json.dumps({"format": FORMAT, "snapshot": name}), encoding="utf-8")
        _fsync_file(pointer)
        os.replace(pointer, root / _POINTER)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in root.iterdir():  # old snapshots and leftovers of crashed saves
        if stale.name != name and (stale.name.startswith(("snap-", ".tmp-snap-", f".{_POINTER}."))):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return root / name


def read_index(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Read the current snapshot: (manifest, arrays, docs).

    Raises:
        FileNotFoundError: no index at ``path``.
        IndexFormatError: wrong format or version, a missing array, a shape or dtype that
            differs from the manifest, or unreadable docs.
    """
    root = Path(path)
    pointer = root / _POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"no m3-rag index at {root} (missing {_POINTER})")
    try:
        current = json.loads(pointer.read_text(encoding="utf-8"))
        snap = root / current["snapshot"]
        manifest = json.loads((snap / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexFormatError(f"unreadable index at {root}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{snap} is not an m3-rag index (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(
            f"{snap} has index format version {manifest.get('version')}, this m3-rag reads "
            f"version {VERSION}; rebuild the index"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, meta in manifest.get("arrays", {}).items():
        try:
            arr = np.load(snap / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"cannot read {snap / (key + '.npy')}: {e}") from e
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise IndexFormatError(
                f"{key}.npy has shape {list(arr.shape)} {arr.dtype}, the manifest says "
                f"{meta['shape']} {meta['dtype']}"
            )
        arrays[key] = arr
    docs: list[dict[str, Any]] = []
    try:
        with open(snap / "docs.jsonl", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"cannot read {snap / 'docs.jsonl'}: {e}") from e
    if len(docs) != manifest.get("count"):
        raise IndexFormatError(
            f"{snap}: {len(docs)} documents, the manifest says {manifest.get('count')}"
        )
    return manifest, arrays, docs

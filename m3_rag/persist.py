"""Index persistence: a JSON manifest + ``.npy`` arrays, no pickle, atomic checksummed snapshots.

Layout of an index directory::

    DIR/CURRENT                 {"format", "snapshot": "snap-...", "manifest_sha256"}
    DIR/.m3-rag.lock            writers hold it exclusively (serialised, across processes)
    DIR/.m3-rag.readers         readers hold it shared; a writer removes old snapshots only
                                when it can take it exclusively
    DIR/snap-.../manifest.json  format version, model, dims, counts, array shapes, checksums
    DIR/snap-.../docs.jsonl     one {"id", "text", "metadata"} per line, in row order
    DIR/snap-.../*.npy          the stores' arrays (np.load(allow_pickle=False))

Guarantees:

- **Atomic commit.** A save writes a new snapshot directory, fsyncs it, then swaps
  ``CURRENT`` with ``os.replace``. A crash (even ``kill -9``) at any point leaves ``CURRENT``
  naming a complete snapshot: the old one or the new one.
- **One writer at a time.** ``fcntl.flock`` on ``.m3-rag.lock``, across threads and processes.
  The writer first removes what killed saves left behind (``.tmp-snap-*``).
- **Readers never see a half-removed snapshot.** A reader holds ``.m3-rag.readers`` shared
  while it reads; old snapshots are deleted only under an exclusive hold of it (skipped, and
  left to the next save, while readers are active).
- **Trust nothing on disk.** Every name read is checked against a fixed pattern (no absolute
  paths, no ``..``), symlinks are refused, every file's SHA-256 is checked against the
  manifest (whose own SHA-256 is in ``CURRENT``), and anything unreadable raises
  :class:`IndexFormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from m3_rag.errors import IndexFormatError

__all__ = [
    "FORMAT",
    "VERSION",
    "IndexFormatError",
    "check_target",
    "is_index",
    "read_index",
    "reader_lock",
    "write_index",
    "writer_lock",
]

FORMAT = "m3-rag-index"
VERSION = 2  # 2: checksums; 1 (no checksums) is still read
_POINTER = "CURRENT"
_WRITE_LOCK = ".m3-rag.lock"
_READ_LOCK = ".m3-rag.readers"
_SNAPSHOT = re.compile(r"^snap-\d{8}T\d{6}-[0-9a-f]{8}$")
_ARRAY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CHUNK = 1 << 22


# ------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold ``flock`` on ``path`` (created if missing); yields False when ``blocking`` is
    False and the lock is taken, or when the file cannot be opened (read-only directory)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if exclusive and blocking:
            raise
        yield False
        return
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode if blocking else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the index directory's writer lock (blocks while another writer holds it)."""
    with _flock(Path(path) / _WRITE_LOCK, exclusive=True):
        yield


@contextlib.contextmanager
def reader_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Keep the current snapshot from being removed while it is read."""
    root = Path(path)
    if not root.is_dir():
        yield
        return
    with _flock(root / _READ_LOCK, exclusive=False):
        yield


# ------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self._f.write(view)


def _write_file(path: Path, write: Any) -> dict[str, Any]:
    """Create ``path``, let ``write(file)`` fill it, fsync; -> ``{"sha256", "bytes"}``."""
    with open(path, "xb") as raw:
        h = _HashingWriter(raw)
        write(h)
        raw.flush()
        os.fsync(raw.fileno())
    return {"sha256": h.sha.hexdigest(), "bytes": h.size}


def _open_plain(path: Path) -> BinaryIO:
    """Open a regular file for reading, refusing symlinks and anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise IndexFormatError(f"cannot open {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IndexFormatError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    with _open_plain(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise IndexFormatError(f"{path} is larger than {limit} bytes")
    return data


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with _open_plain(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json(data: bytes, where: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{where} is not valid JSON: {str(e)[:200]}") from None


def is_index(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding an m3-rag index pointer."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / _POINTER).is_file()


def check_target(root: Path) -> None:
    """Refuse a place an index must never be written to.

    Raises:
        ValueError: ``root`` is a symlink, a file, or a non-empty directory that is not an
            m3-rag index (only a killed save's leftovers and the lock files do not count).
    """
    if root.is_symlink():
        raise ValueError(f"{root} is a symbolic link; pass the real directory for the index")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; pass a directory for the index")
    if root.is_dir() and not is_index(root):
        ours = {_WRITE_LOCK, _READ_LOCK}
        if any(p.name not in ours and not p.name.startswith(".tmp-snap-") for p in root.iterdir()):
            raise ValueError(
                f"{root} is a non-empty directory that is not an m3-rag index; it is never "
                "replaced: pick another path"
            )


# ------------------------------------------------------------------------------ write
def write_index(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    docs: Iterator[dict[str, Any]],
) -> Path:
    """Write a snapshot and make it current, atomically, under the writer lock.

    Args:
        path: Index directory (created when missing).
        manifest: JSON-serialisable description (model, dims, counts...).
        arrays: Named arrays (names: lowercase letters, digits, ``_``).
        docs: One JSON-serialisable dict per document.

    Returns:
        The new snapshot directory.

    Raises:
        ValueError: ``path`` is a file, a symlink, or a non-empty directory that is not an
            m3-rag index (refuses to write into unrelated data); a bad array name; documents
            that are not valid UTF-8 JSON (nothing is changed then).
    """
    root = Path(path)
    for key in arrays:
        if not _ARRAY.match(key):
            raise ValueError(f"array name {key!r} must match {_ARRAY.pattern}")
    check_target(root)
    root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root):
        check_target(root)  # another writer may have changed it meanwhile
        for stale in root.iterdir():  # leftovers of killed saves: no writer is active now
            if stale.name.startswith((".tmp-snap-", f".{_POINTER}.")):
                _remove(stale)
        name = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = root / f".tmp-{name}"
        tmp.mkdir()
        try:
            files: dict[str, dict[str, Any]] = {}
            shapes = {}
            for key, arr in arrays.items():
                a = np.ascontiguousarray(arr)
                files[f"{key}.npy"] = _write_file(
                    tmp / f"{key}.npy", lambda f, a=a: np.save(f, a, allow_pickle=False)
                )
                shapes[key] = {"shape": list(a.shape), "dtype": str(a.dtype)}

            def write_docs(f: Any) -> None:
                buf = io.BufferedWriter(f, buffer_size=1 << 20)
                for doc in docs:
                    line = json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n"
                    buf.write(line.encode("utf-8"))
                buf.flush()
                buf.detach()

            try:
                files["docs.jsonl"] = _write_file(tmp / "docs.jsonl", write_docs)
            except (UnicodeEncodeError, ValueError, TypeError) as e:
                raise ValueError(f"a document cannot be saved as JSON: {e}") from None
            full = {
                "format": FORMAT,
                "version": VERSION,
                **manifest,
                "arrays": shapes,
                "files": files,
            }
            body = json.dumps(full, indent=1).encode("utf-8")
            _write_file(tmp / "manifest.json", lambda f: f.write(body))
            _fsync_dir(tmp)
            os.rename(tmp, root / name)
            pointer = root / f".{_POINTER}.{uuid.uuid4().hex[:8]}"
            current = {
                "format": FORMAT,
                "snapshot": name,
                "manifest_sha256": hashlib.sha256(body).hexdigest(),
            }
            pointer.write_text(json.dumps(current), encoding="utf-8")
            with open(pointer, "rb") as f:
                os.fsync(f.fileno())
            os.replace(pointer, root / _POINTER)
            _fsync_dir(root)
        except BaseException:
            _remove(tmp)
            raise
        with _flock(root / _READ_LOCK, exclusive=True, blocking=False) as no_readers:
            if no_readers:  # else a reader may be on an old snapshot: the next save cleans
                for stale in root.iterdir():
                    if stale.name != name and _SNAPSHOT.match(stale.name):
                        _remove(stale)
    return root / name


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# ------------------------------------------------------------------------------ read
def read_index(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Read the current snapshot: (manifest, arrays, docs).

    Returns:
        The manifest (a dict), the arrays by name, and the documents as
        ``{"id": str, "text": str, "metadata": dict}`` in row order (ids unique).

    Raises:
        FileNotFoundError: no index at ``path``.
        IndexFormatError: wrong format or version; a name that leaves the directory, a
            symlink, a missing, truncated or corrupt file, a checksum mismatch, a shape or
            dtype that differs from the manifest, or invalid documents. The message names
            the file.
    """
    root = Path(path)
    if not (root / _POINTER).is_file() and not (root / _POINTER).is_symlink():
        raise FileNotFoundError(f"no m3-rag index at {root} (missing {_POINTER})")
    with reader_lock(root):
        current = _json(_read_bytes(root / _POINTER, limit=1 << 16), root / _POINTER)
        if not isinstance(current, dict) or current.get("format") != FORMAT:
            raise IndexFormatError(f"{root / _POINTER} is not an m3-rag index pointer")
        name = current.get("snapshot")
        if not isinstance(name, str) or not _SNAPSHOT.match(name):
            raise IndexFormatError(
                f"{root / _POINTER} names snapshot {name!r}, which is not a snapshot of this "
                "directory"
            )
        snap = root / name
        if snap.is_symlink() or not snap.is_dir():
            raise IndexFormatError(f"{snap} is missing or not a directory")
        body = _read_bytes(snap / "manifest.json")
        want = current.get("manifest_sha256")
        if want is not None and hashlib.sha256(body).hexdigest() != want:
            raise IndexFormatError(f"{snap / 'manifest.json'} does not match its checksum")
        manifest = _json(body, snap / "manifest.json")
        _check_manifest(manifest, snap, checksums=want is not None)
        files = manifest.get("files") or {}
        arrays: dict[str, np.ndarray] = {}
        for key, meta in manifest["arrays"].items():
            file = snap / f"{key}.npy"
            _verify(file, files.get(f"{key}.npy"))
            try:
                with _open_plain(file) as f:
                    arr = np.load(f, allow_pickle=False)
            except IndexFormatError:
                raise
            except Exception as e:  # EOFError, ValueError, tokenize errors... on corrupt .npy
                raise IndexFormatError(f"cannot read {file}: {type(e).__name__}: {e}") from None
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise IndexFormatError(
                    f"{file.name} has shape {list(arr.shape)} {arr.dtype}, the manifest says "
                    f"{meta['shape']} {meta['dtype']}"
                )
            arrays[key] = arr
        docs_file = snap / "docs.jsonl"
        _verify(docs_file, files.get("docs.jsonl"))
        docs = _read_docs(docs_file)
    if len(docs) != manifest.get("count"):
        raise IndexFormatError(
            f"{docs_file}: {len(docs)} documents, the manifest says {manifest.get('count')}"
        )
    return manifest, arrays, docs


def _check_manifest(manifest: Any, snap: Path, checksums: bool) -> None:
    where = snap / "manifest.json"
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{where} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{snap} is not an m3-rag index (format {manifest.get('format')!r})")
    version = manifest.get("version")
    if version not in (1, VERSION):
        raise IndexFormatError(
            f"{snap} has index format version {version}, this m3-rag reads versions 1 to "
            f"{VERSION}; rebuild the index"
        )
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        raise IndexFormatError(f"{where}: 'arrays' must be an object")
    for key, meta in arrays.items():
        if not isinstance(key, str) or not _ARRAY.match(key):
            raise IndexFormatError(f"{where}: array name {key!r} is not allowed")
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("shape"), list)
            or not all(type(d) is int and d >= 0 for d in meta["shape"])
            or not isinstance(meta.get("dtype"), str)
        ):
            raise IndexFormatError(f"{where}: array {key!r} needs a shape and a dtype")
    count = manifest.get("count")
    if type(count) is not int or count < 0:
        raise IndexFormatError(f"{where}: 'count' must be an int >= 0, got {count!r}")
    if version == VERSION or checksums:
        files = manifest.get("files")
        expected = {f"{k}.npy" for k in arrays} | {"docs.jsonl"}
        if not isinstance(files, dict) or set(files) != expected:
            raise IndexFormatError(f"{where}: 'files' must list the checksum of every file")


def _verify(file: Path, meta: Any) -> None:
    if meta is None:  # version 1 index: no checksums
        return
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise IndexFormatError(f"the manifest has no checksum for {file.name}")
    if _sha256_of(file) != meta["sha256"]:
        raise IndexFormatError(f"{file} does not match its checksum (corrupt or modified)")


def _read_docs(file: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    with _open_plain(file) as f:
        for n, raw in enumerate(f, start=1):
            doc = _json(raw, file)
            if not isinstance(doc, dict):
                raise IndexFormatError(f"{file}:{n} is not a JSON object")
            doc_id, text = doc.get("id"), doc.get("text", "")
            meta = doc.get("metadata")
            meta = {} if meta is None else meta
            if not isinstance(doc_id, str) or not doc_id or not isinstance(text, str):
                raise IndexFormatError(f"{file}:{n} needs a non-empty 'id' and a 'text' string")
            if not isinstance(meta, dict):
                raise IndexFormatError(f"{file}:{n}: 'metadata' must be an object")
            if doc_id in seen:
                raise IndexFormatError(f"{file}:{n}: duplicate id {doc_id!r}")
            # the line decoded as strict UTF-8 already: a lone surrogate can only come from a
            # \uD800-\uDFFF escape, so only such lines pay for the full check
            if b"\\ud" in raw.lower():
                try:
                    json.dumps(doc, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise IndexFormatError(f"{file}:{n} holds a lone surrogate") from None
            seen.add(doc_id)
            docs.append({"id": doc_id, "text": text, "metadata": meta})
    return docs

"""Safe files for index directories: locks, atomic writes, reads that trust nothing.

What every on-disk index of m3-rag relies on (the local engine's format,
:mod:`m3_rag.backends.local.disk`, and the reader of the old snapshots,
:mod:`m3_rag.backends.local.format2`):

- **One writer at a time.** ``fcntl.flock`` on ``DIR/.m3-rag.lock`` (:func:`writer_lock`),
  across threads and processes.
- **Readers never see a half-removed commit.** A reader holds ``DIR/.m3-rag.readers``
  shared while it opens an index (:func:`reader_lock`); a writer removes old files only
  when it can take that lock exclusively.
- **Durable writes.** :func:`write_file` creates a file, hashes it while writing and fsyncs
  it; :func:`fsync_dir` makes a rename durable.
- **Trust nothing on disk.** :func:`open_plain` refuses symlinks and anything but a regular
  file, :func:`read_bytes` bounds what it reads, :func:`read_json` refuses invalid JSON (and
  ``NaN``), and anything unreadable raises :class:`IndexFormatError` naming the file.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from m3_rag.errors import IndexFormatError

__all__ = [
    "FORMAT",
    "check_target",
    "flock",
    "fsync_dir",
    "is_index",
    "open_plain",
    "read_bytes",
    "read_json",
    "reader_lock",
    "remove",
    "sha256_of",
    "write_file",
    "writer_lock",
]

FORMAT = "m3-rag-index"  # the "format" key of every CURRENT pointer
POINTER = "CURRENT"
WRITE_LOCK = ".m3-rag.lock"
READ_LOCK = ".m3-rag.readers"
# what a killed writer may leave in a directory that has no CURRENT yet (never user data)
_LEFTOVER = re.compile(r"^(\.tmp-snap-.*|\.CURRENT\..*|seg-\d{8}|manifest-\d{8}\.json)$")
_CHUNK = 1 << 22


# ------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def flock(path: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
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
    with flock(Path(path) / WRITE_LOCK, exclusive=True):
        yield


@contextlib.contextmanager
def reader_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Keep the current commit's files from being removed while they are opened."""
    root = Path(path)
    if not root.is_dir():
        yield
        return
    with flock(root / READ_LOCK, exclusive=False):
        yield


@contextlib.contextmanager
def no_readers(path: Path) -> Iterator[bool]:
    """Yields True while no reader holds ``path``'s reader lock (and keeps new ones out)."""
    with flock(path / READ_LOCK, exclusive=True, blocking=False) as alone:
        yield alone


# ------------------------------------------------------------------------------ files
def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable."""
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


def write_file(path: Path, write: Callable[[Any], Any]) -> dict[str, Any]:
    """Create ``path`` (it must not exist), let ``write(file)`` fill it, fsync it.

    Returns:
        ``{"sha256", "bytes"}`` of what was written.
    """
    with open(path, "xb") as raw:
        h = _HashingWriter(raw)
        write(h)
        raw.flush()
        os.fsync(raw.fileno())
    return {"sha256": h.sha.hexdigest(), "bytes": h.size}


def open_plain(path: Path) -> BinaryIO:
    """Open a regular file for reading, refusing symlinks and anything else.

    Raises:
        IndexFormatError: missing, a symlink, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise IndexFormatError(f"cannot open {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IndexFormatError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The whole of a regular file (at most ``limit`` bytes, else IndexFormatError)."""
    with open_plain(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise IndexFormatError(f"{path} is larger than {limit} bytes")
    return data


def sha256_of(path: Path) -> str:
    """SHA-256 of a regular file, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open_plain(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(data: bytes, where: Path) -> Any:
    """Parse strict UTF-8 JSON (no ``NaN``/``Infinity``); IndexFormatError names ``where``."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{where} is not valid JSON: {str(e)[:200]}") from None


def remove(p: Path) -> None:
    """Remove a file or a directory tree (never following a symlink); errors ignored."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# ------------------------------------------------------------------------------ places
def is_index(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding an m3-rag index pointer."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / POINTER).is_file()


def check_target(root: Path) -> None:
    """Refuse a place an index must never be written to.

    Raises:
        ValueError: ``root`` is a symlink, a file, or a non-empty directory that is not an
            m3-rag index (only the lock files and what a killed writer left before its
            first commit do not count).
    """
    if root.is_symlink():
        raise ValueError(f"{root} is a symbolic link; pass the real directory for the index")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; pass a directory for the index")
    if root.is_dir() and not is_index(root):
        ours = {WRITE_LOCK, READ_LOCK}
        if any(
            p.name not in ours and not (_LEFTOVER.match(p.name) and not p.is_symlink())
            for p in root.iterdir()
        ):
            raise ValueError(
                f"{root} is a non-empty directory that is not an m3-rag index; it is never "
                "replaced: pick another path"
            )

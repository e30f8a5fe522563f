"""The crash-safe replacement of an index directory (what ``m3-rag index --force`` ends in).

At every instant of a replacement the target holds a complete index (the old one, then the
new one): the new index is built beside it (:func:`staging_path`, held by :func:`staging`),
the two directories are swapped with one atomic system call (Linux renameat2
RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP), then the old one is removed. Where the swap
is not available, two renames (out -> aside, new -> out): a crash between them leaves no
index at the target for a moment, and :func:`recover_replacement` (which
:func:`m3_rag.ingest.plan_index` calls) puts the old one back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from m3_rag.errors import WriteConflictError
from m3_rag.persist import check_target, fsync_dir, is_index, writer_lock

__all__ = ["recover_replacement", "replace_index", "staging", "staging_path"]

_CRASH_AT = "M3_RAG_CRASH_AT"  # tests only: the replacement step at which to die (SIGKILL)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h


def staging_path(out: str | os.PathLike[str]) -> Path:
    """Where a ``force`` run builds the index that replaces ``out`` (beside it)."""
    p = Path(out)
    return p.with_name(f".{p.name}.m3-rag-new")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """The directory a ``force`` run builds in (:func:`staging_path`), held (``flock`` on
    it) for the run and removed on any error or interruption before it is swapped in.

    Raises:
        WriteConflictError: another run is building the same index.
    """
    import fcntl

    stage = staging_path(out)
    _remove_unheld(stage)  # a killed run's leftover
    try:
        os.mkdir(stage)
    except FileExistsError:
        raise WriteConflictError(
            f"another ingestion with force is building {out} (in {stage}); wait for it"
        ) from None
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        ino = os.fstat(fd).st_ino
        try:
            yield stage
        except BaseException:
            with contextlib.suppress(OSError):
                if os.stat(stage).st_ino == ino:  # still ours (not swapped in)
                    _remove_tree(stage)
            raise
    finally:
        os.close(fd)


def _aside_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.m3-rag-old")


def replace_index(
    new: str | os.PathLike[str], out: str | os.PathLike[str], *, exchange: bool = True
) -> None:
    """Put the complete index at ``new`` in place of ``out`` (an index, an empty directory,
    or nothing), crash-safe: at every instant ``out`` holds the old index or the new one.

    Holds the old index's writer lock, so no commit to it is in flight during the swap.

    Args:
        new: A complete index directory (beside ``out``: the same file system).
        out: The index to replace.
        exchange: Swap the two with one atomic rename where the system has it (Linux,
            macOS); ``False`` (or no such call): two renames, after which a crash between
            them is undone by :func:`recover_replacement`.

    Raises:
        ValueError: ``new`` is not an index, or ``out`` is not an index, nothing, or an
            empty directory. OSError: the file system refused a rename.
    """
    new, out = Path(new), Path(out)
    if not is_index(new):
        raise ValueError(f"{new} holds no index to put in place of {out}")
    check_target(out)
    with contextlib.ExitStack() as held:
        if out.is_dir():
            held.enter_context(writer_lock(out))  # no commit of the old index in flight
            held.enter_context(_dir_lock(out, blocking=True))  # recovery leaves it alone
        _crash_point("locked")
        if not out.exists():
            os.rename(new, out)
            fsync_dir(out.parent)
            return
        if exchange and _exchange(new, out):
            fsync_dir(out.parent)
            _crash_point("exchanged")
            _remove_tree(new)  # the old index, now at new
            return
        aside = _aside_path(out)
        _remove_unheld(aside)
        os.rename(out, aside)
        _crash_point("aside")
        os.rename(new, out)
        fsync_dir(out.parent)
        _crash_point("renamed")
        _remove_tree(aside)


def recover_replacement(out: str | os.PathLike[str]) -> str | None:
    """Finish what a replacement of ``out`` killed midway left: the old index put back
    when ``out`` is missing (the two-rename fallback of :func:`replace_index`), and the
    leftover directories beside ``out`` removed (never one a live run holds, never one that
    is not an index).

    Returns:
        A line saying what was done, or ``None`` when there was nothing to do.
    """
    out = Path(out)
    aside, done = _aside_path(out), None
    if aside.is_dir() and not out.exists() and is_index(aside):
        with _dir_lock(aside, blocking=False) as free:
            if free:
                os.rename(aside, out)
                fsync_dir(out.parent)
                done = f"put back the index at {out} that an interrupted replacement moved"
    _remove_unheld(aside)
    _remove_unheld(staging_path(out))
    return done


def _remove_unheld(path: Path) -> None:
    """Remove a leftover index directory unless a live run holds it.

    Raises:
        WriteConflictError: a live run holds it.
    """
    if not path.is_dir() or path.is_symlink():
        return
    try:
        check_target(path)
    except ValueError:
        return  # not ours: never removed
    with _dir_lock(path, blocking=False) as free:
        if not free:
            raise WriteConflictError(f"{path} is in use by another m3-rag run; wait for it")
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """Remove an index directory, its ``CURRENT`` last: a crash midway leaves a directory
    that is still recognisably an index (so a later run removes it)."""
    entries = sorted(path.iterdir(), key=lambda p: p.name == "CURRENT")
    for i, p in enumerate(entries):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        if i == 0:
            _crash_point("removing")
    path.rmdir()


def _crash_point(step: str) -> None:
    if os.environ.get(_CRASH_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _dir_lock(path: Path, blocking: bool) -> Iterator[bool]:
    """``flock`` a directory; yields False when ``blocking`` is False and it is held."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically -> True; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # no C library to ask (Windows)
        return False
    src, dst = os.fsencode(a), os.fsencode(b)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    renamex_np = getattr(libc, "renamex_np", None)  # macOS >= 10.12
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
        rc = renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_EXCHANGE)
    elif renamex_np is not None:
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = renamex_np(src, dst, _RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot swap: the caller falls back
    raise OSError(err, os.strerror(err), str(b))

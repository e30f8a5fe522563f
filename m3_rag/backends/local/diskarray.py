"""Reading the ``.npy`` files of segments: large arrays with ``pread``, never memory-mapped.

A memory-mapped file counts in the process's RSS for every page it has touched (and the
kernel maps whole read-ahead windows around each touch), so random reads of candidates'
vectors grew RSS by ~13 MB per query. :class:`DiskArray` reads exactly the rows or ranges
asked for into fresh buffers: memory stays bounded by what one search or one merge chunk
needs, and the OS page cache (not counted in RSS) does the caching.

Headers are parsed here, not by ``np.load``: numpy parses them with ``ast.literal_eval``,
and CPython 3.11's AST constructor is not thread-safe (``SystemError: AST constructor
recursion depth mismatch`` when two threads parse at once, python/cpython#106905), which
made an open racing a commit in another thread fail now and then. Only what numpy writes
for a C-order array of plain numbers is accepted.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, BinaryIO

import numpy as np

__all__ = ["DiskArray", "check_size", "load_npy", "map_npy", "npy_header", "open_array"]

_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-z][0-9]*)', 'fortran_order': (False|True), "
    r"'shape': \(((?:[0-9]+, ?)*[0-9]*)\), \}",
    re.IGNORECASE,
)


def npy_header(f: BinaryIO, where: Any) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """The dtype, shape and data offset of the ``.npy`` file ``f`` (read from its start),
    without ``ast`` (see the module docstring).

    Raises:
        ValueError: not a ``.npy`` file of a C-order array of plain numbers.
    """
    f.seek(0)
    head = f.read(8)
    if len(head) != 8 or head[:6] != _MAGIC or head[6] not in (1, 2, 3):
        raise ValueError(f"{where} is not a .npy file (or of an unknown version)")
    size = 2 if head[6] == 1 else 4
    n = int.from_bytes(f.read(size), "little")
    if n > 1 << 16:
        raise ValueError(f"{where}: the .npy header is too large")
    raw = f.read(n)
    text = raw.decode("utf-8" if head[6] == 3 else "latin-1").rstrip(" \n")
    m = _HEADER.fullmatch(text) if len(raw) == n else None
    if m is None or m.group(2) == "True":
        raise ValueError(f"{where} must be a C-order array of numbers (header {text[:80]!r})")
    try:
        dtype = np.dtype(m.group(1))
    except TypeError:
        raise ValueError(f"{where}: unknown dtype {m.group(1)!r}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"{where} must hold plain numbers, not {dtype}")
    shape = tuple(int(x) for x in m.group(3).replace(" ", "").split(",") if x)
    return dtype, shape, 8 + size + n


def check_size(where: Any, fd: int, offset: int, nbytes: int) -> None:
    """Raise ``ValueError`` unless the file ``fd`` is exactly ``offset + nbytes`` long (its
    ``.npy`` header's data offset plus the bytes the header's shape says)."""
    size = os.fstat(fd).st_size
    if size != offset + nbytes:
        raise ValueError(f"{where} has {size} bytes, its header says {offset + nbytes}")


def load_npy(f: BinaryIO, where: Any) -> np.ndarray:
    """The whole array of the ``.npy`` file ``f``, read into RAM.

    Raises:
        ValueError: not a C-order ``.npy`` of plain numbers, or a size that does not match.
    """
    dtype, shape, offset = npy_header(f, where)
    count = int(np.prod(shape, dtype=np.int64))
    check_size(where, f.fileno(), offset, count * dtype.itemsize)
    buf = bytearray(count * dtype.itemsize)
    view, got = memoryview(buf), 0
    while got < len(buf):
        k = os.preadv(f.fileno(), [view[got:]], offset + got)
        if k <= 0:
            raise ValueError(f"{where}: short read")
        got += k
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def map_npy(path: Any) -> np.memmap:
    """The array of the ``.npy`` file ``path``, memory-mapped read-only."""
    with open(path, "rb") as f:
        dtype, shape, offset = npy_header(f, path)
        check_size(path, f.fileno(), offset, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class DiskArray:
    """A read-only ``.npy`` array on disk (C order), read on demand.

    Attributes:
        shape, dtype, ndim, nbytes: As numpy's.
    """

    def __init__(self, fd: int, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self._fd, self._offset = fd, offset
        self.dtype, self.shape = dtype, shape
        self.ndim = len(shape)
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.nbytes = self._row * (shape[0] if shape else 1)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _read(self, start: int, stop: int) -> np.ndarray:
        n = max(0, stop - start)
        size = n * self._row
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            k = os.preadv(self._fd, [view[got:]], self._offset + start * self._row + got)
            if k <= 0:
                raise OSError(f"short read at row {start} of a segment file")
            got += k
        return np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.shape[1:]))

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("DiskArray slices must have step 1")
            return self._read(start, stop)
        return self.take(np.asarray(key, dtype=np.int64))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order), one read per run of consecutive rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if int(srt[0]) < 0 or int(srt[-1]) >= self.shape[0]:
            raise IndexError("row out of range")
        cut = np.flatnonzero(np.diff(srt) != 1) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [len(srt)]])
        parts = [
            self._read(int(srt[a]), int(srt[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)
        ]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not np.array_equal(srt, rows):
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            out = out[inv]
        return out

    def ranges(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Rows ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, concatenated
        (ranges that follow each other are read at once)."""
        starts = np.asarray(starts, np.int64).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        keep = lengths > 0
        starts, lengths = starts[keep], lengths[keep]
        if len(starts) > 1:  # a new run where a range does not start at the previous end
            new = np.concatenate([[True], starts[1:] != starts[:-1] + lengths[:-1]])
            run = np.cumsum(new) - 1
            ends = np.zeros(int(run[-1]) + 1, np.int64)
            np.add.at(ends, run, lengths)
            starts, lengths = starts[new], ends
        parts = [self._read(int(s), int(s) + int(n)) for s, n in zip(starts, lengths, strict=True)]
        if not parts:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def open_array(path: Any, fd: int) -> DiskArray:
    """A :class:`DiskArray` over the ``.npy`` file open as ``fd`` (which it then owns).

    Raises:
        ValueError: not a C-order ``.npy`` of plain numbers, or a size that does not match.
    """
    with os.fdopen(os.dup(fd), "rb") as f:  # (the descriptor may have been read already)
        dtype, shape, offset = npy_header(f, path)
    arr = DiskArray(fd, offset, dtype, shape)
    check_size(path, fd, offset, arr.nbytes)
    return arr

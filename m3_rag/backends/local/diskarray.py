"""Large segment arrays read with ``pread``, never memory-mapped.

A memory-mapped file counts in the process's RSS for every page it has touched (and the
kernel maps whole read-ahead windows around each touch), so random reads of candidates'
vectors grew RSS by ~13 MB per query. :class:`DiskArray` reads exactly the rows or ranges
asked for into fresh buffers: memory stays bounded by what one search or one merge chunk
needs, and the OS page cache (not counted in RSS) does the caching.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

__all__ = ["DiskArray", "open_array"]


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
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)  # the descriptor may have been read already (to hash the file)
        version = np.lib.format.read_magic(f)
        read = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read is None:
            raise ValueError(f"{path}: unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path} must be a C-order array of numbers")
    arr = DiskArray(fd, offset, dtype, tuple(shape))
    if os.fstat(fd).st_size != offset + arr.nbytes:
        raise ValueError(
            f"{path} has {os.fstat(fd).st_size} bytes, its header says {offset + arr.nbytes}"
        )
    return arr

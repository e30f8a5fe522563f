"""Building segments, in RAM or in a directory, and copying them between directories.

``build_segment`` writes the live rows of some existing segments (a merge, a save) or a new
batch into a new segment, streaming ``chunk`` rows at a time: memory stays bounded by the
chunk and the lexical postings, never by the vectors. ``copy_segment`` copies a committed
segment's files to another index, verifying each against its checksum as it streams. The
layout is described in :mod:`m3_rag.backends.local.segment_io`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from m3_rag.backends.local.ann import DenseANN
from m3_rag.backends.local.diskarray import DiskArray
from m3_rag.backends.local.lexmerge import can_stream, stream_postings
from m3_rag.backends.local.segment import (
    ColbertBlock,
    DocTable,
    LexicalPostings,
    Segment,
    check_finite,
    gather_ranges,
)
from m3_rag.backends.local.segment_io import DELETES, FILES, SegmentOptions, open_segment
from m3_rag.backends.validate import PreparedBatch
from m3_rag.codecs import get_codec
from m3_rag.errors import IndexFormatError
from m3_rag.persist import fsync_dir, open_plain

__all__ = [
    "Parts",
    "batch_segment",
    "build_segment",
    "copy_file",
    "copy_segment",
    "read_chunk",
]

_CHUNK_BYTES = 64 << 20
_COPY_CHUNK = 4 << 20


def read_chunk(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``a[start:stop]`` copied into RAM; for a memory-mapped ``a`` the pages read are
    released again (the copy stays bounded in RSS however large the file)."""
    out = np.array(a[start:stop])
    mm = getattr(a, "_mmap", None)
    if isinstance(a, np.memmap) and mm is not None and stop > start:
        row = a.strides[0] if a.ndim else a.itemsize
        begin = a.offset + start * row
        page = mmap.PAGESIZE
        aligned = begin - begin % page
        with contextlib.suppress(OSError, ValueError):  # best effort
            mm.madvise(mmap.MADV_DONTNEED, aligned, begin - aligned + (stop - start) * row)
    return out


def _rows_chunk(a: Any, rows: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """Rows ``rows`` (sorted) of ``a`` in pieces of about ``budget`` bytes, one piece read
    at a time (a merge never holds more than one piece of its sources)."""
    per = max(1, budget // max(1, a[:1].nbytes))
    for s in range(0, len(rows), per):
        part = rows[s : s + per]
        if isinstance(a, DiskArray):
            yield a.take(part)
            continue
        lo, hi = int(part[0]), int(part[-1]) + 1
        yield read_chunk(a, lo, hi)[part - lo]


def _read(seg: Segment, file: str, a: Any, rows: np.ndarray) -> Iterator[np.ndarray]:
    """:func:`_rows_chunk` of ``seg``'s array ``a`` (stored as ``file``), each piece checked
    for NaN and inf when the segment was opened without checking that file (a merge must not
    copy a corrupted value into a new segment, whose checksum would then cover it)."""
    for c in _rows_chunk(a, rows, _CHUNK_BYTES):
        yield check_finite(c, seg.file(file)) if file in seg.unchecked else c


class _Sink:
    """Where a segment's arrays go: RAM, or files (hashed while written, fsynced)."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self.files: dict[str, dict[str, Any]] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def array(
        self, name: str, pieces: Iterable[np.ndarray], dtype: Any, shape: tuple[int, ...]
    ) -> None:
        dtype = np.dtype(dtype)
        if self.dir is None:
            out = np.empty(shape, dtype)
            at = 0
            for p in pieces:
                out[at : at + len(p)] = p
                at += len(p)
            self.arrays[name] = out
            return
        written = 0
        with self._npy(name, dtype, shape) as write:
            for p in pieces:
                b = np.ascontiguousarray(p, dtype=dtype).tobytes()
                write(b)
                written += len(b)

    def stream(
        self, name: str, nbytes: int, fill: Callable[[Callable[[bytes], Any]], None]
    ) -> None:
        """Write a ``[nbytes]`` uint8 array whose bytes ``fill(write)`` pushes in pieces (no
        copy of the whole in RAM)."""
        with self._npy(name, np.dtype(np.uint8), (nbytes,)) as write:
            fill(write)

    @contextlib.contextmanager
    def _npy(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...]
    ) -> Iterator[Callable[[bytes], Any]]:
        """An ``.npy`` file being written: yields ``write(bytes)``; checks the size, hashes,
        fsyncs and records the file."""
        assert self.dir is not None
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": shape,
        }
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        written = 0
        with open(self.dir / f"{name}.npy", "xb") as f:
            sha = hashlib.sha256(buf.getvalue())
            f.write(buf.getvalue())

            def write(b: bytes) -> int:
                nonlocal written
                sha.update(b)
                f.write(b)
                written += len(b)
                return len(b)

            yield write
            f.flush()
            os.fsync(f.fileno())
        want = int(np.prod(shape)) * dtype.itemsize
        if written != want:  # pragma: no cover - an internal error, never a user's
            raise RuntimeError(f"{name}.npy: wrote {written} bytes, expected {want}")
        self.files[f"{name}.npy"] = {
            "sha256": sha.hexdigest(),
            "bytes": len(buf.getvalue()) + written,
        }

    def raw(self, name: str, data: bytes) -> None:
        assert self.dir is not None
        with open(self.dir / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


Parts = Sequence[tuple[Segment, np.ndarray]]


def batch_segment(batch: PreparedBatch, codec: str = "float16") -> Segment:
    """A validated batch as an unnamed in-RAM segment (the source ``build_segment`` reads);
    ``codec`` names the ColBERT codec of its codes."""
    colbert = None
    if batch.colbert is not None and batch.colbert_offsets is not None:
        colbert = ColbertBlock(
            batch.colbert, batch.colbert_offsets, batch.colbert_scales, get_codec(codec)
        )
    return Segment(
        "",
        list(batch.ids),
        batch.dense,
        None if batch.lexical is None else LexicalPostings.from_csr(batch.lexical),
        colbert,
        DocTable(texts=list(batch.texts), metas=list(batch.metadatas)),
    )


def build_segment(
    name: str,
    parts: Parts,
    opts: SegmentOptions,
    vocab_size: int,
    directory: Path | None = None,
) -> Segment:
    """Write the given rows of ``parts`` (in order) as one new segment.

    Args:
        name: The new segment's name.
        parts: ``(segment, rows)`` pairs; ``rows`` sorted int64.
        opts: Dtypes and the approximate-index threshold.
        vocab_size: Lexical id space.
        directory: Where to write it (created, must not exist), or ``None`` for RAM.

    Returns:
        The new segment (memory-mapped when written to ``directory``).
    """
    sink = _Sink(directory)
    if directory is not None:
        directory.mkdir()
    n = sum(len(r) for _, r in parts)
    first = parts[0][0] if parts else None
    ids = [s.ids[r] for s, rows in parts for r in rows.tolist()]
    dim = first.dense.shape[1] if first is not None else 0
    sink.array(
        "dense",
        (c for s, rows in parts for c in _read(s, "dense.npy", s.dense, rows)),
        opts.dense_dtype,
        (n, dim),
    )
    lexical = None
    if first is not None and first.lexical is not None:
        sources = [(s, rows) for s, rows in parts if s.lexical is not None]
        if can_stream(sources):  # a bounded piece at a time (lexmerge)
            stream_postings(sources, sink.array)
            if directory is None:
                lexical = LexicalPostings(*(sink.arrays[f"lex_{k}"] for k in LexicalPostings.NAMES))
        else:  # a migrated format-2 source has doc-major postings only
            import scipy.sparse as sp

            pieces = [_lexical_rows(s, rows, vocab_size) for s, rows in sources]
            csr = sp.vstack(pieces, format="csr")
            del pieces
            lexical = LexicalPostings.from_csr(csr)
            del csr
            for key, arr in lexical.arrays().items():
                sink.array(f"lex_{key}", [arr], arr.dtype, arr.shape)
            del arr  # the postings must be freeable once written
    if first is not None and first.colbert is not None:
        _colbert(sink, parts, opts)
    texts = [s.docs.text(r) for s, rows in parts for r in rows.tolist()]
    metas = [s.docs.metadata(r) for s, rows in parts for r in rows.tolist()]
    if directory is None:
        seg = Segment(
            name,
            ids,
            sink.arrays["dense"],
            lexical,
            _colbert_block(sink.arrays, opts),
            DocTable(texts=texts, metas=metas),
        )
        return _with_ann(seg, opts, reuse=_whole_ann(parts))
    _write_docs(sink, ids, texts, metas)
    del texts, metas, lexical  # the new segment reads them from disk
    seg = open_segment(directory.parent, name, {"count": n, "files": sink.files}, opts, check=False)
    seg = _with_ann(seg, opts, sink, reuse=_whole_ann(parts))
    meta = {"count": n, "files": sink.files}
    body = json.dumps(meta, indent=1).encode("utf-8")
    sink.raw("segment.json", body)
    fsync_dir(directory)
    return seg


def _lexical_rows(seg: Segment, rows: np.ndarray, vocab_size: int) -> Any:
    assert seg.lexical is not None
    csr = seg.lexical.rows_csr(rows, vocab_size)
    if "lex_data.npy" in seg.unchecked:
        check_finite(csr.data, seg.file("lex_data.npy"))
    return csr


def _colbert(sink: _Sink, parts: Parts, opts: SegmentOptions) -> None:
    lengths = np.concatenate(
        [np.diff(s.colbert.offsets)[rows] for s, rows in parts if s.colbert is not None]
        or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    total = int(lengths.sum())
    dim = next(s.colbert.vectors.shape[1] for s, _ in parts if s.colbert is not None)

    def pieces(key: str) -> Any:
        for s, rows in parts:
            assert s.colbert is not None
            src = s.colbert.vectors if key == "vectors" else s.colbert.scales
            assert src is not None
            starts = s.colbert.offsets[rows]
            at = gather_ranges(starts, s.colbert.offsets[rows + 1] - starts)
            yield from _read(s, f"colbert_{key}.npy", src, at)

    codec = get_codec(opts.colbert_dtype)
    sink.array("colbert_vectors", pieces("vectors"), codec.dtype, (total, dim))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sink.array("colbert_offsets", [offsets], np.int64, offsets.shape)
    if codec.scaled:
        sink.array("colbert_scales", pieces("scales"), np.float32, (total,))


def _colbert_block(arrays: dict[str, np.ndarray], opts: SegmentOptions) -> ColbertBlock | None:
    if "colbert_vectors" not in arrays:
        return None
    return ColbertBlock(
        arrays["colbert_vectors"],
        arrays["colbert_offsets"],
        arrays.get("colbert_scales"),
        get_codec(opts.colbert_dtype),
    )


def _write_docs(sink: _Sink, ids: list[str], texts: list[str], metas: list[dict[str, Any]]) -> None:
    sink.raw("ids.json", json.dumps(ids, ensure_ascii=False).encode("utf-8"))
    lines = [
        (json.dumps({"text": t, "metadata": m}, ensure_ascii=False, allow_nan=False) + "\n").encode(
            "utf-8"
        )
        for t, m in zip(texts, metas, strict=True)
    ]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    sink.raw("docs.jsonl", b"".join(lines))
    sink.array("docs_offsets", [offsets], np.int64, offsets.shape)


def _whole_ann(parts: Parts) -> DenseANN | None:
    """The approximate index of ``parts`` when they are one whole segment that has one (it
    indexes exactly the new segment's rows, in order: no need to train another)."""
    if len(parts) != 1:
        return None
    seg, rows = parts[0]
    whole = len(rows) == len(seg) and bool((rows == np.arange(len(seg))).all())
    return seg.ann if whole and isinstance(seg.ann, DenseANN) else None


def _with_ann(
    seg: Segment,
    opts: SegmentOptions,
    sink: _Sink | None = None,
    reuse: DenseANN | None = None,
) -> Segment:
    if opts.ann_threshold is None or len(seg) < opts.ann_threshold:
        return seg
    ann = reuse or DenseANN.build(
        lambda rows: (
            np.concatenate(list(_rows_chunk(seg.dense, rows, _CHUNK_BYTES)))
            if len(rows)
            else np.zeros((0, seg.dense.shape[1]), np.float32)
        ),
        len(seg),
        seg.dense.shape[1],
        nprobe=opts.ann_nprobe,
    )
    if sink is not None and sink.dir is not None:  # streamed: no second copy of the index
        sink.stream("ann", ann.nbytes(), ann.write_to)
    return replace(seg, ann=ann)


def copy_file(src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """Copy ``src`` to ``dst`` (created, fsynced) in 4 MiB pieces, verifying the bytes
    against ``meta`` (``{"sha256", "bytes"}``) as they stream.

    Raises:
        IndexFormatError: ``src`` is missing, not a regular file, or does not match its
            checksum (``dst`` is then removed).
    """
    h = hashlib.sha256()
    size = 0
    try:
        with open_plain(src) as f, open(dst, "xb") as out:
            while chunk := f.read(_COPY_CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != meta.get("bytes") or h.hexdigest() != meta.get("sha256"):
            raise IndexFormatError(f"{src} does not match its checksum (changed or corrupt)")
    except BaseException:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise


def copy_segment(src: Path, dst: Path, files: dict[str, dict[str, Any]]) -> None:
    """Copy a committed segment directory: ``files`` (name -> ``{"sha256", "bytes"}``, its
    ``segment.json`` and tombstone file included) from ``src`` to ``dst`` (created), each
    verified while it streams; nothing is held in RAM but one piece.

    Raises:
        IndexFormatError: a file name the segment layout does not allow, or a file that
            is missing or does not match its checksum.
    """
    for name in files:
        if not (FILES.match(name) or DELETES.match(name)):
            raise IndexFormatError(f"{src} names a bad file {name!r}")
    dst.mkdir()
    for name, meta in files.items():
        copy_file(src / name, dst / name, meta)
    fsync_dir(dst)

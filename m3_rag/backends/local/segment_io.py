"""Building segments, in RAM or in a directory, and opening them again.

``build_segment`` writes the live rows of some existing segments (a merge) or a new batch
into a new segment, streaming ``chunk`` rows at a time: memory stays bounded by the chunk
and the lexical postings, never by the vectors. On disk a segment is a directory::

    seg-00000007/segment.json    {"count", "files": {name: {"sha256", "bytes"}}}
    seg-00000007/ids.json        the ids, in row order
    seg-00000007/docs.jsonl      one {"text", "metadata"} per row; docs_offsets.npy
    seg-00000007/dense.npy       [n, dense_dim]
    seg-00000007/lex_*.npy       lexical postings (doc-major and term-major)
    seg-00000007/colbert_*.npy   packed ColBERT vectors, offsets (and int8 scales)
    seg-00000007/ann.npy         a serialised faiss index (large segments only)
    seg-00000007/del-*.npy       tombstones: sorted deleted rows (written by the engine)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3_rag.backends.local.ann import DenseANN
from m3_rag.backends.local.diskarray import DiskArray, open_array
from m3_rag.backends.local.segment import (
    ColbertBlock,
    DocTable,
    LexicalPostings,
    Segment,
    gather_ranges,
)
from m3_rag.persist import IndexFormatError, _fsync_dir, _open_plain, _read_bytes

__all__ = ["SEGMENT", "SegmentOptions", "build_segment", "open_segment", "read_chunk"]

SEGMENT = re.compile(r"^seg-\d{8}$")
DELETES = re.compile(r"^del-\d{8}\.npy$")
_FILES = re.compile(r"^(ids\.json|docs\.jsonl|segment\.json|[a-z][a-z0-9_]{0,40}\.npy)$")
_CHUNK_BYTES = 64 << 20
_HASH_ON_OPEN = 256 << 20  # "auto" verification hashes files up to this size on open
_IN_RAM = 32 << 20  # arrays up to this size are read into RAM, larger ones on demand
# the arrays read on demand when large (offsets and other small tables are always in RAM)
_ON_DEMAND = {  # (int8 ColBERT scales stay in RAM: 4 bytes per vector, read by every search)
    "dense",
    "colbert_vectors",
    "lex_indices",
    "lex_data",
    "lex_trows",
    "lex_tdata",
}


@dataclass(frozen=True)
class SegmentOptions:
    """How segments are built and opened.

    Attributes:
        dense_dtype / colbert_dtype: Storage dtypes.
        ann_threshold: Segments with at least this many rows get an approximate dense index
            (``None``: never).
        ann_nprobe: Inverted lists the approximate index visits per query.
        verify: ``"auto"`` (on open, hash files up to 256 MB and check the size, header and
            shape of larger ones) or ``"full"`` (hash every file).
        io: How arrays over 32 MB are read: ``"pread"`` (exactly the rows a search needs,
            into fresh buffers) or ``"mmap"`` (memory-mapped read-only, ``MADV_RANDOM``).
            Both leave the caching to the OS page cache; with ``"mmap"`` every page a
            search touches stays mapped and counts in the process's RSS
            (``benchmarks/bench_scale.py`` measures both).
    """

    dense_dtype: str = "float32"
    colbert_dtype: str = "float16"
    ann_threshold: int | None = None
    ann_nprobe: int = 32
    verify: str = "auto"
    io: str = "pread"


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
        (c for s, rows in parts for c in _rows_chunk(s.dense, rows, _CHUNK_BYTES)),
        opts.dense_dtype,
        (n, dim),
    )
    lexical = None
    if first is not None and first.lexical is not None:
        import scipy.sparse as sp

        csr = sp.vstack(
            [s.lexical.rows_csr(rows, vocab_size) for s, rows in parts if s.lexical is not None],
            format="csr",
        )
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
            _colbert_block(sink.arrays),
            DocTable(texts=texts, metas=metas),
        )
        return _with_ann(seg, opts)
    _write_docs(sink, ids, texts, metas)
    del texts, metas, lexical  # the new segment reads them from disk
    seg = open_segment(directory.parent, name, {"count": n, "files": sink.files}, opts, check=False)
    seg = _with_ann(seg, opts, sink)
    meta = {"count": n, "files": sink.files}
    body = json.dumps(meta, indent=1).encode("utf-8")
    sink.raw("segment.json", body)
    _fsync_dir(directory)
    return seg


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
            yield from _rows_chunk(src, at, _CHUNK_BYTES)

    sink.array("colbert_vectors", pieces("vectors"), opts.colbert_dtype, (total, dim))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sink.array("colbert_offsets", [offsets], np.int64, offsets.shape)
    if opts.colbert_dtype == "int8":
        sink.array("colbert_scales", pieces("scales"), np.float32, (total,))


def _colbert_block(arrays: dict[str, np.ndarray]) -> ColbertBlock | None:
    if "colbert_vectors" not in arrays:
        return None
    return ColbertBlock(
        arrays["colbert_vectors"], arrays["colbert_offsets"], arrays.get("colbert_scales")
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


def _with_ann(seg: Segment, opts: SegmentOptions, sink: _Sink | None = None) -> Segment:
    if opts.ann_threshold is None or len(seg) < opts.ann_threshold:
        return seg
    ann = DenseANN.build(
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
    return Segment(seg.name, seg.ids, seg.dense, seg.lexical, seg.colbert, seg.docs, ann)


# ------------------------------------------------------------------------------ open
def open_segment(
    root: Path, name: str, meta: dict[str, Any], opts: SegmentOptions, *, check: bool = True
) -> Segment:
    """Open a segment directory (arrays memory-mapped read-only) and validate it.

    Args:
        root: The index directory.
        name: The segment's name.
        meta: Its ``segment.json`` (already checked against the manifest's hash).
        opts: Dtypes and verification level.
        check: Verify hashes and contents (``False`` only right after writing it).

    Raises:
        IndexFormatError: a missing, tampered or inconsistent file (the message names it).
    """
    if not SEGMENT.match(name):
        raise IndexFormatError(f"bad segment name {name!r}")
    d = root / name
    files = meta.get("files")
    count = meta.get("count")
    if not isinstance(files, dict) or type(count) is not int or count < 0:
        raise IndexFormatError(f"{d}/segment.json: bad 'files' or 'count'")
    for fname, fmeta in files.items():
        if not _FILES.match(fname) or not isinstance(fmeta, dict):
            raise IndexFormatError(f"{d}/segment.json names a bad file {fname!r}")
        if check:
            _verify(d / fname, fmeta, opts.verify)

    def arr(key: str) -> Any:
        """Small arrays are read into RAM; large ones are read on demand (DiskArray)."""
        if f"{key}.npy" not in files:
            raise IndexFormatError(f"{d} has no {key}.npy")
        f = _open_plain(d / f"{key}.npy")  # refuses symlinks and non-files
        try:
            if key in _ON_DEMAND and os.fstat(f.fileno()).st_size > _IN_RAM:
                if opts.io == "mmap":
                    return _mmap(d / f"{key}.npy")
                return open_array(d / f"{key}.npy", os.dup(f.fileno()))
            a = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{d}/{key}.npy is not a readable array: {e}") from None
        finally:
            f.close()
        if a.dtype.hasobject:
            raise IndexFormatError(f"{d}/{key}.npy holds objects")
        return a

    ids = _ids(d, count)
    dense = arr("dense")
    if dense.shape[0] != count or dense.ndim != 2 or str(dense.dtype) != opts.dense_dtype:
        raise IndexFormatError(f"{d}/dense.npy has shape {dense.shape} {dense.dtype}")
    if check and dense.nbytes <= _HASH_ON_OPEN and not np.isfinite(dense).all():
        raise IndexFormatError(f"{d}/dense.npy holds NaN or inf")
    lexical = None
    if "lex_indptr.npy" in files:
        lexical = LexicalPostings(*(arr(f"lex_{k}") for k in LexicalPostings.NAMES))
        _check_lexical(d, lexical, count, check)
    colbert = None
    if "colbert_vectors.npy" in files:
        scales = arr("colbert_scales") if "colbert_scales.npy" in files else None
        colbert = ColbertBlock(arr("colbert_vectors"), arr("colbert_offsets"), scales)
        _check_colbert(d, colbert, count, opts, check)
    offsets = arr("docs_offsets")
    with _open_plain(d / "docs.jsonl") as f:
        size = os.fstat(f.fileno()).st_size
        blob: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    if len(offsets) != count + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != size:
        raise IndexFormatError(f"{d}/docs_offsets.npy does not fit docs.jsonl")
    if (np.diff(offsets) <= 0).any():
        raise IndexFormatError(f"{d}/docs_offsets.npy must increase")
    ann = None
    if "ann.npy" in files:
        ann = DenseANN.from_array(np.load(d / "ann.npy", allow_pickle=False), opts.ann_nprobe)
        if ann.index.ntotal != count or ann.index.d != dense.shape[1]:
            raise IndexFormatError(f"{d}/ann.npy does not index this segment's vectors")
    return Segment(name, ids, dense, lexical, colbert, DocTable(blob=blob, offsets=offsets), ann)


def _mmap(path: Path) -> np.ndarray:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    mm = getattr(a, "_mmap", None)
    if mm is not None:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_RANDOM)  # no read-ahead around each random read
    return a


def _verify(path: Path, meta: dict[str, Any], level: str) -> None:
    try:
        size = os.lstat(path).st_size
    except OSError:
        raise IndexFormatError(f"{path} is missing") from None
    if size != meta.get("bytes"):
        raise IndexFormatError(
            f"{path} does not match its checksum ({size} bytes, the segment says "
            f"{meta.get('bytes')}): changed or corrupt"
        )
    if level == "full" or size <= _HASH_ON_OPEN:
        h = hashlib.sha256()
        with _open_plain(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != meta.get("sha256"):
            raise IndexFormatError(f"{path} does not match its checksum (changed or corrupt)")


def _ids(d: Path, count: int) -> list[str]:
    try:
        ids = json.loads(_read_bytes(d / "ids.json").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IndexFormatError(f"{d}/ids.json is not valid JSON: {str(e)[:100]}") from None
    if (
        not isinstance(ids, list)
        or len(ids) != count
        or not all(isinstance(i, str) and i for i in ids)
    ):
        raise IndexFormatError(f"{d}/ids.json must list {count} non-empty str ids")
    if len(set(ids)) != len(ids):
        raise IndexFormatError(f"{d}/ids.json repeats an id")
    return ids


def _check_offsets(where: str, offsets: np.ndarray, count: int, total: int) -> None:
    if (
        offsets.ndim != 1
        or offsets.dtype.kind not in "iu"
        or len(offsets) != count + 1
        or int(offsets[0]) != 0
        or int(offsets[-1]) != total
        or (np.diff(offsets) < 0).any()
    ):
        raise IndexFormatError(f"{where} is inconsistent with the stored data")


def _check_lexical(d: Path, lex: LexicalPostings, count: int, check: bool) -> None:
    nnz = len(lex.indices)
    _check_offsets(f"{d}/lex_indptr.npy", lex.indptr, count, nnz)
    _check_offsets(f"{d}/lex_tptr.npy", lex.tptr, len(lex.terms), nnz)
    if not (len(lex.data) == len(lex.trows) == len(lex.tdata) == nnz) or len(lex.length) != count:
        raise IndexFormatError(f"{d}/lex_*.npy have inconsistent lengths")
    big = (lex.trows, lex.indices, lex.data, lex.tdata)
    if not check or any(x.nbytes > _HASH_ON_OPEN for x in big):
        return  # large postings: their checksums are verified with verify="full"
    trows, indices, data, tdata = (np.asarray(x) for x in big)
    if nnz and (
        int(trows.min()) < 0
        or int(trows.max()) >= count
        or int(indices.min()) < 0
        or not np.isfinite(data).all()
        or float(data.min()) < 0
        or not np.isfinite(tdata).all()
        or float(tdata.min()) < 0
    ):
        raise IndexFormatError(f"{d}/lex_*.npy hold rows, ids or weights out of range")
    if len(lex.terms) > 1 and (np.diff(lex.terms) <= 0).any():
        raise IndexFormatError(f"{d}/lex_terms.npy must increase")


def _check_colbert(
    d: Path, col: ColbertBlock, count: int, opts: SegmentOptions, check: bool
) -> None:
    _check_offsets(f"{d}/colbert_offsets.npy", col.offsets, count, len(col.vectors))
    if str(col.vectors.dtype) != opts.colbert_dtype or col.vectors.ndim != 2:
        raise IndexFormatError(f"{d}/colbert_vectors.npy is {col.vectors.dtype}")
    if (col.scales is None) != (opts.colbert_dtype != "int8"):
        raise IndexFormatError(f"{d}: int8 ColBERT vectors need colbert_scales.npy")
    if not check:
        return
    if col.scales is not None:
        if col.scales.nbytes > _HASH_ON_OPEN:
            return
        s = np.asarray(col.scales)
        if len(s) != len(col.vectors) or not (np.isfinite(s).all() and (s > 0).all()):
            raise IndexFormatError(f"{d}/colbert_scales.npy must hold finite scales > 0")
    elif col.vectors.nbytes <= _HASH_ON_OPEN and not np.isfinite(col.vectors).all():
        raise IndexFormatError(f"{d}/colbert_vectors.npy holds NaN or inf")


def deletes_of(d: Path, name: str, count: int) -> np.ndarray:
    """Read a tombstone file: sorted unique rows in ``[0, count)``."""
    if not DELETES.match(name):
        raise IndexFormatError(f"bad tombstone file name {name!r}")
    try:
        with _open_plain(d / name) as f:
            rows = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{d}/{name} is not a readable array: {e}") from None
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise IndexFormatError(f"{d}/{name} must be 1-d integers")
    rows = rows.astype(np.int64)
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= count or (np.diff(rows) <= 0).any()):
        raise IndexFormatError(f"{d}/{name} holds rows out of range or unsorted")
    return rows

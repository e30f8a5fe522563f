"""Segment directories of the local engine: the options, and opening and verifying them.

On disk a segment is a directory (written by :mod:`m3_rag.backends.local.build`)::

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
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from m3_rag.backends.local.ann import DenseANN
from m3_rag.backends.local.diskarray import (
    check_size,
    load_npy,
    map_npy,
    npy_header,
    open_array,
)
from m3_rag.backends.local.segment import ColbertBlock, DocTable, LexicalPostings, Segment
from m3_rag.codecs import get_codec
from m3_rag.errors import IndexFormatError
from m3_rag.persist import open_plain, read_bytes

__all__ = [
    "DELETES",
    "FILES",
    "SEGMENT",
    "SegmentOptions",
    "deletes_of",
    "open_segment",
    "verify_file",
]

SEGMENT = re.compile(r"^seg-\d{8}$")
DELETES = re.compile(r"^del-\d{8}\.npy$")
FILES = re.compile(r"^(ids\.json|docs\.jsonl|segment\.json|[a-z][a-z0-9_]{0,40}\.npy)$")
_HASH_ON_OPEN = 256 << 20  # "auto" verification hashes files up to this size on open
# (and checks their values; what is read from larger ones is checked where it is read)
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
        dense_dtype: Dense storage dtype.
        colbert_dtype: The ColBERT codec's name (:mod:`m3_rag.codecs`).
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
        if not FILES.match(fname) or not isinstance(fmeta, dict):
            raise IndexFormatError(f"{d}/segment.json names a bad file {fname!r}")
        if check:
            verify_file(d / fname, fmeta, opts.verify)

    def arr(key: str) -> Any:
        """Small arrays are read into RAM; large ones are read on demand (DiskArray)."""
        if f"{key}.npy" not in files:
            raise IndexFormatError(f"{d} has no {key}.npy")
        f = open_plain(d / f"{key}.npy")  # refuses symlinks and non-files
        try:
            if key in _ON_DEMAND and os.fstat(f.fileno()).st_size > _IN_RAM:
                if opts.io == "mmap":
                    return _mmap(d / f"{key}.npy")
                return open_array(d / f"{key}.npy", os.dup(f.fileno()))
            a = load_npy(f, d / f"{key}.npy")
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
    unchecked: set[str] = set()
    if check and dense.nbytes > _HASH_ON_OPEN:
        unchecked.add("dense.npy")
    elif check and not np.isfinite(dense).all():
        raise IndexFormatError(f"{d}/dense.npy holds NaN or inf")
    lexical = None
    if "lex_indptr.npy" in files:
        lexical = LexicalPostings(*(arr(f"lex_{k}") for k in LexicalPostings.NAMES))
        unchecked |= _check_lexical(d, lexical, count, check)
    colbert = None
    if "colbert_vectors.npy" in files:
        scales = arr("colbert_scales") if "colbert_scales.npy" in files else None
        codec = get_codec(opts.colbert_dtype)
        colbert = ColbertBlock(arr("colbert_vectors"), arr("colbert_offsets"), scales, codec)
        unchecked |= _check_colbert(d, colbert, count, opts, check)
    offsets = arr("docs_offsets")
    with open_plain(d / "docs.jsonl") as f:
        size = os.fstat(f.fileno()).st_size
        blob: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    if len(offsets) != count + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != size:
        raise IndexFormatError(f"{d}/docs_offsets.npy does not fit docs.jsonl")
    if (np.diff(offsets) <= 0).any():
        raise IndexFormatError(f"{d}/docs_offsets.npy must increase")
    ann = None
    if "ann.npy" in files:
        try:
            with open_plain(d / "ann.npy") as f:
                ann = _read_ann(f, d / "ann.npy", opts.ann_nprobe)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{d}/ann.npy is not a readable faiss index: {e}") from None
        if ann.index.ntotal != count or ann.index.d != dense.shape[1]:
            raise IndexFormatError(f"{d}/ann.npy does not index this segment's vectors")
    docs = DocTable(blob=blob, offsets=offsets, where=f"{d}/docs.jsonl")
    return Segment(
        name, ids, dense, lexical, colbert, docs, ann, where=str(d), unchecked=frozenset(unchecked)
    )


def _read_ann(f: BinaryIO, where: Path, nprobe: int) -> DenseANN:
    """The faiss index serialised in the ``uint8`` ``.npy`` file ``f``, streamed into faiss
    (the file's bytes are not held in RAM beside the index).

    Raises:
        ValueError: not a 1-d uint8 array, a size that does not match its header, not a
            faiss index, or bytes left after it.
    """
    dtype, shape, offset = npy_header(f, where)
    if dtype != np.uint8 or len(shape) != 1:
        raise ValueError(f"expected a 1-d uint8 array, got {dtype} {shape}")
    check_size(where, f.fileno(), offset, shape[0])
    f.seek(offset)
    left = shape[0]

    def read(n: int) -> bytes:
        nonlocal left
        b = f.read(min(n, left))
        left -= len(b)
        return b

    ann = DenseANN.read_from(read, nprobe)
    if left:
        raise ValueError(f"{left} bytes after the index")
    return ann


def _mmap(path: Path) -> np.ndarray:
    a = map_npy(path)
    mm = getattr(a, "_mmap", None)
    if mm is not None:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_RANDOM)  # no read-ahead around each random read
    return a


def verify_file(path: Path, meta: dict[str, Any], level: str) -> None:
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
        with open_plain(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != meta.get("sha256"):
            raise IndexFormatError(f"{path} does not match its checksum (changed or corrupt)")


def _ids(d: Path, count: int) -> list[str]:
    try:
        ids = json.loads(read_bytes(d / "ids.json").decode("utf-8"))
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


def _check_lexical(d: Path, lex: LexicalPostings, count: int, check: bool) -> set[str]:
    """Check postings read from ``d`` -> the files whose values were not checked (large)."""
    nnz = len(lex.indices)
    _check_offsets(f"{d}/lex_indptr.npy", lex.indptr, count, nnz)
    _check_offsets(f"{d}/lex_tptr.npy", lex.tptr, len(lex.terms), nnz)
    if not (len(lex.data) == len(lex.trows) == len(lex.tdata) == nnz) or len(lex.length) != count:
        raise IndexFormatError(f"{d}/lex_*.npy have inconsistent lengths")
    big = (lex.trows, lex.indices, lex.data, lex.tdata)
    if not check:
        return set()
    if any(x.nbytes > _HASH_ON_OPEN for x in big):
        return {"lex_data.npy", "lex_tdata.npy"}  # weights checked where they are read
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
    return set()


def _check_colbert(
    d: Path, col: ColbertBlock, count: int, opts: SegmentOptions, check: bool
) -> set[str]:
    """Check ColBERT arrays read from ``d`` -> the files whose values were not checked."""
    _check_offsets(f"{d}/colbert_offsets.npy", col.offsets, count, len(col.vectors))
    codec = get_codec(opts.colbert_dtype)
    if col.vectors.dtype != codec.dtype or col.vectors.ndim != 2:
        raise IndexFormatError(f"{d}/colbert_vectors.npy is {col.vectors.dtype}")
    if (col.scales is None) == codec.scaled:
        raise IndexFormatError(
            f"{d}: {codec.name} ColBERT vectors {'need' if codec.scaled else 'have no'} "
            "colbert_scales.npy"
        )
    if not check:
        return set()
    if col.scales is not None:
        if len(col.scales) != len(col.vectors):
            raise IndexFormatError(f"{d}/colbert_scales.npy must hold one scale per vector")
        if col.scales.nbytes > _HASH_ON_OPEN:
            return {"colbert_scales.npy"}
        s = np.asarray(col.scales)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise IndexFormatError(f"{d}/colbert_scales.npy must hold finite scales > 0")
    elif col.vectors.nbytes > _HASH_ON_OPEN:
        return {"colbert_vectors.npy"}
    elif codec.dtype.kind == "f" and not np.isfinite(col.vectors).all():
        raise IndexFormatError(f"{d}/colbert_vectors.npy holds NaN or inf")
    return set()


def deletes_of(d: Path, name: str, count: int) -> np.ndarray:
    """Read a tombstone file: sorted unique rows in ``[0, count)``."""
    if not DELETES.match(name):
        raise IndexFormatError(f"bad tombstone file name {name!r}")
    try:
        with open_plain(d / name) as f:
            rows = load_npy(f, d / name)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{d}/{name} is not a readable array: {e}") from None
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise IndexFormatError(f"{d}/{name} must be 1-d integers")
    rows = rows.astype(np.int64)
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= count or (np.diff(rows) <= 0).any()):
        raise IndexFormatError(f"{d}/{name} holds rows out of range or unsorted")
    return rows

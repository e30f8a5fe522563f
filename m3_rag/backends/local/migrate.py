"""Converting a format-2 snapshot into the local engine's format (3).

One code path for both uses: :func:`migrate` writes the converted index to a new directory,
:func:`load_snapshot` (``open_saved`` on a snapshot) keeps it in RAM. Both verify every
checksum first (:func:`~m3_rag.backends.local.format2.read_snapshot`), then check the
documents ``batch`` rows at a time with :func:`~m3_rag.backends.validate.prepare_batch` (the
one validation of the engines, plus the checks only stored arrays need: offsets, int8
scales), then write them with the streaming segment builder: the vectors are read a piece
at a time, never loaded whole; the lexical postings and the texts are held while the
segment is written, as a merge holds them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.local.build import build_segment
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.local.format2 import Snapshot, read_snapshot
from m3_rag.backends.local.save import IndexWriter
from m3_rag.backends.local.segment import ColbertBlock, DocTable, LexicalPostings, Segment
from m3_rag.backends.local.segment_io import SegmentOptions
from m3_rag.backends.validate import prepare_batch
from m3_rag.errors import IndexFormatError
from m3_rag.spec import IndexSpec

__all__ = ["load_snapshot", "migrate"]

_BATCH_BYTES = 64 << 20  # vectors checked at a time


def migrate(old: str | os.PathLike[str], new: str | os.PathLike[str]) -> int:
    """Convert the format-2 snapshot at ``old`` into a new index (format 3) at ``new``.

    ``old`` is only read. ``new`` is created, committed at once (no index there until it
    is complete); an index already at ``new`` is replaced atomically.

    Returns:
        The number of documents converted.

    Raises:
        FileNotFoundError: no index at ``old``.
        IndexFormatError: ``old`` is not a readable format-2 snapshot (format 1 has no
            checksums and is refused: rebuild it), or it fails a check (the message names
            the file); nothing is committed at ``new`` then.
        ValueError: ``new`` is a file, a symlink or an unrelated non-empty directory.
    """
    snap = read_snapshot(Path(old))
    try:
        options = LocalBackend().segment_options(snap.spec)
        with IndexWriter(Path(new)) as w:
            if snap.count:
                name, d = w.segment_dir()
                _convert(snap, name, options, d)
                w.add(name)
            w.commit(snap.spec, snap.settings, snap.count)
        return snap.count
    finally:
        snap.close()


def load_snapshot(old: str | os.PathLike[str]) -> tuple[IndexSpec, dict[str, Any], LocalBackend]:
    """The format-2 snapshot at ``old`` converted into an in-memory local engine.

    Returns:
        ``(spec, settings, backend)``: the backend holds the documents, opened with
        ``spec`` (open it again with the spec you need: it is checked against this one).

    Raises:
        FileNotFoundError, IndexFormatError: as :func:`migrate`.
    """
    snap = read_snapshot(Path(old))
    try:
        backend = LocalBackend()
        options = backend.segment_options(snap.spec)
        segments = [_convert(snap, "seg-00000001", options, None)] if snap.count else []
        return snap.spec, snap.settings, backend.adopt(snap.spec, snap.settings, segments)
    finally:
        snap.close()


def _convert(snap: Snapshot, name: str, options: SegmentOptions, directory: Path | None) -> Segment:
    """The whole snapshot as one segment (written to ``directory``, or in RAM)."""
    source = _source(snap)
    build = [(source, np.arange(snap.count, dtype=np.int64))]
    return build_segment(name, build, options, snap.spec.vocab_size, directory)


def _array(snap: Snapshot, key: str) -> Any:
    """Array ``key`` of the snapshot, read on demand (a DiskArray, which reads as an
    ndarray does: the segment builder takes either)."""
    arr = snap.arrays.get(key)
    if arr is None:
        raise IndexFormatError(f"{snap.where} has no {key}.npy")
    return arr


def _offsets(snap: Snapshot, key: str, total: int) -> np.ndarray:
    """A checked ``[count + 1]`` offsets array (``total``: what its last entry must be)."""
    a = _array(snap, key)
    if a.ndim != 1 or a.dtype.kind not in "iu" or len(a) != snap.count + 1:
        raise IndexFormatError(f"{snap.where}/{key}.npy must hold {snap.count + 1} integers")
    off = np.asarray(a).astype(np.int64)
    if int(off[0]) != 0 or (np.diff(off) < 0).any() or int(off[-1]) != total:
        raise IndexFormatError(
            f"{snap.where}/{key}.npy must start at 0, never decrease and end at {total} "
            "(inconsistent with the stored data)"
        )
    return off


def _source(snap: Snapshot) -> Segment:
    """The snapshot as a segment ``build_segment`` can read (arrays on disk), once every
    document passed the checks."""
    spec = snap.spec
    dense = _array(snap, "dense_vectors")
    if dense.ndim != 2 or dense.shape != (snap.count, spec.dense_dim):
        raise IndexFormatError(
            f"{snap.where}/dense_vectors.npy has shape {dense.shape}, expected "
            f"{(snap.count, spec.dense_dim)}"
        )
    if str(dense.dtype) != spec.dense_dtype:
        raise IndexFormatError(f"{snap.where}/dense_vectors.npy is {dense.dtype}")
    lexical = None
    if spec.lexical is not None:
        data, indices = _array(snap, "lexical_data"), _array(snap, "lexical_indices")
        if data.ndim != 1 or indices.ndim != 1 or len(data) != len(indices):
            raise IndexFormatError(f"{snap.where}/lexical_*.npy must be 1-d, of equal length")
        if indices.dtype.kind not in "iu" or data.dtype.kind != "f":
            raise IndexFormatError(f"{snap.where}/lexical_*.npy: integer ids, float weights")
        indptr = _offsets(snap, "lexical_indptr", len(data))
        lexical = LexicalPostings.doc_major(indptr, indices, data)
    colbert = None
    if spec.colbert_dim is not None:
        vecs = _array(snap, "colbert_vectors")
        if vecs.ndim != 2 or vecs.shape[1] != spec.colbert_dim:
            raise IndexFormatError(f"{snap.where}/colbert_vectors.npy has shape {vecs.shape}")
        if str(vecs.dtype) != spec.colbert_dtype:
            raise IndexFormatError(f"{snap.where}/colbert_vectors.npy is {vecs.dtype}")
        offsets = _offsets(snap, "colbert_offsets", len(vecs))
        scales: Any = None
        if spec.colbert_dtype == "int8":
            s = snap.arrays.get("colbert_scales")
            if s is None or s.ndim != 1 or len(s) != len(vecs) or s.dtype.kind != "f":
                raise IndexFormatError(
                    f"{snap.where}: int8 ColBERT vectors need colbert_scales.npy, one per vector"
                )
            scales = s
        colbert = ColbertBlock(vecs, offsets, scales)
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    for doc_id, text, meta in snap.documents():
        ids.append(doc_id)
        texts.append(text)
        metas.append(meta)
    source = Segment("", ids, dense, lexical, colbert, DocTable(texts=texts, metas=metas))
    for start, stop in _batches(source):
        _check_rows(snap, source, start, stop)
    return source


def _batches(seg: Segment) -> Iterator[tuple[int, int]]:
    """Row ranges holding about ``_BATCH_BYTES`` of vectors each."""
    n = len(seg)
    per_row = seg.dense.nbytes // max(n, 1)
    if seg.colbert is not None:
        per_row += seg.colbert.vectors.nbytes // max(n, 1)
    step = max(1, _BATCH_BYTES // max(per_row, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _check_rows(snap: Snapshot, seg: Segment, start: int, stop: int) -> None:
    """Rows ``start:stop`` through the engines' input validation (and the stored-only
    checks); any failure names the snapshot."""
    spec = snap.spec
    dense = np.asarray(seg.dense[start:stop])
    if not np.isfinite(dense).all():
        raise IndexFormatError(
            f"{snap.where}/dense_vectors.npy must hold finite floats (NaN or inf found)"
        )
    lexical = None
    if seg.lexical is not None:
        lex = seg.lexical
        a, b = int(lex.indptr[start]), int(lex.indptr[stop])
        indices, data = np.asarray(lex.indices[a:b]), np.asarray(lex.data[a:b])
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= spec.vocab_size):
            raise IndexFormatError(
                f"{snap.where}/lexical_indices.npy has token ids outside the vocabulary"
            )
        if len(data) and (not np.isfinite(data).all() or float(data.min()) < 0):
            raise IndexFormatError(f"{snap.where}/lexical_data.npy must hold finite weights >= 0")
        indptr = np.asarray(lex.indptr[start : stop + 1]) - a
        lexical = sp.csr_matrix((data, indices, indptr), shape=(stop - start, spec.vocab_size))
    colbert = None
    if seg.colbert is not None:
        col = seg.colbert
        a, b = int(col.offsets[start]), int(col.offsets[stop])
        vecs = np.asarray(col.vectors[a:b], dtype=np.float32)
        if col.scales is not None:
            scales = np.asarray(col.scales[a:b])
            if not (np.isfinite(scales).all() and (scales > 0).all()):
                raise IndexFormatError(
                    f"{snap.where}/colbert_scales.npy must hold finite scales > 0"
                )
            vecs *= scales[:, None]
        elif not np.isfinite(vecs).all():
            raise IndexFormatError(f"{snap.where}/colbert_vectors.npy holds NaN or inf")
        cuts = (np.asarray(col.offsets[start : stop + 1]) - a).tolist()
        colbert = [vecs[x:y] for x, y in itertools.pairwise(cuts)]
    rows = range(start, stop)
    try:
        prepare_batch(
            spec,
            [seg.ids[r] for r in rows],
            [seg.docs.text(r) for r in rows],
            [seg.docs.metadata(r) for r in rows],
            dense,
            lexical,
            colbert,
        )
    except (TypeError, ValueError) as e:
        raise IndexFormatError(f"{snap.where} holds documents that cannot be stored: {e}") from None

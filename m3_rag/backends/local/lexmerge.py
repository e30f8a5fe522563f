"""The lexical postings of a merged segment, streamed from its sources' postings.

A merge writes the rows it keeps of several segments as one. The postings of the new
segment are the sources' postings with dead rows dropped and rows renumbered: doc-major
(``indptr``, ``indices``, ``data``, ``length``) is the kept rows' ranges copied in order;
term-major (``terms``, ``tptr``, ``trows``, ``tdata``) is, term after term, each source's
postings of that term, kept and renumbered, sources in order (so rows ascend within a term,
as :meth:`LexicalPostings.from_csr` orders them). Both are written a bounded piece at a
time: a merge of 65M postings holds ~``_BLOCK`` postings in RAM, where building them with
``from_csr`` held every posting several times (2.4 GB at 1M documents).

The result equals ``LexicalPostings.from_csr`` of the kept rows, array for array
(``tests/backends/test_local_engine.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from m3_rag.backends.local.segment import LexicalPostings, Segment, check_finite, read_ranges
from m3_rag.errors import IndexFormatError

__all__ = ["can_stream", "stream_postings"]

_BLOCK = 1 << 21  # postings per piece (~30 bytes each in flight)

Write = Callable[[str, Iterable[np.ndarray], Any, tuple[int, ...]], None]


def can_stream(parts: Sequence[tuple[Segment, np.ndarray]]) -> bool:
    """Whether every source has term-major postings (a migrated format-2 source has only
    doc-major ones, and is merged by ``from_csr``)."""
    for s, _ in parts:
        lex = s.lexical
        if lex is None or (len(lex.terms) == 0 and len(lex.indices) > 0):
            return False
    return True


def stream_postings(parts: Sequence[tuple[Segment, np.ndarray]], write: Write) -> None:
    """Write the postings of ``parts``' rows as ``lex_<name>`` arrays through
    ``write(name, pieces, dtype, shape)`` (the segment builder's sink).

    Args:
        parts: ``(segment, rows)`` pairs, ``rows`` sorted int64; every segment has
            postings (:func:`can_stream`).
        write: Called once per array, with an iterable of pieces and the array's shape.

    Raises:
        IndexFormatError: a source's stored postings are corrupt (a NaN or inf weight, a
            row out of range), naming the file.
    """
    lexs = [_lex(s) for s, _ in parts]
    lens = [
        np.asarray(lex.indptr[rows + 1] - lex.indptr[rows])
        for lex, (_, rows) in zip(lexs, parts, strict=True)
    ]
    all_lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(all_lens)]).astype(np.int64)
    nnz = int(indptr[-1])
    write("lex_indptr", [indptr], np.int64, indptr.shape)
    write("lex_indices", _doc_major(parts, "indices"), np.int32, (nnz,))
    write("lex_data", _doc_major(parts, "data"), np.float32, (nnz,))
    length = [np.asarray(lex.length)[rows] for lex, (_, rows) in zip(lexs, parts, strict=True)]
    write("lex_length", length, np.float32, (len(indptr) - 1,))
    counts: list[tuple[np.ndarray, np.ndarray]] = []
    write("lex_trows", _term_major(parts, "trows", counts), np.int32, (nnz,))
    write("lex_tdata", _term_major(parts, "tdata", None), np.float32, (nnz,))
    terms = np.concatenate([t for t, _ in counts]) if counts else np.zeros(0, np.int64)
    per = np.concatenate([c for _, c in counts]) if counts else np.zeros(0, np.int64)
    tptr = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
    if int(tptr[-1]) != nnz:
        raise IndexFormatError(
            f"the term-major postings of {', '.join(s.where for s, _ in parts)} do not match "
            "their doc-major postings: the index is corrupt; rebuild it"
        )
    write("lex_terms", [terms.astype(np.int64)], np.int64, terms.shape)
    write("lex_tptr", [tptr], np.int64, tptr.shape)


def _lex(s: Segment) -> LexicalPostings:
    assert s.lexical is not None
    return s.lexical


def _doc_major(parts: Sequence[tuple[Segment, np.ndarray]], key: str) -> Iterator[np.ndarray]:
    """The kept rows' ``indices`` or ``data``, in row order, about ``_BLOCK`` at a time."""
    for s, rows in parts:
        lex = _lex(s)
        src = lex.indices if key == "indices" else lex.data
        starts = np.asarray(lex.indptr[rows], dtype=np.int64)
        lengths = np.asarray(lex.indptr[rows + 1], dtype=np.int64) - starts
        ends = np.cumsum(lengths)
        at = 0
        while at < len(rows):
            stop = max(at + 1, int(np.searchsorted(ends, ends[at] - lengths[at] + _BLOCK)))
            piece = read_ranges(src, starts[at:stop], lengths[at:stop])
            if key == "data" and "lex_data.npy" in s.unchecked:
                check_finite(piece, s.file("lex_data.npy"))
            if key == "indices" and len(piece) and int(piece.min()) < 0:
                raise IndexFormatError(f"{s.file('lex_indices.npy')} holds a negative term id")
            yield piece
            at = stop


def _renumbering(parts: Sequence[tuple[Segment, np.ndarray]]) -> list[np.ndarray]:
    """Per source, ``[n_source]`` int64: each row's row in the new segment, -1 if dropped."""
    out, base = [], 0
    for s, rows in parts:
        new = np.full(len(s), -1, np.int64)
        new[rows] = np.arange(base, base + len(rows), dtype=np.int64)
        base += len(rows)
        out.append(new)
    return out


def _blocks(parts: Sequence[tuple[Segment, np.ndarray]]) -> list[tuple[int, int]]:
    """Term id ranges ``[t0, t1)`` holding about ``_BLOCK`` source postings each (over the
    terms present: BM25's hashed ids are spread over 2^31 values)."""
    terms = np.concatenate([np.asarray(_lex(s).terms, dtype=np.int64) for s, _ in parts])
    sizes = np.concatenate([np.diff(np.asarray(_lex(s).tptr, dtype=np.int64)) for s, _ in parts])
    if len(terms) == 0:
        return []
    present, at = np.unique(terms, return_inverse=True)
    cum = np.cumsum(np.bincount(at.reshape(-1), weights=sizes, minlength=len(present)))
    edges = [0]  # positions in ``present``
    while edges[-1] < len(present):
        start = cum[edges[-1] - 1] if edges[-1] else 0
        nxt = int(np.searchsorted(cum, start + _BLOCK))
        edges.append(min(len(present), max(edges[-1] + 1, nxt)))
    bounds = [int(present[e]) for e in edges[:-1]] + [int(present[-1]) + 1]
    return list(itertools.pairwise(bounds))


def _term_major(
    parts: Sequence[tuple[Segment, np.ndarray]],
    key: str,
    counts: list[tuple[np.ndarray, np.ndarray]] | None,
) -> Iterator[np.ndarray]:
    """``trows`` or ``tdata`` of the new segment, a block of terms at a time; with
    ``counts``, also appends each block's ``(terms, postings per term)``."""
    renumber = _renumbering(parts)
    for t0, t1 in _blocks(parts):
        tids, rows, vals = [], [], []
        for (s, _), new in zip(parts, renumber, strict=True):
            lex = _lex(s)
            a, b = np.searchsorted(lex.terms, [t0, t1])
            if a == b:
                continue
            tptr = np.asarray(lex.tptr[a : b + 1], dtype=np.int64)
            p0, p1 = int(tptr[0]), int(tptr[-1])
            one = np.array([p0], np.int64)
            src_rows = read_ranges(lex.trows, one, np.array([p1 - p0], np.int64))
            if len(src_rows) and (int(src_rows.min()) < 0 or int(src_rows.max()) >= len(s)):
                raise IndexFormatError(f"{s.file('lex_trows.npy')} holds a row out of range")
            mapped = new[src_rows]
            keep = mapped >= 0
            tids.append(np.repeat(np.asarray(lex.terms[a:b], dtype=np.int64), np.diff(tptr))[keep])
            if key == "trows":
                rows.append(mapped[keep])
            else:
                v = read_ranges(lex.tdata, one, np.array([p1 - p0], np.int64))
                if "lex_tdata.npy" in s.unchecked:
                    check_finite(v, s.file("lex_tdata.npy"))
                vals.append(v[keep])
        if not tids:
            continue
        tid = np.concatenate(tids)
        order = np.argsort(tid, kind="stable")  # by term; sources, then rows, in order
        if counts is not None:
            counts.append(np.unique(tid, return_counts=True))
        yield (np.concatenate(rows) if key == "trows" else np.concatenate(vals))[order]

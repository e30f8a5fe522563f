"""Immutable segments: the unit the local engine stores, searches, persists and merges.

A segment holds ``n`` documents row-aligned across its arrays. Its arrays are plain numpy
arrays, in RAM (an in-memory index) or memory-mapped read-only from its directory (a
disk-backed index): the scoring code does not tell them apart. A segment never changes once
built; deletes are tombstones kept by the engine, and merging writes a new segment.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag._inputs import SCORES_KEY
from m3_rag.backends.local.diskarray import DiskArray
from m3_rag.codecs import ColbertCodec, get_codec
from m3_rag.errors import IndexFormatError
from m3_rag.scoring import colbert_scores_rows, dense_scan

__all__ = [
    "ColbertBlock",
    "DocTable",
    "LexicalPostings",
    "Segment",
    "check_finite",
    "gather_ranges",
]


def read_ranges(a: Any, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows ``starts[i] .. starts[i] + lengths[i] - 1`` of ``a`` (an array or a
    :class:`~m3_rag.backends.local.diskarray.DiskArray`), concatenated."""
    if isinstance(a, DiskArray):
        return a.ranges(starts, lengths)
    return np.asarray(a[gather_ranges(starts, lengths)])


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, concatenated.

    Args:
        starts: ``[r]`` int64 start of each range.
        lengths: ``[r]`` int64 length of each range.

    Returns:
        ``[sum(lengths)]`` int64 positions.
    """
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    local = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - local, lengths) + np.arange(total, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class LexicalPostings:
    """Lexical weights of a segment, doc-major and term-major.

    Attributes:
        indptr: ``[n + 1]`` int64 row offsets (doc-major CSR).
        indices: ``[nnz]`` int32 term ids.
        data: ``[nnz]`` float32 M3 weights or BM25 term counts.
        terms: ``[u]`` int64 sorted ids of the terms present.
        tptr: ``[u + 1]`` int64 offsets of each term's postings.
        trows: ``[nnz]`` int32 row of each posting.
        tdata: ``[nnz]`` float32 value of each posting.
        length: ``[n]`` float32 sum of each row (the BM25 document length).
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    terms: np.ndarray
    tptr: np.ndarray
    trows: np.ndarray
    tdata: np.ndarray
    length: np.ndarray

    NAMES = ("indptr", "indices", "data", "terms", "tptr", "trows", "tdata", "length")

    @classmethod
    def from_csr(cls, docs: sp.csr_matrix) -> LexicalPostings:
        """Build both layouts from a doc x term CSR matrix ``[n, V]``."""
        docs = sp.csr_matrix(docs, dtype=np.float32)
        docs.sum_duplicates()
        indices = docs.indices.astype(np.int32)
        order = np.argsort(indices, kind="stable")  # by term, rows ascending within a term
        rows = np.repeat(np.arange(docs.shape[0], dtype=np.int32), np.diff(docs.indptr))
        terms, counts = np.unique(indices, return_counts=True)
        return cls(
            indptr=docs.indptr.astype(np.int64),
            indices=indices,
            data=docs.data.astype(np.float32),
            terms=terms.astype(np.int64),
            tptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            trows=rows[order],
            tdata=docs.data[order].astype(np.float32),
            length=np.asarray(docs.sum(axis=1), dtype=np.float32).reshape(-1),
        )

    @classmethod
    def doc_major(cls, indptr: np.ndarray, indices: Any, data: Any) -> LexicalPostings:
        """Doc-major postings alone (the term-major arrays left empty): a source the segment
        builder reads rows from (:meth:`rows_csr`), never a segment that is searched."""
        z = np.zeros(0, np.int64)
        return cls(indptr, indices, data, z, np.zeros(1, np.int64), z, z, np.zeros(0, np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in self.NAMES}

    def rows_csr(self, rows: np.ndarray, vocab_size: int) -> sp.csr_matrix:
        """Doc-major CSR ``[len(rows), vocab_size]`` of the given rows."""
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        indptr = np.concatenate([[0], np.cumsum(ends - starts)])
        return sp.csr_matrix(
            (
                read_ranges(self.data, starts, ends - starts),
                read_ranges(self.indices, starts, ends - starts),
                indptr,
            ),
            shape=(len(rows), vocab_size),
        )

    def term_postings(self, terms: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(query_position, rows [p] int64, values [p] float32)`` of each query term found
        here (one read per term)."""
        pos = np.searchsorted(self.terms, terms)
        found = pos < len(self.terms)
        found[found] = self.terms[pos[found]] == terms[found]
        for q in np.flatnonzero(found).tolist():
            a, b = int(self.tptr[pos[q]]), int(self.tptr[pos[q] + 1])
            yield q, np.asarray(self.trows[a:b], dtype=np.int64), np.asarray(self.tdata[a:b])


@dataclass(frozen=True, eq=False)
class ColbertBlock:
    """ColBERT vectors of a segment, packed.

    Attributes:
        vectors: ``[T, width]`` codes: float16, float32 or int8 vectors, or uint8 sign bits.
        offsets: ``[n + 1]`` int64 first vector of each row.
        scales: ``[T]`` float32 per-vector scales of int8 ``vectors``, else ``None``.
        codec: The codec of ``vectors`` (``None``: the built-in one of their dtype).
    """

    vectors: np.ndarray
    offsets: np.ndarray
    scales: np.ndarray | None = None
    codec: ColbertCodec | None = None

    @property
    def coder(self) -> ColbertCodec:
        """The codec that scores and decodes ``vectors``."""
        if self.codec is not None:
            return self.codec
        if self.vectors.dtype.kind == "u":  # bit codes: binary or rotated, not to be guessed
            raise ValueError("a ColBERT block of bit codes needs its codec")
        return get_codec("int8" if self.vectors.dtype.kind == "i" else "float32")

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Vectors of the given rows, copied out -> ``(packed, offsets [len(rows)+1], scales)``."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        scales = None if self.scales is None else read_ranges(self.scales, starts, lengths)
        return read_ranges(self.vectors, starts, lengths), offsets, scales

    def scores(self, query: np.ndarray, rows: np.ndarray, prepared: Any = None) -> np.ndarray:
        """MaxSim of ``query [q, dim]`` with the given rows -> ``[len(rows)]`` float32
        (``prepared``: ``self.coder.prepare`` of the query, made once per search)."""
        packed, offsets, scales = self.gather(rows)
        local = np.arange(len(rows), dtype=np.int64)
        return colbert_scores_rows(
            query, packed, offsets, local, scales=scales, codec=self.coder, prepared=prepared
        )


def check_finite(values: np.ndarray, where: str) -> np.ndarray:
    """``values`` (scores or vectors read from stored files), or an error when one is NaN or
    infinite: a stored vector was corrupted after it was written (``add()`` refuses
    non-finite input), and a NaN or inf score would silently drop or top a document.

    Raises:
        IndexFormatError: naming ``where`` (the file the values come from).
    """
    if not np.isfinite(values).all():
        raise IndexFormatError(
            f"{where} holds NaN or inf (a score computed from it is not finite): the file is "
            "corrupt; restore the index from a copy or rebuild it"
        )
    return values


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(eq=False)
class DocTable:
    """Texts and metadata of a segment: Python lists in RAM, or a memory-mapped ``docs.jsonl``
    (one ``{"text", "metadata"}`` object per line) read a line at a time.

    A line is checked when it is first read: an unreadable line, or one that is not
    ``{"text": str, "metadata": dict}`` (without the reserved key), raises
    :class:`~m3_rag.errors.IndexFormatError` naming ``where`` and the line.
    """

    texts: list[str] | None = None
    metas: list[dict[str, Any]] | None = None
    blob: mmap.mmap | bytes | None = None
    offsets: np.ndarray | None = None
    where: str = "docs.jsonl"
    _parsed: list[dict[str, Any]] | None = field(default=None, repr=False)

    def _line(self, row: int) -> dict[str, Any]:
        assert self.blob is not None and self.offsets is not None
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        raw = bytes(self.blob[a:b])
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise IndexFormatError(
                f"{self.where}, line {row + 1}: not valid JSON ({str(e)[:120]})"
            ) from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("text"), str)
            or not isinstance(doc.get("metadata"), dict)
        ):
            raise IndexFormatError(
                f"{self.where}, line {row + 1}: must be an object with a str 'text' and an "
                "object 'metadata'"
            )
        if SCORES_KEY in doc["metadata"]:
            raise IndexFormatError(
                f"{self.where}, line {row + 1}: metadata holds the reserved key {SCORES_KEY!r}"
            )
        if b"\\u" in raw:  # an escape may encode a lone surrogate (add() refuses them)
            try:
                json.dumps(doc, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise IndexFormatError(
                    f"{self.where}, line {row + 1}: holds a lone surrogate (not valid Unicode)"
                ) from None
        return doc

    def text(self, row: int) -> str:
        if self.texts is not None:
            return self.texts[row]
        return str(self._line(row)["text"])

    def metadata(self, row: int) -> dict[str, Any]:
        if self.metas is not None:
            return self.metas[row]
        if self._parsed is not None:
            return self._parsed[row]
        metadata: dict[str, Any] = self._line(row)["metadata"]
        return metadata

    def metadatas(self) -> list[dict[str, Any]]:
        """Every row's metadata (parsed once on first use when memory-mapped)."""
        if self.metas is not None:
            return self.metas
        if self._parsed is None:
            n = len(self.offsets) - 1 if self.offsets is not None else 0
            self._parsed = [self._line(r)["metadata"] for r in range(n)]
        return self._parsed


@dataclass(frozen=True, eq=False)
class Segment:
    """``n`` documents with their stored encodings (immutable).

    Attributes:
        name: Unique name (``seg-000001``), also the directory name on disk.
        ids: ``n`` document ids.
        dense: ``[n, dense_dim]`` float32 or float16.
        lexical: Lexical postings, or ``None``.
        colbert: ColBERT vectors, or ``None``.
        docs: Texts and metadata.
        ann: An approximate dense index over ``dense``
            (:class:`~m3_rag.backends.local.ann.DenseANN`), or ``None`` (exact scan).
        where: Its directory (for error messages), or ``""`` in RAM.
        unchecked: The files whose values were not checked for NaN and inf when the segment
            was opened (files over the size hashed on open): what is read from them is
            checked where it is read (:func:`check_finite`).
    """

    name: str
    ids: list[str]
    dense: np.ndarray
    lexical: LexicalPostings | None
    colbert: ColbertBlock | None
    docs: DocTable
    ann: Any = None
    where: str = ""
    unchecked: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.ids)

    def dense_scores(self, query: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Inner products of ``query [dim]`` with all rows (or ``rows``) -> float32."""
        if rows is None and isinstance(self.dense, DiskArray):
            step = max(1, (32 << 20) // max(1, self.dense.nbytes // max(1, len(self))))
            return np.concatenate(
                [dense_scan(self.dense[s : s + step], query) for s in range(0, len(self), step)]
                or [np.zeros(0, np.float32)]
            )
        if rows is None:
            return dense_scan(self.dense, query)
        return np.asarray(self.dense[rows], dtype=np.float32) @ query

    def file(self, name: str) -> str:
        """Where file ``name`` of this segment is (for error messages)."""
        return f"{self.where}/{name}" if self.where else f"segment {self.name or '(new)'}: {name}"

    def nbytes(self) -> int:
        """Bytes of the segment's arrays (vectors, postings)."""
        total = int(self.dense.nbytes)
        if self.lexical is not None:
            total += sum(int(a.nbytes) for a in self.lexical.arrays().values())
        if self.colbert is not None:
            total += int(self.colbert.vectors.nbytes + self.colbert.offsets.nbytes)
            total += 0 if self.colbert.scales is None else int(self.colbert.scales.nbytes)
        return total

"""What every engine shares: id validation, top-k selection, and the one batch check
(:func:`prepare_batch`) each engine's ``add`` starts with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag._inputs import check_unicode
from m3_rag.codecs import get_codec, quantize_int8
from m3_rag.scoring import sparse_matrix
from m3_rag.spec import IndexSpec

__all__ = [
    "PreparedBatch",
    "check_ids",
    "id_list",
    "prepare_batch",
    "quantize_int8",
    "top_k",
]


def id_list(ids: Any) -> list[Any]:
    """``ids`` as a new list, its entries unchecked.

    Raises:
        TypeError: a bare ``str`` or ``bytes`` (it would be read as one id per character:
            ``delete("ab")`` must not delete ``"a"`` and ``"b"``), or not an iterable.
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"ids must be a list of ids, got a single {type(ids).__name__}; pass [{ids!r}]"
        )
    if not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list of str, got {type(ids).__name__}")
    return list(ids)


def check_ids(ids: Any, n: int | None = None) -> list[str]:
    """Validate document ids: a list of unique ``str``, ``n`` of them when given.

    Raises:
        TypeError: not a list of str (the message names the index).
        ValueError: duplicates within the call, or a count that does not match ``n``.
    """
    out = id_list(ids)
    for i, x in enumerate(out):
        if not isinstance(x, str):
            raise TypeError(f"ids[{i}] is {type(x).__name__}, expected str")
        if not x:
            raise ValueError(f"ids[{i}] is empty; ids must be non-empty strings")
        check_unicode(x, f"ids[{i}]")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(x for x in out if x in seen or seen.add(x))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate id {dup!r} in one call; ids must be unique")
    if n is not None and len(out) != n:
        raise ValueError(f"got {len(out)} ids for {n} items")
    return out


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``k`` highest scores, best first (ties by row), restricted to ``mask``.

    Args:
        scores: ``[n]`` scores.
        k: how many (all when ``k >= number of allowed rows``).
        mask: optional ``[n]`` bool, True for allowed rows.

    Returns:
        ``[min(k, allowed)]`` int64 row indices.
    """
    if mask is not None:
        allowed = np.flatnonzero(mask)
        sub = scores[allowed]
    else:
        allowed = None
        sub = scores
    k = min(int(k), len(sub))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(sub):  # all rows above the k-th score, then the lowest rows tied with it
        kth = np.partition(sub, len(sub) - k)[len(sub) - k]
        above = np.flatnonzero(sub > kth)
        part = np.concatenate([above, np.flatnonzero(sub == kth)[: k - len(above)]])
    else:
        part = np.arange(len(sub))
    part = part[np.lexsort((part, -sub[part]))]
    return (part if allowed is None else allowed[part]).astype(np.int64)


@dataclass(frozen=True)
class PreparedBatch:
    """A validated batch, in the storage types of its :class:`~m3_rag.spec.IndexSpec`.

    Attributes:
        ids, texts, metadatas: ``m`` of each.
        dense: ``[m, dense_dim]`` in ``spec.dense_dtype``.
        lexical: ``[m, vocab_size]`` float32 CSR (weights or term counts, >= 0), or ``None``.
        colbert: ``[T, width]`` packed codes of the codec ``spec.colbert_dtype`` names
            (float vectors for ``"float16"``/``"float32"``, int8 codes for ``"int8"``,
            ``[T, ceil(dim / 8)]`` sign bits for ``"binary"`` and ``"rotated-binary"``), or
            ``None``.
        colbert_offsets: ``[m + 1]`` int64: document ``i`` owns rows ``offsets[i]:offsets[i+1]``.
        colbert_scales: ``[T]`` float32 scales of a scaled codec's codes (int8), else ``None``.
    """

    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, Any]]
    dense: np.ndarray
    lexical: sp.csr_matrix | None
    colbert: np.ndarray | None
    colbert_offsets: np.ndarray | None
    colbert_scales: np.ndarray | None

    @property
    def colbert_lengths(self) -> np.ndarray | None:
        """``[m]`` vectors per document, or ``None``."""
        return None if self.colbert_offsets is None else np.diff(self.colbert_offsets)


def prepare_batch(
    spec: IndexSpec,
    ids: Sequence[str],
    texts: Sequence[str],
    metadatas: Sequence[dict[str, Any]],
    dense: np.ndarray,
    lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
    colbert: Sequence[np.ndarray] | None,
) -> PreparedBatch:
    """Validate a batch for ``spec`` and convert it to storage types, changing nothing.

    The one check every engine's ``add`` starts with.

    Raises:
        TypeError, ValueError: bad or duplicate ids; counts that differ; a leg present
            where ``spec`` has none (or missing where it has one); a wrong shape; a NaN or
            inf (or a value overflowing the storage dtype); a negative lexical weight or a
            term id outside ``[0, vocab_size)``.
    """
    checked = check_ids(ids, len(texts))
    if len(metadatas) != len(checked):
        raise ValueError(f"got {len(metadatas)} metadatas for {len(checked)} texts")
    if (spec.lexical is None) != (lexical is None) or (spec.colbert_dim is None) != (
        colbert is None
    ):
        raise ValueError("the encoded outputs do not match the legs of this index")
    vecs = np.asarray(dense)
    if vecs.ndim != 2 or vecs.shape != (len(checked), spec.dense_dim):
        raise ValueError(
            f"dense vectors must have shape [{len(checked)}, {spec.dense_dim}], got {vecs.shape}"
        )
    vecs = np.ascontiguousarray(vecs, dtype=spec.dense_dtype)
    if not np.isfinite(vecs).all():
        raise ValueError("dense vectors contain NaN or inf (or overflow their storage dtype)")
    block = None
    if spec.lexical is not None and lexical is not None:
        block = _lexical_block(lexical, spec.vocab_size)
        if block.shape[0] != len(checked):
            raise ValueError(f"got {block.shape[0]} lexical rows for {len(checked)} texts")
    packed = offsets = scales = None
    if spec.colbert_dim is not None and colbert is not None:
        packed, offsets, scales = _colbert_block(colbert, spec, len(checked))
    return PreparedBatch(
        checked, list(texts), list(metadatas), vecs, block, packed, offsets, scales
    )


def _lexical_block(
    lexical: Sequence[Mapping[int, float]] | sp.csr_matrix, vocab_size: int
) -> sp.csr_matrix:
    if sp.issparse(lexical):
        block = sp.csr_matrix(lexical, dtype=np.float32)
        if block.shape[1] != vocab_size:
            raise ValueError(f"lexical matrix has {block.shape[1]} columns, expected {vocab_size}")
    else:
        block = sparse_matrix(lexical, vocab_size)
    if block.nnz and (not np.isfinite(block.data).all() or block.data.min() < 0):
        raise ValueError("lexical weights must be finite and >= 0")
    return block


def _colbert_block(
    colbert: Sequence[np.ndarray], spec: IndexSpec, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if len(colbert) != m:
        raise ValueError(f"got {len(colbert)} ColBERT matrices for {m} texts")
    dim = int(spec.colbert_dim or 0)
    mats = [np.asarray(v) for v in colbert]
    for i, mat in enumerate(mats):
        if mat.ndim != 2 or mat.shape[1] != dim:
            raise ValueError(f"colbert[{i}] must have shape [t, {dim}], got {mat.shape}")
    lengths = np.fromiter((len(mat) for mat in mats), dtype=np.int64, count=len(mats))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codec = get_codec(spec.colbert_dtype)
    # float codecs store the block in their dtype: check it after the cast (an overflow)
    store = codec.dtype if codec.dtype.kind == "f" else np.dtype(np.float32)
    block = np.concatenate(mats).astype(store) if lengths.sum() else np.zeros((0, dim), store)
    if not np.isfinite(block).all():
        raise ValueError("ColBERT vectors contain NaN or inf (or overflow their storage dtype)")
    codes, scales = codec.encode(block)
    return codes, offsets, scales

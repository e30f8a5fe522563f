"""BM25: parameters, corpus statistics, IDF (variants named) and the document-side weight.

Pure, vectorised code; every engine scores BM25 through it. Two IDF variants:

* ``"okapi"`` (the default): rank-bm25's ``BM25Okapi``, ``ln((N - n + 0.5) / (n + 0.5))``,
  where a negative IDF (a term in more than half the documents) becomes
  ``epsilon * mean IDF`` of the corpus terms;
* ``"qdrant"``: Qdrant's IDF modifier, ``ln(1 + (N - n + 0.5) / (n + 0.5))`` (never
  negative, no floor).

``N`` is the number of documents, ``n`` the number holding the term; a term no document
holds gets an IDF of 0 in both.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, get_args

import numpy as np

__all__ = [
    "IDF_VARIANTS",
    "BM25Params",
    "BM25Stats",
    "IdfVariant",
    "bm25_idf",
    "bm25_norm",
    "bm25_tf",
]

IdfVariant = Literal["okapi", "qdrant"]
IDF_VARIANTS: tuple[str, ...] = get_args(IdfVariant)


@dataclass(frozen=True)
class BM25Params:
    """Okapi BM25 parameters, rank-bm25's ``BM25Okapi`` defaults."""

    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25

    def __post_init__(self) -> None:
        for name in ("k1", "b", "epsilon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"BM25 {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))

    def as_dict(self) -> dict[str, float]:
        return {"k1": self.k1, "b": self.b, "epsilon": self.epsilon}


def _check_variant(variant: str) -> None:
    if variant not in IDF_VARIANTS:
        raise ValueError(f"IDF variant must be one of {IDF_VARIANTS}, got {variant!r}")


def _raw_idf(df: np.ndarray, n: int, variant: str) -> np.ndarray:
    """The IDF formula of ``variant`` for document frequencies ``df`` (all > 0)."""
    df = np.asarray(df, dtype=np.float64)
    if variant == "qdrant":
        return np.log1p((n - df + 0.5) / (df + 0.5))
    return np.log(n - df + 0.5) - np.log(df + 0.5)


def bm25_idf(
    df: np.ndarray,
    n: int,
    p: BM25Params,
    variant: IdfVariant = "okapi",
    *,
    mean_idf: float | None = None,
) -> np.ndarray:
    """IDF of every term from its document frequency.

    Args:
        df: ``[V]`` document frequencies (0: the term is absent, its IDF is 0).
        n: Number of documents.
        p: BM25 parameters (``epsilon`` is the Okapi floor).
        variant: ``"okapi"`` or ``"qdrant"`` (see the module docstring).
        mean_idf: The corpus mean Okapi IDF the floor is taken from; ``None``: the mean over
            the terms of ``df`` present (right when ``df`` covers the whole corpus).

    Returns:
        ``[V]`` float64 IDF.
    """
    _check_variant(variant)
    df = np.asarray(df)
    present = df > 0
    idf = np.zeros(len(df), dtype=np.float64)
    idf[present] = _raw_idf(df[present], n, variant)
    if variant == "okapi" and present.any():
        floor = idf[present].mean() if mean_idf is None else mean_idf
        idf[present & (idf < 0)] = p.epsilon * floor
    return idf


@dataclass(frozen=True, eq=False)
class BM25Stats:
    """BM25 corpus statistics over a set of documents (immutable: updates return new stats).

    Attributes:
        n: Number of documents.
        total_len: Sum of their lengths (term counts).
        terms: ``[u]`` int64 sorted ids of the terms seen.
        df: ``[u]`` int64 documents holding each term (0 once all of them are removed).
    """

    n: int = 0
    total_len: float = 0.0
    terms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    df: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def updated(
        self, terms: np.ndarray, counts: np.ndarray, n: int, length: float, sign: int
    ) -> BM25Stats:
        """These statistics with some documents added (``sign=1``) or removed (``sign=-1``).

        Args:
            terms: ``[t]`` sorted unique term ids of those documents.
            counts: ``[t]`` how many of them hold each term.
            n: How many documents.
            length: Their total length.
            sign: ``1`` to add, ``-1`` to remove (the documents were counted before).
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign!r}")
        terms = np.asarray(terms, np.int64)
        union = np.union1d(self.terms, terms) if sign > 0 else self.terms
        df = np.zeros(len(union), np.int64)
        df[np.searchsorted(union, self.terms)] += self.df
        df[np.searchsorted(union, terms)] += sign * np.asarray(counts, np.int64)
        return BM25Stats(self.n + sign * int(n), self.total_len + sign * float(length), union, df)

    @property
    def avgdl(self) -> float:
        """Mean document length (1.0 for an empty corpus, so scores stay finite)."""
        return self.total_len / max(self.n, 1) or 1.0

    def doc_freq(self, terms: np.ndarray) -> np.ndarray:
        """``[q]`` int64 document frequency of each of ``terms`` (0 when absent)."""
        terms = np.asarray(terms, np.int64)
        out = np.zeros(len(terms), np.int64)
        if len(self.terms) == 0 or len(terms) == 0:
            return out
        pos = np.minimum(np.searchsorted(self.terms, terms), len(self.terms) - 1)
        hit = self.terms[pos] == terms
        out[hit] = self.df[pos[hit]]
        return out

    @cached_property
    def mean_idf(self) -> float:
        """Mean Okapi IDF of the terms present (the base of the Okapi floor)."""
        df = self.df[self.df > 0]
        return float(_raw_idf(df, self.n, "okapi").mean()) if len(df) else 0.0

    def idf(self, terms: np.ndarray, p: BM25Params, variant: IdfVariant = "okapi") -> np.ndarray:
        """``[q]`` float64 IDF of the query ``terms`` under ``variant`` (0 for an absent one)."""
        _check_variant(variant)
        mean = self.mean_idf if variant == "okapi" else None
        return bm25_idf(self.doc_freq(terms), self.n, p, variant, mean_idf=mean)


def bm25_tf(tf: np.ndarray, doc_len: np.ndarray, avgdl: float, p: BM25Params) -> np.ndarray:
    """The document side of BM25, ``tf (k1+1) / (tf + k1 (1 - b + b dl/avgdl))``.

    Args:
        tf: ``[m]`` term counts.
        doc_len: ``[m]`` length of the document of each count.
        avgdl: Mean document length of the corpus.
        p: BM25 parameters.

    Returns:
        ``[m]`` float64 weights.
    """
    tf = np.asarray(tf, dtype=np.float64)
    return tf * (p.k1 + 1) / (tf + bm25_norm(doc_len, avgdl, p))


def bm25_norm(doc_len: np.ndarray, avgdl: float | np.ndarray, p: BM25Params) -> np.ndarray:
    """``k1 (1 - b + b dl/avgdl)`` per document length -> float64, same shape.

    ``avgdl`` is the corpus mean length (a scalar, or one per document)."""
    avg = avgdl if isinstance(avgdl, np.ndarray) else (avgdl or 1.0)
    return p.k1 * (1 - p.b + p.b * np.asarray(doc_len, dtype=np.float64) / avg)

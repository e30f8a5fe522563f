"""Okapi BM25 (rank-bm25's ``BM25Okapi``): parameters, IDF and the document-side weight.

Pure, vectorised functions; every engine scores BM25 through them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["BM25Params", "bm25_idf", "bm25_norm", "bm25_tf"]


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


def bm25_idf(df: np.ndarray, n: int, p: BM25Params) -> np.ndarray:
    """rank-bm25 Okapi IDF ``log((n - df + 0.5) / (df + 0.5))`` of every term.

    Negative IDFs become ``epsilon * mean IDF`` of the terms present; absent terms get 0.

    Args:
        df: ``[V]`` document frequencies.
        n: Number of documents.
        p: BM25 parameters.

    Returns:
        ``[V]`` float64 IDF.
    """
    present = df > 0
    idf = np.zeros(len(df), dtype=np.float64)
    idf[present] = np.log(n - df[present] + 0.5) - np.log(df[present] + 0.5)
    if present.any():
        idf[present & (idf < 0)] = p.epsilon * idf[present].mean()
    return idf


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

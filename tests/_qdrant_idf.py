"""The local engine's BM25 with Qdrant's IDF: the reference the Qdrant backend is held to.

Use it in a test with::

    from m3_rag.bm25 import BM25Stats
    monkeypatch.setattr(BM25Stats, "idf", qdrant_idf)

Every BM25 statistics object (the local engine's included) then scores with the ``"qdrant"``
IDF variant of :mod:`m3_rag.bm25`, ``ln(1 + (N - n + 0.5) / (n + 0.5))`` over the live
documents (no epsilon floor).
"""

from __future__ import annotations

import numpy as np

from m3_rag.bm25 import BM25Params, BM25Stats, IdfVariant

_LIBRARY_IDF = BM25Stats.idf  # taken before any test replaces it


def qdrant_idf(
    self: BM25Stats, terms: np.ndarray, p: BM25Params, variant: IdfVariant = "okapi"
) -> np.ndarray:
    """Stands in for :meth:`BM25Stats.idf`: the ``"qdrant"`` variant, whatever is asked."""
    return _LIBRARY_IDF(self, terms, p, "qdrant")

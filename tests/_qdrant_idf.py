"""The local engine's BM25 with Qdrant's IDF: the reference the Qdrant backend is held to."""

from __future__ import annotations

import numpy as np


def qdrant_idf(self: object, terms: np.ndarray, p: object) -> np.ndarray:
    """Replaces ``m3_rag.backends.local.engine._Stats.idf``: Qdrant's IDF modifier,
    ``ln(1 + (N - n + 0.5) / (n + 0.5))`` over the live documents (no epsilon floor)."""
    known = dict(zip(self.terms.tolist(), self.df.tolist(), strict=True))  # type: ignore[attr-defined]
    df = np.asarray([known.get(t, 0) for t in terms.tolist()], np.float64)
    n = self.n  # type: ignore[attr-defined]
    return np.where(df > 0, np.log1p((n - df + 0.5) / (df + 0.5)), 0.0)

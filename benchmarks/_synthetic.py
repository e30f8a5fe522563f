"""Synthetic BGE-M3-shaped corpora for the benchmarks (no model pass needed)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def unit_rows(rng: np.random.Generator, n: int, dim: int, dtype: type = np.float32) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype, copy=False)


def zipf_terms(
    rng: np.random.Generator, n_docs: int, terms_per_doc: int, vocab: int
) -> sp.csr_matrix:
    """``[n_docs, vocab]`` lexical weights: ~terms_per_doc Zipf-distributed term ids per doc."""
    ids = np.minimum(rng.zipf(1.2, size=n_docs * terms_per_doc), vocab - 1).astype(np.int64)
    ids = rng.permutation(vocab)[ids]  # spread the frequent terms over the id space
    rows = np.repeat(np.arange(n_docs), terms_per_doc)
    vals = rng.uniform(0.01, 0.3, size=len(ids)).astype(np.float32)
    m = sp.csr_matrix((vals, (rows, ids)), shape=(n_docs, vocab))
    m.sum_duplicates()
    return m


def query_terms(rng: np.random.Generator, n_terms: int, vocab: int) -> dict[int, float]:
    ids = rng.permutation(vocab)[np.minimum(rng.zipf(1.2, size=n_terms), vocab - 1)]
    return {int(i): float(w) for i, w in zip(ids, rng.uniform(0.05, 0.3, n_terms), strict=True)}

"""The local engine's lexical candidates with exact pruning (search.PRUNE_ROWS lowered so
small segments prune) equal the exhaustive ones: ids, dense and lexical scores, bit for bit,
with deletes and filters. (To go into tests/backends/test_local_engine.py once the patch
/tmp/h23b/search.patch is applied.)"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from m3_rag.backends.local import search
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.spec import IndexSpec


def _weights(rng: np.random.Generator, n: int, vocab: int) -> sp.csr_matrix:
    ids = np.minimum(rng.zipf(1.15, size=n * 20), vocab) - 1
    vals = rng.uniform(0.01, 0.3, len(ids)) * (0.1 + np.log1p(ids) / np.log(vocab))
    m = sp.csr_matrix((vals.astype(np.float32), (np.repeat(np.arange(n), 20), ids)), (n, vocab))
    m.sum_duplicates()
    return m


def test_pruned_candidates_equal_exhaustive(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    vocab, n = 500, 3000
    spec = IndexSpec(model="m", dense_dim=8, colbert_dim=None, lexical="m3", vocab_size=vocab)
    backend = LocalBackend(ann_threshold=None)
    backend.open(spec, {})
    for s in range(0, n, 1000):  # three segments
        dense = rng.standard_normal((1000, 8)).astype(np.float32)
        metas = [{"g": int(i % 3)} for i in range(s, s + 1000)]
        ids = [f"d{i}" for i in range(s, s + 1000)]
        backend.add(ids, [""] * 1000, metas, dense, _weights(rng, 1000, vocab), None)
    backend.delete([f"d{i}" for i in range(0, n, 7)])
    for k in range(30):
        terms = np.unique(np.minimum(rng.zipf(1.15, size=6), vocab) - 1)
        query = {
            int(t): float(w) for t, w in zip(terms, rng.uniform(0.05, 0.3, len(terms)), strict=True)
        }
        dq = rng.standard_normal(8).astype(np.float32)
        flt = {"g": 1} if k % 2 else None
        monkeypatch.setattr(search, "PRUNE_ROWS", 1 << 60)
        want = backend.candidates(dq, query, 20, flt)
        monkeypatch.setattr(search, "PRUNE_ROWS", 0)
        got = backend.candidates(dq, query, 20, flt)
        assert got.ids == want.ids
        assert got.dense.tobytes() == want.dense.tobytes()
        assert got.lexical is not None and want.lexical is not None
        assert got.lexical.tobytes() == want.lexical.tobytes()

"""The pure scoring functions against brute-force references."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3_rag import scoring


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


sparse_dicts = st.lists(
    st.dictionaries(st.integers(0, 50), st.floats(0.0625, 5, width=32), max_size=12),
    min_size=1,
    max_size=8,
)


@settings(max_examples=50, deadline=None)
@given(q=sparse_dicts, d=sparse_dicts)
def test_sparse_scores_equal_dict_intersection(
    q: list[dict[int, float]], d: list[dict[int, float]]
) -> None:
    got = scoring.sparse_scores(scoring.sparse_matrix(q), scoring.sparse_matrix(d))
    want = np.array([[sum(a[t] * b[t] for t in a if t in b) for b in d] for a in q])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    n = min(len(q), len(d))
    np.testing.assert_allclose(
        scoring.pairwise_sparse(q[:n], d[:n]), np.diag(want[:n, :n]), rtol=1e-5, atol=1e-5
    )


def test_sparse_matrix_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="out of range"):
        scoring.sparse_matrix([{10: 1.0}], n_cols=5)
    assert scoring.sparse_matrix([{}, {}]).shape == (2, 1)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=7),
    q_len=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_packed_maxsim_equals_loop(lengths: list[int], q_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = _unit(rng, q_len, 8)
    docs = [_unit(rng, n, 8) for n in lengths]
    packed = np.concatenate(docs) if sum(lengths) else np.zeros((0, 8), np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    got = scoring.colbert_scores_packed(q, packed, offsets)
    want = [float((q @ d.T).max(axis=1).mean()) if len(d) else 0.0 for d in docs]
    np.testing.assert_allclose(got, want, atol=1e-5)
    rows = np.random.default_rng(seed).permutation(len(lengths))[: max(1, len(lengths) // 2)]
    np.testing.assert_allclose(
        scoring.colbert_scores_rows(q, packed, offsets, rows, chunk=3),
        np.asarray(want)[rows],
        atol=1e-5,
    )
    nonempty = [d for d in docs if len(d)]
    if nonempty:
        pair = scoring.pairwise_colbert([q] * len(nonempty), nonempty)
        np.testing.assert_allclose(
            pair, [w for w, d in zip(want, docs, strict=True) if len(d)], atol=1e-5
        )


def test_dense_scores() -> None:
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 3, 5), _unit(rng, 4, 5)
    np.testing.assert_allclose(scoring.dense_scores(a, b), a @ b.T, atol=1e-6)
    np.testing.assert_allclose(scoring.pairwise_dense(a, b[:3]), (a * b[:3]).sum(1), atol=1e-6)


def test_weighted_fusion_is_bgem3_formula() -> None:
    s = {
        "dense": np.array([0.5, 0.1]),
        "sparse": np.array([0.2, 0.4]),
        "colbert": np.array([0.9, 0.3]),
    }
    w = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
    np.testing.assert_allclose(
        scoring.weighted_fusion(s, w),
        (0.4 * s["dense"] + 0.2 * s["sparse"] + 0.4 * s["colbert"]) / 1.0,
        atol=1e-6,
    )
    # a mode without scores is left out of the denominator
    np.testing.assert_allclose(
        scoring.weighted_fusion({"dense": s["dense"]}, w), s["dense"], atol=1e-6
    )
    with pytest.raises(ValueError, match="no positive weight"):
        scoring.weighted_fusion(s, {"dense": 0.0})


def test_rrf_fusion_hand_computed() -> None:
    s = {"dense": np.array([3.0, 2.0, 1.0]), "sparse": np.array([1.0, 3.0, 2.0])}
    got = scoring.rrf_fusion(s, k=60)
    want = [1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(np.argmax(got)) == 1


@pytest.mark.parametrize("n", [0, 5, 20_000, 50_001])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dense_scan_matches_numpy(n: int, dtype: type) -> None:
    """Below 16,384 rows the scan runs inline, above it is split over the workers."""
    rng = np.random.default_rng(n)
    docs = _unit(rng, n, 8).astype(dtype)
    q = _unit(rng, 8)
    got = scoring.dense_scan(docs, q, chunk=1000)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, docs.astype(np.float32) @ q, atol=1e-6)


def test_dense_scan_rejects_wrong_dims() -> None:
    with pytest.raises(ValueError, match="dims"):
        scoring.dense_scan(np.zeros((3, 4), np.float32), np.zeros(5, np.float32))


def test_run_split_covers_rows_and_keeps_thread_settings() -> None:
    import threading

    import torch

    from m3_rag._parallel import run_split, split_ranges

    assert split_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_ranges(2, 8) == [(0, 1), (1, 2)]
    before = torch.get_num_threads()
    seen = np.zeros(100_000, np.int64)
    workers: set[int] = set()

    def mark(a: int, b: int) -> None:
        seen[a:b] += 1
        workers.add(torch.get_num_threads())

    run_split(mark, len(seen), min_rows=1000)
    assert (seen == 1).all()
    assert torch.get_num_threads() == before
    if before > 1:
        assert workers == {1}  # the workers run torch single-threaded
    fresh: list[int] = []  # a thread that has not used torch yet gets the process default
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [before]

    def boom(a: int, b: int) -> None:
        raise RuntimeError(f"rows {a}:{b}")

    with pytest.raises(RuntimeError, match="rows"):
        run_split(boom, 100_000, min_rows=1000)


def _scan_in_child(conn: Any) -> None:
    docs = np.ones((40_000, 4), np.float32)
    conn.send(float(scoring.dense_scan(docs, np.ones(4, np.float32)).sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_dense_scan_works_in_a_forked_child() -> None:
    """A forked child inherits the worker pool object but not its threads: it must not hang."""
    import multiprocessing as mp

    scoring.dense_scan(np.ones((40_000, 4), np.float32), np.ones(4, np.float32))  # pool up
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_scan_in_child, args=(child,))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("dense_scan hung in a forked child")
    assert parent.recv() == 160_000.0


def test_rrf_ties_share_a_rank_whatever_the_candidate_order() -> None:
    """Documents without a lexical match all score 0: their RRF credit must not depend on
    the order the backend listed the candidates in (it did: Milvus and memory differed)."""
    s = {"dense": np.array([0.9, 0.8, 0.7, 0.6]), "bm25": np.array([2.0, 0.0, 1.0, 0.0])}
    got = scoring.rrf_fusion(s, k=60)
    np.testing.assert_allclose(
        got, [1 / 61 + 1 / 61, 1 / 62 + 1 / 63, 1 / 63 + 1 / 62, 1 / 64 + 1 / 63], rtol=1e-6
    )
    perm = np.array([3, 1, 0, 2])
    shuffled = scoring.rrf_fusion({m: v[perm] for m, v in s.items()}, k=60)
    np.testing.assert_array_equal(shuffled, got[perm])


def test_sparse_dot_rows_equals_the_matrix_product_at_any_id_space() -> None:
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    docs = sp.random(50, 300, density=0.05, format="csr", random_state=1, dtype=np.float32)
    query = {
        int(t): float(w) for t, w in zip(rng.integers(0, 300, 12), rng.random(12), strict=True)
    }
    want = docs @ scoring.sparse_matrix([query], 300).T.toarray().reshape(-1)
    np.testing.assert_allclose(scoring.sparse_dot_rows(docs, query), want, rtol=1e-5, atol=1e-6)
    # hashed term ids: 2**31 - 1 columns; a transpose would cost O(columns) (minutes)
    big = sp.csr_matrix((docs.data, docs.indices * 7_000_000, docs.indptr), shape=(50, 2**31 - 1))
    big_q = {t * 7_000_000: w for t, w in query.items()}
    np.testing.assert_allclose(scoring.sparse_dot_rows(big, big_q), want, rtol=1e-5, atol=1e-6)
    assert scoring.sparse_dot_rows(big, {}).tolist() == [0.0] * 50

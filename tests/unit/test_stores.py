"""Each store against a brute-force reference (random data, hypothesis where it fits)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require
from hypothesis import given, settings
from hypothesis import strategies as st

from m3_rag.backends.legacy.colbert import ColbertStore
from m3_rag.backends.legacy.dense import DenseStore
from m3_rag.backends.legacy.lexical import LexicalStore
from m3_rag.backends.validate import top_k
from m3_rag.bm25 import BM25Params


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40), k=st.integers(0, 50), seed=st.integers(0, 10_000), use_mask=st.booleans()
)
def test_top_k_matches_full_sort(n: int, k: int, seed: int, use_mask: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, n).astype(np.float32)  # many ties
    mask = rng.random(n) < 0.5 if use_mask else None
    allowed = np.arange(n) if mask is None else np.flatnonzero(mask)
    want = sorted(allowed.tolist(), key=lambda r: (-scores[r], r))[:k]
    assert top_k(scores, k, mask).tolist() == want


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dense_store_scores_add_update_delete(dtype: str) -> None:
    rng = np.random.default_rng(0)
    store = DenseStore(8, dtype)
    vecs = _unit(rng, 100, 8)
    ids = [f"d{i}" for i in range(100)]
    for s in range(0, 100, 30):  # several adds: exercises growth
        store.add(ids[s : s + 30], vecs[s : s + 30])
    q = _unit(rng, 8)
    atol = 1e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(store.scores(q), vecs @ q, atol=atol)
    new = _unit(rng, 1, 8)
    store.add(["d5"], new)  # update: replaces, no duplicate
    assert len(store) == 100 and store.ids.count("d5") == 1
    np.testing.assert_allclose(store.scores(q)[store.rows(["d5"])[0]], (new @ q)[0], atol=atol)
    store.delete(["d0", "d99"])
    assert len(store) == 98 and "d0" not in store
    ref = {i: v for i, v in zip(ids, vecs, strict=True)} | {"d5": new[0]}
    np.testing.assert_allclose(
        store.scores(q), np.stack([ref[i] for i in store.ids]) @ q, atol=atol
    )


def test_dense_store_rejects_bad_input_and_keeps_data() -> None:
    store = DenseStore(4)
    store.add(["a"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="shape"):
        store.add(["b"], np.ones((1, 5)))
    with pytest.raises(ValueError, match="NaN"):
        store.add(["a"], np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        store.add(["x", "x"], np.ones((2, 4)))
    with pytest.raises(KeyError, match="'zz'"):
        store.delete(["a", "zz"])
    assert store.ids == ["a"] and store.vectors.sum() == 4


sparse_docs = st.lists(
    st.dictionaries(st.integers(0, 30), st.floats(0.0625, 4, width=32), max_size=10),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(
    docs=sparse_docs,
    query=st.dictionaries(st.integers(0, 35), st.floats(0.0625, 4, width=32), max_size=6),
)
def test_lexical_m3_equals_dict_dot(docs: list[dict[int, float]], query: dict[int, float]) -> None:
    store = LexicalStore(40, "m3")
    store.add([str(i) for i in range(len(docs))], docs)
    want = [sum(w * d.get(t, 0.0) for t, w in query.items()) for d in docs]
    np.testing.assert_allclose(store.scores(query), want, rtol=1e-5, atol=1e-5)


def test_lexical_delete_and_update_leave_no_stale_rows() -> None:
    store = LexicalStore(10, "m3")
    store.add(["a", "b", "c"], [{1: 1.0}, {1: 2.0}, {2: 1.0}])
    store.delete(["b"])
    store.add(["a"], [{2: 5.0}])  # update
    assert store.ids == ["c", "a"]
    np.testing.assert_allclose(store.scores({1: 1.0}), [0.0, 0.0])
    np.testing.assert_allclose(store.scores({2: 1.0}), [1.0, 5.0])
    with pytest.raises(ValueError, match="out of range"):
        store.add(["d"], [{99: 1.0}])
    with pytest.raises(ValueError, match=">= 0"):
        store.add(["d"], [{1: -1.0}])
    assert store.ids == ["c", "a"]


@settings(max_examples=30, deadline=None)
@given(
    corpus=st.lists(st.lists(st.integers(0, 12), max_size=15), min_size=1, max_size=20),
    query=st.lists(st.integers(0, 14), min_size=1, max_size=6),
)
def test_bm25_equals_rank_bm25(corpus: list[list[int]], query: list[int]) -> None:
    rank_bm25 = require("rank_bm25", "the BM25 oracle; pip install rank-bm25")
    if not any(corpus):  # rank-bm25 divides by an average length of 0
        return
    ref = rank_bm25.BM25Okapi([[str(t) for t in doc] for doc in corpus])
    store = LexicalStore(16, "bm25", BM25Params())
    counts = [{t: float(doc.count(t)) for t in set(doc)} for doc in corpus]
    store.add([str(i) for i in range(len(corpus))], counts)
    q = {t: float(query.count(t)) for t in set(query)}
    np.testing.assert_allclose(
        store.scores(q), ref.get_scores([str(t) for t in query]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_colbert_store_maxsim_add_update_delete(dtype: str) -> None:
    rng = np.random.default_rng(1)
    docs = {f"d{i}": _unit(rng, int(rng.integers(1, 9)), 16) for i in range(30)}
    store = ColbertStore(16, dtype)
    store.add(list(docs)[:10], list(docs.values())[:10])
    store.add(list(docs)[10:], list(docs.values())[10:])
    store.delete(["d3", "d17"])
    docs.pop("d3"), docs.pop("d17")
    docs["d4"] = _unit(rng, 3, 16)
    store.add(["d4"], [docs["d4"]])
    assert sorted(store.ids) == sorted(docs) and store.n_vectors == sum(
        len(v) for v in docs.values()
    )
    q = _unit(rng, 5, 16)
    pick = ["d4", "d0", "d29", "d10"]
    want = [float((q @ docs[i].T).max(axis=1).mean()) for i in pick]
    atol = {"float32": 1e-6, "float16": 2e-3, "int8": 1e-2}[dtype]
    np.testing.assert_allclose(store.scores(q, store.rows(pick)), want, atol=atol)
    np.testing.assert_allclose(store.get("d4"), docs["d4"], atol=atol)
    with pytest.raises(ValueError, match=r"vectors\[0\]"):
        store.add(["x"], [np.ones((2, 3))])


def test_colbert_int8_is_one_byte_per_dim_and_close_to_float32() -> None:
    """BGE-M3-shaped ColBERT vectors (1024-d, unit norm): int8 + a scale per vector takes
    1 byte per dimension (+4 bytes per vector) and MaxSim stays within 0.01 of float32."""
    rng = np.random.default_rng(7)
    docs = [_unit(rng, int(rng.integers(20, 200)), 1024) for _ in range(60)]
    ids = [f"d{i}" for i in range(60)]
    f32, i8 = ColbertStore(1024, "float32"), ColbertStore(1024, "int8")
    f32.add(ids, docs)
    i8.add(ids, docs)
    per_dim = (i8.nbytes - i8._offsets.nbytes) / (i8.n_vectors * 1024)
    assert per_dim <= 1 + 4 / 1024
    rows = np.arange(60)
    for _ in range(5):
        q = _unit(rng, 32, 1024)
        diff = np.abs(i8.scores(q, rows) - f32.scores(q, rows))
        assert diff.max() < 0.01
    arrays = i8.state()
    back = ColbertStore.from_state(ids, arrays, "int8")
    np.testing.assert_array_equal(back.scores(q, rows), i8.scores(q, rows))
    with pytest.raises(ValueError, match="int8"):
        ColbertStore.from_state(ids, {k: v for k, v in arrays.items() if k != "scales"}, "int8")


def test_store_state_round_trip() -> None:
    rng = np.random.default_rng(2)
    ids = ["a", "b", "c"]
    dense = DenseStore(4)
    dense.add(ids, _unit(rng, 3, 4))
    lex = LexicalStore(20, "m3")
    lex.add(ids, [{1: 1.0}, {2: 2.0, 3: 1.0}, {}])
    col = ColbertStore(4)
    col.add(ids, [_unit(rng, n, 4) for n in (1, 2, 3)])
    d2 = DenseStore.from_state(ids, dense.state(), "float32")
    l2 = LexicalStore.from_state(ids, lex.state(), 20, "m3")
    c2 = ColbertStore.from_state(ids, col.state(), "float16")
    q = _unit(rng, 4)
    np.testing.assert_array_equal(d2.scores(q), dense.scores(q))
    np.testing.assert_array_equal(l2.scores({2: 1.0, 1: 1.0}), lex.scores({2: 1.0, 1: 1.0}))
    np.testing.assert_array_equal(
        c2.scores(q[None], np.arange(3)), col.scores(q[None], np.arange(3))
    )
    bad = col.state() | {"offsets": np.array([0, 1, 2, 99])}
    with pytest.raises(ValueError, match="offsets"):
        ColbertStore.from_state(ids, bad, "float16")


def test_each_store_saves_and_loads_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    ids = ["a", "b", "c"]
    stores = [
        DenseStore(4, "float16"),
        LexicalStore(20, "bm25", BM25Params(k1=1.2)),
        ColbertStore(4),
    ]
    stores[0].add(ids, _unit(rng, 3, 4))
    stores[1].add(ids, [{1: 2.0}, {2: 1.0, 3: 1.0}, {1: 1.0}])
    stores[2].add(ids, [_unit(rng, n, 4) for n in (1, 2, 3)])
    q = _unit(rng, 4)
    for store in stores:
        store.save(tmp_path / type(store).__name__)
        loaded = type(store).load(tmp_path / type(store).__name__)
        assert loaded.ids == ids and loaded.config() == store.config()
    d2 = DenseStore.load(tmp_path / "DenseStore")
    np.testing.assert_array_equal(d2.scores(q), stores[0].scores(q))
    l2 = LexicalStore.load(tmp_path / "LexicalStore")
    np.testing.assert_array_equal(l2.scores({1: 1.0}), stores[1].scores({1: 1.0}))
    c2 = ColbertStore.load(tmp_path / "ColbertStore")
    np.testing.assert_array_equal(
        c2.scores(q[None], np.arange(3)), stores[2].scores(q[None], np.arange(3))
    )
    with pytest.raises(ValueError, match="not a DenseStore"):
        DenseStore.load(tmp_path / "ColbertStore")

"""The one batch validation and the local engine's legs against brute-force references
(random data, hypothesis where it fits): ``prepare_batch``, ``quantize_int8``, ``top_k``,
dense, lexical (M3 and BM25 against rank-bm25) and ColBERT scores through LocalBackend,
and what a saved index keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _format2 import write_format2
from conftest import resign
from hypothesis import given, settings
from hypothesis import strategies as st

from m3_rag.backends.local import LocalBackend
from m3_rag.backends.local.migrate import migrate
from m3_rag.backends.protocol import Candidates
from m3_rag.backends.registry import open_saved
from m3_rag.backends.validate import prepare_batch, quantize_int8, top_k
from m3_rag.bm25 import BM25Params, BM25Stats, bm25_idf
from m3_rag.errors import IndexFormatError, IndexMismatchError
from m3_rag.spec import IndexSpec


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _spec(
    dense_dim: int = 4,
    colbert_dim: int | None = None,
    lexical: str | None = None,
    vocab_size: int = 0,
    **kw: object,
) -> IndexSpec:
    if lexical == "bm25":
        kw.setdefault("analyzer", "model")
    return IndexSpec("validate-test", dense_dim, colbert_dim, lexical, vocab_size, **kw)  # type: ignore[arg-type]


def _all(b: LocalBackend, q: np.ndarray, lq: dict[int, float] | None = None) -> Candidates:
    """Every stored document as a candidate (the dense top-n with n = all of them)."""
    return b.candidates(q, lq, n=10**6)


def _by_id(ids: list[str], scores: np.ndarray | None) -> dict[str, float]:
    assert scores is not None
    return dict(zip(ids, scores.tolist(), strict=True))


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


# ------------------------------------------------------------------------------ dense
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dense_scores_add_update_delete(dtype: str) -> None:
    rng = np.random.default_rng(0)
    b = LocalBackend().open(_spec(8, dense_dtype=dtype))
    vecs = _unit(rng, 100, 8)
    ids = [f"d{i}" for i in range(100)]
    for s in range(0, 100, 30):  # several adds: several segments
        b.add(
            ids[s : s + 30],
            ids[s : s + 30],
            [{}] * len(ids[s : s + 30]),
            vecs[s : s + 30],
            None,
            None,
        )
    q = _unit(rng, 8)
    atol = 1e-6 if dtype == "float32" else 2e-3
    got = _by_id(*(lambda c: (c.ids, c.dense))(_all(b, q)))
    np.testing.assert_allclose([got[i] for i in ids], vecs @ q, atol=atol)
    new = _unit(rng, 1, 8)
    b.add(["d5"], ["d5"], [{}], new, None, None)  # update: replaces, no duplicate
    assert len(b) == 100 and b.ids.count("d5") == 1
    got = _by_id(*(lambda c: (c.ids, c.dense))(_all(b, q)))
    np.testing.assert_allclose(got["d5"], (new @ q)[0], atol=atol)
    b.delete(["d0", "d99"])
    assert len(b) == 98 and "d0" not in b
    ref = {i: v for i, v in zip(ids, vecs, strict=True)} | {"d5": new[0]}
    c = _all(b, q)
    assert sorted(c.ids) == sorted(b.ids)
    np.testing.assert_allclose(c.dense, np.stack([ref[i] for i in c.ids]) @ q, atol=atol)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_bad_dense_input_is_refused_and_keeps_data() -> None:
    b = LocalBackend().open(_spec(4))
    b.add(["a"], ["a"], [{}], np.ones((1, 4)), None, None)
    with pytest.raises(ValueError, match="shape"):
        b.add(["b"], ["b"], [{}], np.ones((1, 5)), None, None)
    with pytest.raises(ValueError, match="NaN"):
        b.add(["a"], ["a"], [{}], np.full((1, 4), np.nan), None, None)
    with pytest.raises(ValueError, match="NaN or inf"):  # overflows float16 storage
        LocalBackend().open(_spec(4, dense_dtype="float16")).add(
            ["a"], ["a"], [{}], np.full((1, 4), 1e6), None, None
        )
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        b.add(["x", "x"], ["x", "x"], [{}, {}], np.ones((2, 4)), None, None)
    with pytest.raises(KeyError, match="'zz'"):
        b.delete(["a", "zz"])
    assert b.ids == ["a"]
    (batch,) = b.export()
    assert batch.dense.sum() == 4


def test_prepare_batch_converts_to_storage_types_and_checks_legs() -> None:
    spec = _spec(4, 3, "m3", 10, dense_dtype="float16", colbert_dtype="int8")
    rng = np.random.default_rng(9)
    col = [_unit(rng, 2, 3), _unit(rng, 1, 3)]
    p = prepare_batch(
        spec, ["a", "b"], ["x", "y"], [{}, {"k": 1}], np.ones((2, 4)), [{1: 2.0}, {}], col
    )
    assert p.dense.dtype == np.float16 and p.dense.flags.c_contiguous
    assert p.lexical is not None and p.lexical.toarray()[0, 1] == 2.0 and p.lexical.nnz == 1
    assert p.colbert is not None and p.colbert.dtype == np.int8
    assert p.colbert_offsets is not None and p.colbert_offsets.tolist() == [0, 2, 3]
    assert p.colbert_lengths is not None and p.colbert_lengths.tolist() == [2, 1]
    assert p.colbert_scales is not None and p.colbert_scales.dtype == np.float32
    with pytest.raises(ValueError, match="legs"):
        prepare_batch(spec, ["a"], ["x"], [{}], np.ones((1, 4)), None, col[:1])
    with pytest.raises(ValueError, match="metadatas"):
        prepare_batch(spec, ["a"], ["x"], [], np.ones((1, 4)), [{}], col[:1])
    with pytest.raises(ValueError, match=r"colbert\[0\]"):
        prepare_batch(spec, ["a"], ["x"], [{}], np.ones((1, 4)), [{}], [np.ones((2, 5))])


def test_quantize_int8_error_is_half_a_step() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 16)).astype(np.float32) * rng.uniform(0.01, 10, (50, 1))
    x[3] = 0  # an all-zero vector keeps a positive scale
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and (scales > 0).all()
    assert np.abs(codes.astype(np.int16)).max() == 127
    assert (np.abs(codes * scales[:, None] - x) <= scales[:, None] / 2 + 1e-6).all()
    empty = quantize_int8(np.zeros((0, 16), np.float32))
    assert empty[0].shape == (0, 16) and empty[1].shape == (0,)


# ------------------------------------------------------------------------------ lexical
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
    b = LocalBackend().open(_spec(1, None, "m3", 40))
    ids = [str(i) for i in range(len(docs))]
    b.add(ids, ids, [{}] * len(ids), np.ones((len(ids), 1)), docs, None)
    want = [sum(w * d.get(t, 0.0) for t, w in query.items()) for d in docs]
    got = _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, np.ones(1, np.float32), query)))
    np.testing.assert_allclose([got[i] for i in ids], want, rtol=1e-5, atol=1e-5)
    prepared = prepare_batch(b.spec, ids, ids, [{}] * len(ids), np.ones((len(ids), 1)), docs, None)  # type: ignore[arg-type]
    assert prepared.lexical is not None
    dense = prepared.lexical.toarray()
    for r, d in enumerate(docs):
        assert {int(t): float(dense[r, t]) for t in np.flatnonzero(dense[r])} == pytest.approx(
            {t: w for t, w in d.items() if w}
        )


def test_lexical_delete_and_update_leave_no_stale_rows() -> None:
    b = LocalBackend().open(_spec(1, None, "m3", 10))
    one = np.ones((1, 1))
    b.add(
        ["a", "b", "c"],
        ["a", "b", "c"],
        [{}] * 3,
        np.ones((3, 1)),
        [{1: 1.0}, {1: 2.0}, {2: 1.0}],
        None,
    )
    b.delete(["b"])
    b.add(["a"], ["a"], [{}], one, [{2: 5.0}], None)  # update
    assert b.ids == ["c", "a"]
    q = np.ones(1, np.float32)
    assert _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, q, {1: 1.0}))) == {"c": 0.0, "a": 0.0}
    assert _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, q, {2: 1.0}))) == {"c": 1.0, "a": 5.0}
    with pytest.raises(ValueError, match="out of range"):
        b.add(["d"], ["d"], [{}], one, [{99: 1.0}], None)
    with pytest.raises(ValueError, match=">= 0"):
        b.add(["d"], ["d"], [{}], one, [{1: -1.0}], None)
    assert b.ids == ["c", "a"]


@settings(max_examples=30, deadline=None)
@given(
    corpus=st.lists(st.lists(st.integers(0, 12), max_size=15), min_size=1, max_size=20),
    query=st.lists(st.integers(0, 14), min_size=1, max_size=6),
)
def test_bm25_equals_rank_bm25(corpus: list[list[int]], query: list[int]) -> None:
    from conftest import require

    rank_bm25 = require("rank_bm25", "the BM25 oracle; pip install rank-bm25")
    if not any(corpus):  # rank-bm25 divides by an average length of 0
        return
    ref = rank_bm25.BM25Okapi([[str(t) for t in doc] for doc in corpus])
    b = LocalBackend().open(_spec(1, None, "bm25", 16, bm25=BM25Params()))
    counts = [{t: float(doc.count(t)) for t in set(doc)} for doc in corpus]
    ids = [str(i) for i in range(len(corpus))]
    b.add(ids, ids, [{}] * len(ids), np.ones((len(ids), 1)), counts, None)
    q = {t: float(query.count(t)) for t in set(query)}
    got = _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, np.ones(1, np.float32), q)))
    np.testing.assert_allclose(
        [got[i] for i in ids], ref.get_scores([str(t) for t in query]), rtol=1e-4, atol=1e-4
    )


def test_bm25_idf_variants_are_named() -> None:
    p = BM25Params()
    df = np.array([1, 3, 4])
    stats = BM25Stats().updated(np.array([1, 2, 3]), df, n=4, length=10.0, sign=1)
    assert (stats.n, stats.total_len, stats.avgdl) == (4, 10.0, 2.5)
    terms = np.array([1, 2, 3, 9])  # 9: in no document
    raw = np.log((4 - df + 0.5) / (df + 0.5))
    okapi = np.where(raw < 0, p.epsilon * raw.mean(), raw)
    np.testing.assert_allclose(stats.idf(terms, p), [*okapi, 0.0])
    np.testing.assert_allclose(stats.idf(terms, p, "okapi"), bm25_idf(np.array([*df, 0]), 4, p))
    qdrant = np.log1p((4 - df + 0.5) / (df + 0.5))
    np.testing.assert_allclose(stats.idf(terms, p, "qdrant"), [*qdrant, 0.0])
    assert (qdrant > 0).all() and (raw < 0).any()  # the floor is okapi's alone
    gone = stats.updated(np.array([3]), np.array([4]), n=4, length=10.0, sign=-1)
    assert gone.n == 0 and gone.doc_freq(terms).tolist() == [1, 3, 0, 0]
    with pytest.raises(ValueError, match="IDF variant"):
        stats.idf(terms, p, "bm15")  # type: ignore[arg-type]


def test_the_local_engine_scores_bm25_with_the_qdrant_variant_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from _qdrant_idf import qdrant_idf

    b = LocalBackend().open(_spec(1, None, "bm25", 16))
    counts = [{1: 2.0, 2: 1.0}, {1: 1.0}, {3: 4.0}, {1: 1.0, 3: 1.0}]
    ids = ["a", "b", "c", "d"]
    b.add(ids, ids, [{}] * 4, np.ones((4, 1)), counts, None)
    q, p = {1: 1.0, 3: 2.0}, BM25Params()
    okapi = _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, np.ones(1, np.float32), q)))
    monkeypatch.setattr(BM25Stats, "idf", qdrant_idf)
    got = _by_id(*(lambda c: (c.ids, c.lexical))(_all(b, np.ones(1, np.float32), q)))
    dl = np.array([sum(c.values()) for c in counts])
    want = {}
    for i, c in zip(ids, counts, strict=True):
        total = 0.0
        for t, w in q.items():
            n = sum(t in d for d in counts)
            tf = c.get(t, 0.0)
            norm = p.k1 * (1 - p.b + p.b * sum(c.values()) / dl.mean())
            total += w * np.log1p((4 - n + 0.5) / (n + 0.5)) * tf * (p.k1 + 1) / (tf + norm)
        want[i] = total
    assert got == pytest.approx(want, rel=1e-5) and got != pytest.approx(okapi, rel=1e-3)


# ------------------------------------------------------------------------------ ColBERT
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_colbert_maxsim_add_update_delete(dtype: str) -> None:
    rng = np.random.default_rng(1)
    docs = {f"d{i}": _unit(rng, int(rng.integers(1, 9)), 16) for i in range(30)}
    b = LocalBackend().open(_spec(2, 16, colbert_dtype=dtype))
    names, mats = list(docs), list(docs.values())
    for s in (slice(0, 10), slice(10, 30)):
        b.add(names[s], names[s], [{}] * len(names[s]), np.ones((len(names[s]), 2)), None, mats[s])
    b.delete(["d3", "d17"])
    docs.pop("d3"), docs.pop("d17")
    docs["d4"] = _unit(rng, 3, 16)
    b.add(["d4"], ["d4"], [{}], np.ones((1, 2)), None, [docs["d4"]])
    stored = {
        i: c for batch in b.export() for i, c in zip(batch.ids, batch.colbert or [], strict=True)
    }
    assert sorted(stored) == sorted(docs) == sorted(b.ids)
    assert sum(len(v) for v in stored.values()) == sum(len(v) for v in docs.values())
    q = _unit(rng, 5, 16)
    cands = _all(b, np.ones(2, np.float32))
    got = _by_id(cands.ids, b.colbert_scores(q, cands))
    pick = ["d4", "d0", "d29", "d10"]
    want = [float((q @ docs[i].T).max(axis=1).mean()) for i in pick]
    atol = {"float32": 1e-6, "float16": 2e-3, "int8": 1e-2}[dtype]
    np.testing.assert_allclose([got[i] for i in pick], want, atol=atol)
    np.testing.assert_allclose(stored["d4"], docs["d4"], atol=atol)
    with pytest.raises(ValueError, match=r"colbert\[0\]"):
        b.add(["x"], ["x"], [{}], np.ones((1, 2)), None, [np.ones((2, 3))])


def test_colbert_int8_is_one_byte_per_dim_and_close_to_float32(tmp_path: Path) -> None:
    """BGE-M3-shaped ColBERT vectors (1024-d, unit norm): int8 + a scale per vector takes
    1 byte per dimension (+4 bytes per vector) and MaxSim stays within 0.01 of float32,
    and a saved index scores the same."""
    rng = np.random.default_rng(7)
    docs = [_unit(rng, int(rng.integers(20, 200)), 1024) for _ in range(60)]
    ids = [f"d{i}" for i in range(60)]
    f32 = LocalBackend().open(_spec(2, 1024, colbert_dtype="float32"))
    i8 = LocalBackend().open(_spec(2, 1024, colbert_dtype="int8"))
    for b in (f32, i8):
        b.add(ids, ids, [{}] * 60, np.ones((60, 2)), None, docs)
    (seg,) = i8.segments
    assert seg.colbert is not None and seg.colbert.scales is not None
    n_vectors = sum(len(d) for d in docs)
    per_dim = (seg.colbert.vectors.nbytes + seg.colbert.scales.nbytes) / (n_vectors * 1024)
    assert seg.colbert.vectors.dtype == np.int8 and per_dim <= 1 + 4 / 1024
    q1 = np.ones(2, np.float32)
    c32, c8 = _all(f32, q1), _all(i8, q1)
    assert c32.ids == c8.ids
    for _ in range(5):
        q = _unit(rng, 32, 1024)
        diff = np.abs(i8.colbert_scores(q, c8) - f32.colbert_scores(q, c32))
        assert diff.max() < 0.01
    i8.save(tmp_path / "idx", {})
    back = open_saved(tmp_path / "idx").backend.open(i8.spec)  # type: ignore[arg-type]
    cb = _all(back, q1)
    np.testing.assert_array_equal(back.colbert_scores(q, cb), i8.colbert_scores(q, c8))


def test_int8_colbert_without_scales_is_refused(tmp_path: Path) -> None:
    """A stored int8 block without its scales cannot be read (format 2 and format 3)."""
    rng = np.random.default_rng(8)
    b = LocalBackend().open(_spec(2, 4, colbert_dtype="int8"))
    b.add(["a", "b"], ["a", "b"], [{}, {}], np.ones((2, 2)), None, [_unit(rng, 2, 4)] * 2)
    write_format2(tmp_path / "old", b, {})
    snap = tmp_path / "old" / json.loads((tmp_path / "old" / "CURRENT").read_text())["snapshot"]
    manifest = json.loads((snap / "manifest.json").read_text())
    del manifest["arrays"]["colbert_scales"], manifest["files"]["colbert_scales.npy"]
    (snap / "manifest.json").write_text(json.dumps(manifest))
    resign(tmp_path / "old")
    with pytest.raises(IndexFormatError, match="int8"):
        migrate(tmp_path / "old", tmp_path / "new")
    b.save(tmp_path / "v3", {})
    manifest_name = json.loads((tmp_path / "v3" / "CURRENT").read_text())["manifest"]
    seg = tmp_path / "v3" / "seg-00000001"
    meta = json.loads((seg / "segment.json").read_text())
    del meta["files"]["colbert_scales.npy"]
    body = json.dumps(meta).encode()
    (seg / "segment.json").write_bytes(body)
    _resign_v3(tmp_path / "v3", manifest_name, {"seg-00000001": body})
    with pytest.raises(IndexFormatError, match="int8"):
        LocalBackend(tmp_path / "v3").open(b.spec)  # type: ignore[arg-type]


def _resign_v3(root: Path, manifest_name: str, segment_json: dict[str, bytes]) -> None:
    """Re-sign a format-3 manifest after segment.json files were edited."""
    import hashlib

    manifest = json.loads((root / manifest_name).read_text())
    for e in manifest["segments"]:
        if e["name"] in segment_json:
            e["meta_sha256"] = hashlib.sha256(segment_json[e["name"]]).hexdigest()
    body = json.dumps(manifest).encode()
    (root / manifest_name).write_bytes(body)
    current = json.loads((root / "CURRENT").read_text())
    current["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    (root / "CURRENT").write_text(json.dumps(current))


def test_bad_colbert_offsets_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    b = LocalBackend().open(_spec(4, 4))
    b.add(
        ["a", "b", "c"],
        ["a", "b", "c"],
        [{}] * 3,
        _unit(rng, 3, 4),
        None,
        [_unit(rng, n, 4) for n in (1, 2, 3)],
    )
    snap = write_format2(tmp_path / "old", b, {})
    np.save(snap / "colbert_offsets.npy", np.array([0, 1, 2, 99]))
    resign(tmp_path / "old")
    with pytest.raises(ValueError, match="offsets"):
        migrate(tmp_path / "old", tmp_path / "new")


# ------------------------------------------------------------------------------ saved
def test_a_saved_index_keeps_every_leg(tmp_path: Path) -> None:
    """Each leg alone (dense float16, BM25 with its parameters, ColBERT) saves and opens
    with the same spec and the same scores; opened with another spec it is refused."""
    rng = np.random.default_rng(3)
    ids = ["a", "b", "c"]
    specs = {
        "dense": _spec(4, dense_dtype="float16"),
        "bm25": _spec(4, None, "bm25", 20, bm25=BM25Params(k1=1.2)),
        "colbert": _spec(4, 4),
    }
    dense = _unit(rng, 3, 4)
    inputs = {
        "dense": (None, None),
        "bm25": ([{1: 2.0}, {2: 1.0, 3: 1.0}, {1: 1.0}], None),
        "colbert": (None, [_unit(rng, n, 4) for n in (1, 2, 3)]),
    }
    q = _unit(rng, 4)
    for name, spec in specs.items():
        b = LocalBackend().open(spec)
        b.add(ids, ids, [{}] * 3, dense, *inputs[name])
        b.save(tmp_path / name, {"leg": name})
        saved = open_saved(tmp_path / name)
        assert saved.spec == spec and saved.settings == {"leg": name}
        again = saved.backend.open(spec)
        assert again.ids == ids
        lq = {1: 1.0} if spec.lexical else None
        x, y = b.candidates(q, lq, 10), again.candidates(q, lq, 10)
        assert x.ids == y.ids
        np.testing.assert_array_equal(x.dense, y.dense)
        if lq:
            np.testing.assert_array_equal(x.lexical, y.lexical)  # type: ignore[arg-type]
        if spec.colbert_dim:
            np.testing.assert_array_equal(
                b.colbert_scores(q[None], x), again.colbert_scores(q[None], y)
            )
    with pytest.raises(IndexMismatchError, match="colbert_dim"):
        open_saved(tmp_path / "colbert").backend.open(_spec(4))
    with pytest.raises(IndexMismatchError, match="dense_dtype"):
        open_saved(tmp_path / "colbert").backend.open(specs["dense"])

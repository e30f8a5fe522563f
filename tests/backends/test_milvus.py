"""The Milvus backend on Milvus Lite (offline): same results and scores as the local engine.

What every engine shares (search equality, rollback of a refused write, int64 metadata,
unreachable server, adapters, beir-mini) runs in ``test_backend_contract.py``; this file
covers what is Milvus's own: the one-round-trip search, reopening and the collection record,
collections of format 1, the BM25 statistics kept in the side collection, the codec.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from _server_format1 import format1_record
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_expr
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.errors import IndexFormatError, IndexMismatchError
from m3_rag.spec import IndexSpec
from m3_rag.testing import SAMPLE_TEXTS, CountingClient, refused_upserts

require("pymilvus", "pip install -e '.[milvus]'")
require("milvus_lite", "pip install -e '.[milvus]'")

from m3_rag.backends.milvus.engine import MilvusBackend

LANGS = ["en", "zh", "ar", "fr"]
METAS = [{"i": i, "par": i % 2, "lang": LANGS[i % 4]} for i in range(len(SAMPLE_TEXTS))]
IDS = [f"doc-{i}" for i in range(len(SAMPLE_TEXTS))]
QUERIES = [*SAMPLE_TEXTS[:4], "capital city", "机器学习", "retrieval model"]
FILTERS = [None, {"par": 1}, {"lang": ["en", "zh"]}, {"lang": "fr", "par": 1}, {"lang": "xx"}]


def _pair(
    enc: M3Encoder, path: Path, lexical: str, **kw: object
) -> tuple[HybridRetriever, HybridRetriever]:
    mem = HybridRetriever(enc, lexical=lexical, **kw)  # type: ignore[arg-type]
    mil = HybridRetriever(
        enc,
        lexical=lexical,
        backend=MilvusBackend(str(path / "m.db"), f"docs_{lexical}"),
        **kw,  # type: ignore[arg-type]
    )
    return mem, mil


def _assert_same(
    mem: HybridRetriever,
    mil: HybridRetriever,
    query: str,
    fused_tol: float = 1e-5,
    tol: float = 1e-5,
    **kw: object,
) -> None:
    a, b = mem.search(query, **kw), mil.search(query, **kw)  # type: ignore[arg-type]
    assert [h.id for h in a] == [h.id for h in b], (query, kw)
    for x, y in zip(a, b, strict=True):
        assert x.text == y.text and x.metadata == y.metadata
        assert x.scores.keys() == y.scores.keys()
        for mode, s in x.scores.items():
            t = fused_tol if mode == "fused" else tol
            assert y.scores[mode] == pytest.approx(s, rel=t, abs=t), (mode, query, kw, a, b)


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_search_equals_memory_backend(
    tiny_encoder: M3Encoder, tmp_path: Path, lexical: str
) -> None:
    mem, mil = _pair(tiny_encoder, tmp_path, lexical, candidates=6)
    for r in (mem, mil):
        assert r.add_texts(SAMPLE_TEXTS, METAS, IDS) == IDS
    assert len(mil) == len(mem) == len(SAMPLE_TEXTS)
    for q in QUERIES:
        for flt in FILTERS:
            _assert_same(mem, mil, q, k=5, filter=flt)
        _assert_same(mem, mil, q, k=4, fusion="rrf")
        _assert_same(mem, mil, q, k=3, weights=(1, 0, 0))
        _assert_same(mem, mil, q, k=3, weights=(0, 1, 0))
    # k larger than the collection: every document, same order
    _assert_same(mem, mil, "capital", k=1000, candidates=1000)
    assert len(mil.search("capital", k=1000, candidates=1000)) == len(SAMPLE_TEXTS)


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_update_delete_reopen(tiny_encoder: M3Encoder, tmp_path: Path, lexical: str) -> None:
    mem, mil = _pair(tiny_encoder, tmp_path, lexical)
    for r in (mem, mil):
        r.add_texts(SAMPLE_TEXTS, METAS, IDS)
        r.add_texts(["a replaced passage about Paris"], [{"new": True}], [IDS[3]])  # update
        r.delete([IDS[0], IDS[5]])
        with pytest.raises(KeyError, match="unknown"):
            r.delete([IDS[1], "no-such-id"])  # nothing is removed
    assert len(mil) == len(mem) == len(SAMPLE_TEXTS) - 2
    for q in QUERIES:
        _assert_same(mem, mil, q, k=6)
    assert mil.search("Paris", k=30, filter={"new": True})[0].id == IDS[3]

    assert isinstance(mil.backend, MilvusBackend)
    mil.backend.close()
    again = HybridRetriever(
        tiny_encoder,
        lexical=lexical,
        backend=MilvusBackend(str(tmp_path / "m.db"), f"docs_{lexical}"),
    )
    assert isinstance(again.backend, MilvusBackend)
    if lexical == "bm25":  # reopening reads the corpus statistics, nothing per document
        assert again.backend._stats.n == len(mem)
    for q in QUERIES:
        _assert_same(mem, again, q, k=6)
    assert sorted(d["id"] for d in again.backend.docs()) == sorted(set(IDS) - {IDS[0], IDS[5]})


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_a_search_is_one_round_trip(tiny_encoder: M3Encoder, tmp_path: Path, lexical: str) -> None:
    """Both legs in one ``hybrid_search`` with the stored vectors and the ColBERT vectors;
    past ``colbert_inline`` candidates the ColBERT vectors are a second request."""
    mem, mil = _pair(tiny_encoder, tmp_path, lexical)
    for r in (mem, mil):
        r.add_texts(SAMPLE_TEXTS, METAS, IDS)
    backend = mil.backend
    assert isinstance(backend, MilvusBackend)
    counting = CountingClient(backend.client)
    backend._client = counting
    _assert_same(mem, mil, "capital city", k=5, filter={"lang": ["en", "fr"]})
    assert counting.calls == ["hybrid_search"]
    counting.calls.clear()
    _assert_same(mem, mil, "capital city", k=5, weights=(1, 0, 0))  # no ColBERT
    assert counting.calls == ["hybrid_search"]
    counting.calls.clear()
    backend.colbert_inline = 4
    _assert_same(mem, mil, "capital city", k=5, candidates=4)
    assert counting.calls == ["hybrid_search", "query"]


def test_empty_collection_and_bad_input_keep_data(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    mil = HybridRetriever(tiny_encoder, backend=MilvusBackend(str(tmp_path / "e.db"), "empty"))
    assert mil.search("anything", k=5) == []
    assert len(mil) == 0
    mil.add_texts(SAMPLE_TEXTS[:3], ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="split long texts"):
        mil.add_texts(["ok", "x" * 70_000], ids=["d", "e"])
    with pytest.raises(ValueError, match="control characters"):
        mil.add_texts(["ok"], ids=["bad\nid"])
    with pytest.raises(ValueError, match="duplicate"):
        mil.add_texts(["x", "y"], ids=["a", "a"])
    with pytest.raises(TypeError, match="dict filter"):
        mil.search("x", filter=lambda m: True)
    with pytest.raises(ValueError, match="persists in Milvus"):
        mil.save(tmp_path / "idx")
    assert len(mil) == 3
    assert {h.id for h in mil.search(SAMPLE_TEXTS[0], k=10)} == {"a", "b", "c"}


def test_collection_of_another_model_is_refused(
    tiny_encoder: M3Encoder, tiny_m3_dir: Path, tiny_m3_bin_dir: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "x.db")
    HybridRetriever(tiny_encoder, backend=MilvusBackend(uri, "c")).add_texts(["hello"])
    other = M3Encoder(tiny_m3_bin_dir, device="cpu")  # 16-d ColBERT head
    with pytest.raises(IndexMismatchError, match="colbert_dim"):
        HybridRetriever(other, backend=MilvusBackend(uri, "c"), allow_model_mismatch=True)
    with pytest.raises(IndexMismatchError, match="built with model"):
        HybridRetriever(other, backend=MilvusBackend(uri, "c"))
    with pytest.raises(IndexMismatchError, match="lexical"):
        HybridRetriever(tiny_encoder, lexical="bm25", backend=MilvusBackend(uri, "c"))
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        HybridRetriever(tiny_encoder, colbert_dtype="binary", backend=MilvusBackend(uri, "c"))
    copy = tmp_path / "same-model-elsewhere"
    shutil.copytree(tiny_m3_dir, copy)
    same = M3Encoder(copy, device="cpu", max_length=64)
    r = HybridRetriever(same, backend=MilvusBackend(uri, "c"), allow_model_mismatch=True)
    assert len(r) == 1
    with pytest.raises(ValueError, match="letters, digits"):
        MilvusBackend(uri, "bad-name")
    with pytest.raises(TypeError):  # the option is the retriever's (Backend.open), not ours
        MilvusBackend(uri, "c", allow_model_mismatch=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="colbert_inline"):
        MilvusBackend(uri, "c", colbert_inline=-1)
    with pytest.raises(TypeError, match="uri"):
        MilvusBackend("")


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("batch_size", True, TypeError),
        ("batch_size", 0, ValueError),
        ("batch_size", 2.0, TypeError),
        ("timeout", True, TypeError),
        ("timeout", "x", TypeError),
        ("timeout", -1, ValueError),
        ("timeout", float("nan"), ValueError),
        ("colbert_inline", True, TypeError),
        ("colbert_inline", -1, ValueError),
        ("show_progress", "no", TypeError),
        ("show_progress", 0, TypeError),
        ("token", 123, TypeError),
        ("token", None, TypeError),
        ("db_name", 1.5, TypeError),
        ("index_type", 5, TypeError),
        ("index_type", "", ValueError),
        ("index_params", [("nlist", 4)], TypeError),
        ("index_params", {1: 4}, TypeError),
    ],
)
def test_bad_options_are_refused_at_construction(
    tmp_path: Path, option: str, value: object, error: type[Exception]
) -> None:
    """Each bad option is a TypeError/ValueError naming it when the backend is made (it
    used to be accepted, or to surface as "cannot reach Milvus" at the first call)."""
    uri = str(tmp_path / "m.db")
    with pytest.raises(error, match=option) as caught:
        MilvusBackend(uri, "c", **{option: value})  # type: ignore[arg-type]
    assert type(caught.value) is error
    assert not (tmp_path / "m.db").exists()  # nothing was opened
    ok = MilvusBackend(
        uri, "c", batch_size=2, timeout=2.5, show_progress=False, index_params={"nlist": 4}
    )
    assert (ok.batch_size, ok.timeout, ok.show_progress) == (2, 2.5, False)


def _create_format1(uri: str, name: str, spec: IndexSpec) -> None:
    """Create collection ``name`` as the previous version did: the lexical field is named
    ``sparse`` and the side collection holds :func:`_format1_record`."""
    from pymilvus import DataType, MilvusClient

    c = MilvusClient(uri)
    meta = c.create_schema(auto_id=False, enable_dynamic_field=False)
    meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    meta.add_field("value", DataType.VARCHAR, max_length=65535)
    meta.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
    meta_index = c.prepare_index_params()
    meta_index.add_index("vec", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    c.create_collection(
        f"{name}_m3meta", schema=meta, index_params=meta_index, consistency_level="Strong"
    )
    s = c.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    s.add_field("text", DataType.VARCHAR, max_length=65535)
    s.add_field("metadata", DataType.JSON)
    s.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dense_dim)
    index = c.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="IP")
    if spec.lexical:
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    if spec.lexical == "bm25":
        s.add_field("dl", DataType.DOUBLE)
        s.add_field("avgdl", DataType.DOUBLE)
    if spec.colbert_dim:
        s.add_field(
            "colbert", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4096,
            max_length=65532,
        )  # fmt: skip
    c.create_collection(name, schema=s, index_params=index, consistency_level="Strong")
    record = json.dumps(format1_record(spec))
    c.upsert(f"{name}_m3meta", [{"key": "config", "value": record, "vec": {spec.vocab_size: 1.0}}])
    c.close()


def _stored(uri: str, name: str) -> tuple[set[str], dict[str, Any]]:
    """The field names of collection ``name`` and the record its side collection holds."""
    from pymilvus import MilvusClient

    c = MilvusClient(uri)
    fields = {f["name"] for f in c.describe_collection(name)["fields"]}
    c.load_collection(f"{name}_m3meta")
    rows = c.query(f"{name}_m3meta", filter='key == "config"', output_fields=["value"])
    c.close()
    return fields, json.loads(rows[0]["value"])


@pytest.mark.parametrize("lexical", ["m3", "bm25", "none"])
def test_a_format1_collection_still_opens_and_works(
    tiny_encoder: M3Encoder, tmp_path: Path, lexical: str
) -> None:
    """A collection made by the previous version (lexical field ``sparse``, the record of
    format 1) opens, takes writes into its ``sparse`` field and searches as the local
    engine; opening changes neither its layout nor its record. New collections name the
    field ``lexical`` and record ``spec.to_json()`` with format 2."""
    uri = str(tmp_path / "m.db")
    # float16 ColBERT, unpooled: what the previous version stored
    ref = HybridRetriever(tiny_encoder, lexical=lexical, colbert_dtype="float16", pool_factor=1)
    spec = ref.backend.spec  # type: ignore[attr-defined]
    _create_format1(uri, "old", spec)
    old = HybridRetriever(tiny_encoder, lexical=lexical, backend=MilvusBackend(uri, "old"))
    for r in (ref, old):
        r.add_texts(SAMPLE_TEXTS, METAS, IDS)
        r.delete([IDS[2]])
    for q in QUERIES[:4]:
        _assert_same(ref, old, q, k=5)
    assert isinstance(old.backend, MilvusBackend)
    old.backend.close()
    again = HybridRetriever(tiny_encoder, lexical=lexical, backend=MilvusBackend(uri, "old"))
    for q in QUERIES[:4]:
        _assert_same(ref, again, q, k=5)
    assert isinstance(again.backend, MilvusBackend)
    again.backend.close()
    fields, record = _stored(uri, "old")
    assert ("sparse" in fields) == (lexical != "none") and "lexical" not in fields
    assert record == format1_record(spec)
    with pytest.raises(IndexMismatchError, match="lexical"):
        other = "m3" if lexical != "m3" else "bm25"
        HybridRetriever(tiny_encoder, lexical=other, backend=MilvusBackend(uri, "old"))

    new = HybridRetriever(tiny_encoder, lexical=lexical, backend=MilvusBackend(uri, "new"))
    spec = new.backend.spec  # type: ignore[attr-defined]  # the defaults of a new index
    new.add_texts(SAMPLE_TEXTS[:3], METAS[:3], IDS[:3])
    assert isinstance(new.backend, MilvusBackend)
    new.backend.close()
    fields, record = _stored(uri, "new")
    assert ("lexical" in fields) == (lexical != "none") and "sparse" not in fields
    assert record == spec.to_json() | {"format": 2}


def test_unknown_format_or_foreign_collection_is_refused(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    from pymilvus import MilvusClient

    uri = str(tmp_path / "m.db")
    ref = HybridRetriever(tiny_encoder)
    future = format1_record(ref.backend.spec) | {"format": 99}  # type: ignore[attr-defined]
    _create_format1(uri, "future", ref.backend.spec)  # type: ignore[attr-defined]
    c = MilvusClient(uri)
    c.upsert("future_m3meta", [{"key": "config", "value": json.dumps(future), "vec": {1: 1.0}}])
    c.create_collection("foreign", dimension=4)
    c.close()
    with pytest.raises(IndexFormatError, match="format 99"):
        HybridRetriever(tiny_encoder, backend=MilvusBackend(uri, "future"))
    with pytest.raises(IndexFormatError, match="not created by m3-rag"):
        HybridRetriever(tiny_encoder, backend=MilvusBackend(uri, "foreign"))


@pytest.mark.parametrize(("colbert_dtype", "pool"), [("float16", 1), ("int8", 1), ("binary", 2)])
def test_add_from_copies_without_encoding(
    tiny_encoder: M3Encoder, tmp_path: Path, colbert_dtype: str, pool: int
) -> None:
    mem = HybridRetriever(tiny_encoder, colbert_dtype=colbert_dtype, pool_factor=pool)
    mem.add_texts(SAMPLE_TEXTS, METAS, IDS)
    mil = HybridRetriever(
        tiny_encoder,
        colbert_dtype=colbert_dtype,
        pool_factor=pool,
        backend=MilvusBackend(str(tmp_path / "c.db"), "copy"),
    )
    assert mil.add_from(mem, batch_size=7) == len(SAMPLE_TEXTS)
    for q in QUERIES:
        _assert_same(mem, mil, q, k=5)
    with pytest.raises(TypeError, match="can export"):  # Milvus does not export
        mem.add_from(mil)


def test_codec_roundtrips() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 128)).astype(np.float16)
    chunks = codec.encode_blob(vecs)
    assert all(len(c) <= codec.CHUNK_CHARS for c in chunks) and len(chunks) > 1
    packed, offsets, _ = codec.decode_blobs([chunks, codec.encode_blob(vecs[:0])], 128, vecs.dtype)
    assert np.array_equal(packed, vecs) and offsets.tolist() == [0, 300, 300]
    bits = np.packbits(rng.normal(size=(7, 13)) > 0, axis=1)  # binary codes: 2 bytes each
    packed, offsets, scales = codec.decode_blobs([codec.encode_blob(bits)], 2, bits.dtype, False)
    assert np.array_equal(packed, bits) and offsets.tolist() == [0, 7] and scales is None

    assert codec.encode_sparse(sp.csr_matrix((1, 10), dtype=np.float32), 10) == {10: 1.0}
    back = codec.decode_sparse([{10: 1.0}, {3: 0.5, 1: 2.0}], 10)
    assert back.shape == (2, 10) and back[0].nnz == 0 and back[1, 1] == 2.0

    p = BM25Params()
    tf = sp.random(50, 200, density=0.05, random_state=1, format="csr", dtype=np.float64)
    tf.data = np.ceil(tf.data * 300)
    dl = np.asarray(tf.sum(axis=1)).reshape(-1)
    avgdl = np.full(50, dl.mean())
    rows = np.repeat(np.arange(50), np.diff(tf.indptr))
    stored = sp.csr_matrix(
        (bm25_tf(tf.data, dl[rows], dl.mean(), p).astype(np.float32), tf.indices, tf.indptr),
        shape=tf.shape,
    )
    assert np.array_equal(codec.recover_tf(stored, dl, avgdl, p).toarray(), tf.toarray())


def test_filters_translate_to_milvus_expressions() -> None:
    assert milvus_expr(None) == ""
    assert milvus_expr({"lang": "en", "year": [2023, 2024]}) == (
        '(metadata["lang"] == "en") and (metadata["year"] == 2023 or metadata["year"] == 2024)'
    )
    assert milvus_expr({'q"k': True}) == '(metadata["q\\"k"] == true)'
    with pytest.raises(ValueError, match="null"):
        milvus_expr({"a": None})


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_a_filtered_search_that_drops_rows_searches_deeper(
    tiny_encoder: M3Encoder, tmp_path: Path, lexical: str
) -> None:
    """Rows Milvus Lite matched but JSON does not (``1`` for ``True``) are dropped; the
    search then asks for more until each leg holds its top ``n``, and cuts each leg back to
    it: the same hits and scores as the local engine. Without a dropped row it stays one
    round trip."""
    metas = [{"a": True if i % 5 == 0 else 1, "i": i} for i in range(len(SAMPLE_TEXTS))]
    mem, mil = _pair(tiny_encoder, tmp_path, lexical)
    for r in (mem, mil):
        r.add_texts(SAMPLE_TEXTS, metas, IDS)
    backend = mil.backend
    assert isinstance(backend, MilvusBackend)
    counting = CountingClient(backend.client)
    backend._client = counting

    def call(q: str) -> str:
        # both legs in one hybrid_search; a plain search when the query has no lexical
        # weight > 0 (a tiny random model's ReLU head can give a query none)
        two_legs = lexical == "bm25" or bool(tiny_encoder.encode_queries(q).sparse[0])  # type: ignore[index]
        return "hybrid_search" if two_legs else "search"

    trips = []
    for q in QUERIES:
        for flt in ({"a": True}, {"a": [True, 7]}, {"a": 1}, {"a": 1.0, "i": [3, 4, 5, 6]}):
            counting.calls.clear()
            _assert_same(mem, mil, q, k=2, candidates=2, filter=flt)
            _assert_same(mem, mil, q, k=3, candidates=3, filter=flt, fusion="rrf")
            trips.append(len(counting.calls))
            assert set(counting.calls) == {call(q)}
    assert max(trips) > 2  # some searches went deeper
    counting.calls.clear()
    _assert_same(mem, mil, "capital city", k=2, candidates=2, filter={"i": [0, 5, 10]})
    assert counting.calls == [call("capital city")]  # nothing dropped: one round trip


# ------------------------------------------------------------------------------ trust
def _bm25_state(b: MilvusBackend) -> tuple[dict[int, float], int, float]:
    s = b._stats
    present = s.df > 0
    df = dict(zip(s.terms[present].tolist(), s.df[present].tolist(), strict=True))
    return df, s.n, s.total_len


def _milvus(enc: M3Encoder, path: Path, name: str, **kw: object) -> HybridRetriever:
    return HybridRetriever(
        enc,
        lexical="bm25",
        backend=MilvusBackend(str(path / "m.db"), name, **kw),  # type: ignore[arg-type]
    )


def test_failed_writes_keep_the_bm25_statistics(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    """A bad row in a late batch and a write refused at the third batch (the contract suite
    checks the documents and scores) leave the side collection's BM25 statistics as they
    were."""
    mil = _milvus(tiny_encoder, tmp_path, "failed", batch_size=4)
    mil.add_texts(SAMPLE_TEXTS[:6], METAS[:6], IDS[:6])
    assert isinstance(mil.backend, MilvusBackend)
    state = _bm25_state(mil.backend)
    metas: list[dict[str, Any]] = [{} for _ in range(10)]
    metas[9] = {"big": 2**70}  # valid JSON, beyond Milvus's int64: row 10, third batch
    with pytest.raises(ValueError, match="64-bit"):
        mil.add_texts(SAMPLE_TEXTS[6:16], metas, IDS[6:16])
    assert len(mil) == 6 and _bm25_state(mil.backend) == state
    new = ["replaced " + t for t in SAMPLE_TEXTS[:3]] + SAMPLE_TEXTS[6:15]
    fault = ConnectionResetError("server went away")
    with refused_upserts(mil.backend, 3, fault), pytest.raises(RuntimeError, match="rolled back"):
        mil.add_texts(new, [{"v": 2} for _ in new], IDS[:3] + IDS[6:15])
    assert len(mil) == 6 and _bm25_state(mil.backend) == state
    assert _bm25_state(mil.backend)[1] == 6


def test_killed_write_statistics_are_recomputed_on_open(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    mil = _milvus(tiny_encoder, tmp_path, "killed", batch_size=4)
    mil.add_texts(SAMPLE_TEXTS[:6], METAS[:6], IDS[:6])
    assert isinstance(mil.backend, MilvusBackend)
    # the process dies at the second batch: no rollback, no statistics update
    with refused_upserts(mil.backend, 2, SystemExit("killed")), pytest.raises(SystemExit):
        mil.add_texts(SAMPLE_TEXTS[6:18], METAS[6:18], IDS[6:18])
    mil.backend.close()
    again = _milvus(tiny_encoder, tmp_path, "killed", batch_size=4)
    assert isinstance(again.backend, MilvusBackend)
    stored = sorted(d["id"] for d in again.backend.docs())
    assert len(stored) == 10  # the 6 + the first batch of 4 that was written
    # statistics recomputed from the rows: exactly those of an index of the stored documents
    mem = HybridRetriever(tiny_encoder, lexical="bm25")
    by_id = dict(zip(IDS, range(len(IDS)), strict=True))
    mem.add_texts(
        [SAMPLE_TEXTS[by_id[i]] for i in stored], [METAS[by_id[i]] for i in stored], stored
    )
    assert again.backend._stats.n == 10 and not again.backend._stats_dirty
    # the two sides were encoded in batches of other shapes (float32 rounding ~1e-7, which
    # float16 ColBERT storage can turn into 2e-5) and BM25 tf is recovered from float32 rows
    for q in QUERIES:
        _assert_same(mem, again, q, fused_tol=1e-4, tol=1e-4, k=6)
    for r in (mem, again):  # later deletes keep the statistics exact (no negative df)
        r.delete(stored[:7])
    assert (again.backend._stats.df >= 0).all()
    for q in QUERIES:
        _assert_same(mem, again, q, fused_tol=1e-4, tol=1e-4, k=3)

"""The Milvus backend on Milvus Lite (offline): same results and scores as the memory backend."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_expr
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.eval import BeirData, evaluate_run
from m3_rag.testing import SAMPLE_TEXTS, CountingClient

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
        assert again.backend._n_docs == len(mem)
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
    with pytest.raises(ValueError, match="colbert_dim"):
        HybridRetriever(other, backend=MilvusBackend(uri, "c", allow_model_mismatch=True))
    with pytest.raises(ValueError, match="built with model"):
        HybridRetriever(other, backend=MilvusBackend(uri, "c"))
    with pytest.raises(ValueError, match="lexical"):
        HybridRetriever(tiny_encoder, lexical="bm25", backend=MilvusBackend(uri, "c"))
    copy = tmp_path / "same-model-elsewhere"
    shutil.copytree(tiny_m3_dir, copy)
    same = M3Encoder(copy, device="cpu", max_length=64)
    r = HybridRetriever(same, backend=MilvusBackend(uri, "c", allow_model_mismatch=True))
    assert len(r) == 1
    with pytest.raises(ValueError, match="letters, digits"):
        MilvusBackend(uri, "bad-name")


def test_unreachable_server_is_a_connection_error(tiny_encoder: M3Encoder) -> None:
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach Milvus"):
        HybridRetriever(tiny_encoder, backend=MilvusBackend("http://127.0.0.1:1", timeout=2))
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("colbert_dtype", ["float16", "int8"])
def test_add_from_copies_without_encoding(
    tiny_encoder: M3Encoder, tmp_path: Path, colbert_dtype: str
) -> None:
    mem = HybridRetriever(tiny_encoder, colbert_dtype=colbert_dtype)
    mem.add_texts(SAMPLE_TEXTS, METAS, IDS)
    mil = HybridRetriever(
        tiny_encoder,
        colbert_dtype=colbert_dtype,
        backend=MilvusBackend(str(tmp_path / "c.db"), "copy"),
    )
    assert mil.add_from(mem, batch_size=7) == len(SAMPLE_TEXTS)
    for q in QUERIES:
        _assert_same(mem, mil, q, k=5)
    with pytest.raises(TypeError, match="memory backend"):
        mem.add_from(mil)


def test_adapters_accept_the_backend(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    from langchain_core.documents import Document
    from langchain_m3rag import M3Retriever
    from llama_index.core.vector_stores import MetadataFilter, MetadataFilters
    from llama_index_m3rag import M3Retriever as LlamaRetriever

    uri = str(tmp_path / "a.db")
    lc = M3Retriever.from_texts(
        SAMPLE_TEXTS,
        tiny_encoder,
        metadatas=METAS,
        ids=IDS,
        retriever_kwargs={"backend": MilvusBackend(uri, "lc")},
        k=3,
    )
    docs = lc.invoke("capital", filter={"par": 1})
    assert len(docs) == 3 and all(isinstance(d, Document) and d.metadata["par"] == 1 for d in docs)
    core = HybridRetriever(tiny_encoder, backend=MilvusBackend(uri, "li"))
    core.add_texts(SAMPLE_TEXTS, METAS, IDS)
    nodes = LlamaRetriever(core, similarity_top_k=4).retrieve("capital")
    assert [n.node.node_id for n in nodes] == [h.id for h in core.search("capital", k=4)]
    flt = MetadataFilters(filters=[MetadataFilter(key="lang", value=["en", "fr"], operator="in")])
    nodes = LlamaRetriever(core, similarity_top_k=4, filters=flt).retrieve("capital")
    assert nodes and all(n.node.metadata["lang"] in ("en", "fr") for n in nodes)


def test_codec_roundtrips() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 128)).astype(np.float16)
    chunks = codec.encode_blob(vecs)
    assert all(len(c) <= codec.CHUNK_CHARS for c in chunks) and len(chunks) > 1
    packed, offsets, _ = codec.decode_blobs([chunks, codec.encode_blob(vecs[:0])], 128, vecs.dtype)
    assert np.array_equal(packed, vecs) and offsets.tolist() == [0, 300, 300]

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


@pytest.mark.slow
def test_msmarco_parity_with_memory(
    msmarco_minilm: HybridRetriever, msmarco: BeirData, tmp_path: Path
) -> None:
    """MiniLM + BM25 on beir-mini msmarco: the same top-10 for >= 95% of the queries and
    nDCG@10 within 0.005 of the memory backend."""
    mil = HybridRetriever(
        msmarco_minilm.encoder, backend=MilvusBackend(str(tmp_path / "ms.db"), "msmarco")
    )
    mil.add_from(msmarco_minilm, batch_size=1000)
    assert len(mil) == len(msmarco_minilm)
    queries = [q for q in msmarco.queries if q in msmarco.qrels]
    runs: dict[str, dict[str, list[str]]] = {"memory": {}, "milvus": {}}
    same = 0
    for q in queries:
        text = msmarco.queries[q]
        enc = msmarco_minilm.encoder.encode_queries([text])
        a = msmarco_minilm.search_encoded(enc, k=10, query_text=text)
        b = mil.search_encoded(enc, k=10, query_text=text)
        runs["memory"][q], runs["milvus"][q] = [h.id for h in a], [h.id for h in b]
        same += runs["memory"][q] == runs["milvus"][q]
    assert same >= 0.95 * len(queries)
    nd = {name: evaluate_run(run, msmarco.qrels)["ndcg@10"] for name, run in runs.items()}
    assert abs(nd["memory"] - nd["milvus"]) <= 0.005


# ------------------------------------------------------------------------------ trust
def _bm25_state(b: MilvusBackend) -> tuple[dict[int, float], int, float]:
    df = b._df.tocsr()
    df.eliminate_zeros()
    return dict(zip(df.indices.tolist(), df.data.tolist(), strict=True)), b._n_docs, b._total_len


def _milvus(enc: M3Encoder, path: Path, name: str, **kw: object) -> HybridRetriever:
    return HybridRetriever(
        enc,
        lexical="bm25",
        backend=MilvusBackend(str(path / "m.db"), name, **kw),  # type: ignore[arg-type]
    )


def test_bad_row_in_a_late_batch_writes_nothing(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    mil = _milvus(tiny_encoder, tmp_path, "late", batch_size=4)
    mil.add_texts(SAMPLE_TEXTS[:5], METAS[:5], IDS[:5])
    assert isinstance(mil.backend, MilvusBackend)
    state = _bm25_state(mil.backend)
    metas = [{} for _ in range(10)]
    metas[9] = {"big": 2**70}  # valid JSON, beyond Milvus's int64: row 10, third batch
    with pytest.raises(ValueError, match="64-bit"):
        mil.add_texts(SAMPLE_TEXTS[5:15], metas, IDS[5:15])
    assert len(mil) == 5 and _bm25_state(mil.backend) == state


def test_refused_write_is_rolled_back(
    tiny_encoder: M3Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses the third batch (fault injected into the real client): the earlier
    batches are undone, replaced rows come back, the BM25 statistics are unchanged."""
    mem = HybridRetriever(tiny_encoder, lexical="bm25")
    mil = _milvus(tiny_encoder, tmp_path, "refused", batch_size=4)
    for r in (mem, mil):
        r.add_texts(SAMPLE_TEXTS[:6], METAS[:6], IDS[:6])
    assert isinstance(mil.backend, MilvusBackend)
    state = _bm25_state(mil.backend)
    client = mil.backend.client
    real, calls = client.upsert, []

    def upsert(collection: str, rows: list, **kw: object) -> object:
        if collection == mil.backend.collection:  # type: ignore[union-attr]
            calls.append(len(rows))
            if len(calls) == 3:
                raise ConnectionResetError("server went away")
        return real(collection, rows, **kw)

    monkeypatch.setattr(client, "upsert", upsert)
    new = ["replaced " + t for t in SAMPLE_TEXTS[:3]] + SAMPLE_TEXTS[6:15]
    with pytest.raises(RuntimeError, match="rolled back"):
        mil.add_texts(new, [{"v": 2} for _ in new], IDS[:3] + IDS[6:15])
    monkeypatch.setattr(client, "upsert", real)
    assert len(mil) == 6 and _bm25_state(mil.backend) == state
    for q in QUERIES:
        _assert_same(mem, mil, q, k=6)  # same texts, metadata and exact scores as before


def test_killed_write_statistics_are_recomputed_on_open(
    tiny_encoder: M3Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mil = _milvus(tiny_encoder, tmp_path, "killed", batch_size=4)
    mil.add_texts(SAMPLE_TEXTS[:6], METAS[:6], IDS[:6])
    assert isinstance(mil.backend, MilvusBackend)
    client = mil.backend.client
    real, calls = client.upsert, []

    def upsert(collection: str, rows: list, **kw: object) -> object:
        if collection == mil.backend.collection:  # type: ignore[union-attr]
            calls.append(1)
            if len(calls) == 2:  # the process dies: no rollback, no statistics update
                raise SystemExit("killed")
        return real(collection, rows, **kw)

    monkeypatch.setattr(client, "upsert", upsert)
    with pytest.raises(SystemExit):
        mil.add_texts(SAMPLE_TEXTS[6:18], METAS[6:18], IDS[6:18])
    monkeypatch.setattr(client, "upsert", real)
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
    assert again.backend._n_docs == 10 and not again.backend._stats_dirty
    # the two sides were encoded in batches of other shapes (float32 rounding ~1e-7, which
    # float16 ColBERT storage can turn into 2e-5) and BM25 tf is recovered from float32 rows
    for q in QUERIES:
        _assert_same(mem, again, q, fused_tol=1e-4, tol=1e-4, k=6)
    for r in (mem, again):  # later deletes keep the statistics exact (no negative df)
        r.delete(stored[:7])
    assert (again.backend._df.data >= 0).all()
    for q in QUERIES:
        _assert_same(mem, again, q, fused_tol=1e-4, tol=1e-4, k=3)

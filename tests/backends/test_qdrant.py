"""The Qdrant backend on qdrant-client's local mode (in RAM and on disk), offline.

The backend contract (same results and per-mode scores as the local engine, rollback of a
refused write, int64 metadata, unreachable server, adapters, beir-mini) runs in
``test_backend_contract.py``; this file covers what is Qdrant's own: the one-request search,
filters and their injection cases, reopening and the collection record, collections of
format 1, int8 ColBERT, BM25 in the engine.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _server_format1 import format1_record
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.codecs import get_codec, pool_tokens
from m3_rag.errors import IndexFormatError, IndexMismatchError
from m3_rag.spec import IndexSpec
from m3_rag.testing import SAMPLE_TEXTS, CountingClient

require("qdrant_client", "pip install -e '.[qdrant]'")

from qdrant_client import QdrantClient, models

from m3_rag.backends.qdrant.engine import QdrantBackend, point_id
from m3_rag.backends.qdrant.filters import metadata_path, qdrant_filter

IDS = [f"doc-{i}" for i in range(len(SAMPLE_TEXTS))]
METAS = [{"i": i, "par": i % 2, "lang": ["en", "zh", "ar", "fr"][i % 4]} for i in range(len(IDS))]


def _qdrant(enc: M3Encoder, **kw: Any) -> HybridRetriever:
    backend_kw = {k: kw.pop(k) for k in list(kw) if k in ("batch_size", "bm25_avgdl", "path")}
    if "path" not in backend_kw:
        backend_kw["location"] = ":memory:"
    backend = QdrantBackend(collection=f"c_{uuid.uuid4().hex[:8]}", **backend_kw)
    return HybridRetriever(enc, backend=backend, **kw)


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_a_search_is_one_request(tiny_encoder: M3Encoder, lexical: str) -> None:
    r = _qdrant(tiny_encoder, lexical=lexical)
    r.add_texts(SAMPLE_TEXTS, METAS, IDS)
    backend = r.backend
    assert isinstance(backend, QdrantBackend)
    counting = CountingClient(backend.client)
    backend._client = counting
    hits = r.search("capital city", k=5, filter={"lang": ["en", "fr"]})
    assert counting.calls == ["query_batch_points"]
    assert hits and all(h.metadata["lang"] in ("en", "fr") for h in hits)
    lex_key = "lexical"
    assert set(hits[0].scores) == {"dense", lex_key, "colbert", "fused"}
    # ColBERT scored in that request equals the separate request's scores
    q = tiny_encoder.encode_queries(["capital city"])
    assert q.dense is not None and q.colbert is not None
    cands = backend.candidates(q.dense[0], None, 8, None, colbert_query=q.colbert[0])
    in_request = cands.colbert
    cands.colbert = None
    assert np.allclose(backend.colbert_scores(q.colbert[0], cands), in_request, atol=1e-5)


def test_filters_translate_to_typed_conditions() -> None:
    assert qdrant_filter(None) is None
    f = qdrant_filter({"lang": ["en", "fr"], "year": 2024, "score": 0.5, "ok": [True, 1]})
    lang, year, score, ok = f.must
    assert lang.key == "metadata.lang" and lang.match.any == ["en", "fr"]
    # a number matches ints and floats equal to it (a range no bool passes): the local engine
    assert year.range.gte == year.range.lte == 2024 and year.match is None
    assert score.range.gte == score.range.lte == 0.5
    assert isinstance(ok, models.Filter) and len(ok.should) == 2
    assert ok.should[0].match.value is True and ok.should[1].range.gte == 1  # a bool is a bool
    (big,) = qdrant_filter({"a": 2**53}).must  # beyond doubles' exact ints: ints, exactly
    assert big.match.value == 2**53 and big.range is None
    assert metadata_path("a.b") == 'metadata."a.b"'
    assert metadata_path("x[]") == 'metadata."x[]"'
    with pytest.raises(ValueError, match="holding"):
        qdrant_filter({'q"k': 1})
    with pytest.raises(ValueError, match="null"):
        qdrant_filter({"a": None})
    with pytest.raises(ValueError, match="64-bit"):
        qdrant_filter({"a": 2**70})
    with pytest.raises(TypeError, match="dict filter"):
        qdrant_filter(lambda m: True)


def test_filter_keys_and_values_cannot_escape(tiny_encoder: M3Encoder) -> None:
    """A key with a dot or brackets names that one key; a value is data, never syntax."""
    metas: list[dict[str, Any]] = [
        {"a.b": 1},
        {"a": {"b": 1}},
        {"x[]": "v"},
        {"x": ["v"]},
        {"k": "' OR 1=1 --"},
        {"k": 'x") or (true'},
        {"ünï cödé": "ja"},
        {"f": 2.5},
    ]
    texts = [f"passage number {i}" for i in range(len(metas))]
    r = _qdrant(tiny_encoder)
    mem = HybridRetriever(tiny_encoder)
    for x in (r, mem):
        x.add_texts(texts, metas, [f"m{i}" for i in range(len(metas))])
    cases = [
        {"a.b": 1},
        {"x[]": "v"},
        {"k": "' OR 1=1 --"},
        {"k": 'x") or (true'},
        {"k": ["nothing", "' OR 1=1 --"]},
        {"ünï cödé": "ja"},
        {"f": 2.5},
        {"f": [2.5, "y"]},
        {"missing": "x"},
    ]
    for flt in cases:
        assert sorted(r.select(flt)) == sorted(mem.select(flt)), flt
        got = [h.id for h in r.search("passage", k=10, filter=flt)]
        assert sorted(got) == sorted(mem.select(flt)), flt


def test_filters_match_ints_beyond_float_precision(tiny_encoder: M3Encoder) -> None:
    """Qdrant matches a number with a range (so 1 matches a stored 1.0; the cases every
    engine shares are in the contract suite), except an int of magnitude >= 2**53, which a
    double cannot tell from its neighbours: that one is matched exactly."""
    metas: dict[str, dict[str, Any]] = {"big": {"a": 2**53 + 1}, "half": {"a": 2.5}}
    r = _qdrant(tiny_encoder)
    mem = HybridRetriever(tiny_encoder)
    for x in (r, mem):
        x.add_texts([f"passage {i}" for i in metas], list(metas.values()), list(metas))
    for flt, want in [({"a": 2**53 + 1}, {"big"}), ({"a": 2**53}, set()), ({"a": 2.5}, {"half"})]:
        assert set(mem.select(flt)) == want, flt  # the reference
        assert set(r.select(flt)) == want, flt
        assert {h.id for h in r.search("passage", k=20, filter=flt)} == want, flt


def test_a_huge_k_asks_qdrant_for_at_most_the_collection(tiny_encoder: M3Encoder) -> None:
    """``k`` / ``candidates`` of 10**9 reach Qdrant capped at the collection's size (a count
    first), so no server sizes a reply by them; an ordinary search stays one request."""
    r = _qdrant(tiny_encoder)
    r.add_texts(SAMPLE_TEXTS, METAS, IDS)
    backend = r.backend
    assert isinstance(backend, QdrantBackend)
    counting = CountingClient(backend.client)
    backend._client = counting
    limits: list[int] = []
    real = counting.client.query_batch_points

    def recording(collection: str, requests: list[Any], *a: Any, **kw: Any) -> Any:
        for q in requests:
            limits.append(q.limit)
            limits.extend(p.limit for p in q.prefetch or [])
        return real(collection, requests, *a, **kw)

    counting.client.query_batch_points = recording
    try:
        hits = r.search("capital", k=10**9, candidates=10**9)
        assert sorted(h.id for h in hits) == sorted(IDS)  # everything, once
        assert limits and max(limits) <= 2 * len(IDS)
        assert counting.calls == ["count", "query_batch_points"]
        assert len(r.search("capital", k=3, candidates=10**9)) == 3
        limits.clear()
        counting.calls.clear()
        assert len(r.search("capital", k=5, candidates=8)) == 5
        assert counting.calls == ["query_batch_points"] and max(limits) == 16
        empty = _qdrant(tiny_encoder)
        assert empty.search("capital", k=10**9) == []
    finally:
        del counting.client.query_batch_points


def test_bad_options_are_refused_by_name() -> None:
    """A bool where a count is expected, a string where a number or a switch is expected,
    an empty metadata key: each refused, naming the option (none was read as a default)."""
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"timeout": "x"}, TypeError, "timeout"),
        ({"timeout": True}, TypeError, "timeout"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"exact": "no"}, TypeError, "exact"),
        ({"exact": 0}, TypeError, "exact"),
        ({"prefer_grpc": "yes"}, TypeError, "prefer_grpc"),
        ({"colbert_on_disk": None}, TypeError, "colbert_on_disk"),
        ({"dense_on_disk": 1}, TypeError, "dense_on_disk"),
        ({"indexed_fields": {"": "keyword"}}, ValueError, "indexed_fields.*empty key"),
        ({"indexed_fields": {1: "keyword"}}, TypeError, "indexed_fields"),
        ({"api_key": 123}, TypeError, "api_key"),
    ]
    for kw, error, message in bad:
        with pytest.raises(error, match=message):
            QdrantBackend(":memory:", **kw)
    ok = QdrantBackend(
        ":memory:",
        timeout=2.5,
        batch_size=np.int64(8),  # type: ignore[arg-type]
        exact=np.bool_(True),  # type: ignore[arg-type]
    )
    assert ok.batch_size == 8 and type(ok.batch_size) is int and ok.exact is True


def test_reopen_checks_the_configuration(
    tiny_encoder: M3Encoder, tiny_m3_bin_dir: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "q")
    b = QdrantBackend(path=path, collection="docs")
    r = HybridRetriever(tiny_encoder, lexical="bm25", backend=b)
    r.add_texts(SAMPLE_TEXTS[:10], METAS[:10], IDS[:10])
    before = [(h.id, h.scores) for h in r.search("capital city", k=5)]
    avgdl = b._avgdl
    b.close()
    again = QdrantBackend(path=path, collection="docs")
    r2 = HybridRetriever(tiny_encoder, lexical="bm25", backend=again)
    assert len(r2) == 10 and again._avgdl == avgdl
    assert [(h.id, h.scores) for h in r2.search("capital city", k=5)] == before
    with pytest.raises(IndexMismatchError, match="lexical"):
        HybridRetriever(
            tiny_encoder,
            lexical="m3",
            backend=QdrantBackend(client=again.client, collection="docs"),
        )
    other = M3Encoder(tiny_m3_bin_dir, device="cpu")
    with pytest.raises(IndexMismatchError, match="built with model"):
        HybridRetriever(
            other, lexical="bm25", backend=QdrantBackend(client=again.client, collection="docs")
        )
    with pytest.raises(IndexMismatchError, match="colbert_dim"):
        HybridRetriever(
            other,
            lexical="bm25",
            backend=QdrantBackend(client=again.client, collection="docs"),
            allow_model_mismatch=True,
        )
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        HybridRetriever(
            tiny_encoder,
            lexical="bm25",
            colbert_dtype="binary",
            backend=QdrantBackend(client=again.client, collection="docs"),
        )
    meta = again.client.get_collection("docs").config.metadata
    assert meta["m3_rag"] == r2.backend.spec.to_json() | {"format": 2}  # type: ignore[attr-defined]
    # a second writer opened before the first documents came takes their reference length
    late = QdrantBackend(client=again.client, collection="docs")
    late.spec = again.spec
    late._avgdl = None
    late.add(["late"], ["capital city"], [{}], *_encoded(r2, ["capital city"]))
    assert late._avgdl == avgdl
    with pytest.raises(ValueError, match="reference length"):
        HybridRetriever(
            tiny_encoder,
            lexical="bm25",
            backend=QdrantBackend(client=again.client, collection="docs", bm25_avgdl=3.0),
        )
    with pytest.raises(ValueError, match="persists in Qdrant"):
        r2.save(tmp_path / "idx")
    again.client.create_collection(
        "foreign", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT)
    )
    with pytest.raises(IndexFormatError, match="not created by m3-rag"):
        HybridRetriever(
            tiny_encoder, backend=QdrantBackend(client=again.client, collection="foreign")
        )
    again.close()


def test_bm25_is_scored_by_the_engine_with_the_recorded_length(tiny_encoder: M3Encoder) -> None:
    """Lexical scores equal Qdrant's documented formula: IDF ``ln(1 + (N-n+0.5)/(n+0.5))``
    over the live documents, document side with the reference length of the first add."""
    r = _qdrant(tiny_encoder, lexical="bm25")
    r.add_texts(SAMPLE_TEXTS[:6], ids=IDS[:6])
    r.add_texts(SAMPLE_TEXTS[6:], ids=IDS[6:])
    r.delete([IDS[2]])
    backend = r.backend
    assert isinstance(backend, QdrantBackend)
    keep = [i for i in range(len(IDS)) if i != 2]
    counts = r._term_counts(SAMPLE_TEXTS)[keep]
    dl = np.asarray(counts.sum(axis=1), np.float64).reshape(-1)
    first = np.asarray(r._term_counts(SAMPLE_TEXTS[:6]).sum(axis=1), np.float64)
    assert backend._avgdl == pytest.approx(float(first.mean()))
    q = r._term_counts(["capital city of France"])
    tf = counts[:, q.indices].toarray()  # [n, query terms]
    n = tf.shape[0]
    df = (tf > 0).sum(axis=0)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    side = np.where(tf > 0, bm25_tf(tf, dl[:, None], backend._avgdl, BM25Params()), 0.0)
    expected = side @ (q.data * idf)
    hits = r.search("capital city of France", k=n, candidates=n)
    got = {h.id: h.scores["lexical"] for h in hits}
    assert (expected > 0).sum() >= 2
    for doc_id, e in zip([IDS[i] for i in keep], expected, strict=True):
        assert got[doc_id] == pytest.approx(e, rel=1e-5, abs=1e-6), doc_id


def test_options_reach_the_collection(tiny_encoder: M3Encoder) -> None:
    """Constructor options and the retriever's ColBERT dtype shape the collection: int8
    ColBERT (``HybridRetriever(colbert_dtype="int8")``) is Qdrant's int8 scalar
    quantisation of the multivector."""
    client = QdrantClient(":memory:")
    b = QdrantBackend(
        client=client,
        collection="opts",
        colbert_on_disk=True,
        indexed_fields={"lang": "keyword"},
        exact=True,
    )
    r = HybridRetriever(tiny_encoder, colbert_dtype="int8", backend=b)
    r.add_texts(SAMPLE_TEXTS[:4], METAS[:4], IDS[:4])
    params = client.get_collection("opts").config.params
    colbert = params.vectors["colbert"]
    assert colbert.multivector_config.comparator == models.MultiVectorComparator.MAX_SIM
    assert colbert.hnsw_config.m == 0 and colbert.on_disk is True
    assert colbert.quantization_config is not None
    assert colbert.quantization_config.scalar.type == models.ScalarType.INT8
    assert params.sparse_vectors["lexical"].modifier is None  # M3 weights: no IDF
    assert client.get_collection("opts").config.metadata["m3_rag"]["colbert_dtype"] == "int8"
    assert r.search("capital", k=2)
    # the same scores as the local engine storing int8 codes
    ref = HybridRetriever(tiny_encoder, colbert_dtype="int8")
    ref.add_texts(SAMPLE_TEXTS[:4], METAS[:4], IDS[:4])
    for x, y in zip(ref.search("capital", k=4), r.search("capital", k=4), strict=True):
        assert x.id == y.id
        assert y.scores["colbert"] == pytest.approx(x.scores["colbert"], rel=1e-5, abs=1e-5)
    plain = HybridRetriever(
        tiny_encoder,
        colbert_dtype="float16",
        pool_factor=1,
        backend=QdrantBackend(client=client, collection="f16"),
    )
    assert plain.backend.spec.colbert_dtype == "float16"  # type: ignore[attr-defined]
    assert client.get_collection("f16").config.params.vectors["colbert"].quantization_config is None
    binary = HybridRetriever(
        tiny_encoder,
        colbert_dtype="binary",
        backend=QdrantBackend(client=client, collection="bits"),
    )
    binary.add_texts(SAMPLE_TEXTS[:2], METAS[:2], IDS[:2])
    quant = client.get_collection("bits").config.params.vectors["colbert"].quantization_config
    assert quant is not None and quant.binary.always_ram is True  # a 1-bit copy in RAM
    # rotated-binary: the stored values are the codes' own ±1/sqrt(d) (Qdrant's 1-bit copy of
    # them is exactly the codes), searched with the rotated query: the local engine's scores
    rotated = HybridRetriever(
        tiny_encoder,
        colbert_dtype="rotated-binary",
        pool_factor=2,
        backend=QdrantBackend(client=client, collection="rbits"),
    )
    rotated.add_texts(SAMPLE_TEXTS[:4], METAS[:4], IDS[:4])
    quant = client.get_collection("rbits").config.params.vectors["colbert"].quantization_config
    assert quant is not None and quant.binary.always_ram is True
    dim = tiny_encoder.colbert_dim
    assert dim is not None
    point = client.retrieve("rbits", [point_id(IDS[0])], with_vectors=["colbert"])[0]
    stored = np.asarray(point.vector["colbert"], np.float32)  # type: ignore[index]
    np.testing.assert_allclose(np.abs(stored), 1 / np.sqrt(dim), rtol=1e-6)
    vectors = tiny_encoder.encode_documents(SAMPLE_TEXTS[:4]).colbert  # the batch added
    assert vectors is not None
    codes, _ = get_codec("rotated-binary").encode(pool_tokens(vectors[0], 2))
    np.testing.assert_array_equal(np.packbits(stored > 0, axis=1), codes)
    local = HybridRetriever(tiny_encoder, colbert_dtype="rotated-binary", pool_factor=2)
    local.add_texts(SAMPLE_TEXTS[:4], METAS[:4], IDS[:4])
    for x, y in zip(local.search("capital", k=4), rotated.search("capital", k=4), strict=True):
        assert x.id == y.id
        assert y.scores["colbert"] == pytest.approx(x.scores["colbert"], rel=1e-5, abs=1e-5)
    with pytest.raises(TypeError):  # the one switch is the retriever's colbert_dtype
        QdrantBackend(":memory:", colbert_quantization="int8")  # type: ignore[call-arg]
    with pytest.raises(TypeError):  # the option is the retriever's (Backend.open), not ours
        QdrantBackend(":memory:", allow_model_mismatch=True)  # type: ignore[call-arg]
    for bad in (
        {"indexed_fields": {"lang": "text"}},
        {"batch_size": 0},
        {"bm25_avgdl": -1.0},
        {"bm25_avgdl": "x"},
    ):
        with pytest.raises(ValueError):
            QdrantBackend(":memory:", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        QdrantBackend(":memory:", path="/tmp/x")
    for bad_type in ({"location": ""}, {"url": 6333}, {"location": ":memory:", "collection": 1}):
        with pytest.raises(TypeError):
            QdrantBackend(**bad_type)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="indexed_fields"):
        QdrantBackend(":memory:", indexed_fields=["lang"])  # type: ignore[arg-type]
    assert point_id("a") == point_id("a") != point_id("b")


def _create_format1(client: Any, name: str, spec: IndexSpec) -> None:
    """Create collection ``name`` as the previous version did with its
    ``colbert_quantization="int8"`` switch: ColBERT in the spec's dtype plus an int8 scalar
    quantisation, the record of format 1."""
    f16 = models.Datatype.FLOAT16
    colbert = models.VectorParams(
        size=spec.colbert_dim or 1,
        distance=models.Distance.DOT,
        multivector_config=models.MultiVectorConfig(
            comparator=models.MultiVectorComparator.MAX_SIM
        ),
        hnsw_config=models.HnswConfigDiff(m=0),
        on_disk=True,
        quantization_config=models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
        ),
        datatype=f16 if spec.colbert_dtype == "float16" else models.Datatype.FLOAT32,
    )
    modifier = models.Modifier.IDF if spec.lexical == "bm25" else None
    client.create_collection(
        name,
        vectors_config={
            "dense": models.VectorParams(size=spec.dense_dim, distance=models.Distance.DOT),
            "colbert": colbert,
        },
        sparse_vectors_config={"lexical": models.SparseVectorParams(modifier=modifier)}
        if spec.lexical
        else {},
        metadata={"m3_rag": format1_record(spec)},
    )


@pytest.mark.parametrize("lexical", ["m3", "bm25", "none"])
def test_a_format1_collection_still_opens_and_works(tiny_encoder: M3Encoder, lexical: str) -> None:
    """A collection made by the previous version (the record of format 1, ColBERT quantised
    by the former ``colbert_quantization="int8"`` switch) opens with the retriever's default
    settings, takes writes and searches as a new collection does; opening changes neither
    its record nor its quantisation."""
    client = QdrantClient(":memory:")
    new = HybridRetriever(  # float16 ColBERT, unpooled: what the previous version stored
        tiny_encoder,
        lexical=lexical,
        colbert_dtype="float16",
        pool_factor=1,
        backend=QdrantBackend(client=client, collection="new"),
    )
    spec = new.backend.spec  # type: ignore[attr-defined]
    _create_format1(client, "old", spec)
    old = HybridRetriever(
        tiny_encoder, lexical=lexical, backend=QdrantBackend(client=client, collection="old")
    )
    for r in (new, old):
        r.add_texts(SAMPLE_TEXTS, METAS, IDS)
        r.delete([IDS[2]])
    for q in ("capital city", "机器学习", SAMPLE_TEXTS[6]):
        assert [(h.id, h.scores) for h in old.search(q, k=5)] == [
            (h.id, h.scores) for h in new.search(q, k=5)
        ]
    info = client.get_collection("old").config
    assert info.metadata["m3_rag"] == format1_record(spec)
    assert info.params.vectors["colbert"].quantization_config is not None
    assert client.get_collection("new").config.metadata["m3_rag"] == spec.to_json() | {"format": 2}
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        HybridRetriever(
            tiny_encoder,
            lexical=lexical,
            colbert_dtype="int8",
            backend=QdrantBackend(client=client, collection="old"),
        )
    client.update_collection("old", metadata={"m3_rag": format1_record(spec) | {"format": 9}})
    with pytest.raises(IndexFormatError, match="format 9"):
        HybridRetriever(
            tiny_encoder, lexical=lexical, backend=QdrantBackend(client=client, collection="old")
        )


def _encoded(r: HybridRetriever, texts: list[str]) -> tuple[Any, Any, Any]:
    """``(dense, BM25 term counts, ColBERT)`` of ``texts`` as the retriever stores them."""
    enc = r.encoder.encode_documents(texts)
    return enc.dense, r._term_counts(texts), enc.colbert


def test_unreadable_local_storage_is_a_value_error(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    """A corrupt local-mode directory, or one another client holds, is refused and left as
    it is."""
    (tmp_path / "meta.json").write_text("{corrupt")
    with pytest.raises(ValueError, match="local storage"):
        HybridRetriever(tiny_encoder, backend=QdrantBackend(path=str(tmp_path)))
    assert (tmp_path / "meta.json").read_text() == "{corrupt"
    held = QdrantBackend(path=str(tmp_path / "held"), collection="docs")
    r = HybridRetriever(tiny_encoder, backend=held)
    r.add_texts(SAMPLE_TEXTS[:2], ids=IDS[:2])
    with pytest.raises(ValueError, match="local storage"):
        HybridRetriever(tiny_encoder, backend=QdrantBackend(path=str(tmp_path / "held")))
    assert len(r) == 2 and r.add_texts([]) == [] and len(r) == 2
    held.close()

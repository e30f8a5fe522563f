"""The backend contract: every engine behind ``HybridRetriever`` behaves as the memory backend.

Parametrised over engines: the local engine in RAM (the reference), on disk (memory-mapped
segments, merging every 2 segments) and with its approximate dense index on every segment;
Milvus Lite embedded; Milvus Lite as a separate server process on 127.0.0.1, reached through
``http://127.0.0.1:PORT``. A new engine joins by adding one entry to ``ENGINES``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from _qdrant_idf import qdrant_idf
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.testing import SAMPLE_TEXTS, milvus_lite_server

IDS = [f"doc-{i}" for i in range(len(SAMPLE_TEXTS))]
METAS = [{"i": i, "par": i % 2, "lang": ["en", "zh", "ar", "fr"][i % 4]} for i in range(len(IDS))]
QUERIES = ["capital city", "机器学习", SAMPLE_TEXTS[6], "retrieval model"]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``milvus-lite server`` in its own process on a free loopback port (stopped at the end)."""
    require("milvus_lite", "pip install -e '.[milvus]'")
    with milvus_lite_server(tmp_path_factory.mktemp("milvus-server")) as uri:
        yield uri


Factory = Callable[..., HybridRetriever]


def _memory(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    return HybridRetriever(enc, **kw)  # type: ignore[arg-type]


def _local_disk(
    enc: M3Encoder, request: pytest.FixtureRequest, io: str = "pread", **kw: object
) -> HybridRetriever:
    """Every array is read from disk however small (pread, or memory-mapped)."""
    from m3_rag.backends.local import segment_io
    from m3_rag.backends.local.engine import LocalBackend

    request.getfixturevalue("monkeypatch").setattr(segment_io, "_IN_RAM", 0)
    path = request.getfixturevalue("tmp_path") / f"idx-{uuid.uuid4().hex[:8]}"
    backend = LocalBackend(path, merge_factor=2, io=io)
    return HybridRetriever(enc, backend=backend, **kw)  # type: ignore[arg-type]


def _local_mmap(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    return _local_disk(enc, request, io="mmap", **kw)


def _local_ann(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    """Every segment gets a faiss IVF index; nprobe covers all lists, so it is exhaustive."""
    require("faiss", "pip install -e '.[ann]'")
    from m3_rag.backends.local.engine import LocalBackend

    backend = LocalBackend(ann_threshold=1, ann_nprobe=1000)
    return HybridRetriever(enc, backend=backend, **kw)  # type: ignore[arg-type]


def _milvus_lite(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    from m3_rag.backends.milvus.engine import MilvusBackend

    path = request.getfixturevalue("tmp_path") / f"{uuid.uuid4().hex[:8]}.db"
    return HybridRetriever(enc, backend=MilvusBackend(str(path), "docs"), **kw)  # type: ignore[arg-type]


def _milvus_server(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    from m3_rag.backends.milvus.engine import MilvusBackend

    uri = request.getfixturevalue("milvus_server")
    name = f"c_{uuid.uuid4().hex[:12]}"
    return HybridRetriever(enc, backend=MilvusBackend(uri, name), **kw)  # type: ignore[arg-type]


def _qdrant_local(enc: M3Encoder, request: pytest.FixtureRequest, **kw: object) -> HybridRetriever:
    """qdrant-client's local mode, in RAM (exact search, Qdrant's query planner)."""
    from m3_rag.backends.qdrant.engine import QdrantBackend

    backend = QdrantBackend(":memory:", collection=f"c_{uuid.uuid4().hex[:12]}", batch_size=4)
    return HybridRetriever(enc, backend=backend, **kw)  # type: ignore[arg-type]


ENGINES: dict[str, Callable[..., HybridRetriever]] = {
    "memory": _memory,
    "local-disk": _local_disk,
    "local-mmap": _local_mmap,
    "local-ann": _local_ann,
    "milvus-lite": _milvus_lite,
    "milvus-server": _milvus_server,
    "qdrant-local": _qdrant_local,
}


@pytest.fixture(params=list(ENGINES))
def make(request: pytest.FixtureRequest, tiny_encoder: M3Encoder) -> Factory:
    if request.param.startswith("milvus"):
        require("pymilvus", "pip install -e '.[milvus]'")
    if request.param.startswith("qdrant"):
        require("qdrant_client", "pip install -e '.[qdrant]'")
    return lambda **kw: ENGINES[request.param](tiny_encoder, request, **kw)


def _same(a: HybridRetriever, b: HybridRetriever, query: str, **kw: object) -> None:
    x, y = a.search(query, **kw), b.search(query, **kw)  # type: ignore[arg-type]
    assert [h.id for h in x] == [h.id for h in y], (query, kw)
    for p, q in zip(x, y, strict=True):
        assert (p.text, p.metadata) == (q.text, q.metadata)
        for mode, s in p.scores.items():
            assert q.scores[mode] == pytest.approx(s, rel=1e-5, abs=1e-5), (mode, query, kw)


# engines whose BM25 uses Qdrant's IDF (documented in m3_rag/backends/qdrant/engine.py); their
# reference is the local engine with that IDF (the reference length is the live mean here:
# every document comes in the first add)
QDRANT_BM25 = {"qdrant-local"}


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_search_equals_the_memory_reference(
    make: Factory,
    tiny_encoder: M3Encoder,
    lexical: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if lexical == "bm25" and request.node.callspec.params["make"] in QDRANT_BM25:
        from m3_rag.backends.local import engine as local

        monkeypatch.setattr(local._Stats, "idf", qdrant_idf)
    ref = HybridRetriever(tiny_encoder, lexical=lexical, candidates=8)
    r = make(lexical=lexical, candidates=8)
    for x in (ref, r):
        assert x.add_texts(SAMPLE_TEXTS, METAS, IDS) == IDS
    assert len(r) == len(IDS) and r.search("anything", k=0) == []
    for q in QUERIES:
        _same(ref, r, q, k=5)
        _same(ref, r, q, k=5, filter={"lang": ["en", "zh"], "par": 1})
        _same(ref, r, q, k=4, fusion="rrf")
        _same(ref, r, q, k=3, weights=(0, 1, 0))
    _same(ref, r, "capital", k=1000, candidates=1000)


def test_updates_deletes_and_reads(make: Factory) -> None:
    r = make()
    r.add_texts(SAMPLE_TEXTS[:8], METAS[:8], IDS[:8])
    r.add_texts(["a replaced passage about Paris"], [{"new": True}], [IDS[3]])
    assert len(r) == 8
    assert r.get([IDS[3], "nope", IDS[1]]) == [
        (IDS[3], "a replaced passage about Paris", {"new": True}),
        (IDS[1], SAMPLE_TEXTS[1], METAS[1]),
    ]
    with pytest.raises(KeyError, match="unknown"):
        r.delete([IDS[0], "nope"])
    assert len(r) == 8  # nothing deleted
    assert r.delete([IDS[0], "nope"], missing_ok=True) == 1 and len(r) == 7
    # doc-3 now has {"new": True}; doc-0 is deleted
    assert sorted(r.select({"par": 1})) == ["doc-1", "doc-5", "doc-7"]
    assert sorted(r.select()) == sorted(IDS[1:8])
    hits = r.search("Paris", k=10, filter={"new": True})
    assert [h.id for h in hits] == [IDS[3]]
    hits[0].metadata["new"] = "changed"  # a private copy
    assert r.get([IDS[3]])[0][2] == {"new": True}


def test_bad_input_changes_nothing(make: Factory, tiny_encoder: M3Encoder) -> None:
    r = make()
    r.add_texts(SAMPLE_TEXTS[:4], METAS[:4], IDS[:4])
    enc = tiny_encoder.encode_documents(SAMPLE_TEXTS[4:6])
    assert enc.dense is not None
    enc.dense[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        r.add_encoded(SAMPLE_TEXTS[4:6], enc, ids=IDS[4:6])
    with pytest.raises(ValueError, match="NaN or infinity"):
        r.add_texts(["x", "y"], [{}, {"v": float("inf")}], ["x", "y"])
    with pytest.raises(ValueError, match="lone surrogate"):
        r.add_texts(["x"], ids=["bad\udcff"])
    assert len(r) == 4 and sorted(r.select()) == IDS[:4]


def test_add_encoded_equals_add_texts(make: Factory, tiny_encoder: M3Encoder) -> None:
    a, b = make(), make()
    a.add_texts(SAMPLE_TEXTS[:10], METAS[:10], IDS[:10])
    b.add_encoded(
        SAMPLE_TEXTS[:10], tiny_encoder.encode_documents(SAMPLE_TEXTS[:10]), METAS[:10], IDS[:10]
    )
    for q in QUERIES:
        _same(a, b, q, k=5)

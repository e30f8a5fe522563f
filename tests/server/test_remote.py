"""``RemoteEncoder`` / ``RemoteReranker`` against the real server: equal to the model in this
process, through ``HybridRetriever``, and through the LangChain and LlamaIndex adapters
(langchain-tests' standard suites, the Qdrant sparse bridge, LlamaIndex's retriever,
postprocessor and vector store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _serving import API_KEY, MAX_CHARS, Server, main_server
from conftest import MULTILINGUAL

from m3_rag import CrossEncoder, Encoder, HybridRetriever, M3Encoder, Reranker
from m3_rag.remote import RemoteEncoder, RemoteError, RemoteReranker
from m3_rag.testing import SAMPLE_TEXTS

TEXTS = [*MULTILINGUAL, *SAMPLE_TEXTS[:6]]
IDS = [f"doc{i}" for i in range(len(SAMPLE_TEXTS))]
META = [{"i": i, "lang": "zh" if 8 <= i <= 12 else "other"} for i in range(len(SAMPLE_TEXTS))]


@pytest.fixture(scope="module")
def server(tiny_m3_dir: Path, tiny_reranker_dir: Path) -> Server:
    return main_server(tiny_m3_dir, tiny_reranker_dir)


@pytest.fixture(scope="module")
def remote(server: Server) -> Iterator[RemoteEncoder]:
    enc = RemoteEncoder(server.url, api_key=API_KEY, batch_size=8)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def remote_rr(server: Server) -> RemoteReranker:
    return RemoteReranker(server.url, api_key=API_KEY)


@pytest.fixture(scope="module")
def local(tiny_m3_dir: Path) -> M3Encoder:
    return M3Encoder(tiny_m3_dir, device="cpu")


def _same(a, b, atol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    """Two EncodeOutputs hold the same values (texts batched otherwise round otherwise in
    float32: lexical weights up to ~1e-6 apart)."""
    assert (a.dense is None) == (b.dense is None) and len(a) == len(b)
    if a.dense is not None:
        np.testing.assert_allclose(a.dense, b.dense, atol=atol)
    assert (a.sparse is None) == (b.sparse is None)
    for x, y in zip(a.sparse or [], b.sparse or [], strict=True):
        assert x.keys() == y.keys() and [x[k] for k in y] == pytest.approx(
            list(y.values()), abs=atol
        )
    assert (a.colbert is None) == (b.colbert is None)
    for x, y in zip(a.colbert or [], b.colbert or [], strict=True):
        np.testing.assert_allclose(x, y, atol=atol)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_settings_come_from_the_server(remote: RemoteEncoder, local: M3Encoder) -> None:
    assert isinstance(remote, Encoder)
    for name in ("model_name", "has_sparse", "has_colbert", "dense_dim", "colbert_dim"):
        assert getattr(remote, name) == getattr(local, name), name
    assert remote.vocab_size == local.vocab_size and remote.max_length == local.max_length
    assert "RemoteEncoder(" in repr(remote)


def test_encode_methods_equal_the_model_in_process(remote: RemoteEncoder, local: M3Encoder) -> None:
    _same(remote.encode(TEXTS), local.encode(TEXTS))
    _same(remote.encode_queries(TEXTS), local.encode_queries(TEXTS))
    _same(remote.encode_documents(TEXTS, max_length=8), local.encode_documents(TEXTS, max_length=8))
    _same(
        remote.encode("one", return_sparse=False, return_colbert=False),
        local.encode("one", return_sparse=False, return_colbert=False),
    )
    _same(remote.encode([]), local.encode([]))
    pairs = [("capital of France", t) for t in SAMPLE_TEXTS[:5]]
    got, want = (
        remote.compute_score(pairs, weights=(0.4, 0.2, 0.4)),
        local.compute_score(pairs, weights=(0.4, 0.2, 0.4)),
    )
    assert got.keys() == want.keys()
    for mode in want:
        assert got[mode] == pytest.approx(want[mode], abs=1e-5)


def test_tokenizer_is_the_servers(remote: RemoteEncoder, local: M3Encoder) -> None:
    kwargs = {"add_special_tokens": False, "truncation": False}
    assert (
        remote.tokenizer(TEXTS, **kwargs)["input_ids"]
        == local.tokenizer(TEXTS, **kwargs)["input_ids"]
    )
    assert len(remote.tokenizer) == len(local.tokenizer)


def test_errors_say_what_happened(server: Server, remote: RemoteEncoder) -> None:
    with pytest.raises(PermissionError, match="API key"):
        RemoteEncoder(server.url, api_key="wrong")
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteEncoder("http://127.0.0.1:1", retries=0)
    with pytest.raises(ValueError, match="http"):
        RemoteEncoder("localhost:8000")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        remote.encode(["a", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="characters"):
        remote.encode(["a" * (MAX_CHARS + 1)])
    with pytest.raises(TypeError, match="unknown encode option"):
        remote.encode_queries(["a"], colour="red")


@pytest.mark.parametrize("lexical", ["auto", "bm25"])
def test_hybrid_retriever_over_the_server(
    remote: RemoteEncoder,
    remote_rr: RemoteReranker,
    local: M3Encoder,
    tiny_reranker_dir: Path,
    lexical: str,
    tmp_path: Path,
) -> None:
    # float32 ColBERT storage: this checks the transport, at 1e-5. Under the int8 default a
    # 1e-7 float difference (the remote encodes in requests of 8, the local in one batch plan)
    # can move a value across a rounding step, which moves a ColBERT score by ~2e-5 (CI saw it).
    kwargs = {"lexical": lexical, "analyzer": "model", "colbert_dtype": "float32"}
    mine = HybridRetriever(local, Reranker(tiny_reranker_dir, device="cpu"), **kwargs)
    theirs = HybridRetriever(remote, remote_rr, **kwargs)
    for r in (mine, theirs):
        r.add_texts(SAMPLE_TEXTS, META, IDS)
    for query in ("capital of France", SAMPLE_TEXTS[9], "机器学习"):
        for opts in ({"rerank": False}, {"rerank": True}, {"filter": {"lang": "zh"}}):
            want = mine.search(query, k=4, **opts)  # type: ignore[arg-type]
            got = theirs.search(query, k=4, **opts)  # type: ignore[arg-type]
            assert [h.id for h in got] == [h.id for h in want]
            for g, w in zip(got, want, strict=True):
                assert g.scores == pytest.approx(w.scores, abs=1e-5)
    theirs.save(tmp_path / "idx")
    again = HybridRetriever.load(tmp_path / "idx", remote)
    assert [h.id for h in again.search("capital", k=3)] == [
        h.id for h in theirs.search("capital", k=3, rerank=False)
    ]


def test_remote_reranker_equals_the_reranker(
    remote_rr: RemoteReranker, tiny_reranker_dir: Path
) -> None:
    rr = Reranker(tiny_reranker_dir, device="cpu")
    assert isinstance(remote_rr, CrossEncoder)
    pairs = [("capital", t) for t in SAMPLE_TEXTS[:4]] + [("fox", t) for t in SAMPLE_TEXTS[4:7]]
    assert remote_rr.compute_score(pairs) == pytest.approx(rr.compute_score(pairs), abs=1e-5)
    assert remote_rr.compute_score(pairs, normalize=True) == pytest.approx(
        rr.compute_score(pairs, normalize=True), abs=1e-6
    )
    got, want = (
        remote_rr.rerank("fox", SAMPLE_TEXTS[:8], top_n=3),
        rr.rerank("fox", SAMPLE_TEXTS[:8], top_n=3),
    )
    assert [r.index for r in got] == [r.index for r in want]
    assert remote_rr.rerank("fox", []) == []

"""LangChain adapters: the langchain-tests standard suites plus behaviour tests, offline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import require

require("langchain_core", "pip install -e '.[langchain]'")
from langchain_core.documents import Document
from langchain_m3rag import M3Embeddings, M3Reranker, M3Retriever
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests

from m3_rag import HybridRetriever, M3Encoder, Reranker
from m3_rag.testing import SAMPLE_TEXTS

META = [{"i": i, "lang": "zh" if 8 <= i <= 12 else "other"} for i in range(len(SAMPLE_TEXTS))]


@pytest.fixture(scope="module")
def core(tiny_encoder: M3Encoder) -> HybridRetriever:
    r = HybridRetriever(tiny_encoder)
    r.add_texts(SAMPLE_TEXTS, metadatas=META, ids=[f"doc{i}" for i in range(len(SAMPLE_TEXTS))])
    return r


class TestM3EmbeddingsUnit(EmbeddingsUnitTests):
    path: Path

    @pytest.fixture(autouse=True)
    def _checkpoint(self, tiny_m3_dir: Path) -> None:
        type(self).path = tiny_m3_dir

    @property
    def embeddings_class(self) -> type[M3Embeddings]:
        return M3Embeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model_name_or_path": str(self.path), "model_kwargs": {"device": "cpu"}}


class TestM3EmbeddingsIntegration(EmbeddingsIntegrationTests):
    encoder: M3Encoder

    @pytest.fixture(autouse=True)
    def _encoder(self, tiny_encoder: M3Encoder) -> None:
        type(self).encoder = tiny_encoder

    @property
    def embeddings_class(self) -> type[M3Embeddings]:
        return M3Embeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": self.encoder, "query_max_length": 32}


class TestM3RetrieverIntegration(RetrieversIntegrationTests):
    core: HybridRetriever

    @pytest.fixture(autouse=True)
    def _core(self, core: HybridRetriever) -> None:
        type(self).core = core

    @property
    def retriever_constructor(self) -> type[M3Retriever]:
        return M3Retriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"retriever": self.core, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "What is the capital of France?"


def test_embeddings_return_python_floats_and_match_the_encoder(tiny_encoder: M3Encoder) -> None:
    emb = M3Embeddings(encoder=tiny_encoder)
    docs = emb.embed_documents(["hello", "world"])
    assert isinstance(docs[0][0], float) and len(docs[0]) == tiny_encoder.dense_dim
    direct = tiny_encoder.encode(["hello"]).dense
    assert direct is not None and docs[0] == pytest.approx(direct[0].tolist(), abs=1e-6)
    assert asyncio.run(emb.aembed_query("hello")) == pytest.approx(emb.embed_query("hello"))
    with pytest.raises(TypeError, match="str"):
        emb.embed_query(None)  # type: ignore[arg-type]


def test_retriever_documents_carry_id_and_scores(core: HybridRetriever) -> None:
    r = M3Retriever(retriever=core, k=3)
    docs = r.invoke(SAMPLE_TEXTS[3])
    assert len(docs) == 3 and docs[0].id == "doc3" and docs[0].page_content == SAMPLE_TEXTS[3]
    scores = docs[0].metadata["m3_rag_scores"]
    assert set(scores) == {"score", "dense", "lexical", "colbert", "fused"}
    assert docs[0].metadata["lang"] == "other" and isinstance(scores["score"], float)
    assert len(r.invoke("x", k=5)) == 5


def test_retriever_filters_default_and_per_call(core: HybridRetriever) -> None:
    r = M3Retriever(retriever=core, k=10, filter={"lang": "zh"})
    assert {d.metadata["lang"] for d in r.invoke("capital")} == {"zh"}
    assert {d.metadata["lang"] for d in r.invoke("capital", filter={"lang": "other"})} == {"other"}
    assert all(d.metadata["i"] < 3 for d in r.invoke("capital", filter=lambda m: m["i"] < 3))


def test_from_documents_add_delete_async(tiny_encoder: M3Encoder) -> None:
    docs = [
        Document(page_content=t, metadata={"n": i}, id=f"d{i}")
        for i, t in enumerate(SAMPLE_TEXTS[:6])
    ]
    r = M3Retriever.from_documents(docs, tiny_encoder, k=6)
    assert {d.id for d in r.invoke("fox")} == {f"d{i}" for i in range(6)}
    r.delete(["d0", "d1"])
    assert {d.id for d in r.invoke("fox")} == {f"d{i}" for i in range(2, 6)}
    with pytest.raises(KeyError):
        r.delete(["d2", "missing"])
    r.add_documents([Document(page_content="a new passage about foxes", id="new")])
    got = asyncio.run(r.ainvoke("a new passage about foxes", k=1))
    assert got[0].id == "new"


def test_reranker_compressor(tiny_reranker_dir: Path, core: HybridRetriever) -> None:
    from langchain_core.retrievers import BaseRetriever

    rr = Reranker(tiny_reranker_dir)
    comp = M3Reranker(reranker=rr, top_n=2)
    docs = M3Retriever(retriever=core, k=6).invoke("capital of France")
    out = comp.compress_documents(docs, "capital of France")
    want = rr.rerank("capital of France", [d.page_content for d in docs], top_n=2)
    assert [d.id for d in out] == [docs[i].id for i, _ in want]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([s for _, s in want])
    # LangChain 1.x home of it
    classic = require("langchain_classic.retrievers", "pip install -e '.[dev]'")
    ccr = classic.ContextualCompressionRetriever(
        base_compressor=comp, base_retriever=M3Retriever(retriever=core, k=6)
    )
    assert isinstance(ccr, BaseRetriever) and len(ccr.invoke("capital of France")) == 2

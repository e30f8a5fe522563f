"""The LangChain and LlamaIndex adapters over ``RemoteEncoder`` / ``RemoteReranker``: the
langchain-tests standard suites (embeddings, retriever, vector store), the Qdrant sparse bridge,
LlamaIndex's embeddings, retriever, postprocessor and vector store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import API_KEY, Server, main_server
from conftest import require

require("langchain_core", "pip install -e '.[langchain]'")
from langchain_core.vectorstores import VectorStore
from langchain_m3rag import M3Embeddings, M3Retriever, M3VectorStore
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.remote import RemoteEncoder, RemoteReranker
from m3_rag.testing import SAMPLE_TEXTS

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


class TestRemoteEmbeddingsIntegration(EmbeddingsIntegrationTests):
    encoder: RemoteEncoder

    @pytest.fixture(autouse=True)
    def _encoder(self, remote: RemoteEncoder) -> None:
        type(self).encoder = remote

    @property
    def embeddings_class(self) -> type[M3Embeddings]:
        return M3Embeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": self.encoder, "query_max_length": 32}


class TestRemoteRetrieverIntegration(RetrieversIntegrationTests):
    core: HybridRetriever

    @pytest.fixture(autouse=True)
    def _core(self, remote: RemoteEncoder) -> None:
        if not hasattr(type(self), "core"):
            r = HybridRetriever(remote)
            r.add_texts(SAMPLE_TEXTS, metadatas=META, ids=IDS)
            type(self).core = r

    @property
    def retriever_constructor(self) -> type[M3Retriever]:
        return M3Retriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"retriever": self.core, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "What is the capital of France?"


class TestRemoteVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture(autouse=True)
    def _encoder(self, remote: RemoteEncoder) -> None:
        self._enc = remote

    def get_embeddings(self) -> M3Embeddings:  # type: ignore[override]
        return M3Embeddings(encoder=self._enc)

    @pytest.fixture
    def vectorstore(self) -> Iterator[VectorStore]:  # type: ignore[override]
        yield M3VectorStore.from_encoder(self._enc)

    @property
    def has_get_by_ids(self) -> bool:
        return True


def test_langchain_qdrant_hybrid_over_the_server(remote: RemoteEncoder) -> None:
    require("langchain_qdrant", "pip install -e '.[langchain-qdrant]'")
    from langchain_core.documents import Document
    from langchain_m3rag import M3QdrantSparseEmbeddings
    from langchain_qdrant import QdrantVectorStore, RetrievalMode

    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(SAMPLE_TEXTS)]
    store = QdrantVectorStore.from_documents(
        docs,
        embedding=M3Embeddings(encoder=remote),
        sparse_embedding=M3QdrantSparseEmbeddings(remote),
        location=":memory:",
        collection_name="m3",
        retrieval_mode=RetrievalMode.HYBRID,
    )
    assert store.similarity_search(SAMPLE_TEXTS[9], k=3)[0].page_content == SAMPLE_TEXTS[9]


# ------------------------------------------------------------------------ LlamaIndex
def test_llama_index_adapters_over_the_server(
    remote: RemoteEncoder, remote_rr: RemoteReranker, local: M3Encoder
) -> None:
    require("llama_index.core", "pip install -e '.[llama-index]'")
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.schema import QueryBundle, TextNode
    from llama_index_m3rag import M3Embedding, M3Rerank, M3SparseEmbedding
    from llama_index_m3rag import M3Retriever as LlamaRetriever
    from llama_index_m3rag import M3VectorStore as LlamaStore

    dense, sparse = M3Embedding(encoder=remote), M3SparseEmbedding(encoder=remote)
    want = local.encode(["hello world"])
    assert want.dense is not None and want.sparse is not None
    assert dense.get_text_embedding("hello world") == pytest.approx(
        want.dense[0].tolist(), abs=1e-6
    )
    assert sparse.get_text_embedding("hello world") == pytest.approx(want.sparse[0], abs=1e-6)
    nodes = [TextNode(id_=f"n{i}", text=t, metadata=META[i]) for i, t in enumerate(SAMPLE_TEXTS)]
    retriever = LlamaRetriever.from_nodes(nodes, remote, similarity_top_k=3)
    got = retriever.retrieve(SAMPLE_TEXTS[3])
    assert got[0].node.node_id == "n3" and len(got) == 3
    post = M3Rerank(top_n=2, reranker=remote_rr)
    ranked = post.postprocess_nodes(got, QueryBundle("capital of France"))
    order = remote_rr.rerank("capital of France", [n.node.get_content() for n in got], top_n=2)
    assert [n.node.node_id for n in ranked] == [got[i].node.node_id for i, _ in order]
    store = LlamaStore.from_encoder(remote)
    index = VectorStoreIndex.from_documents(
        [Document(text=t, doc_id=f"d{i}") for i, t in enumerate(SAMPLE_TEXTS)],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=dense,
    )
    hit = index.as_retriever(similarity_top_k=2).retrieve(SAMPLE_TEXTS[14])[0]
    assert hit.node.get_content() == SAMPLE_TEXTS[14]


def test_milvus_sparse_functions_over_the_server(remote: RemoteEncoder, local: M3Encoder) -> None:
    """LangChain's Milvus sparse embeddings and LlamaIndex's Milvus sparse function (the
    interface those stores call) give the served model's lexical weights."""
    require("langchain_milvus", "pip install -e '.[langchain-milvus]'")
    from langchain_m3rag import M3MilvusSparseEmbeddings
    from llama_index_m3rag import M3SparseEmbedding

    texts = SAMPLE_TEXTS[:4]
    want_docs, want_q = local.encode_documents(texts).sparse, local.encode_queries(texts).sparse
    assert want_docs is not None and want_q is not None
    lc = M3MilvusSparseEmbeddings(remote)
    li = M3SparseEmbedding(encoder=remote)
    for got, want in (
        (lc.embed_documents(texts), want_docs),
        ([lc.embed_query(t) for t in texts], want_q),
        (li.encode_documents(texts), want_docs),
        (li.encode_queries(texts), want_q),
    ):
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            assert [g[k] for k in w] == pytest.approx(list(w.values()), abs=1e-5)

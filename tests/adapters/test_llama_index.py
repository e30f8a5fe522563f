"""LlamaIndex adapters: classes, behaviour, persistence and a RetrieverQueryEngine, offline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import require

require("llama_index.core", "pip install -e '.[llama-index]'")
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.embeddings.base_sparse import BaseSparseEmbedding
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import Document, NodeWithScore, QueryBundle, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)
from llama_index_m3rag import M3Embedding, M3Rerank, M3Retriever, M3SparseEmbedding, to_core_filter

from m3_rag import M3Encoder, Reranker
from m3_rag.testing import SAMPLE_TEXTS

NODES = [
    TextNode(id_=f"n{i}", text=t, metadata={"i": i, "lang": "zh" if 8 <= i <= 12 else "other"})
    for i, t in enumerate(SAMPLE_TEXTS)
]


@pytest.fixture(scope="module")
def retriever(tiny_encoder: M3Encoder) -> M3Retriever:
    return M3Retriever.from_nodes(NODES, tiny_encoder, similarity_top_k=3)


def test_class_hierarchy() -> None:
    assert issubclass(M3Embedding, BaseEmbedding) and issubclass(
        M3SparseEmbedding, BaseSparseEmbedding
    )
    assert issubclass(M3Retriever, BaseRetriever) and issubclass(M3Rerank, BaseNodePostprocessor)


def test_dense_and_sparse_embeddings_share_the_encoder(tiny_encoder: M3Encoder) -> None:
    dense = M3Embedding(encoder=tiny_encoder)
    sparse = M3SparseEmbedding(encoder=tiny_encoder)
    assert dense.encoder is tiny_encoder
    vec = dense.get_text_embedding("hello")
    assert len(vec) == tiny_encoder.dense_dim and isinstance(vec[0], float)
    assert len(dense.get_text_embedding_batch(["a", "b", "c"])) == 3
    lex = sparse.get_text_embedding("hello world")
    want = tiny_encoder.encode(["hello world"]).sparse
    assert want is not None and lex == pytest.approx(want[0])
    assert all(isinstance(k, int) for k in lex)
    assert asyncio.run(sparse.aget_query_embedding("hello")) == sparse.get_query_embedding("hello")
    assert asyncio.run(dense.aget_query_embedding("hello")) == pytest.approx(
        dense.get_query_embedding("hello")
    )


def test_sparse_embedding_needs_m3(tiny_dense_dir: Path) -> None:
    with pytest.raises(ValueError, match="dense-only"):
        M3SparseEmbedding(encoder=M3Encoder(tiny_dense_dir))


def test_retrieve_returns_scored_nodes(retriever: M3Retriever) -> None:
    got = retriever.retrieve(SAMPLE_TEXTS[3])
    assert len(got) == 3 and all(
        isinstance(n, NodeWithScore) and isinstance(n.score, float) for n in got
    )
    assert got[0].node.node_id == "n3" and got[0].node.get_content() == SAMPLE_TEXTS[3]
    assert set(got[0].node.metadata["m3_rag_scores"]) == {
        "score",
        "dense",
        "lexical",
        "colbert",
        "fused",
    }
    assert "m3_rag_scores" in got[0].node.excluded_llm_metadata_keys
    assert [n.node.node_id for n in asyncio.run(retriever.aretrieve(SAMPLE_TEXTS[3]))] == [
        n.node.node_id for n in got
    ]


def test_metadata_filters(retriever: M3Retriever) -> None:
    eq = MetadataFilters(filters=[MetadataFilter(key="lang", value="zh")])
    assert to_core_filter(eq) == {"lang": "zh"}
    r = M3Retriever(retriever.retriever, similarity_top_k=10, filters=eq)
    assert {n.node.metadata["lang"] for n in r.retrieve("x")} == {"zh"}
    rng = MetadataFilters(
        filters=[
            MetadataFilter(key="i", value=20, operator=FilterOperator.GTE),
            MetadataFilter(key="i", value=[1, 2], operator=FilterOperator.IN),
        ],
        condition=FilterCondition.OR,
    )
    r = M3Retriever(retriever.retriever, similarity_top_k=50, filters=rng)
    assert sorted(n.node.metadata["i"] for n in r.retrieve("x")) == [1, 2, 20, 21, 22]
    nin = MetadataFilters(
        filters=[MetadataFilter(key="lang", value=["other"], operator=FilterOperator.NIN)]
    )
    assert (
        len(M3Retriever(retriever.retriever, similarity_top_k=50, filters=nin).retrieve("x")) == 5
    )


def test_insert_delete_and_persist(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    docs = [
        Document(text=t, id_=f"doc{i}", metadata={"i": i}) for i, t in enumerate(SAMPLE_TEXTS[:5])
    ]
    r = M3Retriever.from_documents(docs, tiny_encoder, similarity_top_k=10)
    r.delete(["doc0"])
    r.insert_nodes([TextNode(id_="extra", text="an extra node about Paris")])
    assert {n.node.node_id for n in r.retrieve("Paris")} == {
        "doc1",
        "doc2",
        "doc3",
        "doc4",
        "extra",
    }
    r.persist(tmp_path / "idx")
    loaded = M3Retriever.from_persist_dir(tmp_path / "idx", tiny_encoder, similarity_top_k=10)
    a = [(n.node.node_id, n.score) for n in r.retrieve("Paris")]
    assert [(n.node.node_id, n.score) for n in loaded.retrieve("Paris")] == a


def test_rerank_postprocessor_and_query_engine(
    retriever: M3Retriever, tiny_reranker_dir: Path
) -> None:
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    rr = Reranker(tiny_reranker_dir)
    post = M3Rerank(top_n=2, reranker=rr)
    nodes = retriever.retrieve("capital of France")
    out = post.postprocess_nodes(nodes, QueryBundle("capital of France"))
    want = rr.rerank("capital of France", [n.node.get_content() for n in nodes], top_n=2)
    assert [n.node.node_id for n in out] == [nodes[i].node.node_id for i, _ in want]
    engine = RetrieverQueryEngine.from_args(
        retriever, llm=MockLLM(max_tokens=8), node_postprocessors=[post]
    )
    response = engine.query("capital of France")
    assert len(response.source_nodes) == 2 and isinstance(str(response), str)

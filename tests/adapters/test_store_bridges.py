"""BGE-M3 sparse weights inside the stores people already run, one forward pass per text
(issue: drop-in everywhere, items 2 and 4): langchain-qdrant's QdrantVectorStore in hybrid
mode (qdrant-client local mode), langchain-milvus on Milvus Lite, LlamaIndex's Qdrant store
with enable_hybrid (local mode)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from m3_rag import M3Encoder
from m3_rag.cache import encode_cache, encode_cached
from m3_rag.testing import SAMPLE_TEXTS


class Counter:
    """Texts through the model (a forward hook on the backbone)."""

    def __init__(self, enc: M3Encoder) -> None:
        self.texts = 0
        self._handle = enc.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: object, args: tuple, kwargs: dict, out: object) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.texts += int(ids.shape[0])

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def enc(tiny_m3_dir: Path) -> Iterator[M3Encoder]:
    """A fresh encoder: its cache starts empty."""
    yield M3Encoder(tiny_m3_dir, device="cpu", max_length=64, batch_size=8)


def test_cache_shares_one_pass_and_matches_direct_encoding(enc: M3Encoder) -> None:
    count = Counter(enc)
    texts = SAMPLE_TEXTS[:10]
    first = encode_cached(enc, texts, "document")
    again = encode_cached(enc, [*texts[3:], *texts[:3]], "document")
    assert count.texts == 10  # the second call ran nothing
    direct = enc.encode_documents(texts)
    assert direct.dense is not None and direct.sparse is not None
    np.testing.assert_array_equal(np.stack([c.dense for c in first]), direct.dense)
    assert [c.sparse for c in first] == direct.sparse
    assert again[7].sparse == first[0].sparse
    count.texts = 0
    encode_cached(enc, texts[:2], "query")  # another role: encoded again, as a query
    assert count.texts == 2
    cache = encode_cache(enc)
    cache.max_items = 5
    encode_cached(enc, ["one more"], "document")
    assert len(cache) == 5
    with pytest.raises(ValueError, match="dense-only"):
        from langchain_m3rag.sparse_common import sparse_rows

        sparse_rows(_dense_only(enc), ["x"], "query")


def _dense_only(enc: M3Encoder) -> M3Encoder:
    clone = object.__new__(M3Encoder)
    clone.__dict__.update(enc.__dict__, sparse_linear=None)
    return clone


def test_langchain_qdrant_hybrid_one_pass_per_text(enc: M3Encoder) -> None:
    require("langchain_qdrant", "pip install -e '.[langchain-qdrant]'")
    from langchain_core.documents import Document
    from langchain_m3rag import M3Embeddings, M3QdrantSparseEmbeddings
    from langchain_qdrant import QdrantVectorStore, RetrievalMode

    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(SAMPLE_TEXTS)]
    store = QdrantVectorStore.from_documents(  # creating it embeds a probe text for the size
        docs[:1],
        embedding=M3Embeddings(encoder=enc),
        sparse_embedding=M3QdrantSparseEmbeddings(enc),
        location=":memory:",
        collection_name="m3",
        retrieval_mode=RetrievalMode.HYBRID,
    )
    count = Counter(enc)
    store.add_documents(docs[1:])
    assert count.texts == len(docs) - 1  # dense and sparse from one pass per text
    hits = store.similarity_search(SAMPLE_TEXTS[9], k=3)
    assert hits[0].page_content == SAMPLE_TEXTS[9]
    sparse_only = QdrantVectorStore(
        client=store.client,
        collection_name="m3",
        embedding=M3Embeddings(encoder=enc),
        sparse_embedding=M3QdrantSparseEmbeddings(enc),
        retrieval_mode=RetrievalMode.SPARSE,
    )
    # Qdrant's sparse ranking is BGE-M3's lexical matching score, as m3-rag computes it
    from m3_rag.scoring import pairwise_sparse

    query = "capital city of France"
    q = enc.encode_queries([query]).sparse
    d = enc.encode_documents(SAMPLE_TEXTS).sparse
    assert q is not None and d is not None
    mine = pairwise_sparse(q * len(d), d)
    got = sparse_only.similarity_search_with_score(query, k=5)
    want = sorted(range(len(d)), key=lambda i: -mine[i])[:5]
    assert [doc.page_content for doc, _ in got] == [SAMPLE_TEXTS[i] for i in want]
    assert [s for _, s in got] == pytest.approx([mine[i] for i in want], rel=1e-4)


def test_langchain_milvus_dense_and_sparse_fields(enc: M3Encoder, tmp_path: Path) -> None:
    require("langchain_milvus", "pip install -e '.[langchain-milvus]'")
    from langchain_m3rag import M3Embeddings, M3MilvusSparseEmbeddings
    from langchain_milvus import Milvus

    count = Counter(enc)
    store = Milvus.from_texts(
        SAMPLE_TEXTS,
        embedding=[M3Embeddings(encoder=enc), M3MilvusSparseEmbeddings(enc)],
        vector_field=["dense", "sparse"],
        connection_args={"uri": str(tmp_path / "lc.db")},
        collection_name="m3",
        index_params=[
            {"index_type": "FLAT", "metric_type": "IP"},
            {
                "index_type": "SPARSE_INVERTED_INDEX",
                "metric_type": "IP",
                "params": {"drop_ratio_build": 0},  # Milvus Lite supports no other
            },
        ],
        # langchain-milvus's default sparse search params carry drop_ratio_build=0.2, which
        # Milvus Lite refuses
        search_params=[{"metric_type": "IP", "params": {}}, {"metric_type": "IP", "params": {}}],
    )
    assert count.texts == len(SAMPLE_TEXTS)
    hits = store.similarity_search(SAMPLE_TEXTS[13], k=3, ranker_type="rrf")
    assert hits[0].page_content == SAMPLE_TEXTS[13]


def test_llama_index_qdrant_hybrid(enc: M3Encoder) -> None:
    require("llama_index.vector_stores.qdrant", "pip install -e '.[llama-index-qdrant]'")
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from llama_index_m3rag import M3Embedding, M3SparseEmbedding
    from qdrant_client import QdrantClient

    count = Counter(enc)
    sparse = M3SparseEmbedding(encoder=enc)
    store = QdrantVectorStore(
        collection_name="m3",
        client=QdrantClient(location=":memory:"),
        enable_hybrid=True,
        sparse_doc_fn=sparse.qdrant_doc_fn,
        sparse_query_fn=sparse.qdrant_query_fn,
        batch_size=8,
    )
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in SAMPLE_TEXTS],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=M3Embedding(encoder=enc),
    )
    assert count.texts == len(SAMPLE_TEXTS)
    retriever = index.as_retriever(
        vector_store_query_mode="hybrid", similarity_top_k=3, sparse_top_k=5
    )
    assert retriever.retrieve(SAMPLE_TEXTS[14])[0].node.get_content() == SAMPLE_TEXTS[14]


def test_llama_index_milvus_sparse_function_contract(enc: M3Encoder) -> None:
    """llama-index-vector-stores-milvus pins pymilvus<3 and cannot be installed beside the
    milvus extra (pymilvus>=3): the bridge is checked against that store's
    BaseSparseEmbeddingFunction interface (encode_queries / encode_documents, async too)."""
    import asyncio

    from llama_index_m3rag import M3SparseEmbedding

    fn = M3SparseEmbedding(encoder=enc)
    docs = fn.encode_documents(SAMPLE_TEXTS[:3])
    queries = fn.encode_queries(SAMPLE_TEXTS[:1])
    assert all(isinstance(k, int) and v > 0 for d in docs for k, v in d.items())
    # batches of other shapes round differently in float32 (1e-7): compare with a tolerance
    for got, ref in (
        (docs[0], enc.encode_documents(SAMPLE_TEXTS[:1]).sparse[0]),  # type: ignore[index]
        (queries[0], enc.encode_queries(SAMPLE_TEXTS[:1]).sparse[0]),
    ):  # type: ignore[index]
        assert got.keys() == ref.keys()
        assert [got[k] for k in ref] == pytest.approx([ref[k] for k in ref], abs=1e-5)
    assert asyncio.run(fn.async_encode_documents(SAMPLE_TEXTS[:3])) == docs

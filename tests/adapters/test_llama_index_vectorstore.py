"""LlamaIndex ``M3VectorStore`` (issue: drop-in everywhere, item 3): VectorStoreIndex over it
with one forward pass per node, the query modes, filters, ref-doc insert/refresh/delete,
node operations and persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require

require("llama_index.core", "pip install -e '.[llama-index]'")
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.llms.mock import MockLLM
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index_m3rag import M3Embedding, M3VectorStore
from test_store_bridges import Counter

from m3_rag import M3Encoder
from m3_rag.testing import SAMPLE_TEXTS

LANG = ["zh" if 8 <= i <= 12 else "other" for i in range(len(SAMPLE_TEXTS))]


@pytest.fixture
def enc(tiny_m3_dir: Path) -> M3Encoder:
    return M3Encoder(tiny_m3_dir, device="cpu", max_length=64, batch_size=8)


def _doc(text: str, doc_id: str, metadata: dict) -> Document:
    """Metadata kept out of the embedded text, so a passage's own text is its best match."""
    return Document(
        text=text, doc_id=doc_id, metadata=metadata, excluded_embed_metadata_keys=list(metadata)
    )


def _index(enc: M3Encoder) -> tuple[VectorStoreIndex, M3VectorStore, list[Document]]:
    store = M3VectorStore.from_encoder(enc)
    docs = [_doc(t, f"doc-{i}", {"lang": LANG[i], "i": i}) for i, t in enumerate(SAMPLE_TEXTS)]
    index = VectorStoreIndex.from_documents(
        docs,
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=M3Embedding(encoder=enc),
    )
    return index, store, docs


def test_index_builds_with_one_forward_pass_per_node(enc: M3Encoder) -> None:
    count = Counter(enc)
    index, store, docs = _index(enc)
    assert count.texts == len(docs) and len(store.client) == len(docs)
    for mode in ("default", "hybrid", "sparse"):
        hits = index.as_retriever(vector_store_query_mode=mode, similarity_top_k=5).retrieve(
            SAMPLE_TEXTS[3]
        )
        assert len(hits) == 5 and hits[0].node.ref_doc_id is not None
        assert hits[0].node.metadata["lang"] in ("zh", "other")
    dense = index.as_retriever(similarity_top_k=1).retrieve(SAMPLE_TEXTS[3])
    assert dense[0].node.get_content() == SAMPLE_TEXTS[3] and dense[0].score == pytest.approx(
        1, abs=1e-5
    )
    assert count.texts == len(docs) + 4  # then one pass per query


def test_modes_map_onto_the_core_search(enc: M3Encoder) -> None:
    _, store, _ = _index(enc)
    core = store.client
    q = "capital city"

    def ids(**kw: object) -> list[str]:
        res = store.query(VectorStoreQuery(query_str=q, similarity_top_k=4, **kw))  # type: ignore[arg-type]
        return list(res.ids or [])

    assert ids() == [h.id for h in core.search(q, k=4, weights=(1, 0, 0))]
    assert ids(mode=VectorStoreQueryMode.SPARSE, sparse_top_k=10) == [
        h.id for h in core.search(q, k=4, weights=(0, 1, 0), candidates=10)
    ]
    assert ids(mode=VectorStoreQueryMode.HYBRID) == [h.id for h in core.search(q, k=4)]
    assert ids(mode=VectorStoreQueryMode.HYBRID, alpha=1.0) == ids()
    zh = MetadataFilters(
        filters=[MetadataFilter(key="lang", value="zh", operator=FilterOperator.EQ)]
    )
    res = store.query(VectorStoreQuery(query_str=q, similarity_top_k=10, filters=zh))
    assert len(res.nodes or []) == 5 and {n.metadata["lang"] for n in res.nodes or []} == {"zh"}
    res = store.query(
        VectorStoreQuery(query_str=q, similarity_top_k=10, doc_ids=["doc-1", "doc-2"])
    )
    assert {n.ref_doc_id for n in res.nodes or []} == {"doc-1", "doc-2"}
    # doc_ids AND filters: a dict filter on other keys, then a callable (a range)
    both = dict(similarity_top_k=23, doc_ids=[f"doc-{i}" for i in range(6, 12)])
    res = store.query(VectorStoreQuery(query_str=q, filters=zh, **both))  # type: ignore[arg-type]
    assert {n.ref_doc_id for n in res.nodes or []} == {f"doc-{i}" for i in range(8, 12)}
    low = MetadataFilters(filters=[MetadataFilter(key="i", value=9, operator=FilterOperator.LT)])
    res = store.query(VectorStoreQuery(query_str=q, filters=low, **both))  # type: ignore[arg-type]
    assert {n.ref_doc_id for n in res.nodes or []} == {"doc-6", "doc-7", "doc-8"}
    with pytest.raises(ValueError, match="not supported"):
        store.query(VectorStoreQuery(query_str=q, mode=VectorStoreQueryMode.MMR))
    with pytest.raises(ValueError, match="query_str"):
        store.query(VectorStoreQuery(query_embedding=[0.1] * 32))


def test_ref_docs_insert_refresh_delete_and_nodes(enc: M3Encoder) -> None:
    index, store, docs = _index(enc)
    n = len(docs)
    index.insert(Document(text="A new passage about Lisbon.", doc_id="lisbon"))
    assert len(store.client) == n + 1
    changed = _doc(
        "Paris is the capital of France, on the Seine.", "doc-3", {"lang": "other", "i": 3}
    )
    refreshed = index.refresh_ref_docs([changed, docs[4]])
    assert refreshed == [True, False]
    top = index.as_retriever(similarity_top_k=1).retrieve(
        "Paris is the capital of France, on the Seine."
    )
    assert top[0].node.ref_doc_id == "doc-3"
    index.delete_ref_doc("lisbon")
    assert len(store.client) == n
    nodes = store.get_nodes(
        filters=MetadataFilters(filters=[MetadataFilter(key="lang", value="zh")])
    )
    assert len(nodes) == 5 and all(x.metadata["lang"] == "zh" for x in nodes)
    store.delete_nodes([nodes[0].node_id, "not-stored"])
    assert len(store.client) == n - 1
    with pytest.raises(TypeError, match="list of ids"):
        store.delete_nodes(nodes[1].node_id)  # type: ignore[arg-type]
    store.clear()
    assert len(store.client) == 0


def test_persist_and_query_engine(enc: M3Encoder, tmp_path: Path) -> None:
    _, store, _ = _index(enc)
    store.persist(str(tmp_path / "idx"))
    again = M3VectorStore.from_persist_path(tmp_path / "idx", enc)
    q = VectorStoreQuery(
        query_str="machine learning", similarity_top_k=5, mode=VectorStoreQueryMode.HYBRID
    )
    assert again.query(q).ids == store.query(q).ids
    reloaded = VectorStoreIndex.from_vector_store(again, embed_model=M3Embedding(encoder=enc))
    engine = reloaded.as_query_engine(
        llm=MockLLM(), vector_store_query_mode="hybrid", similarity_top_k=3
    )
    response = engine.query("What is machine learning?")
    assert len(response.source_nodes) == 3

"""``M3VectorStore``: langchain-tests' standard vector store suite, LangChain's indexing API
with a record manager, and the hybrid options (issue: drop-in everywhere, item 1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import require

require("langchain_core", "pip install -e '.[langchain]'")
from langchain_core.documents import Document
from langchain_core.indexing import InMemoryRecordManager, index
from langchain_core.vectorstores import VectorStore
from langchain_m3rag import M3Embeddings, M3VectorStore
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from m3_rag import M3Encoder
from m3_rag.testing import SAMPLE_TEXTS


class TestM3VectorStoreStandard(VectorStoreIntegrationTests):
    """The suite embeds with ``get_embeddings()``; here that is the tiny M3 encoder."""

    @pytest.fixture(autouse=True)
    def _encoder(self, tiny_encoder: M3Encoder) -> None:
        self._enc = tiny_encoder

    def get_embeddings(self) -> M3Embeddings:  # type: ignore[override]
        return M3Embeddings(encoder=self._enc)

    @pytest.fixture
    def vectorstore(self) -> Iterator[VectorStore]:  # type: ignore[override]
        yield M3VectorStore.from_encoder(self._enc)

    @property
    def has_get_by_ids(self) -> bool:
        return True


def test_scores_filters_and_retriever(tiny_encoder: M3Encoder) -> None:
    metas = [{"i": i, "lang": "zh" if 8 <= i <= 12 else "other"} for i in range(len(SAMPLE_TEXTS))]
    store = M3VectorStore.from_texts(
        SAMPLE_TEXTS, M3Embeddings(encoder=tiny_encoder), metas, ids=[f"d{i}" for i in range(23)]
    )
    docs = store.similarity_search(SAMPLE_TEXTS[3], k=3)
    assert docs[0].id == "d3" and docs[0].metadata == {"i": 3, "lang": "other"}  # no extra keys
    scored = store.similarity_search_with_score(SAMPLE_TEXTS[3], k=3, fusion="rrf")
    doc, score = scored[0]
    assert doc.id == "d3" and doc.metadata["m3_rag_scores"]["score"] == pytest.approx(score)
    assert set(doc.metadata["m3_rag_scores"]) == {"score", "dense", "lexical", "colbert", "fused"}
    zh = store.similarity_search("机器学习", k=10, filter={"lang": "zh"})
    assert {d.metadata["lang"] for d in zh} == {"zh"} and len(zh) == 5
    dense_only = store.similarity_search_with_score(SAMPLE_TEXTS[5], k=2, weights=(1, 0, 0))
    assert dense_only[0][1] == pytest.approx(1.0, abs=1e-5)  # cosine of a text with itself
    r = store.as_retriever(search_kwargs={"k": 2, "filter": {"lang": "zh"}, "fusion": "rrf"})
    assert [d.metadata["lang"] for d in r.invoke("北京")] == ["zh", "zh"]
    with pytest.raises(TypeError, match="unknown search option"):
        store.similarity_search("x", lambda_mult=0.5)
    with pytest.raises(TypeError, match="M3Embeddings"):
        M3VectorStore.from_texts(["x"], object())  # type: ignore[arg-type]
    assert store.delete(["d0", "never-stored"]) and len(store.retriever) == 22


async def test_async_variants(tiny_encoder: M3Encoder) -> None:
    store = M3VectorStore.from_encoder(tiny_encoder)
    ids = await store.aadd_texts(SAMPLE_TEXTS[:4], ids=["a", "b", "c", "d"])
    assert ids == ["a", "b", "c", "d"]
    assert (await store.asimilarity_search(SAMPLE_TEXTS[2], k=1))[0].id == "c"
    await store.adelete(["c"])
    assert [d.id for d in await store.aget_by_ids(["a", "c"])] == ["a"]


def test_langchain_indexing_api_with_a_record_manager(tiny_encoder: M3Encoder) -> None:
    """``index()`` adds, skips unchanged, updates changed and cleans up deleted documents."""
    store = M3VectorStore.from_encoder(tiny_encoder)
    manager = InMemoryRecordManager(namespace="m3")
    manager.create_schema()
    docs = [
        Document(page_content=t, metadata={"source": f"s{i % 3}"})
        for i, t in enumerate(SAMPLE_TEXTS[:6])
    ]
    first = index(
        docs, manager, store, cleanup="full", source_id_key="source", key_encoder="sha256"
    )
    assert first == {"num_added": 6, "num_updated": 0, "num_skipped": 0, "num_deleted": 0}
    assert len(store.retriever) == 6
    again = index(
        docs, manager, store, cleanup="full", source_id_key="source", key_encoder="sha256"
    )
    assert again["num_skipped"] == 6 and again["num_added"] == 0
    changed = [*docs[:4], Document(page_content="a new passage", metadata={"source": "s1"})]
    third = index(
        changed, manager, store, cleanup="full", source_id_key="source", key_encoder="sha256"
    )
    assert third["num_added"] == 1 and third["num_deleted"] == 2
    assert len(store.retriever) == 5
    texts = {d.page_content for d in store.similarity_search("passage", k=10)}
    assert "a new passage" in texts and SAMPLE_TEXTS[5] not in texts

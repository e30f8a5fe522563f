"""LangChain adapters over m3-rag: ``M3Embeddings``, ``M3VectorStore``, ``M3Retriever``,
``M3Reranker``."""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the import-error test
    raise ImportError(
        "langchain_m3rag needs LangChain's core package: "
        'install it with `pip install "m3-rag[langchain]"`'
    ) from e

from langchain_m3rag.compressors import M3Reranker
from langchain_m3rag.embeddings import M3Embeddings
from langchain_m3rag.retrievers import M3Retriever
from langchain_m3rag.vectorstores import M3VectorStore

__all__ = [
    "M3Embeddings",
    "M3MilvusSparseEmbeddings",
    "M3QdrantSparseEmbeddings",
    "M3Reranker",
    "M3Retriever",
    "M3VectorStore",
]


def __getattr__(name: str) -> object:
    """The store bridges import their store's package only when asked for."""
    if name == "M3QdrantSparseEmbeddings":
        from langchain_m3rag.sparse_qdrant import M3QdrantSparseEmbeddings

        return M3QdrantSparseEmbeddings
    if name == "M3MilvusSparseEmbeddings":
        from langchain_m3rag.sparse_milvus import M3MilvusSparseEmbeddings

        return M3MilvusSparseEmbeddings
    raise AttributeError(f"module 'langchain_m3rag' has no attribute {name!r}")

"""LlamaIndex adapters over m3-rag: embeddings (dense, sparse), retriever, reranker."""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the import-error test
    raise ImportError(
        "llama_index_m3rag needs LlamaIndex's core package: "
        'install it with `pip install "m3-rag[llama-index]"`'
    ) from e

from llama_index_m3rag.embeddings import M3Embedding, M3SparseEmbedding
from llama_index_m3rag.postprocessor import M3Rerank
from llama_index_m3rag.retriever import M3Retriever, to_core_filter
from llama_index_m3rag.vector_store import M3VectorStore

__all__ = [
    "M3Embedding",
    "M3Rerank",
    "M3Retriever",
    "M3SparseEmbedding",
    "M3VectorStore",
    "to_core_filter",
]

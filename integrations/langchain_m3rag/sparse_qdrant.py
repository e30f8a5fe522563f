"""BGE-M3 lexical weights for ``langchain_qdrant.QdrantVectorStore`` (hybrid retrieval mode)."""

from __future__ import annotations

try:
    from langchain_qdrant import SparseEmbeddings, SparseVector
except ImportError as e:  # pragma: no cover - exercised by the import-error test
    raise ImportError(
        'M3QdrantSparseEmbeddings needs langchain-qdrant: pip install "m3-rag[langchain-qdrant]"'
    ) from e

from langchain_m3rag.sparse_common import sparse_rows
from m3_rag import Encoder


class M3QdrantSparseEmbeddings(SparseEmbeddings):
    """``SparseEmbeddings`` for ``QdrantVectorStore(..., sparse_embedding=...)``.

    Shares the forward pass with :class:`~langchain_m3rag.M3Embeddings` on the same
    :class:`~m3_rag.M3Encoder`: the store asks for the dense and then the sparse embedding
    of each batch, the model runs once per text.

    Args:
        encoder: A BGE-M3 :class:`~m3_rag.M3Encoder` (with the sparse head).
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        sparse_rows(encoder, [], "document")  # checks the model has the sparse head

    def embed_documents(self, texts: list[str]) -> list[SparseVector]:
        return [
            SparseVector(indices=i, values=v)
            for i, v in sparse_rows(self.encoder, texts, "document")
        ]

    def embed_query(self, text: str) -> SparseVector:
        ((indices, values),) = sparse_rows(self.encoder, [text], "query")
        return SparseVector(indices=indices, values=values)


__all__ = ["M3QdrantSparseEmbeddings"]

"""BGE-M3 lexical weights for ``langchain_milvus.Milvus`` (a dense + sparse collection)."""

from __future__ import annotations

try:
    from langchain_milvus.utils.sparse import BaseSparseEmbedding
except ImportError as e:  # pragma: no cover - exercised by the import-error test
    raise ImportError(
        'M3MilvusSparseEmbeddings needs langchain-milvus: pip install "m3-rag[langchain-milvus]"'
    ) from e

from langchain_m3rag.sparse_common import sparse_rows
from m3_rag import Encoder


class M3MilvusSparseEmbeddings(BaseSparseEmbedding):
    """``BaseSparseEmbedding`` (``{token_id: weight}``) for ``langchain_milvus.Milvus``
    (``embedding_function=[M3Embeddings(encoder=enc), M3MilvusSparseEmbeddings(enc)]``).

    Shares the forward pass with :class:`~langchain_m3rag.M3Embeddings` on the same encoder.
    Milvus refuses an empty sparse vector, so a document without any lexical weight (an empty
    text) is stored as ``{vocab_size: 1.0}``: an id outside the vocabulary, which no query
    holds, so it never adds to a score.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        sparse_rows(encoder, [], "document")

    def embed_query(self, query: str) -> dict[int, float]:
        ((indices, values),) = sparse_rows(self.encoder, [query], "query")
        return dict(zip(indices, values, strict=True))

    def embed_documents(self, texts: list[str]) -> list[dict[int, float]]:
        return [
            dict(zip(i, v, strict=True)) or {self.encoder.vocab_size: 1.0}
            for i, v in sparse_rows(self.encoder, texts, "document")
        ]


__all__ = ["M3MilvusSparseEmbeddings"]

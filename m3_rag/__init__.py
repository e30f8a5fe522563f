"""m3-rag: the full BGE-M3 model (dense, sparse, ColBERT) for retrieval-augmented generation."""

from __future__ import annotations

from m3_rag.encoder import EncodeOutput, M3Encoder
from m3_rag.loading import CheckpointError
from m3_rag.persist import IndexFormatError
from m3_rag.rerank import Reranker, RerankResult
from m3_rag.retriever import HybridRetriever, SearchHit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EncodeOutput",
    "HybridRetriever",
    "IndexFormatError",
    "M3Encoder",
    "RerankResult",
    "Reranker",
    "SearchHit",
    "__version__",
]

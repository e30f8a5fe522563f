"""m3-rag: the full BGE-M3 model (dense, sparse, ColBERT) for retrieval-augmented generation."""

from __future__ import annotations

from m3_rag._inputs import SCORES_KEY
from m3_rag.encoder import EncodeOutput, M3Encoder
from m3_rag.encoding import CrossEncoder, Encoder
from m3_rag.errors import (
    CheckpointError,
    IndexFormatError,
    IndexMismatchError,
    WriteConflictError,
)
from m3_rag.remote import RemoteEncoder, RemoteReranker
from m3_rag.rerank import Reranker, RerankResult
from m3_rag.retriever import HybridRetriever, SearchHit

__version__ = "0.1.0"

__all__ = [
    "SCORES_KEY",
    "CheckpointError",
    "CrossEncoder",
    "EncodeOutput",
    "Encoder",
    "HybridRetriever",
    "IndexFormatError",
    "IndexMismatchError",
    "M3Encoder",
    "RemoteEncoder",
    "RemoteReranker",
    "RerankResult",
    "Reranker",
    "SearchHit",
    "WriteConflictError",
    "__version__",
]

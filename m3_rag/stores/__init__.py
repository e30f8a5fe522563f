"""Stores (dense, lexical, ColBERT) and the engines behind the Backend protocol."""

from __future__ import annotations

from m3_rag.stores.backend import Backend, BackendSpec, Candidates, DocBatch
from m3_rag.stores.base import IdRows, check_ids, top_k
from m3_rag.stores.colbert import ColbertStore
from m3_rag.stores.dense import DenseStore
from m3_rag.stores.lexical import BM25Params, LexicalStore
from m3_rag.stores.local import LocalBackend
from m3_rag.stores.memory import MemoryBackend
from m3_rag.stores.milvus import MilvusBackend
from m3_rag.stores.qdrant import QdrantBackend

__all__ = [
    "BM25Params",
    "Backend",
    "BackendSpec",
    "Candidates",
    "ColbertStore",
    "DenseStore",
    "DocBatch",
    "IdRows",
    "LexicalStore",
    "LocalBackend",
    "MemoryBackend",
    "MilvusBackend",
    "QdrantBackend",
    "check_ids",
    "top_k",
]

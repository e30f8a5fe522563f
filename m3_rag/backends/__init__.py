"""Where documents live: the :class:`Backend` protocol and one package per engine.

``local`` is the embedded engine (in RAM, or a directory of segments); ``milvus`` and
``qdrant`` keep an index in those servers. Engine client packages are imported lazily.
"""

from __future__ import annotations

from m3_rag.backends.local import LocalBackend
from m3_rag.backends.milvus import MilvusBackend
from m3_rag.backends.protocol import Backend, Candidates, DocBatch, IndexSpec
from m3_rag.backends.qdrant import QdrantBackend

__all__ = [
    "Backend",
    "Candidates",
    "DocBatch",
    "IndexSpec",
    "LocalBackend",
    "MilvusBackend",
    "QdrantBackend",
]

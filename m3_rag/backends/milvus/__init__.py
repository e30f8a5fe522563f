"""The Milvus engine (Milvus Lite or a server): schema, codec and filter translation."""

from __future__ import annotations

from m3_rag.backends.milvus.engine import MilvusBackend

__all__ = ["MilvusBackend"]

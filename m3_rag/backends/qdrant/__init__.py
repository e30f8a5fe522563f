"""The Qdrant engine (a server or qdrant-client's local mode): schema and filter translation."""

from __future__ import annotations

from m3_rag.backends.qdrant.engine import QdrantBackend

__all__ = ["QdrantBackend"]

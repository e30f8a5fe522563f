"""Making backends: the default one by name, and the one a saved index needs.

This is the only place that maps names and saved formats to engines, so the retriever
itself works against the :class:`~m3_rag.backends.protocol.Backend` protocol alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3_rag.backends.protocol import Backend
from m3_rag.persist import read_index

__all__ = ["make_backend", "saved_index"]

_REQUIRED = ("open", "add", "delete", "candidates", "colbert_scores", "documents", "fetch")


def make_backend(backend: Any) -> Backend:
    """``"memory"`` -> a new in-memory local engine; a backend object -> itself.

    Raises:
        TypeError: anything else.
    """
    if isinstance(backend, str) and backend == "memory":
        from m3_rag.backends.local.engine import LocalBackend

        return LocalBackend()
    if not isinstance(backend, str) and all(hasattr(backend, m) for m in _REQUIRED):
        return backend
    raise TypeError(
        "backend must be 'memory' or a backend object: LocalBackend(path), "
        f"MilvusBackend(uri=..., collection=...), QdrantBackend(...); got {backend!r}"
    )


def saved_index(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], Callable[[bool], Backend]]:
    """Read what a saved index says of itself -> ``(manifest, make(allow_model_mismatch))``.

    A snapshot (``HybridRetriever.save``, format 2) is read into RAM; a segmented directory
    (``LocalBackend(path)``, format 3) is opened in place, memory-mapped.

    Raises:
        FileNotFoundError: no index at ``path``.
        IndexFormatError: an unreadable or tampered index.
    """
    from m3_rag.backends.local.disk import VERSION, current_pointer, read_manifest
    from m3_rag.backends.local.engine import LocalBackend
    from m3_rag.backends.local.snapshot import from_snapshot

    root = Path(path)
    cur = current_pointer(root) if root.is_dir() else None
    if cur is not None and cur.get("version") == VERSION:
        manifest = read_manifest(root)
        return manifest, lambda mismatch: LocalBackend(root, allow_model_mismatch=mismatch)
    manifest, arrays, docs = read_index(root)
    return manifest, lambda _mismatch: from_snapshot(manifest, arrays, docs)

"""The engine a saved index needs: the only place that maps saved formats to engines, so
the retriever itself works against the :class:`~m3_rag.backends.protocol.Backend` protocol
alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from m3_rag.backends.protocol import Backend
from m3_rag.errors import IndexFormatError
from m3_rag.spec import IndexSpec

__all__ = ["SavedIndex", "open_saved"]


class SavedIndex(NamedTuple):
    """What a saved index says of itself, and the engine that opens it.

    Attributes:
        spec: The index specification it was built with.
        settings: The retriever's settings recorded with it.
        backend: The engine holding it, not opened yet: call
            ``backend.open(spec_you_need, settings, allow_model_mismatch=...)``.
    """

    spec: IndexSpec
    settings: dict[str, Any]
    backend: Backend


def open_saved(path: str | os.PathLike[str]) -> SavedIndex:
    """The index saved at ``path`` (by ``LocalBackend.save`` or an earlier m3-rag).

    Format 3 (a local engine directory) is opened in place, its segments read from disk;
    a format-2 snapshot is verified and converted into RAM (the code path of
    :func:`~m3_rag.backends.local.migrate.migrate`, which converts it on disk); format 1
    (no checksums) is refused.

    Raises:
        FileNotFoundError: no index at ``path``.
        IndexFormatError: an unreadable, tampered or unsupported index (the message says
            how to recover).
    """
    from m3_rag.backends.local.disk import VERSION, current_pointer
    from m3_rag.backends.local.engine import LocalBackend

    root = Path(path)
    if not root.is_dir() or root.is_symlink():
        raise FileNotFoundError(f"no m3-rag index at {root}")
    cur = current_pointer(root)
    if cur is None:
        raise FileNotFoundError(f"no m3-rag index at {root} (missing CURRENT)")
    if cur.get("version") == VERSION:
        backend = LocalBackend(root)
        spec, settings = backend.read_stored()  # served until a read takes a later one
        return SavedIndex(spec, settings, backend)
    if "snapshot" not in cur:
        raise IndexFormatError(
            f"{root}/CURRENT: index format version {cur.get('version')!r} is not one this "
            "m3-rag reads; rebuild the index"
        )
    from m3_rag.backends.local.migrate import load_snapshot

    try:
        return SavedIndex(*load_snapshot(root))
    except IndexFormatError:
        now = current_pointer(root)
        if now is not None and now.get("version") == VERSION:  # replaced meanwhile by a save
            return open_saved(root)
        raise

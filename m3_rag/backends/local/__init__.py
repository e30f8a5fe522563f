"""The embedded engine: immutable segments in RAM or in a directory (index format 3)."""

from __future__ import annotations

from m3_rag.backends.local.engine import ANN_THRESHOLD, LocalBackend, MergeWarning

__all__ = ["ANN_THRESHOLD", "LocalBackend", "MergeWarning"]

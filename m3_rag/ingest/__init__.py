"""Streaming, resumable ingestion into a disk index, and the crash-safe replacement of one.

What ``m3-rag index`` runs, as a library::

    plan = plan_index("docs/", "idx")          # checks the source and the target, writes nothing
    report = run_index(plan, M3Encoder(...))   # encodes and commits, chunk by chunk

(:func:`index_source` does both.) :mod:`m3_rag.ingest.pipeline` reads, checks, encodes and
commits; :mod:`m3_rag.ingest.replace` swaps a complete index in place of another
(``force=True``), crash-safe.
"""

from __future__ import annotations

from m3_rag.ingest.pipeline import (
    IngestPlan,
    IngestReport,
    check_source,
    index_bytes,
    index_source,
    plan_index,
    run_index,
    source_key,
)
from m3_rag.ingest.replace import recover_replacement, replace_index, staging_path

__all__ = [
    "IngestPlan",
    "IngestReport",
    "check_source",
    "index_bytes",
    "index_source",
    "plan_index",
    "recover_replacement",
    "replace_index",
    "run_index",
    "source_key",
    "staging_path",
]

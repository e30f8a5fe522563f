"""The record Milvus and Qdrant collections of server format 1 hold (the previous release),
for the tests that check such collections still open."""

from __future__ import annotations

from typing import Any

from m3_rag.spec import IndexSpec


def format1_record(spec: IndexSpec) -> dict[str, Any]:
    """``vocab_size`` always, no ``dense_dtype``, ``bm25`` and ``analyzer`` only for BM25."""
    return {
        "format": 1,
        "model": spec.model,
        "dense_dim": spec.dense_dim,
        "colbert_dim": spec.colbert_dim,
        "colbert_dtype": spec.colbert_dtype if spec.colbert_dim else None,
        "lexical": spec.lexical,
        "vocab_size": spec.vocab_size,
        "bm25": spec.bm25_params.as_dict() if spec.lexical == "bm25" else None,
        "analyzer": spec.analyzer if spec.lexical == "bm25" else None,
    }

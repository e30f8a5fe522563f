"""What a server-side collection records of its index, and the check made on reopening it
(shared by the Milvus and Qdrant backends)."""

from __future__ import annotations

from typing import Any

from m3_rag.stores.backend import BackendSpec
from m3_rag.stores.lexical import BM25Params

__all__ = ["check_index_config", "index_config"]

_CHECKED = (
    "dense_dim",
    "colbert_dim",
    "colbert_dtype",
    "lexical",
    "vocab_size",
    "bm25",
    "analyzer",
)


def index_config(spec: BackendSpec, fmt: int) -> dict[str, Any]:
    """The JSON record of ``spec`` an engine stores beside its documents."""
    return {
        "format": fmt,
        "model": spec.model,
        "dense_dim": spec.dense_dim,
        "colbert_dim": spec.colbert_dim,
        "colbert_dtype": spec.colbert_dtype if spec.colbert_dim else None,
        "lexical": spec.lexical,
        "vocab_size": spec.vocab_size,
        "bm25": (spec.bm25 or BM25Params()).as_dict() if spec.lexical == "bm25" else None,
        "analyzer": spec.analyzer if spec.lexical == "bm25" else None,
    }


def check_index_config(
    stored: dict[str, Any],
    wanted: dict[str, Any],
    name: str,
    allow_model_mismatch: bool,
    engine: str,
) -> None:
    """Refuse to reopen collection ``name`` for an index it was not built for.

    Raises:
        ValueError: another format, model (unless ``allow_model_mismatch``), dimension,
            ColBERT dtype, lexical kind, vocabulary, BM25 parameters or analyzer.
    """
    if stored.get("format") != wanted["format"]:
        raise ValueError(
            f"collection {name!r} has format {stored.get('format')}, need {wanted['format']}"
        )
    if stored["model"] != wanted["model"] and not allow_model_mismatch:
        raise ValueError(
            f"collection {name!r} was built with model {stored['model']!r}, the encoder is "
            f"{wanted['model']!r}; pass {engine}(..., allow_model_mismatch=True) if they "
            "are the same model"
        )
    stored = {"analyzer": "model" if stored.get("lexical") == "bm25" else None} | stored
    for key in _CHECKED:
        if stored.get(key) != wanted[key]:
            raise ValueError(
                f"collection {name!r} has {key}={stored.get(key)!r}, this retriever needs "
                f"{wanted[key]!r}; use another collection or the settings it was built with"
            )

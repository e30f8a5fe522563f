"""What the server engines (Milvus, Qdrant) share: the configuration a collection records
and its check on reopening, the int64 check of metadata, and the methods that only read the
retriever's spec or a search's fetched documents."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.bm25 import BM25Params

__all__ = ["ServerEngine", "check_index_config", "check_int64", "index_config"]

_INT64 = (-(2**63), 2**63 - 1)

_CHECKED = (
    "dense_dim",
    "colbert_dim",
    "colbert_dtype",
    "lexical",
    "vocab_size",
    "bm25",
    "analyzer",
)


def index_config(spec: IndexSpec, fmt: int) -> dict[str, Any]:
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


def check_int64(value: Any, name: str, engine: str) -> None:
    """Refuse JSON ``value`` holding an integer outside int64 (what both engines store).

    Raises:
        ValueError: naming ``name`` and ``engine``.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise ValueError(
                f"{name} holds the integer {v}, outside {engine}'s 64-bit range; store it as a str"
            )


class ServerEngine:
    """The parts of a server engine's :class:`~m3_rag.backends.protocol.Backend` that only
    read ``spec`` or the documents a search fetched into ``Candidates.payload`` as
    ``(id, text, metadata)``."""

    spec: IndexSpec | None

    def _spec(self) -> IndexSpec:
        if self.spec is None:
            raise ValueError(f"{self!r} is not open: pass it to HybridRetriever(backend=...)")
        return self.spec

    def known_empty(self) -> bool:
        """Never claims emptiness (counting would cost a round trip)."""
        return False

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (cands.payload[i][0], cands.payload[i][1], copy.deepcopy(cands.payload[i][2]))
            for i in order.tolist()
        ]

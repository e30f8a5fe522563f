"""Reopening a stored index: the encoder, analyzer and retriever settings it records,
checked before anything is opened (:meth:`~m3_rag.HybridRetriever.load`).

The index specification itself (dimensions, dtypes, lexical kind, BM25 parameters) is
checked by the engine against :class:`~m3_rag.spec.IndexSpec`; this module checks what only
the retriever knows: that the encoder fits the stored specification, which analyzer rebuilds
the stored term ids, and that the recorded settings are valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3_rag._inputs import check_count, check_fusion, check_weights
from m3_rag.analysis import Analyzer, analyzer_from_config
from m3_rag.encoding import Encoder
from m3_rag.errors import IndexFormatError, IndexMismatchError
from m3_rag.spec import IndexSpec

__all__ = ["check_encoder", "recorded_analyzer", "recorded_settings"]


def check_encoder(
    spec: IndexSpec, encoder: Encoder, where: str, allow_model_mismatch: bool
) -> None:
    """Refuse an encoder that does not fit a stored index.

    Raises:
        IndexMismatchError: another model name (unless allowed), dimensions or vocabulary.
    """
    if spec.model != encoder.model_name and not allow_model_mismatch:
        raise IndexMismatchError(
            f"{where} was built with model {spec.model!r}, the encoder is "
            f"{encoder.model_name!r}; pass allow_model_mismatch=True if they are the same model"
        )
    if (spec.dense_dim, spec.colbert_dim) != (encoder.dense_dim, encoder.colbert_dim):
        raise IndexMismatchError(
            f"{where} has dense/ColBERT dims {spec.dense_dim}/{spec.colbert_dim}, "
            f"the encoder {encoder.dense_dim}/{encoder.colbert_dim}"
        )
    model_terms = spec.lexical == "m3" or (spec.lexical == "bm25" and spec.analyzer == "model")
    if model_terms and spec.vocab_size != encoder.vocab_size:
        raise IndexMismatchError(
            f"{where} has vocabulary size {spec.vocab_size}, the encoder {encoder.vocab_size}"
        )


def recorded_analyzer(spec: IndexSpec, analyzer: Analyzer | None, where: str) -> str | Analyzer:
    """The ``analyzer`` argument that reopens an index as it was built.

    Raises:
        IndexMismatchError: a custom analyzer is needed and not given, or one is given for an
            index that records its own.
        IndexFormatError: the recorded analyzer is unreadable.
    """
    recorded = spec.analyzer
    if recorded == "callable":
        if analyzer is None:
            raise IndexMismatchError(
                f"{where} was built with a custom analyzer: pass it again, "
                "HybridRetriever.load(path, encoder, analyzer=my_analyzer)"
            )
        return analyzer
    if analyzer is not None:
        raise IndexMismatchError(f"{where} records its analyzer ({recorded!r}); do not pass one")
    if recorded in ("model", None):  # None: no BM25 leg, the argument is unused
        return "model"
    try:
        return analyzer_from_config(recorded)
    except (ValueError, TypeError, ImportError) as e:
        raise IndexFormatError(f"{where}: bad analyzer in the index specification: {e}") from None


def recorded_settings(settings: Mapping[str, Any], spec: IndexSpec, where: str) -> dict[str, Any]:
    """The retriever settings an index records, checked (as the constructor would) before
    anything is opened.

    Raises:
        IndexFormatError: a missing or bad setting, or one contradicting ``spec``.
    """
    try:
        out = {
            "weights": check_weights(settings["weights"]),
            "fusion": check_fusion(settings["fusion"]),
            "candidates": check_count(settings["candidates"], "candidates", minimum=1),
            "rerank_top_n": check_count(settings["rerank_top_n"], "rerank_top_n", minimum=1),
            "lexical": spec.lexical or "none",
            "source": settings.get("source"),
        }
    except KeyError as e:
        raise IndexFormatError(f"{where}: the index records no retriever setting {e}") from None
    except (TypeError, ValueError) as e:
        raise IndexFormatError(f"{where}: the index has a bad retriever setting: {e}") from None
    if settings.get("lexical") != out["lexical"]:
        raise IndexFormatError(
            f"{where}: the index says lexical {spec.lexical!r} for the stores and "
            f"{settings.get('lexical')!r} for the retriever"
        )
    if out["source"] is not None and not isinstance(out["source"], Mapping):
        raise IndexFormatError(f"{where}: the index has a bad retriever setting: source")
    return out

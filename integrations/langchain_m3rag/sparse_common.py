"""Lexical weights as ``(indices, values)`` rows, from the shared encode cache."""

from __future__ import annotations

from collections.abc import Sequence

from m3_rag import Encoder
from m3_rag.cache import Role, encode_cached


def sparse_rows(
    encoder: Encoder, texts: Sequence[str], role: Role
) -> list[tuple[list[int], list[float]]]:
    """Sorted token ids and their BGE-M3 lexical weights, per text.

    Raises:
        TypeError: ``encoder`` is not an M3Encoder. ValueError: a dense-only model.
    """
    if not isinstance(encoder, Encoder):
        raise TypeError(
            "encoder must be an m3_rag.Encoder (M3Encoder or RemoteEncoder), "
            f"got {type(encoder).__name__}"
        )
    if not encoder.has_sparse:
        raise ValueError(
            f"{encoder.model_name!r} is dense-only: sparse embeddings need a BGE-M3 checkpoint"
        )
    return [enc.sparse_pairs() for enc in encode_cached(encoder, list(texts), role)]

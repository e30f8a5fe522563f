"""``compute_score`` of an M3-style encoder (``BGEM3FlagModel.compute_score``), shared by the
encoder in this process and the remote one: encode the pairs' queries and passages, then
score every mode (:func:`m3_rag.scoring.pair_mode_scores`)."""

from __future__ import annotations

from typing import Any, Protocol

from m3_rag import scoring
from m3_rag._inputs import check_pairs, check_weights

__all__ = ["PairScoring"]


class _Encodes(Protocol):
    """What :meth:`PairScoring.compute_score` uses of ``self`` (encodings are
    :class:`~m3_rag.EncodeOutput`; not imported here: m3_rag.encoder imports this module)."""

    query_max_length: int
    max_length: int

    def encode_queries(self, texts: list[str], **kwargs: Any) -> Any: ...

    def encode_documents(self, texts: list[str], **kwargs: Any) -> Any: ...


class PairScoring:
    """Adds :meth:`compute_score` to an encoder with ``encode_queries``,
    ``encode_documents``, ``query_max_length`` and ``max_length``."""

    def compute_score(
        self: _Encodes,
        pairs: list[tuple[str, str]] | tuple[str, str],
        weights: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0),
        *,
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
    ) -> dict[str, list[float]]:
        """Score (query, passage) pairs with every mode, as ``BGEM3FlagModel.compute_score``.

        Args:
            pairs: ``(query, passage)`` pairs (a single pair is accepted).
            weights: ``(dense, sparse, colbert)`` weights of the fused scores.
            batch_size, max_query_length, max_passage_length: encoding options.

        Returns:
            ``{'dense', 'sparse', 'colbert', 'sparse+dense', 'colbert+sparse+dense'}`` -> one
            score per pair; a dense-only model returns ``{'dense'}`` only.

        Raises:
            ValueError: an empty or malformed pair, or weights whose dense + sparse is 0.
        """
        items = check_pairs(pairs)
        w = check_weights(weights)
        if w[0] + w[1] <= 0:
            raise ValueError(
                f"weights {w}: dense + sparse must be > 0 ('sparse+dense' divides by it)"
            )
        q = self.encode_queries(
            [p[0] for p in items],
            batch_size=batch_size,
            max_length=max_query_length or self.query_max_length,
        )
        d = self.encode_documents(
            [p[1] for p in items],
            batch_size=batch_size,
            max_length=max_passage_length or self.max_length,
        )
        assert q.dense is not None and d.dense is not None
        sparse = colbert = None
        if (
            q.sparse is not None
            and d.sparse is not None
            and q.colbert is not None
            and d.colbert is not None
        ):
            sparse, colbert = (q.sparse, d.sparse), (q.colbert, d.colbert)
        return scoring.pair_mode_scores(w, (q.dense, d.dense), sparse, colbert)

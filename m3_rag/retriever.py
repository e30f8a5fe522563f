"""HybridRetriever: dense + lexical candidates, fusion, ColBERT rescoring, optional rerank."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3_rag import scoring
from m3_rag._inputs import check_count, check_fusion, check_query, check_weights
from m3_rag.analysis import Analyzer
from m3_rag.backends.protocol import Backend, Savable
from m3_rag.backends.registry import open_saved
from m3_rag.backends.validate import check_ids
from m3_rag.bm25 import BM25Params
from m3_rag.encoder import EncodeOutput
from m3_rag.encoding import CrossEncoder, Encoder
from m3_rag.filters import Filter, check_filter
from m3_rag.indexing import (
    IndexingMixin,
    index_spec,
    lexical_kind,
    make_analyzer,
    make_engine,
    open_engine,
)
from m3_rag.reopen import check_encoder, recorded_analyzer, recorded_settings

__all__ = ["HybridRetriever", "SearchHit"]


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        id: Document id.
        text: Document text.
        metadata: A copy of the document's metadata.
        score: The final score (the reranker's when it ran, else the fused score).
        scores: Per-mode scores: ``dense``, ``lexical`` (M3 weights or BM25), ``colbert``,
            ``fused``, and ``rerank`` when the reranker ran.
    """

    id: str
    text: str
    metadata: dict[str, Any]
    score: float
    scores: dict[str, float] = field(default_factory=dict)


class HybridRetriever(IndexingMixin):
    """Hybrid retrieval over one M3 encoder pass per document.

    Stage 1: the union of the dense top-``candidates`` and the lexical top-``candidates``.
    Stage 2: ColBERT MaxSim of the candidates (when the model has ColBERT), fused with the
    other scores. Stage 3 (optional): the reranker re-scores the top ``rerank_top_n``.

    Args:
        encoder: The shared :class:`M3Encoder`.
        reranker: Optional cross-encoder :class:`Reranker`.
        weights: ``(dense, lexical, colbert)`` fusion weights.
        fusion: ``"weighted"``: ``(w_d*d + w_s*s + w_c*c) / sum(w)`` on the raw scores, as
            ``BGEM3FlagModel.compute_score``; with a BM25 leg (unbounded scores) every leg is
            first min-max normalised over the candidates (a convex combination, Bruch et al.
            2023). ``"rrf"``: weighted reciprocal rank fusion, ``sum_m w_m / (60 + rank_m)``.
        candidates: Candidates taken from each stage-1 leg.
        lexical: ``"auto"`` (M3 sparse when the model has it, else BM25), ``"m3"``, ``"bm25"``
            or ``"none"``.
        rerank_top_n: How many fused results the reranker re-scores (at least ``k``).
        dense_dtype: ``"float32"`` or ``"float16"`` storage for dense vectors.
        colbert_dtype: ColBERT storage code (:mod:`m3_rag.codecs`): ``"float16"`` (2 bytes
            per dimension), ``"float32"``, ``"int8"`` (1 byte per dimension + a float32
            scale per vector), ``"binary"`` (1 bit per dimension, scored against the float
            query) or ``"rotated-binary"`` (1 bit per dimension of the vector after a fixed
            orthogonal rotation). Recorded in the index; ``None`` (default): the code an
            existing index records, :data:`m3_rag.codecs.DEFAULT_CODEC` for a new one. See
            ``docs/colbert.md``.
        pool_factor: Token pooling of documents' ColBERT vectors at index time (1: none,
            ``f``: at most ``t // f`` vectors per document by hierarchical clustering;
            queries are never pooled). Recorded in the index; ``None`` (default): what an
            existing index records; for a new one :data:`m3_rag.codecs.DEFAULT_POOL_FACTOR`
            when ``colbert_dtype`` is not given either, else 1.
        bm25: BM25 parameters (rank-bm25 ``BM25Okapi`` defaults).
        analyzer: How the BM25 leg turns text into terms: ``"unicode"`` (default: a
            multilingual :class:`~m3_rag.analysis.UnicodeAnalyzer` with an English Snowball
            stemmer, which measured best; terms hashed to ids),
            ``"model"`` (the model's own tokenizer, one term per token id), a
            :class:`~m3_rag.analysis.UnicodeAnalyzer` (e.g. with a stemmer), or any callable
            ``str -> list[str]`` (then pass the same callable again to :meth:`load`).
            Recorded in the index. Unused by the M3 lexical leg.
        source: What the index is built from (JSON values), recorded with the index from
            its first commit; ``m3-rag index`` keeps the source path and chunking here to
            know a rerun of the same command (and resume it).
        backend: Where the documents live. ``None`` (default): the local engine in RAM
            (``LocalBackend()``; :meth:`save`/:meth:`load` to disk);
            :class:`~m3_rag.backends.LocalBackend` with a path (a disk-backed index where
            every write commits), :class:`~m3_rag.backends.MilvusBackend`,
            :class:`~m3_rag.backends.QdrantBackend`, or any engine implementing
            :class:`~m3_rag.backends.protocol.Backend`. An engine that persists by itself is
            reopened by passing it again.
        allow_model_mismatch: Open a stored index built under another model name (the same
            model from another path); every shape must still match.
    """

    def __init__(
        self,
        encoder: Encoder,
        reranker: CrossEncoder | None = None,
        weights: Sequence[float] = (0.4, 0.2, 0.4),
        fusion: str = "weighted",
        candidates: int = 100,
        lexical: str = "auto",
        *,
        rerank_top_n: int = 20,
        dense_dtype: str = "float32",
        colbert_dtype: str | None = None,
        pool_factor: int | None = None,
        bm25: BM25Params | None = None,
        backend: Backend | None = None,
        analyzer: str | Analyzer = "unicode",
        source: Mapping[str, Any] | None = None,
        allow_model_mismatch: bool = False,
    ) -> None:
        if not isinstance(encoder, Encoder):
            raise TypeError(
                "encoder must be an m3_rag.Encoder (M3Encoder or RemoteEncoder), "
                f"got {type(encoder).__name__}"
            )
        if reranker is not None and not isinstance(reranker, CrossEncoder):
            raise TypeError(
                "reranker must be an m3_rag.CrossEncoder (Reranker or RemoteReranker) or None, "
                f"got {type(reranker).__name__}"
            )
        self.encoder = encoder
        self.reranker = reranker
        self.weights = check_weights(weights)
        self.fusion = check_fusion(fusion)
        self.candidates = check_count(candidates, "candidates", minimum=1)
        self.rerank_top_n = check_count(rerank_top_n, "rerank_top_n", minimum=1)
        self.lexical = lexical_kind(encoder, lexical)
        self.analyzer = make_analyzer(analyzer)  # None: the model's tokenizer
        spec = index_spec(
            encoder, self.lexical, self.analyzer, dense_dtype, colbert_dtype, bm25, pool_factor
        )
        if source is not None and not isinstance(source, Mapping):
            raise TypeError(f"source must be a mapping or None, got {type(source).__name__}")
        self.source = None if source is None else dict(source)
        unset = [
            k
            for k, v in (("colbert_dtype", colbert_dtype), ("colbert_pool_factor", pool_factor))
            if v is None
        ]
        self.backend, spec = open_engine(
            make_engine(backend), spec, self._settings(), bool(allow_model_mismatch), unset
        )
        self.colbert_dtype = spec.colbert_dtype  # what the index stores (given or recorded)
        self.pool_factor = spec.colbert_pool_factor
        self._lock = threading.RLock()  # writes only: searches never wait for it

    def __len__(self) -> int:
        return len(self.backend)

    def __repr__(self) -> str:
        return (
            f"HybridRetriever({len(self)} docs, lexical={self.lexical}, "
            f"colbert={self.encoder.has_colbert}, fusion={self.fusion}, weights={self.weights})"
        )

    def _settings(self) -> dict[str, Any]:
        """The retriever's settings, recorded with a saved index."""
        return {
            "weights": list(self.weights),
            "fusion": self.fusion,
            "candidates": self.candidates,
            "rerank_top_n": self.rerank_top_n,
            "lexical": self.lexical or "none",
            "analyzer": self._analyzer_config(),
            **({"source": dict(self.source)} if self.source is not None else {}),
        }

    # ---------------------------------------------------------------- documents
    def delete(self, ids: Sequence[str], *, missing_ok: bool = False) -> int:
        """Delete documents by id.

        Args:
            ids: Document ids (a list; a bare ``str`` is refused).
            missing_ok: Ignore ids that are not stored (LangChain's ``delete`` semantics);
                by default an unknown id raises ``KeyError`` and nothing is deleted.

        Returns:
            The number of documents deleted.
        """
        ids = check_ids(ids)
        with self._lock:
            if missing_ok:
                ids = [d[0] for d in self.backend.fetch(ids)]
            if ids:
                self.backend.delete(ids)
        return len(ids)

    def select(self, filter: Filter = None) -> list[str]:
        """Ids of the stored documents whose metadata passes ``filter`` (every id for
        ``None``), e.g. to delete all the chunks of one source document."""
        flt = check_filter(filter)
        return self.backend.select(flt)

    def get(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        """``(id, text, metadata copy)`` of the stored documents among ``ids``, in the order
        of ``ids``; unknown ids are left out."""
        return self.backend.fetch(check_ids(ids))

    # ---------------------------------------------------------------- search
    def search(
        self,
        query: str,
        k: int = 10,
        filter: Filter = None,
        *,
        weights: Sequence[float] | None = None,
        fusion: str | None = None,
        candidates: int | None = None,
        rerank: bool | None = None,
    ) -> list[SearchHit]:
        """Top-``k`` documents for ``query``, best first.

        Args:
            query: The query text.
            k: Results wanted (all matching documents when fewer).
            filter: Metadata equality matches ``{"lang": "en", "year": [2023, 2024]}`` (a list
                means any-of) or a callable ``metadata -> bool``; applied before top-k.
            weights, fusion, candidates: Per-call overrides of the constructor's settings.
            rerank: Use the reranker (default: when one is set).
        """
        query = check_query(query)
        opts = self._options(k, filter, weights, fusion, candidates, rerank, query)
        if opts.k == 0 or self.backend.known_empty():
            return []
        q = self.encoder.encode_queries(
            [query],
            return_sparse=self.lexical == "m3",
            return_colbert=self.encoder.has_colbert and opts.weights[2] > 0,
        )
        return self._search(q, opts)

    def search_encoded(
        self,
        q: EncodeOutput,
        k: int = 10,
        filter: Filter = None,
        *,
        weights: Sequence[float] | None = None,
        fusion: str | None = None,
        candidates: int | None = None,
        rerank: bool | None = None,
        query_text: str | None = None,
    ) -> list[SearchHit]:
        """:meth:`search` with an already encoded query (``encode_queries`` of one text).

        ``query_text`` is needed only by the reranker and by BM25 (its terms come from text).
        """
        if q.dense is None or len(q) != 1:
            raise ValueError(
                "q must be the encode_queries() output of exactly one query, with dense"
            )
        opts = self._options(k, filter, weights, fusion, candidates, rerank, query_text)
        if opts.k == 0 or self.backend.known_empty():
            return []
        return self._search(q, opts)

    def _options(
        self,
        k: Any,
        flt: Any,
        weights: Sequence[float] | None,
        fusion: str | None,
        candidates: int | None,
        rerank: bool | None,
        query_text: str | None,
    ) -> _SearchOptions:
        use_rerank = self.reranker is not None if rerank is None else bool(rerank)
        if use_rerank and self.reranker is None:
            raise ValueError(
                "rerank=True needs a reranker: HybridRetriever(..., reranker=Reranker(...))"
            )
        if use_rerank and query_text is None:
            raise ValueError("reranking needs query_text")
        return _SearchOptions(
            k=check_count(k, "k", minimum=0),
            filter=check_filter(flt),
            weights=self.weights if weights is None else check_weights(weights),
            fusion=self.fusion if fusion is None else check_fusion(fusion),
            candidates=self.candidates
            if candidates is None
            else check_count(candidates, "candidates", 1),
            rerank=use_rerank,
            query_text=query_text,
        )

    def _search(self, q: EncodeOutput, opts: _SearchOptions) -> list[SearchHit]:
        assert q.dense is not None
        k, w, how, flt = opts.k, opts.weights, opts.fusion, opts.filter
        n_cand, use_rerank, query_text = opts.candidates, opts.rerank, opts.query_text
        use_colbert = self.encoder.has_colbert and w[2] > 0 and q.colbert is not None
        query = query_text or ""
        lex_query = None
        if self.lexical == "m3" and q.sparse is not None:
            lex_query = q.sparse[0]
        elif self.lexical == "bm25" and query_text is not None:
            counts = self._term_counts([query_text])
            lex_query = dict(zip(counts.indices.tolist(), counts.data.tolist(), strict=True))
        # no lock: the backend's candidates carry the consistent view the later calls read
        colbert_q = q.colbert[0] if use_colbert and q.colbert is not None else None
        cands = self.backend.candidates(
            q.dense[0], lex_query, max(n_cand, k), flt, colbert_query=colbert_q
        )
        if not cands.ids:
            return []
        per_mode: dict[str, np.ndarray] = {"dense": cands.dense}
        if cands.lexical is not None and w[1] > 0:
            per_mode["lexical"] = cands.lexical
        if colbert_q is not None:
            per_mode["colbert"] = (
                cands.colbert
                if cands.colbert is not None
                else self.backend.colbert_scores(colbert_q, cands)
            )
        fused = self._fuse(per_mode, w, how)
        n_keep = max(k, self.rerank_top_n) if use_rerank else k
        # best first; equal scores by id, so every backend ranks ties alike
        ids = np.asarray(cands.ids)
        order = np.lexsort((ids, -fused.astype(np.float64)))[:n_keep]
        docs = self.backend.documents(cands, order)
        scores = [
            {m: float(s[i]) for m, s in per_mode.items()} | {"fused": float(fused[i])}
            for i in order
        ]
        final = [float(fused[i]) for i in order]
        if use_rerank and self.reranker is not None:
            rr = self.reranker.compute_score([(query, text) for _, text, _ in docs])
            for s, r in zip(scores, rr, strict=True):
                s["rerank"] = r
            best = np.argsort(-np.asarray(rr), kind="stable")[:k]
            docs, scores, final = (
                [docs[i] for i in best],
                [scores[i] for i in best],
                [rr[i] for i in best],
            )
        return [
            SearchHit(id=i, text=t, metadata=m, score=f, scores=s)
            for (i, t, m), s, f in zip(docs[:k], scores[:k], final[:k], strict=True)
        ]

    def _fuse(
        self, per_mode: dict[str, np.ndarray], w: tuple[float, float, float], how: str
    ) -> np.ndarray:
        weight = {"dense": w[0], "lexical": w[1], "colbert": w[2]}
        if how == "rrf":
            return scoring.rrf_fusion(per_mode, weight)
        modes = per_mode
        if self.lexical == "bm25" and "lexical" in modes:  # BM25 is unbounded: min-max
            # every leg over the candidates
            modes = {m: _minmax(s) for m, s in per_mode.items()}
        return scoring.weighted_fusion(modes, weight)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to a directory (index format 3: checksummed segments, committed
        atomically, no pickle), which :meth:`load` opens. A disk-backed index saved to its
        own directory is left as it is (every write is committed already).

        Raises:
            ValueError: the backend persists by itself (e.g. Milvus, Qdrant).
        """
        if not isinstance(self.backend, Savable):
            raise ValueError(
                f"{self.backend!r} persists by itself; reopen it with "
                "HybridRetriever(encoder, backend=<the same backend>)"
            )
        self.backend.save(path, self._settings())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        encoder: Encoder,
        reranker: CrossEncoder | None = None,
        *,
        allow_model_mismatch: bool = False,
        analyzer: Analyzer | None = None,
    ) -> HybridRetriever:
        """Open an index written by :meth:`save` (or by ``LocalBackend(path)``) with the
        settings it records; a format-2 index (m3-rag 0.1) is read into RAM.

        Args:
            path: The index directory.
            encoder: The encoder of the model the index was built with.
            reranker: Optional :class:`Reranker`.
            allow_model_mismatch: Accept an encoder under another model name (e.g. the same
                model from another path); its dimensions must still fit.
            analyzer: The callable the index was built with, when it was built with a custom
                BM25 analyzer (the index records every other analyzer itself).

        Raises:
            FileNotFoundError: no index at ``path``.
            IndexFormatError: an unreadable index, or one recording bad settings.
            IndexMismatchError: the index was built with another model (pass
                ``allow_model_mismatch=True`` to accept a same-shaped one), its dimensions or
                vocabulary do not fit ``encoder``, or ``analyzer`` does not fit it.
        """
        saved = open_saved(path)
        where = f"index {path}"
        check_encoder(saved.spec, encoder, where, allow_model_mismatch)
        return cls(
            encoder,
            reranker,
            **recorded_settings(saved.settings, saved.spec, where),
            dense_dtype=saved.spec.dense_dtype,
            colbert_dtype=saved.spec.colbert_dtype,
            pool_factor=saved.spec.colbert_pool_factor,
            bm25=saved.spec.bm25,
            analyzer=recorded_analyzer(saved.spec, analyzer, where),
            backend=saved.backend,
            allow_model_mismatch=allow_model_mismatch,
        )


@dataclass(frozen=True)
class _SearchOptions:
    k: int
    filter: Filter
    weights: tuple[float, float, float]
    fusion: str
    candidates: int
    rerank: bool
    query_text: str | None


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

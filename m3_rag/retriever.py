"""HybridRetriever: dense + lexical candidates, fusion, ColBERT rescoring, optional rerank."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from m3_rag import scoring
from m3_rag._inputs import (
    check_count,
    check_metadatas,
    check_query,
    check_texts,
    check_weights,
)
from m3_rag._memory import release_free_memory
from m3_rag.analysis import HASH_SPACE, Analyzer, UnicodeAnalyzer, analyzer_from_config, term_counts
from m3_rag.backends.protocol import Backend, IndexSpec
from m3_rag.backends.registry import make_backend, saved_index
from m3_rag.backends.validate import check_ids
from m3_rag.bm25 import BM25Params
from m3_rag.encoder import EncodeOutput, M3Encoder
from m3_rag.filters import Filter, check_filter
from m3_rag.persist import IndexFormatError
from m3_rag.rerank import Reranker
from m3_rag.scoring import sparse_matrix
from m3_rag.spec import LexicalKind

__all__ = ["HybridRetriever", "SearchHit"]

FUSIONS = ("weighted", "rrf")
ADD_CHUNK = 256  # documents encoded and stored at a time (bounds ingestion memory)


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        id: Document id.
        text: Document text.
        metadata: A copy of the document's metadata.
        score: The final score (the reranker's when it ran, else the fused score).
        scores: Per-mode scores: ``dense``, ``sparse`` (M3 lexical) or ``bm25``, ``colbert``,
            ``fused``, and ``rerank`` when the reranker ran.
    """

    id: str
    text: str
    metadata: dict[str, Any]
    score: float
    scores: dict[str, float] = field(default_factory=dict)


class HybridRetriever:
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
        colbert_dtype: ColBERT storage: ``"float16"`` (default, 2 bytes per dimension),
            ``"float32"``, or ``"int8"`` (1 byte per dimension + a float32 scale per vector).
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
        backend: ``"memory"`` (the local engine in RAM; :meth:`save`/:meth:`load` to disk)
            or a backend object: :class:`~m3_rag.backends.LocalBackend` with a path (a
            disk-backed, memory-mapped index where every write commits),
            :class:`~m3_rag.backends.MilvusBackend`,
            :class:`~m3_rag.backends.QdrantBackend`, or any engine implementing
            :class:`~m3_rag.backends.protocol.Backend`. An engine that persists by itself is
            reopened by passing it again.
    """

    def __init__(
        self,
        encoder: M3Encoder,
        reranker: Reranker | None = None,
        weights: Sequence[float] = (0.4, 0.2, 0.4),
        fusion: str = "weighted",
        candidates: int = 100,
        lexical: str = "auto",
        *,
        rerank_top_n: int = 20,
        dense_dtype: str = "float32",
        colbert_dtype: str = "float16",
        bm25: BM25Params | None = None,
        backend: str | Backend = "memory",
        analyzer: str | Analyzer = "unicode",
        source: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(encoder, M3Encoder):
            raise TypeError(f"encoder must be an M3Encoder, got {type(encoder).__name__}")
        if reranker is not None and not isinstance(reranker, Reranker):
            raise TypeError(f"reranker must be a Reranker or None, got {type(reranker).__name__}")
        self.encoder = encoder
        self.reranker = reranker
        self.weights = check_weights(weights)
        self.fusion = _check_fusion(fusion)
        self.candidates = check_count(candidates, "candidates", minimum=1)
        self.rerank_top_n = check_count(rerank_top_n, "rerank_top_n", minimum=1)
        if lexical == "auto":
            lexical = "m3" if encoder.has_sparse else "bm25"
        if lexical not in ("m3", "bm25", "none"):
            raise ValueError(f"lexical must be 'auto', 'm3', 'bm25' or 'none', got {lexical!r}")
        if lexical == "m3" and not encoder.has_sparse:
            raise ValueError(
                f"lexical='m3' needs an M3 model; {encoder.model_name!r} is dense-only"
            )
        self.lexical: LexicalKind | None = None if lexical == "none" else lexical  # type: ignore[assignment]
        self.analyzer: Analyzer | None = None  # None: the model's tokenizer
        if analyzer == "unicode":
            self.analyzer = UnicodeAnalyzer()
        elif analyzer != "model":
            if not callable(analyzer):
                raise TypeError(
                    "analyzer must be 'unicode', 'model', a UnicodeAnalyzer or a callable "
                    f"str -> list[str], got {analyzer!r}"
                )
            self.analyzer = analyzer
        vocab_size = encoder.vocab_size
        if self.lexical == "bm25" and self.analyzer is not None:
            vocab_size = HASH_SPACE
        spec = IndexSpec(
            encoder.model_name,
            encoder.dense_dim,
            encoder.colbert_dim,
            self.lexical,
            vocab_size,
            dense_dtype=dense_dtype,
            colbert_dtype=colbert_dtype,
            bm25=bm25,
            analyzer=self._analyzer_config(),
        )
        if source is not None and not isinstance(source, Mapping):
            raise TypeError(f"source must be a mapping or None, got {type(source).__name__}")
        self.source = None if source is None else dict(source)
        self.backend: Backend = make_backend(backend).open(spec, self._settings())
        self._lock = threading.RLock()  # writes only: searches never wait for it

    def __len__(self) -> int:
        return len(self.backend)

    def __repr__(self) -> str:
        return (
            f"HybridRetriever({len(self)} docs, lexical={self.lexical}, "
            f"colbert={self.encoder.has_colbert}, fusion={self.fusion}, weights={self.weights})"
        )

    def _known_empty(self) -> bool:
        """True when the index is certainly empty (asked only where it is free)."""
        return self.backend.known_empty()

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

    # ---------------------------------------------------------------- indexing
    def add_texts(
        self,
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[str]:
        """Encode texts once and add them to every store; an existing id is replaced.

        Args:
            texts: Document texts.
            metadatas: One JSON-serialisable dict (or ``None``) per text.
            ids: One unique non-empty str per text; default: random UUIDs.
            batch_size, show_progress: Encoding options.

        Returns:
            The ids, in input order.

        Raises:
            TypeError / ValueError: bad texts, metadata or ids; nothing is added.
        """
        items = check_texts(texts)
        doc_ids = [uuid.uuid4().hex for _ in items] if ids is None else check_ids(ids, len(items))
        metas = check_metadatas(metadatas, len(items))
        bar = tqdm(total=len(items), unit="doc", desc="index", disable=not show_progress)
        with bar:
            for s in range(0, len(items), ADD_CHUNK):
                e = min(s + ADD_CHUNK, len(items))
                self._encode_add(items[s:e], metas[s:e], doc_ids[s:e], batch_size)
                bar.update(e - s)
        return doc_ids

    def add_documents(
        self,
        documents: Iterable[Any],
        *,
        chunk_size: int = ADD_CHUNK,
        batch_size: int | None = None,
        skip_existing: bool = False,
        show_progress: bool = False,
        total: int | None = None,
    ) -> int:
        """Encode and add a stream of documents ``chunk_size`` at a time (memory stays
        bounded by the chunk, not the corpus; each chunk is one commit of a disk index).

        Args:
            documents: Any iterable (a generator is read lazily) of ``str``, of dicts
                ``{"text", "id"?, "metadata"?}``, or of objects with ``.text``, ``.id``,
                ``.metadata`` (e.g. :class:`~m3_rag.sources.Record`). Without an id a
                random one is given.
            chunk_size: Documents encoded and committed together.
            batch_size: Encoding batch size.
            skip_existing: Leave out documents whose id is already stored (to resume an
                interrupted ingestion: run it again with the same ids).
            show_progress: A progress bar counting documents.
            total: The number of documents, when known (for the progress bar).

        Returns:
            The number of documents added (skipped ones not counted).

        Raises:
            TypeError / ValueError: a bad document; the chunks before it stay added.
        """
        size = check_count(chunk_size, "chunk_size", minimum=1)
        added = 0
        bar = tqdm(total=total, unit="doc", desc="index", disable=not show_progress)
        with bar:
            for chunk in _chunks(documents, size):
                texts, metas, ids = _unpack(chunk)
                seen = len(texts)
                if skip_existing:
                    have = {d[0] for d in self.backend.fetch(ids)}
                    keep = [i for i, x in enumerate(ids) if x not in have]
                    texts, metas, ids = (
                        [texts[i] for i in keep],
                        [metas[i] for i in keep],
                        [ids[i] for i in keep],
                    )
                items = check_texts(texts)
                doc_ids = check_ids(ids, len(items))
                self._encode_add(items, check_metadatas(metas, len(items)), doc_ids, batch_size)
                added += len(items)
                bar.update(seen)
        return added

    def _encode_add(
        self, items: list[str], metas: list[dict[str, Any]], ids: list[str], batch_size: int | None
    ) -> None:
        if not items:
            return
        out = self.encoder.encode_documents(
            items,
            batch_size=batch_size,
            show_progress=False,
            return_sparse=self.lexical == "m3",
            return_colbert=self.encoder.has_colbert,
        )
        self._add_checked(items, out, metas, ids)
        del out
        release_free_memory()  # keeps ingestion memory flat (see m3_rag/_memory.py)

    def add_encoded(
        self,
        texts: Sequence[str],
        encoded: EncodeOutput,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Add documents whose encodings were computed already (one ``encode_documents``
        pass, e.g. shared between indexes or computed on another machine).

        Args:
            texts: Document texts (BM25 terms come from them).
            encoded: ``encode_documents(texts)`` output: ``dense [m, dim]``; ``sparse`` when
                the lexical leg is M3; ``colbert`` when the model has ColBERT.
            metadatas, ids: As :meth:`add_texts`.

        Returns:
            The ids, in input order.

        Raises:
            TypeError / ValueError: bad input, or encodings that do not match the texts or
                this index; nothing is added.
        """
        items = check_texts(texts)
        doc_ids = [uuid.uuid4().hex for _ in items] if ids is None else check_ids(ids, len(items))
        metas = check_metadatas(metadatas, len(items))
        return self._add_checked(items, encoded, metas, doc_ids)

    def _add_checked(
        self, items: list[str], encoded: Any, metas: list[dict[str, Any]], doc_ids: list[str]
    ) -> list[str]:
        """:meth:`add_encoded` once texts, metadata and ids are validated."""
        if not isinstance(encoded, EncodeOutput):
            raise TypeError(f"encoded must be an EncodeOutput, got {type(encoded).__name__}")
        if encoded.dense is None or len(encoded.dense) != len(items):
            raise ValueError(f"encoded needs dense vectors for the {len(items)} texts")
        if self.lexical == "m3" and (encoded.sparse is None or len(encoded.sparse) != len(items)):
            raise ValueError("encoded needs sparse weights (encode with return_sparse=True)")
        colbert = encoded.colbert if self.encoder.has_colbert else None
        if self.encoder.has_colbert and (colbert is None or len(colbert) != len(items)):
            raise ValueError("encoded needs ColBERT vectors (encode with return_colbert=True)")
        if not items:
            return []
        lexical: Any = encoded.sparse if self.lexical == "m3" else None
        if self.lexical == "bm25":
            lexical = self._term_counts(items)
        with self._lock:
            self.backend.add(doc_ids, items, metas, encoded.dense, lexical, colbert)
        return doc_ids

    def add_from(
        self, source: HybridRetriever, *, batch_size: int = 1000, show_progress: bool = False
    ) -> int:
        """Copy every document of another retriever, with its stored encodings (no model
        pass), e.g. to move a saved index into Milvus.

        Returns:
            The number of documents copied.

        Raises:
            TypeError: ``source`` is not a HybridRetriever whose backend can export.
            ValueError: ``source`` was built with another model shape or lexical kind.
        """
        export = getattr(source, "backend", None) and getattr(source.backend, "export", None)
        if not isinstance(source, HybridRetriever) or export is None:
            raise TypeError(
                "source must be a HybridRetriever whose backend can export its encodings "
                "(the local/memory backend)"
            )
        a, b = source.encoder, self.encoder
        if (a.dense_dim, a.colbert_dim, source.lexical) != (
            b.dense_dim,
            b.colbert_dim,
            self.lexical,
        ):
            raise ValueError(
                "source has dense/ColBERT dims and lexical kind "
                f"{a.dense_dim}/{a.colbert_dim}/{source.lexical}, this retriever "
                f"{b.dense_dim}/{b.colbert_dim}/{self.lexical}"
            )
        if source._analyzer_config() != self._analyzer_config():
            raise ValueError(
                f"source's BM25 analyzer {source._analyzer_config()!r} differs from this "
                f"retriever's {self._analyzer_config()!r}: their term ids differ"
            )
        n = 0
        total = -(-len(source) // batch_size)
        batches = export(batch_size)  # a consistent view of the source
        for batch in tqdm(batches, total=total, desc="copy", disable=not show_progress):
            with self._lock:
                self.backend.add(*batch)
            n += len(batch.ids)
        return n

    def _analyzer_config(self) -> dict[str, Any] | str | None:
        """What the index records of its BM25 analyzer."""
        if self.lexical != "bm25":
            return None
        if self.analyzer is None:
            return "model"
        if isinstance(self.analyzer, UnicodeAnalyzer):
            return self.analyzer.config()
        return "callable"

    def _term_counts(self, texts: list[str]) -> sp.csr_matrix:
        """BM25 term counts ``[len(texts), vocab]``: the analyzer's terms hashed to ids, or
        the model's tokenizer (no special tokens, no truncation)."""
        if self.analyzer is not None:
            return sparse_matrix([term_counts(self._analyze(t)) for t in texts], HASH_SPACE)
        tok = self.encoder.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        lengths = np.fromiter((len(t) for t in tok), dtype=np.int64, count=len(tok))
        cols = np.fromiter((i for t in tok for i in t), dtype=np.int64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(tok)), lengths)
        counts = sp.csr_matrix(
            (np.ones(len(cols), np.float32), (rows, cols)),
            shape=(len(tok), self.encoder.vocab_size),
        )
        counts.sum_duplicates()
        return counts

    def _analyze(self, text: str) -> list[str]:
        assert self.analyzer is not None
        terms = self.analyzer(text)
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise TypeError(f"the analyzer must return a list of str, got {terms!r:.100}")
        return terms

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
        if opts.k == 0 or self._known_empty():
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
        if opts.k == 0 or self._known_empty():
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
            fusion=self.fusion if fusion is None else _check_fusion(fusion),
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
        """Write the index to a directory as one snapshot (JSON manifest + ``.npy``; atomic,
        checksummed, no pickle). A disk-backed index saved to its own directory is left as
        it is (every write is committed already).

        Raises:
            ValueError: the backend persists by itself (e.g. Milvus).
        """
        save = getattr(self.backend, "save", None)
        if save is None:
            raise ValueError(
                f"{self.backend!r} persists by itself; reopen it with "
                "HybridRetriever(encoder, backend=<the same backend>)"
            )
        save(path, self._settings())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        encoder: M3Encoder,
        reranker: Reranker | None = None,
        *,
        allow_model_mismatch: bool = False,
        analyzer: Analyzer | None = None,
    ) -> HybridRetriever:
        """Load an index saved by :meth:`save`.

        Raises:
            FileNotFoundError: no index at ``path``.
            ValueError: the index was built with another model (pass
                ``allow_model_mismatch=True`` to accept a same-shaped one, e.g. the same model
                from another path) or its dimensions do not fit ``encoder``.
        """
        manifest, make = saved_index(path)
        model, cfg = manifest.get("model"), manifest.get("retriever")
        if not isinstance(model, str) or not isinstance(cfg, dict):
            raise IndexFormatError(f"{path}: manifest.json needs 'model' and 'retriever'")
        if model != encoder.model_name and not allow_model_mismatch:
            raise ValueError(
                f"index {path} was built with model {model!r}, the encoder is "
                f"{encoder.model_name!r}; pass allow_model_mismatch=True if they are the same model"
            )
        if (
            manifest.get("dense_dim") != encoder.dense_dim
            or manifest.get("colbert_dim") != encoder.colbert_dim
        ):
            raise ValueError(
                f"index {path} has dense/ColBERT dims "
                f"{manifest.get('dense_dim')}/{manifest.get('colbert_dim')}, "
                f"the encoder {encoder.dense_dim}/{encoder.colbert_dim}"
            )
        saved = cfg.get("analyzer", "model")  # indexes before the analyzer: the model's
        chosen: str | Analyzer
        if saved == "callable":
            if analyzer is None:
                raise ValueError(
                    f"index {path} was built with a custom analyzer: pass it again, "
                    "HybridRetriever.load(path, encoder, analyzer=my_analyzer)"
                )
            chosen = analyzer
        elif analyzer is not None:
            raise ValueError(f"index {path} records its analyzer ({saved!r}); do not pass one")
        else:
            try:
                chosen = "model" if saved in ("model", None) else analyzer_from_config(saved)
            except (ValueError, TypeError, ImportError) as e:
                raise IndexFormatError(f"{path}: bad analyzer in manifest.json: {e}") from None
        vocab = manifest.get("vocab_size")
        uses_model_vocab = manifest.get("lexical") == "m3" or saved in ("model", None)
        if vocab is not None and uses_model_vocab and vocab != encoder.vocab_size:
            raise ValueError(
                f"index {path} has vocabulary size {vocab}, the encoder {encoder.vocab_size}"
            )
        options: dict[str, Any] = {
            "rerank_top_n": cfg.get("rerank_top_n"),
            "dense_dtype": manifest.get("dense_dtype"),
            "colbert_dtype": manifest.get("colbert_dtype") or "float16",
            "analyzer": chosen,
        }
        try:
            args = (cfg["weights"], cfg["fusion"], cfg["candidates"], cfg["lexical"])
            bm25 = BM25Params(**manifest["bm25"]) if manifest.get("bm25") else None
            cls(encoder, reranker, *args, bm25=bm25, **options)  # settings check, nothing read
        except (KeyError, TypeError, ValueError) as e:
            msg = f"{path}: manifest.json has a bad retriever setting: {e}"
            raise IndexFormatError(msg) from None
        self = cls(
            encoder, reranker, *args, bm25=bm25, **options, backend=make(allow_model_mismatch)
        )
        if self.lexical != manifest["lexical"]:
            raise IndexFormatError(
                f"{path}: manifest.json says lexical {manifest['lexical']!r} for the stores and "
                f"{cfg['lexical']!r} for the retriever"
            )
        return self


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


def _check_fusion(fusion: Any) -> str:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return str(fusion)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"documents must be an iterable of documents, got {type(items).__name__}")
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unpack(chunk: list[Any]) -> tuple[list[Any], list[Any], list[str]]:
    """texts, metadatas, ids of a chunk of documents (random ids where none is given)."""
    texts: list[Any] = []
    metas: list[Any] = []
    ids: list[str] = []
    for doc in chunk:
        text: Any
        meta: Any
        doc_id: Any
        if isinstance(doc, str):
            text, meta, doc_id = doc, None, None
        elif isinstance(doc, Mapping):
            text, meta, doc_id = doc.get("text"), doc.get("metadata"), doc.get("id")
        elif hasattr(doc, "text"):
            text, meta, doc_id = doc.text, getattr(doc, "metadata", None), getattr(doc, "id", None)
        else:
            raise TypeError(
                "each document must be a str, a dict with 'text' (and 'id', 'metadata') or "
                f"an object with .text, got {type(doc).__name__}"
            )
        texts.append(text)
        metas.append(meta)
        ids.append(uuid.uuid4().hex if doc_id is None else doc_id)
    return texts, metas, ids

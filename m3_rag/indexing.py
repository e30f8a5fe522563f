"""Building and filling the index of a :class:`~m3_rag.HybridRetriever`: the engine and the
:class:`~m3_rag.spec.IndexSpec` its arguments describe, the four ingestion paths, and the
BM25 leg's term counting.

:class:`IndexingMixin` holds ``add_texts``, ``add_documents``, ``add_encoded`` and
``add_from``; :class:`~m3_rag.HybridRetriever` inherits them, so they are its methods (the
public API is the retriever's). Every path ends in one ``Backend.add`` per chunk, made under
the retriever's write lock; searches never take it. (Over 450 lines: the four paths share
their chunking, checks and undo, so they stay together.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, cast

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from m3_rag._inputs import check_count, check_metadatas, check_texts
from m3_rag._memory import release_free_memory
from m3_rag.analysis import HASH_SPACE, Analyzer, UnicodeAnalyzer, term_counts
from m3_rag.backends.local import LocalBackend
from m3_rag.backends.protocol import Backend, DocumentChecking, Exportable
from m3_rag.backends.validate import check_ids
from m3_rag.bm25 import BM25Params
from m3_rag.codecs import DEFAULT_CODEC, default_pool_factor, pool_tokens
from m3_rag.encoder import EncodeOutput
from m3_rag.encoding import Encoder
from m3_rag.errors import IndexMismatchError
from m3_rag.scoring import sparse_matrix
from m3_rag.spec import IndexSpec, LexicalKind, SettingMismatchError

__all__ = [
    "ADD_CHUNK",
    "IndexingMixin",
    "analyzer_config",
    "index_spec",
    "lexical_kind",
    "make_analyzer",
    "make_engine",
    "open_engine",
]

ADD_CHUNK = 256  # documents encoded and stored at a time (bounds ingestion memory)


def make_engine(backend: Backend | None) -> Backend:
    """The backend a retriever's ``backend`` argument names (``None``: a new in-RAM engine).

    Raises:
        TypeError: a name (``"memory"`` is no longer one), or an object that does not
            implement :class:`~m3_rag.backends.protocol.Backend`.
    """
    if backend is None:
        return LocalBackend()
    if isinstance(backend, (str, bytes, os.PathLike)):
        raise TypeError(
            f"backend={backend!r} is not a backend: pass nothing (or backend=LocalBackend()) "
            "for an index in RAM, or a backend object such as LocalBackend(path), "
            "MilvusBackend(uri, collection) or QdrantBackend(...)"
        )
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend must implement m3_rag.backends.Backend (LocalBackend, MilvusBackend, "
            f"QdrantBackend, or an engine with the same methods), got {type(backend).__name__}"
        )
    return backend


def lexical_kind(encoder: Encoder, lexical: str) -> LexicalKind | None:
    """The lexical leg a retriever's ``lexical`` argument names (``None``: no lexical leg).

    Raises:
        ValueError: an unknown kind, or ``"m3"`` with a dense-only model.
    """
    if lexical == "auto":
        lexical = "m3" if encoder.has_sparse else "bm25"
    if lexical not in ("m3", "bm25", "none"):
        raise ValueError(f"lexical must be 'auto', 'm3', 'bm25' or 'none', got {lexical!r}")
    if lexical == "m3" and not encoder.has_sparse:
        raise ValueError(f"lexical='m3' needs an M3 model; {encoder.model_name!r} is dense-only")
    return None if lexical == "none" else cast(LexicalKind, lexical)


def index_spec(
    encoder: Encoder,
    lexical: LexicalKind | None,
    analyzer: Analyzer | None,
    dense_dtype: str,
    colbert_dtype: str | None,
    bm25: BM25Params | None,
    pool_factor: int | None = None,
) -> IndexSpec:
    """The index a retriever over ``encoder`` needs (BM25 over the analyzer's hashed terms
    has their id space, anything else the model's vocabulary).

    Raises:
        ValueError / TypeError: a bad dtype or BM25 parameters.
    """
    vocab_size = HASH_SPACE if lexical == "bm25" and analyzer is not None else encoder.vocab_size
    return IndexSpec(
        encoder.model_name,
        encoder.dense_dim,
        encoder.colbert_dim,
        lexical,
        vocab_size,
        dense_dtype=dense_dtype,
        colbert_dtype=DEFAULT_CODEC if colbert_dtype is None else colbert_dtype,
        colbert_pool_factor=default_pool_factor(colbert_dtype)
        if pool_factor is None
        else pool_factor,
        bm25=bm25,
        analyzer=analyzer_config(lexical, analyzer),
    )


def open_engine(
    backend: Backend,
    spec: IndexSpec,
    settings: Mapping[str, Any],
    allow_model_mismatch: bool,
    adopt: Sequence[str] = (),
) -> tuple[Backend, IndexSpec]:
    """``backend.open(spec, ...)``, taking the stored value of each setting in ``adopt``
    (``"colbert_dtype"``, ``"colbert_pool_factor"``: the ones the caller left unset) when
    the engine holds an index that records another one.

    Returns:
        The opened backend and the specification it was opened with.

    Raises:
        IndexMismatchError: another model, or a setting outside ``adopt`` that differs.
    """
    for _ in range(len(adopt) + 1):
        try:
            return backend.open(spec, settings, allow_model_mismatch=allow_model_mismatch), spec
        except SettingMismatchError as e:
            value = e.stored.to_json()[e.key]
            if e.key not in adopt or spec.to_json()[e.key] == value:
                raise
            spec = replace(spec, **{e.key: value})
    return backend.open(spec, settings, allow_model_mismatch=allow_model_mismatch), spec


def make_analyzer(analyzer: Any) -> Analyzer | None:
    """The BM25 analyzer a retriever's ``analyzer`` argument names (``None``: the model's
    tokenizer).

    Raises:
        TypeError: not ``"unicode"``, ``"model"`` or a callable.
    """
    if analyzer == "unicode":
        return UnicodeAnalyzer()
    if analyzer == "model":
        return None
    if not callable(analyzer):
        raise TypeError(
            "analyzer must be 'unicode', 'model', a UnicodeAnalyzer or a callable "
            f"str -> list[str], got {analyzer!r}"
        )
    return analyzer


def analyzer_config(
    lexical: LexicalKind | None, analyzer: Analyzer | None
) -> dict[str, Any] | str | None:
    """What an index records of its BM25 analyzer (``None`` without a BM25 leg)."""
    if lexical != "bm25":
        return None
    if analyzer is None:
        return "model"
    if isinstance(analyzer, UnicodeAnalyzer):
        return analyzer.config()
    return "callable"


class IndexingMixin:
    """The ingestion half of :class:`~m3_rag.HybridRetriever` (see the module docstring)."""

    encoder: Encoder
    lexical: LexicalKind | None
    analyzer: Analyzer | None
    backend: Backend
    pool_factor: int  # the index's ColBERT token pooling (1: none)
    _lock: AbstractContextManager[Any]

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

        More than ``ADD_CHUNK`` (256) texts are encoded and committed 256 at a time. When a
        later chunk fails (a full disk, a server error, the encoder running out of memory),
        the chunks committed before it are removed again if their ids were generated (a
        retry then stores each text once); with ``ids`` given they stay, and adding the same
        ids again replaces them. The error's note says which happened.

        Raises:
            TypeError / ValueError: bad texts, metadata or ids, or a document the engine
                cannot hold; nothing is added (all are checked before the first chunk).
        """
        items = check_texts(texts)
        doc_ids = [uuid.uuid4().hex for _ in items] if ids is None else check_ids(ids, len(items))
        metas = check_metadatas(metadatas, len(items))
        self._check_documents(doc_ids, items, metas)  # all of them before the first chunk
        bar = tqdm(total=len(items), unit="doc", desc="index", disable=not show_progress)
        done = 0
        with bar:
            try:
                for s in range(0, len(items), ADD_CHUNK):
                    e = min(s + ADD_CHUNK, len(items))
                    self._encode_add(items[s:e], metas[s:e], doc_ids[s:e], batch_size)
                    done = e
                    bar.update(e - s)
            except BaseException as err:
                if done:
                    self._after_partial_add(err, doc_ids[:done], len(items), ids is None)
                raise
        return doc_ids

    def _after_partial_add(
        self, err: BaseException, committed: list[str], total: int, generated: bool
    ) -> None:
        """``add_texts`` failed after committing ``committed``: remove them when their ids
        were generated (nobody else knows them), and say on ``err`` what is stored."""
        kept = f"the first {len(committed)} of {total} documents were added before this error"
        note = f"add_texts: {kept} and stay; adding them again with the same ids replaces them"
        if generated and isinstance(err, Exception):  # not on Ctrl-C: stop, do not undo
            try:
                with self._lock:
                    self.backend.delete(committed)
                note = f"add_texts: {kept}, and were removed: nothing of this call is stored"
            except Exception as undo:
                note = (
                    f"add_texts: {kept}; removing them failed ({type(undo).__name__}: {undo}), "
                    f"so they stay under generated ids (the first: {committed[0]!r})"
                )
        err.add_note(note)

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
                checked = check_metadatas(metas, len(items))
                self._check_documents(doc_ids, items, checked)
                self._encode_add(items, checked, doc_ids, batch_size)
                added += len(items)
                bar.update(seen)
        return added

    def _check_documents(
        self, ids: list[str], texts: list[str], metas: list[dict[str, Any]]
    ) -> None:
        """The engine's own refusals, before anything is encoded (where it has them)."""
        if isinstance(self.backend, DocumentChecking):
            self.backend.check_documents(ids, texts, metas)

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
        colbert = self._pooled(colbert)
        lexical: Any = encoded.sparse if self.lexical == "m3" else None
        if self.lexical == "bm25":
            lexical = self._term_counts(items)
        with self._lock:
            self.backend.add(doc_ids, items, metas, encoded.dense, lexical, colbert)
        return doc_ids

    def add_from(
        self, source: IndexingMixin, *, batch_size: int = 1000, show_progress: bool = False
    ) -> int:
        """Copy every document of another retriever, with its stored encodings (no model
        pass), e.g. to move a local index into Milvus.

        Returns:
            The number of documents copied.

        Raises:
            TypeError: ``source`` is not a HybridRetriever whose backend can export.
            IndexMismatchError: ``source`` was built with another model shape, lexical kind
                or BM25 analyzer, or pools ColBERT vectors by another factor than 1 or
                this index's (an unpooled source is pooled as it is copied).
        """
        if not isinstance(source, IndexingMixin) or not isinstance(source.backend, Exportable):
            raise TypeError(
                "source must be a HybridRetriever whose backend can export its encodings "
                "(the local engine, LocalBackend)"
            )
        a, b = source.encoder, self.encoder
        if (a.dense_dim, a.colbert_dim, source.lexical) != (
            b.dense_dim,
            b.colbert_dim,
            self.lexical,
        ):
            raise IndexMismatchError(
                "source has dense/ColBERT dims and lexical kind "
                f"{a.dense_dim}/{a.colbert_dim}/{source.lexical}, this retriever "
                f"{b.dense_dim}/{b.colbert_dim}/{self.lexical}"
            )
        if source._analyzer_config() != self._analyzer_config():
            raise IndexMismatchError(
                f"source's BM25 analyzer {source._analyzer_config()!r} differs from this "
                f"retriever's {self._analyzer_config()!r}: their term ids differ"
            )
        if source.pool_factor not in (1, self.pool_factor):
            raise IndexMismatchError(
                f"source's ColBERT vectors are pooled by {source.pool_factor}, this index "
                f"pools by {self.pool_factor}: pooled vectors cannot be pooled again; "
                "re-encode the texts (add_texts) instead"
            )
        pool = source.pool_factor != self.pool_factor  # unpooled source: pool here
        n = 0
        total = -(-len(source.backend) // batch_size)
        batches = source.backend.export(batch_size)  # a consistent view of the source
        for batch in tqdm(batches, total=total, desc="copy", disable=not show_progress):
            if pool:
                batch = batch._replace(colbert=self._pooled(batch.colbert))
            with self._lock:
                self.backend.add(*batch)
            n += len(batch.ids)
        return n

    def _pooled(self, colbert: Sequence[np.ndarray] | None) -> list[np.ndarray] | None:
        """Documents' ColBERT vectors pooled as the index records (``colbert_pool_factor``;
        queries are never pooled)."""
        factor = self.pool_factor
        if colbert is None:
            return None
        if factor == 1:
            return list(colbert)
        return [pool_tokens(np.asarray(v, np.float32), factor) for v in colbert]

    # ---------------------------------------------------------------- BM25 terms
    def _analyzer_config(self) -> dict[str, Any] | str | None:
        """What the index records of its BM25 analyzer."""
        return analyzer_config(self.lexical, self.analyzer)

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

"""Milvus backend: the same HybridRetriever over Milvus Lite (a local file) or a Milvus server.

One collection of documents per retriever: ``id`` (primary key), ``text``, ``metadata``
(JSON), ``dense`` (FLOAT_VECTOR, IP), ``lexical`` (SPARSE_FLOAT_VECTOR, IP, inverted index;
``sparse`` in collections of format 1, which still open) and ``colbert`` (the document's
ColBERT vectors in their storage dtype, base64 in an ARRAY<VARCHAR>). A one-row-per-key side
collection ``<name>_m3meta`` holds the index record (``IndexSpec.to_json()`` and the
collection format) and, for BM25, the corpus statistics (:mod:`.stats`).

This module holds the connection, the writes (validated whole, rolled back on a refusal)
and the reads by id or filter; a search's round trip and its scoring are in :mod:`.search`.
BM25 rows store the document side ``tf (k1+1) / (tf + K)`` with the mean length at write
time and queries carry the IDF: Milvus ranks by exact BM25 while the corpus is unchanged
since the last write; the returned scores are always exact.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from m3_rag._inputs import check_count, check_flag, check_positive
from m3_rag.backends.milvus import search, stats
from m3_rag.backends.milvus.filters import milvus_expr
from m3_rag.backends.milvus.rows import delete_ids, encode_rows, fetch_rows, pages
from m3_rag.backends.milvus.schema import (
    FORMATS,
    check_documents,
    create_collections,
    is_server,
    lexical_field,
    record,
)
from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.backends.server import ServerEngine, check_record
from m3_rag.backends.validate import check_ids, prepare_batch
from m3_rag.bm25 import BM25Params, BM25Stats
from m3_rag.filters import Filter

__all__ = ["MilvusBackend"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


class MilvusBackend(ServerEngine):
    """Milvus storage for a :class:`~m3_rag.HybridRetriever`.

    ``HybridRetriever(encoder, backend=MilvusBackend("./m3.db", "docs"))`` creates the
    collection, or reconnects to it (reading only its configuration and, for BM25, its
    term statistics: nothing per document is loaded into this process).

    Args:
        uri: A local file path (Milvus Lite, in-process) or a server URI such as
            ``"http://localhost:19530"``.
        collection: Collection name (letters, digits, ``_``).
        token: Server credentials (``"user:password"`` or an API key).
        db_name: Server database.
        index_type: Dense index: ``"FLAT"`` (exact, as the local engine) or e.g. ``"HNSW"``.
        index_params: Extra dense index parameters (e.g. ``{"M": 16, "efConstruction": 200}``).
        batch_size: Rows per insert call.
        show_progress: Progress bar for inserts (default: when more than one batch).
        timeout: Seconds to wait for a server.
        colbert_inline: Up to this many candidates (both legs' limits together), a search
            returns their ColBERT vectors in the same reply (one round trip); above it they
            are fetched in a second request (replies stay far below gRPC limits).

    Raises:
        TypeError: an option of the wrong type (a bool for a count, a str for ``timeout``,
            a non-str ``token``...), named. ValueError: one out of range, named.
        ImportError: pymilvus is missing (``pip install 'm3-rag[milvus]'``).
    """

    def __init__(
        self,
        uri: str = "./m3_rag_milvus.db",
        collection: str = "m3_rag",
        *,
        token: str = "",
        db_name: str = "",
        index_type: str = "FLAT",
        index_params: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        show_progress: bool | None = None,
        timeout: float = 10.0,
        colbert_inline: int = 512,
    ) -> None:
        if not isinstance(uri, str) or not uri:
            raise TypeError(f"uri must be a non-empty str, got {uri!r}")
        if not isinstance(collection, str) or not _NAME.match(collection):
            raise ValueError(
                f"collection must be letters, digits and '_' (not starting with a digit), "
                f"got {collection!r}"
            )
        for name, value in (("token", token), ("db_name", db_name), ("index_type", index_type)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")
        if not index_type:
            raise ValueError("index_type must name a Milvus index type, such as 'FLAT' or 'HNSW'")
        if index_params is not None and (
            not isinstance(index_params, Mapping)
            or not all(isinstance(k, str) for k in index_params)
        ):
            raise TypeError(f"index_params must be a dict with str keys, got {index_params!r:.80}")
        self.uri, self.collection = uri, collection
        self.meta_collection = f"{collection}_m3meta"
        self.index_type, self.index_params = index_type, dict(index_params or {})
        self.batch_size = check_count(batch_size, "batch_size", 1)
        self.show_progress = (
            None if show_progress is None else check_flag(show_progress, "show_progress")
        )
        self.timeout = check_positive(timeout, "timeout")
        self.colbert_inline = check_count(colbert_inline, "colbert_inline", 0)
        self._connect_kwargs = {"token": token, "db_name": db_name}
        self._client: Any = None
        self.spec: IndexSpec | None = None
        self._lex = "lexical"  # the lexical field ("sparse" in a format-1 collection)
        self._stats = BM25Stats()  # the BM25 corpus statistics (BM25 only)
        self._stats_dirty = False

    def __repr__(self) -> str:
        return f"MilvusBackend(uri={self.uri!r}, collection={self.collection!r})"

    # ---------------------------------------------------------------- connection / schema
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from pymilvus import MilvusClient
            except ImportError as e:
                raise ImportError(
                    "the Milvus backend needs pymilvus and milvus-lite: "
                    "pip install 'm3-rag[milvus]'"
                ) from e
            try:
                self._client = MilvusClient(self.uri, timeout=self.timeout, **self._connect_kwargs)
            except Exception as e:  # pymilvus raises its own MilvusException
                raise ConnectionError(f"cannot reach Milvus at {self.uri!r}: {e}") from e
        return self._client

    def open(
        self,
        spec: IndexSpec,
        settings: Mapping[str, Any] | None = None,
        *,
        allow_model_mismatch: bool = False,
    ) -> MilvusBackend:
        """Create the collection for ``spec``, or check and load an existing one.

        Args:
            spec: The retriever's index specification.
            settings: The retriever's settings (unused: the collection records ``spec``).
            allow_model_mismatch: Accept a collection built under another model name (same
                dimensions and settings still required).

        Raises:
            ConnectionError: the server is unreachable.
            IndexMismatchError: the collection was built with another model or settings.
            IndexFormatError: the collection was not created by m3-rag, or by a version
                whose format this one does not read.
        """
        if spec.dense_dtype != "float32":
            raise ValueError("the Milvus backend stores dense vectors as float32")
        self._check_rebind(spec)
        c = self.client
        if c.has_collection(self.collection):
            if not c.has_collection(self.meta_collection):
                raise self._foreign()
            c.load_collection(self.meta_collection)
            stored = json.loads(self._meta_row("config")["value"])
            check_record(
                stored, spec, self.collection, FORMATS, allow_model_mismatch=allow_model_mismatch
            )
            self._lex = lexical_field(c, self.collection) or "lexical"
            c.load_collection(self.collection)
        else:
            self._create(spec)
            stats.write_meta(
                self.client, self.meta_collection, "config", record(spec), {spec.vocab_size: 1.0}
            )
            self._lex = "lexical"
        self.spec = spec
        if spec.lexical == "bm25":
            self._read_stats()
            if self._stats_dirty or self._stats.n != len(self):
                self._recompute_stats()  # a write was killed or failed half-way
        return self

    def _create(self, spec: IndexSpec) -> None:
        create_collections(
            self.client,
            spec,
            self.collection,
            self.meta_collection,
            self.index_type,
            self.index_params,
        )

    def drop(self) -> None:
        """Delete the collection and its side collection (all documents are lost)."""
        for name in (self.collection, self.meta_collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
        self.spec = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---------------------------------------------------------------- side collection
    def _meta_row(self, key: str) -> dict[str, Any]:
        row = stats.read_meta(self.client, self.meta_collection, key)
        if row is None:
            raise ValueError(f"collection {self.collection!r} has no {key!r} record")
        return row

    def _read_stats(self) -> None:
        spec = self._spec()
        self._stats, self._stats_dirty = stats.read_stats(
            self.client, self.meta_collection, spec.vocab_size
        )

    def _write_stats(self, corpus: BM25Stats, dirty: bool = False) -> None:
        """Store the BM25 statistics ``corpus``; ``dirty=True`` marks a write in progress
        (a reader that opens the collection then recomputes them from the rows)."""
        spec = self._spec()
        stats.write_stats(self.client, self.meta_collection, corpus, spec.vocab_size, dirty=dirty)
        self._stats, self._stats_dirty = corpus, dirty

    def _recompute_stats(self) -> None:
        """Rebuild the BM25 statistics from the stored rows (O(corpus); after a failed or
        killed write only)."""
        spec = self._spec()
        pages = self._pages(["id", self._lex, "dl", "avgdl"])
        self._write_stats(stats.recompute(pages, self._lex, spec.vocab_size, self._bm25()))

    def _bm25(self) -> BM25Params:
        return self._spec().bm25 or BM25Params()

    # ---------------------------------------------------------------- mutation
    def save(self, path: Any, settings: Any = None) -> None:
        """Refused: the collection persists in Milvus by itself."""
        raise ValueError(
            f"{self!r} persists in Milvus; reopen it with "
            "HybridRetriever(encoder, backend=MilvusBackend(uri, collection))"
        )

    def __len__(self) -> int:
        self._spec()
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        dense: np.ndarray,
        lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
        colbert: Sequence[np.ndarray] | None,
    ) -> None:
        """Add or replace documents (upsert by id), in batches.

        Every row of every batch is validated and encoded before the first write (the
        batch with :func:`~m3_rag.backends.validate.prepare_batch`, then Milvus's own limits:
        :meth:`check_documents`); a write Milvus refuses is rolled back. On error nothing
        stored is lost.
        """
        spec = self._spec()
        batch = prepare_batch(spec, ids, texts, metadatas, dense, lexical, colbert)
        ids = batch.ids
        self.check_documents(ids, batch.texts, batch.metadatas)
        after = None  # the BM25 statistics once written
        lexical_rows, lengths = batch.lexical, None
        if batch.lexical is not None and spec.lexical == "bm25":
            replaced = self._fetch(ids, ["dl", "avgdl"])
            lexical_rows, dl, avgdl, after = stats.bm25_rows(
                self._stats, replaced, batch.lexical, self._lex, spec.vocab_size, self._bm25()
            )
            lengths = (dl, avgdl)
        rows = encode_rows(batch, self._lex, lexical_rows, spec.vocab_size, lengths)
        # everything is validated and encoded: now write, undoing what was written on failure
        existing = [r["id"] for r in self._fetch(ids, [])]
        old = {r["id"]: r for r in self._fetch(existing, ["*"])}
        if after is not None:
            self._write_stats(self._stats, dirty=True)
        steps = range(0, len(rows), self.batch_size)
        show = len(steps) > 1 if self.show_progress is None else self.show_progress
        done = 0
        try:
            for start in tqdm(steps, desc="Milvus upsert", unit="batch", disable=not show):
                self.client.upsert(self.collection, rows[start : start + self.batch_size])
                done = start + self.batch_size
        except Exception as e:
            self._rollback([r["id"] for r in rows[:done]], old)
            raise RuntimeError(
                f"Milvus refused the write of documents {done}..{done + self.batch_size - 1} "
                f"({type(e).__name__}: {e}); the {min(done, len(rows))} documents written "
                "before were rolled back"
            ) from e
        if not is_server(self.uri) and len(rows) >= self.batch_size:
            self.client.flush(self.collection)  # Milvus Lite indexes sealed segments only
        if after is not None:
            self._write_stats(after)

    def check_documents(
        self, ids: Sequence[str], texts: Sequence[str], metadatas: Sequence[dict[str, Any]]
    ) -> None:
        """Refuse documents a Milvus row cannot hold (before anything is encoded or
        written): ids over 512 bytes or with control characters, texts over 65,535 bytes,
        metadata with an integer outside int64 or over 64 KiB of JSON.

        Raises:
            ValueError: naming the first bad document.
        """
        check_documents(ids, texts, metadatas)

    def _rollback(self, written: list[str], old: dict[str, dict[str, Any]]) -> None:
        """Remove the new ids written by a failed add and put back the rows it replaced;
        then bring the BM25 statistics back in line with the rows."""
        try:
            new = [i for i in written if i not in old]
            delete_ids(self.client, self.collection, new, self.batch_size)
            back = [old[i] for i in written if i in old]
            for start in range(0, len(back), self.batch_size):
                self.client.upsert(self.collection, back[start : start + self.batch_size])
        finally:
            if self._spec().lexical == "bm25":
                self._recompute_stats()

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents; unknown ids raise ``KeyError`` and nothing is removed."""
        spec = self._spec()
        ids = check_ids(ids)
        if not ids:
            return
        extra = ["dl", "avgdl"] if spec.lexical == "bm25" else []
        found = self._fetch(ids, extra)
        missing = sorted(set(ids) - {r["id"] for r in found})
        if missing:
            raise KeyError(f"unknown ids: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        after = None
        if spec.lexical == "bm25":
            after = stats.without_rows(self._stats, found, self._lex, spec.vocab_size, self._bm25())
            self._write_stats(self._stats, dirty=True)
        try:
            delete_ids(self.client, self.collection, ids, self.batch_size)
        except Exception:
            if spec.lexical == "bm25":
                self._recompute_stats()
            raise
        if after is not None:
            self._write_stats(after)

    # ---------------------------------------------------------------- reading
    def _fetch(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """Stored rows of ``ids`` (those that exist), with ``id``, the lexical field when
        there is a lexical leg, and ``fields``."""
        lex = [self._lex] if self._spec().lexical else []
        return fetch_rows(self.client, self.collection, ids, ["id", *fields, *lex])

    def candidates(
        self,
        dense_query: np.ndarray,
        lexical_query: Mapping[int, float] | None,
        n: int,
        flt: Filter = None,
        *,
        colbert_query: np.ndarray | None = None,
    ) -> Candidates:
        """Dense and lexical top-``n`` in Milvus (filtered there), scored client-side.

        One round trip: a ``hybrid_search`` of both legs (a plain ``search`` when there is
        no lexical query) returns the union with the stored vectors, so the per-mode scores
        are computed here exactly as the local engine does (Milvus's rankers return one
        fused score). With ``colbert_query`` and at most ``colbert_inline`` candidates, the
        ColBERT vectors come in the same reply and are scored too. The rows are checked
        against ``flt`` again (JSON's equality, not Python's); when that drops some, the
        search is repeated deeper (:func:`~m3_rag.backends.milvus.search.candidates`).
        """
        spec = self._spec()
        target = search.Target(
            self.client,
            self.collection,
            spec,
            self._lex,
            self._stats if spec.lexical == "bm25" else None,
            self.colbert_inline,
        )
        return search.candidates(target, dense_query, lexical_query, n, flt, colbert_query)

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        """Fetch the candidates' ColBERT vectors and score them by MaxSim -> ``[c]``."""
        spec = self._spec()
        if not spec.colbert_dim:
            raise ValueError("this index has no ColBERT vectors")
        by_id = {r["id"]: r["colbert"] for r in self._fetch(cands.ids, ["colbert"])}
        return search.colbert_of(spec, [by_id.get(i, []) for i in cands.ids], query)

    def select(self, flt: Filter) -> list[str]:
        """Ids of the stored documents passing the dict filter ``flt`` (paged); each page's
        metadata is checked again, so the filter compares as JSON does."""
        expr = milvus_expr(flt)
        if flt is None:
            return [r["id"] for batch in self._pages(["id"]) for r in batch]
        pages = self._pages(["id", "metadata"], expr)
        return [r["id"] for batch in pages for r in search.passing(batch, flt)]

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        """Stored documents among ``ids``, in the order of ``ids``."""
        by_id = {r["id"]: r for r in self._fetch(list(ids), ["text", "metadata"])}
        return [
            (i, by_id[i]["text"], copy.deepcopy(by_id[i]["metadata"] or {}))
            for i in ids
            if i in by_id
        ]

    def _pages(self, fields: list[str], expr: str = "") -> Iterator[list[dict[str, Any]]]:
        """``fields`` of every stored row matching the Milvus expression ``expr`` (all rows
        for ``""``), 1,000 rows per request."""
        self._spec()
        return pages(self.client, self.collection, fields, expr, server=is_server(self.uri))

    def docs(self) -> Iterator[dict[str, Any]]:
        """Every stored document as ``{"id", "text", "metadata"}``, 1,000 rows per request."""
        for batch in self._pages(["id", "text", "metadata"]):
            for r in batch:
                yield {"id": r["id"], "text": r["text"], "metadata": r["metadata"] or {}}

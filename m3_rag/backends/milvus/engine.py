"""Milvus backend: the same HybridRetriever over Milvus Lite (a local file) or a Milvus server.

One collection of documents per retriever: ``id`` (primary key), ``text``, ``metadata``
(JSON), ``dense`` (FLOAT_VECTOR, IP), ``lexical`` (SPARSE_FLOAT_VECTOR, IP, inverted index;
``sparse`` in collections of format 1, which still open) and ``colbert`` (the document's
ColBERT vectors in their storage dtype, base64 in an ARRAY<VARCHAR>). A one-row-per-key side
collection ``<name>_m3meta`` holds the index record (``IndexSpec.to_json()`` and the
collection format) and, for BM25, the corpus statistics (document frequencies, count,
length).

Candidate generation (dense top-n, lexical top-n, metadata filter) runs in Milvus in one
``hybrid_search`` round trip that also returns the candidates' stored vectors (and, for up
to ``colbert_inline`` candidates, their ColBERT vectors); they are scored client-side with
the same functions as the local engine, so per-mode scores and rankings agree with it.
BM25 rows store the document side ``tf (k1+1) / (tf + K)`` with the mean length at write
time and queries carry the IDF: Milvus ranks by exact BM25 while the corpus is unchanged
since the last write; the returned scores are always exact.

Over 450 lines: the write path, its rollback and the BM25 statistics kept in the side
collection change together and share the one connection.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_expr, milvus_literal
from m3_rag.backends.milvus.schema import (
    FORMATS,
    check_documents,
    create_collections,
    is_server,
    lexical_field,
    record,
    str_list,
)
from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.backends.server import ServerEngine, check_record
from m3_rag.backends.validate import check_ids, prepare_batch
from m3_rag.bm25 import BM25Params, bm25_idf, bm25_tf
from m3_rag.errors import IndexFormatError
from m3_rag.filters import Filter
from m3_rag.scoring import colbert_scores_rows, dense_scan, sparse_dot_rows

__all__ = ["MilvusBackend"]

MAX_TOPK = 16384  # Milvus's largest search limit
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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.uri, self.collection = uri, collection
        self.meta_collection = f"{collection}_m3meta"
        self.index_type, self.index_params = index_type, dict(index_params or {})
        self.batch_size, self.show_progress, self.timeout = batch_size, show_progress, timeout
        if not isinstance(colbert_inline, int) or colbert_inline < 0:
            raise ValueError(f"colbert_inline must be an int >= 0, got {colbert_inline!r}")
        self.colbert_inline = colbert_inline
        self._connect_kwargs = {"token": token, "db_name": db_name}
        self._client: Any = None
        self.spec: IndexSpec | None = None
        self._lex = "lexical"  # the lexical field ("sparse" in a format-1 collection)
        self._df = sp.csr_matrix((1, 1), dtype=np.float64)  # [1, vocab] document frequencies
        self._n_docs, self._total_len = 0, 0.0
        self._idf: tuple[np.ndarray, np.ndarray] | None = None
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
        if self.spec is not None and self.spec != spec:
            raise ValueError(f"{self!r} is already open for another index")
        c = self.client
        if c.has_collection(self.collection):
            if not c.has_collection(self.meta_collection):
                raise IndexFormatError(
                    f"collection {self.collection!r} exists but was not created by m3-rag; "
                    "pick another collection name"
                )
            c.load_collection(self.meta_collection)
            stored = json.loads(self._meta_row("config")["value"])
            check_record(
                stored, spec, self.collection, FORMATS, allow_model_mismatch=allow_model_mismatch
            )
            self._lex = lexical_field(c, self.collection) or "lexical"
            c.load_collection(self.collection)
        else:
            self._create(spec)
            self._write_meta("config", record(spec), {spec.vocab_size: 1.0})
            self._lex = "lexical"
        self.spec = spec
        if spec.lexical == "bm25":
            self._read_stats()
            if self._stats_dirty or self._n_docs != len(self):
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

    # ---------------------------------------------------------------- meta rows
    def _meta_row(self, key: str) -> dict[str, Any]:
        rows = self.client.query(
            self.meta_collection,
            filter=f"key == {milvus_literal(key)}",
            output_fields=["key", "value", "vec"],
        )
        if not rows:
            raise ValueError(f"collection {self.collection!r} has no {key!r} record")
        return dict(rows[0])

    def _write_meta(self, key: str, value: dict[str, Any], vec: Mapping[int, float]) -> None:
        self.client.upsert(
            self.meta_collection, [{"key": key, "value": json.dumps(value), "vec": dict(vec)}]
        )

    def _read_stats(self) -> None:
        spec = self._spec()
        self._df = sp.csr_matrix((1, spec.vocab_size), dtype=np.float64)
        self._n_docs, self._total_len, self._idf = 0, 0.0, None
        self._stats_dirty = False
        try:
            row = self._meta_row("bm25")
        except ValueError:
            return
        stats = json.loads(row["value"])
        self._n_docs, self._total_len = int(stats["n"]), float(stats["total_len"])
        self._stats_dirty = bool(stats.get("dirty", False))
        self._df = sp.csr_matrix(
            codec.decode_sparse([row["vec"]], spec.vocab_size), dtype=np.float64
        )

    def _write_stats(self, dirty: bool = False) -> None:
        """Store the BM25 statistics; ``dirty=True`` marks a write in progress (a reader that
        opens the collection then recomputes them from the rows)."""
        self._df.eliminate_zeros()
        vec = dict(zip(self._df.indices.tolist(), self._df.data.tolist(), strict=True))
        self._write_meta(
            "bm25",
            {"n": self._n_docs, "total_len": self._total_len, "dirty": dirty},
            vec or {self._spec().vocab_size: 1.0},
        )
        self._idf = None
        self._stats_dirty = dirty

    def _recompute_stats(self) -> None:
        """Rebuild the BM25 statistics from the stored rows (O(corpus); after a failed or
        killed write only)."""
        df = sp.csr_matrix((1, self._spec().vocab_size), dtype=np.float64)
        n, total = 0, 0.0
        for batch in self._pages(["id", self._lex, "dl", "avgdl"]):
            df = df + _presence(self._stored_tf(batch))
            n += len(batch)
            total += float(sum(float(r["dl"]) for r in batch))
        self._df, self._n_docs, self._total_len = df, n, total
        self._write_stats()

    def _bm25_idf(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted term ids, their IDF) over the terms present in the corpus."""
        if self._idf is None:
            df = self._df.tocsr()
            df.eliminate_zeros()
            df.sort_indices()
            self._idf = (df.indices.astype(np.int64), bm25_idf(df.data, self._n_docs, self._bm25()))
        return self._idf

    def _bm25(self) -> BM25Params:
        return self._spec().bm25 or BM25Params()

    @property
    def _avgdl(self) -> float:
        return self._total_len / self._n_docs if self._n_docs else 1.0

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
        rows: list[dict[str, Any]] = [
            {"id": i, "text": t, "metadata": m, "dense": v}
            for i, t, m, v in zip(ids, batch.texts, batch.metadatas, batch.dense, strict=True)
        ]
        if batch.colbert is not None and batch.colbert_offsets is not None:
            packed, offsets, scales = batch.colbert, batch.colbert_offsets, batch.colbert_scales
            for r, a, b in zip(rows, offsets[:-1], offsets[1:], strict=True):
                r["colbert"] = codec.encode_blob(
                    packed[a:b], None if scales is None else scales[a:b]
                )
        stats = None
        if batch.lexical is not None:
            block = batch.lexical
            if spec.lexical == "bm25":
                block, stats = self._bm25_rows(ids, block, rows)
            for r, i in zip(rows, range(len(rows)), strict=True):
                r[self._lex] = codec.encode_sparse(block[i], spec.vocab_size)
        # everything is validated and encoded: now write, undoing what was written on failure
        existing = [r["id"] for r in self._fetch(ids, [])]
        old = {r["id"]: r for r in self._fetch(existing, ["*"])}
        if stats is not None:
            self._write_stats(dirty=True)
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
        if stats is not None:
            self._df, self._n_docs, self._total_len = stats
            self._write_stats()

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
            for start in range(0, len(new), self.batch_size):
                part = new[start : start + self.batch_size]
                self.client.delete(self.collection, filter=f"id in {str_list(part)}")
            back = [old[i] for i in written if i in old]
            for start in range(0, len(back), self.batch_size):
                self.client.upsert(self.collection, back[start : start + self.batch_size])
        finally:
            if self._spec().lexical == "bm25":
                self._recompute_stats()

    def _bm25_rows(
        self, ids: list[str], counts: sp.csr_matrix, rows: list[dict[str, Any]]
    ) -> tuple[sp.csr_matrix, tuple[sp.csr_matrix, int, float]]:
        """The stored BM25 document-side weights of ``counts`` (``dl``/``avgdl`` are set on
        ``rows``) and the corpus statistics once they replace any stored ``ids``; the
        backend's own statistics are not changed (the caller commits them after the write)."""
        df, n, total = self._forget(self._fetch(ids, ["dl", "avgdl"]))
        dl = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
        df = df + _presence(counts)
        n += len(ids)
        total += float(dl.sum())
        avgdl = total / n if n else 1.0
        doc_rows = np.repeat(np.arange(len(ids)), np.diff(counts.indptr))
        data = bm25_tf(counts.data, dl[doc_rows], avgdl, self._bm25()).astype(np.float32)
        for r, length in zip(rows, dl.tolist(), strict=True):
            r["dl"], r["avgdl"] = length, avgdl
        weights = sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)
        return weights, (df, n, total)

    def _forget(self, old: list[dict[str, Any]]) -> tuple[sp.csr_matrix, int, float]:
        """The BM25 statistics without stored rows ``old`` (with the lexical field, ``dl``,
        ``avgdl``): ``(df, n, total_len)``, new objects."""
        if not old:
            return self._df.copy(), self._n_docs, self._total_len
        tf = self._stored_tf(old)
        df = self._df - _presence(tf)
        total = self._total_len - float(sum(float(r["dl"]) for r in old))
        return df, self._n_docs - len(old), total

    def _stored_tf(self, rows: list[dict[str, Any]]) -> sp.csr_matrix:
        spec = self._spec()
        weights = codec.decode_sparse([r[self._lex] for r in rows], spec.vocab_size)
        dl = np.asarray([float(r["dl"]) for r in rows])
        written = np.asarray([float(r["avgdl"]) for r in rows])
        return codec.recover_tf(weights, dl, written, self._bm25())

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
        if spec.lexical == "bm25":
            stats = self._forget(found)
            self._write_stats(dirty=True)
        try:
            for start in range(0, len(ids), self.batch_size):
                part = ids[start : start + self.batch_size]
                self.client.delete(self.collection, filter=f"id in {str_list(part)}")
        except Exception:
            if spec.lexical == "bm25":
                self._recompute_stats()
            raise
        if spec.lexical == "bm25":
            self._df, self._n_docs, self._total_len = stats
            self._write_stats()

    # ---------------------------------------------------------------- reading
    def _fetch(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """Stored rows of ``ids`` (those that exist), with ``id``, the lexical field when
        there is a lexical leg, and ``fields``."""
        spec = self._spec()
        out_fields = ["id", *fields] + ([self._lex] if spec.lexical else [])
        found: list[dict[str, Any]] = []
        # keep replies far below gRPC limits
        step = 32 if "colbert" in fields or "*" in fields else 512
        for start in range(0, len(ids), step):
            part = list(ids[start : start + step])
            found += self.client.query(
                self.collection,
                filter=f"id in {str_list(part)}",
                output_fields=out_fields,
                limit=len(part),
            )
        return found

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
        ColBERT vectors come in the same reply and are scored too.
        """
        from pymilvus import AnnSearchRequest, RRFRanker

        spec = self._spec()
        expr = milvus_expr(flt)
        limit = min(int(n), MAX_TOPK)
        use_lex = spec.lexical is not None and lexical_query is not None
        dq = np.asarray(dense_query, np.float32).tolist()
        ip = {"metric_type": "IP"}
        reqs = [AnnSearchRequest([dq], "dense", ip, limit, expr=expr)]
        lex_q = None
        if use_lex and lexical_query is not None:
            lex_q = self._lexical_query(lexical_query)
            nz = {t: w for t, w in lex_q.items() if w > 0}  # every hit then scores > 0
            if nz:
                reqs.append(AnnSearchRequest([nz], self._lex, ip, limit, expr=expr))
        bound = min(len(reqs) * limit, MAX_TOPK)
        inline = colbert_query is not None and spec.colbert_dim and bound <= self.colbert_inline
        fields = ["id", "text", "metadata", "dense"]
        fields += ([self._lex] if spec.lexical else []) + (["colbert"] if inline else [])
        fields += ["dl", "avgdl"] if spec.lexical == "bm25" else []
        if len(reqs) == 1:
            res = self.client.search(
                self.collection,
                data=[dq],
                anns_field="dense",
                limit=limit,
                filter=expr,
                output_fields=fields,
                search_params=ip,
            )
        else:
            res = self.client.hybrid_search(
                self.collection, reqs, RRFRanker(), limit=bound, output_fields=fields
            )
        rows = [dict(h["entity"]) | {"id": h["id"]} for h in res[0]]
        if not rows:
            return Candidates.empty(use_lex)
        dense = np.asarray([r["dense"] for r in rows], dtype=np.float32)
        lexical = self._lexical_scores(rows, lex_q) if lex_q is not None else None
        if use_lex and lexical is None:
            lexical = np.zeros(len(rows), np.float32)
        colbert = None
        if inline and colbert_query is not None:
            colbert = self._colbert_of([r["colbert"] for r in rows], colbert_query)
        return Candidates(
            ids=[r["id"] for r in rows],
            dense=dense_scan(dense, dense_query),
            lexical=lexical,
            rows=np.arange(len(rows), dtype=np.int64),
            payload=[(r["id"], r["text"], r["metadata"] or {}) for r in rows],
            colbert=colbert,
        )

    def _lexical_query(self, query: Mapping[int, float]) -> dict[int, float]:
        """M3: the query weights. BM25: query term counts times IDF (the document side is
        stored)."""
        spec = self._spec()
        q = {int(t): float(w) for t, w in query.items() if 0 <= int(t) < spec.vocab_size}
        if spec.lexical == "bm25":
            terms, idf = self._bm25_idf()
            pos = np.searchsorted(terms, list(q))
            ok = pos < len(terms)
            ok[ok] = terms[pos[ok]] == np.asarray(list(q))[ok]
            q = {
                t: c * float(idf[p])
                for (t, c), p, hit in zip(q.items(), pos, ok, strict=True)
                if hit
            }
        return q

    def _lexical_scores(self, rows: list[dict[str, Any]], q: dict[int, float]) -> np.ndarray:
        spec = self._spec()
        if spec.lexical == "bm25":
            tf = self._stored_tf(rows)
            dl = np.asarray([float(r["dl"]) for r in rows])
            doc_rows = np.repeat(np.arange(len(rows)), np.diff(tf.indptr))
            w = bm25_tf(tf.data, dl[doc_rows], self._avgdl, self._bm25()).astype(np.float32)
            docs = sp.csr_matrix((w, tf.indices, tf.indptr), shape=tf.shape)
        else:
            docs = codec.decode_sparse([r[self._lex] for r in rows], spec.vocab_size)
        return sparse_dot_rows(docs, q)

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        """Fetch the candidates' ColBERT vectors and score them by MaxSim -> ``[c]``."""
        spec = self._spec()
        if not spec.colbert_dim:
            raise ValueError("this index has no ColBERT vectors")
        by_id = {r["id"]: r["colbert"] for r in self._fetch(cands.ids, ["colbert"])}
        return self._colbert_of([by_id.get(i, []) for i in cands.ids], query)

    def _colbert_of(self, blobs: list[Any], query: np.ndarray) -> np.ndarray:
        """MaxSim of ``query [q, dim]`` against stored ColBERT blobs -> ``[len(blobs)]``."""
        spec = self._spec()
        assert spec.colbert_dim
        dtype = np.dtype(spec.colbert_dtype)
        packed, offsets, scales = codec.decode_blobs(blobs, spec.colbert_dim, dtype)
        return colbert_scores_rows(query, packed, offsets, np.arange(len(blobs)), scales=scales)

    def select(self, flt: Filter) -> list[str]:
        """Ids of the stored documents passing the dict filter ``flt`` (paged)."""
        return [r["id"] for batch in self._pages(["id"], milvus_expr(flt)) for r in batch]

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
        if is_server(self.uri):  # a server pages consistently with its query iterator
            it = self.client.query_iterator(
                self.collection, batch_size=1000, filter=expr, output_fields=fields
            )
            yield from iter(it.next, [])
            return
        for start in itertools.count(0, 1000):  # Milvus Lite: offsets in a fixed order
            batch = self.client.query(
                self.collection, filter=expr, output_fields=fields, limit=1000, offset=start
            )
            if not batch:
                return
            yield batch

    def docs(self) -> Iterator[dict[str, Any]]:
        """Every stored document as ``{"id", "text", "metadata"}``, 1,000 rows per request."""
        for batch in self._pages(["id", "text", "metadata"]):
            for r in batch:
                yield {"id": r["id"], "text": r["text"], "metadata": r["metadata"] or {}}


def _presence(tf: sp.csr_matrix) -> sp.csr_matrix:
    """``[1, vocab]`` number of rows of ``tf`` holding each term (document frequencies)."""
    cols = tf.indices[tf.data > 0] if tf.nnz else tf.indices
    return sp.csr_matrix(
        (np.ones(len(cols)), (np.zeros(len(cols), dtype=np.int64), cols)),
        shape=(1, tf.shape[1]),
        dtype=np.float64,
    )

"""Qdrant backend: the same HybridRetriever over Qdrant, with all three legs run by the engine.

One collection per retriever. Each point holds three named vectors and a payload:

- ``dense``: the dense vector (dot product, HNSW index; ``exact=True`` searches it exactly);
- ``lexical``: a sparse vector, the M3 weights, or for BM25 the document side of BM25
  ``tf (k1+1) / (tf + k1 (1 - b + b dl/avgdl))`` with Qdrant's IDF modifier, so the engine
  scores BM25 itself;
- ``colbert``: the ColBERT multivector with the ``max_sim`` comparator and no HNSW graph
  (it only rescores), optionally on disk; with ``HybridRetriever(colbert_dtype="int8")``
  the stored values are the local engine's int8 codes dequantised and the engine keeps an
  int8 scalar-quantised copy in RAM; with ``colbert_dtype="binary"`` they are the
  ``±1 / sqrt(dim)`` vectors the local engine's sign bits stand for (float32: Qdrant has
  no 1-bit storage type) with a binary-quantised copy (1 bit per dimension) in RAM, and
  with ``colbert_dtype="rotated-binary"`` the same for its codes, searched with the rotated
  query (collections made with the former
  ``colbert_quantization="int8"`` switch keep their quantisation and still open);
- payload ``{"id", "text", "metadata"}`` (point ids are UUIDv5 of the document ids).

The collection's metadata records the index (``IndexSpec.to_json()`` and the collection
format, key ``m3_rag``) and the BM25 reference length (``m3_rag_bm25_avgdl``); reopening
checks the record with ``IndexSpec.check_stored``.

A search is one ``query_batch_points`` request (one round trip) of up to three queries over
the same two prefetches (dense top-``n`` and lexical top-``n``, both filtered): the union is
rescored by the dense vector (with the payload), by the lexical vector and by ColBERT
MaxSim. The retriever fuses these per-mode scores exactly as for every other backend
(Qdrant's own RRF ranks each prefetch list alone and returns one fused score, so it cannot
give ``SearchHit.scores`` nor the retriever's fusion over the union).

BM25 differs from the local engine's (rank-bm25 ``BM25Okapi``) in two documented ways:
Qdrant's IDF is ``ln(1 + (N - n + 0.5) / (n + 0.5))`` (always positive, no epsilon floor),
and ``avgdl`` is a reference length fixed when the collection receives its first documents
(``bm25_avgdl`` sets it), not the live mean. M3 lexical, dense and ColBERT scores equal the
local engine's.

Over 450 lines: the one-request search, the write with its rollback and the reopening
checks share the backend's connection and reference length.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag._inputs import check_count, check_flag, check_positive
from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.backends.qdrant.filters import metadata_path, qdrant_filter
from m3_rag.backends.qdrant.schema import (
    FORMATS,
    PAYLOAD_TYPES,
    check_payload,
    create_collection,
    point_id,
    record,
    to_points,
)
from m3_rag.backends.server import ServerEngine, check_record
from m3_rag.backends.validate import check_ids, prepare_batch
from m3_rag.codecs import get_codec
from m3_rag.filters import Filter

__all__ = ["COUNT_ABOVE", "QdrantBackend", "point_id"]

COUNT_ABOVE = 10_000
"""A search for more candidates than this first counts the collection and asks for at most
that many (a huge ``k`` or ``candidates`` would otherwise reach Qdrant as the reply size)."""


class QdrantBackend(ServerEngine):
    """Qdrant storage for a :class:`~m3_rag.HybridRetriever`.

    ``HybridRetriever(encoder, backend=QdrantBackend(url="http://localhost:6333"))`` creates
    the collection, or reconnects to it (reading only its configuration).

    Args:
        location: ``":memory:"`` (qdrant-client's local mode, in this process) or a URL.
        path: A directory for qdrant-client's local mode on disk (one process at a time).
        url: A Qdrant server, e.g. ``"http://localhost:6333"``.
        collection: Collection name.
        api_key: Server API key.
        client: An existing ``QdrantClient`` (instead of ``location``/``path``/``url``).
        prefer_grpc: Talk gRPC to a server.
        timeout: Seconds to wait for a server.
        batch_size: Points per upsert request.
        exact: Search the dense leg exactly (no HNSW), as the local engine does.
        colbert_on_disk: Keep the ColBERT vectors on disk (they are only read to rescore).
            Their precision is the retriever's ``colbert_dtype`` (``"int8"``: an int8
            scalar-quantised copy is kept in RAM; ``"binary"`` and ``"rotated-binary"``: the
            float32 values the codes stand for and a 1-bit copy in RAM).
        dense_on_disk: Keep the dense vectors on disk.
        indexed_fields: Metadata keys to index for filtering, ``{"lang": "keyword",
            "year": "integer"}`` (``"keyword"``, ``"integer"``, ``"float"``, ``"bool"``).
        bm25_avgdl: BM25 reference document length; default: the mean length of the first
            documents added (recorded in the collection).

    Raises:
        ImportError: qdrant-client is missing (``pip install 'm3-rag[qdrant]'``).
        TypeError: an option of the wrong type (``batch_size=True``, ``timeout="x"``,
            ``exact="no"``), naming it.
        ValueError: not exactly one of ``location``, ``path``, ``url``, ``client``; an
            option out of range (``batch_size=0``, an empty ``indexed_fields`` key...).
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        collection: str = "m3_rag",
        api_key: str | None = None,
        client: Any = None,
        prefer_grpc: bool = False,
        timeout: float = 30,
        batch_size: int = 256,
        exact: bool = False,
        colbert_on_disk: bool = True,
        dense_on_disk: bool = False,
        indexed_fields: Mapping[str, str] | None = None,
        bm25_avgdl: float | None = None,
    ) -> None:
        given = [x for x in (location, path, url, client) if x is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of location=':memory:', path=DIR, url=URL or client=; "
                f"got {len(given)}"
            )
        for name, value in (("location", location), ("path", path), ("url", url)):
            if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value)):
                raise TypeError(f"{name} must be a non-empty str, got {value!r}")
        if not isinstance(collection, str):
            raise TypeError(f"collection must be a str, got {type(collection).__name__}")
        if not collection or "/" in collection:
            raise ValueError(f"collection must be a non-empty name without '/', got {collection!r}")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
        batch_size = check_count(batch_size, "batch_size", minimum=1)
        timeout = check_positive(timeout, "timeout")
        prefer_grpc = check_flag(prefer_grpc, "prefer_grpc")
        exact = check_flag(exact, "exact")
        colbert_on_disk = check_flag(colbert_on_disk, "colbert_on_disk")
        dense_on_disk = check_flag(dense_on_disk, "dense_on_disk")
        fields = _check_indexed_fields(indexed_fields)
        if bm25_avgdl is not None and (
            isinstance(bm25_avgdl, bool)
            or not isinstance(bm25_avgdl, (int, float))
            or not math.isfinite(bm25_avgdl)
            or bm25_avgdl <= 0
        ):
            raise ValueError(f"bm25_avgdl must be a positive number, got {bm25_avgdl!r}")
        self.location, self.url, self.collection = location, url, collection
        self.path = None if path is None else str(path)
        self._connect = {"api_key": api_key, "prefer_grpc": prefer_grpc, "timeout": timeout}
        self._client: Any = client
        self.batch_size, self.exact = batch_size, exact
        self.colbert_on_disk = colbert_on_disk
        self.dense_on_disk, self.indexed_fields = dense_on_disk, fields
        self.spec: IndexSpec | None = None
        self._avgdl: float | None = None if bm25_avgdl is None else float(bm25_avgdl)

    def __repr__(self) -> str:
        where = self.url or self.path or self.location or "client"
        return f"QdrantBackend({where!r}, collection={self.collection!r})"

    # ---------------------------------------------------------------- connection / schema
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from qdrant_client import QdrantClient
            except ImportError as e:
                raise ImportError(
                    "the Qdrant backend needs qdrant-client: pip install 'm3-rag[qdrant]'"
                ) from e
            kw: dict[str, Any] = dict(self._connect)
            if self.url is None and (self.path is not None or self.location == ":memory:"):
                kw = {}  # local mode takes no server options
            try:
                self._client = QdrantClient(
                    location=self.location, path=self.path, url=self.url, **kw
                )
            except Exception as e:
                if self.path is not None:  # local storage: a bad or locked directory
                    raise ValueError(
                        f"cannot open qdrant-client's local storage at {self.path!r}: {e}"
                    ) from e
                raise ConnectionError(f"cannot open Qdrant at {self!r}: {e}") from e
        return self._client

    def open(
        self,
        spec: IndexSpec,
        settings: Mapping[str, Any] | None = None,
        *,
        allow_model_mismatch: bool = False,
    ) -> QdrantBackend:
        """Create the collection for ``spec``, or check an existing one.

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
        self._check_rebind(spec)
        if spec.vocab_size > 2**32:
            raise ValueError("Qdrant sparse vectors hold term ids below 2**32")
        client = self.client  # a bad local directory raises its own ValueError
        try:
            exists = client.collection_exists(self.collection)
        except Exception as e:
            raise ConnectionError(f"cannot reach Qdrant at {self!r}: {e}") from e
        if exists:
            meta = self.client.get_collection(self.collection).config.metadata or {}
            if "m3_rag" not in meta:
                raise self._foreign()
            check_record(
                meta["m3_rag"],
                spec,
                self.collection,
                FORMATS,
                allow_model_mismatch=allow_model_mismatch,
            )
            stored = meta.get("m3_rag_bm25_avgdl")
            if stored is not None and self._avgdl not in (None, float(stored)):
                raise ValueError(
                    f"collection {self.collection!r} has the BM25 reference length {stored}; "
                    f"drop bm25_avgdl={self._avgdl} or use another collection"
                )
            if stored is not None:
                self._avgdl = float(stored)
        else:
            self._create(spec)
        self.spec = spec
        return self

    def _create(self, spec: IndexSpec) -> None:
        meta: dict[str, Any] = {"m3_rag": record(spec)}
        if self._avgdl is not None:
            meta["m3_rag_bm25_avgdl"] = self._avgdl
        create_collection(
            self.client,
            self.collection,
            spec,
            meta,
            dense_on_disk=self.dense_on_disk,
            colbert_on_disk=self.colbert_on_disk,
            indexed_fields=self.indexed_fields,
        )

    def drop(self) -> None:
        """Delete the collection (all documents are lost)."""
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)
        self.spec = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def save(self, path: Any, settings: Any = None) -> None:
        """Refused: the collection persists in Qdrant by itself."""
        raise ValueError(
            f"{self!r} persists in Qdrant; reopen it with "
            "HybridRetriever(encoder, backend=QdrantBackend(..., collection=...))"
        )

    def __len__(self) -> int:
        self._spec()
        return int(self.client.count(self.collection, exact=True).count)

    # ---------------------------------------------------------------- mutation
    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        dense: np.ndarray,
        lexical: Sequence[Mapping[int, float]] | sp.csr_matrix | None,
        colbert: Sequence[np.ndarray] | None,
    ) -> None:
        """Add or replace documents (upsert by id), ``batch_size`` points per request.

        Every row of every request is validated and encoded before the first write (the
        batch with :func:`~m3_rag.backends.validate.prepare_batch`, then what a payload
        can hold: :meth:`check_documents`). A request Qdrant refuses rolls back the earlier
        requests of this call (new points deleted, replaced ones restored), so nothing
        already stored is lost.
        """
        spec = self._spec()
        batch = prepare_batch(spec, ids, texts, metadatas, dense, lexical, colbert)
        self.check_documents(batch.ids, batch.texts, batch.metadatas)
        block = batch.lexical  # [m, vocab]: M3 weights or BM25 term counts
        bm25 = spec.lexical == "bm25" and block is not None
        meta: dict[str, Any] = {}
        if bm25 and self._avgdl is None:  # another writer may have set it
            meta = dict(self.client.get_collection(self.collection).config.metadata or {})
            stored = meta.get("m3_rag_bm25_avgdl")
            self._avgdl = None if stored is None else float(stored)
        avgdl, new_avgdl = self._avgdl, None
        if bm25 and block is not None and avgdl is None:  # the first documents set it
            dl = np.asarray(block.sum(axis=1), dtype=np.float64)
            avgdl = new_avgdl = float(dl.mean()) if len(dl) and dl.mean() > 0 else 1.0
        points = to_points(spec, batch, avgdl)
        # validated and encoded: now write, undoing what was written on failure
        pids: list[Any] = [p.id for p in points]
        old = {r.id: r for r in self._retrieve(pids, vectors=True)}
        if new_avgdl is not None:
            meta["m3_rag_bm25_avgdl"] = new_avgdl  # the collection's metadata, read above
            self.client.update_collection(self.collection, metadata=meta)
            self._avgdl = new_avgdl
        done = 0
        try:
            for start in range(0, len(points), self.batch_size):
                self.client.upsert(
                    self.collection, points[start : start + self.batch_size], wait=True
                )
                done = min(start + self.batch_size, len(points))
        except Exception as e:
            self._rollback(pids[:done], old)
            raise RuntimeError(
                f"Qdrant refused the write of documents {done}.."
                f"{min(done + self.batch_size, len(points)) - 1} ({type(e).__name__}: {e}); "
                f"the {done} documents written before were rolled back"
            ) from e

    def check_documents(
        self, ids: Sequence[str], texts: Sequence[str], metadatas: Sequence[dict[str, Any]]
    ) -> None:
        """Refuse documents a Qdrant payload cannot hold (before anything is encoded or
        written): metadata with an integer outside int64, NaN or infinity, or values JSON
        cannot encode.

        Raises:
            ValueError: naming the first bad document.
        """
        for i, m in enumerate(metadatas):
            check_payload(m, f"metadatas[{i}]")

    def _rollback(self, written: list[Any], old: dict[Any, Any]) -> None:
        from qdrant_client import models

        new = [i for i in written if i not in old]
        if new:
            self.client.delete(self.collection, models.PointIdsList(points=list(new)), wait=True)
        rewritten = set(written)
        back = [
            models.PointStruct(id=r.id, vector=r.vector, payload=r.payload)
            for i, r in old.items()
            if i in rewritten
        ]
        for start in range(0, len(back), self.batch_size):
            self.client.upsert(self.collection, back[start : start + self.batch_size], wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents; unknown ids raise ``KeyError`` and nothing is removed."""
        from qdrant_client import models

        self._spec()
        ids = check_ids(ids)
        if not ids:
            return
        found = {r.payload["id"] for r in self._retrieve([point_id(i) for i in ids])}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"unknown ids: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        pids: list[Any] = [point_id(i) for i in ids]
        for start in range(0, len(pids), self.batch_size):
            part = pids[start : start + self.batch_size]
            self.client.delete(self.collection, models.PointIdsList(points=part), wait=True)

    # ---------------------------------------------------------------- reading
    def _retrieve(self, pids: Sequence[Any], vectors: bool = False) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(pids), 1024):
            out += self.client.retrieve(
                self.collection,
                list(pids[start : start + 1024]),
                with_payload=True,
                with_vectors=vectors,
            )
        return out

    def _lexical_vector(self, query: Mapping[int, float]) -> Any:
        """The query's sparse vector (M3 weights, or BM25 term counts the IDF modifier
        weighs), or ``None`` when it has no usable term."""
        from qdrant_client import models

        spec = self._spec()
        q = {
            int(t): float(w)
            for t, w in query.items()
            if 0 <= int(t) < spec.vocab_size and float(w) > 0
        }
        if not q:
            return None
        return models.SparseVector(indices=list(q), values=list(q.values()))

    def candidates(
        self,
        dense_query: np.ndarray,
        lexical_query: Mapping[int, float] | None,
        n: int,
        flt: Filter = None,
        *,
        colbert_query: np.ndarray | None = None,
    ) -> Candidates:
        """Dense and lexical top-``n`` (filtered), their union rescored by every leg: one
        ``query_batch_points`` request (plus one count when ``n`` exceeds
        :data:`COUNT_ABOVE`: ``n`` is capped at the collection's size)."""
        from qdrant_client import models

        spec = self._spec()
        qf = qdrant_filter(flt)
        n = int(n)
        use_lex = spec.lexical is not None and lexical_query is not None
        if n > COUNT_ABOVE:  # never let the server size a reply by k (some versions abort)
            n = min(n, len(self))  # one count: at most every document counted now
            if n == 0:
                return Candidates.empty(use_lex)
        dq = np.asarray(dense_query, np.float32).tolist()
        params = models.SearchParams(exact=True) if self.exact else None
        legs = [models.Prefetch(query=dq, using="dense", limit=n, filter=qf, params=params)]
        lq = self._lexical_vector(lexical_query) if use_lex and lexical_query else None
        if lq is not None:
            legs.append(models.Prefetch(query=lq, using="lexical", limit=n, filter=qf))
        use_colbert = colbert_query is not None and spec.colbert_dim is not None
        union = len(legs) > 1 or use_colbert

        def request(query: Any, using: str, payload: bool) -> Any:
            return models.QueryRequest(
                prefetch=legs if union else None,
                query=query,
                using=using,
                limit=len(legs) * n,
                filter=qf,
                params=None if union else params,
                with_payload=["id", "text", "metadata"] if payload else False,
            )

        reqs = [request(dq, "dense", True)]
        if lq is not None:
            reqs.append(request(lq, "lexical", False))
        if use_colbert:
            cq = self._colbert_query(spec, colbert_query)  # type: ignore[arg-type]
            reqs.append(request(cq.tolist(), "colbert", False))
        replies = self.client.query_batch_points(self.collection, reqs)
        points = replies[0].points
        if not points:
            return Candidates.empty(use_lex)
        ids = [p.payload["id"] for p in points]
        position = {p.id: i for i, p in enumerate(points)}

        def scores(reply: Any, scale: float = 1.0) -> np.ndarray:
            out = np.zeros(len(points), dtype=np.float32)  # absent: no shared term -> 0
            for p in reply.points:
                if p.id in position:
                    out[position[p.id]] = p.score / scale
            return out

        lexical = None
        if use_lex:
            lexical = scores(replies[1]) if lq is not None else np.zeros(len(ids), np.float32)
        colbert = None
        if use_colbert:  # Qdrant's MaxSim sums over query vectors; BGE-M3 takes the mean
            colbert = scores(replies[-1], float(len(colbert_query)))  # type: ignore[arg-type]
        return Candidates(
            ids=ids,
            dense=np.asarray([p.score for p in points], dtype=np.float32),
            lexical=lexical,
            rows=np.arange(len(ids), dtype=np.int64),
            payload=[(p.payload["id"], p.payload["text"], p.payload["metadata"]) for p in points],
            colbert=colbert,
        )

    @staticmethod
    def _colbert_query(spec: IndexSpec, query: np.ndarray) -> np.ndarray:
        """The ColBERT query in the space of the stored values (``float_query`` of the
        index's codec: the query itself, or rotated for rotated-binary codes)."""
        return get_codec(spec.colbert_dtype).float_query(query, int(spec.colbert_dim or 0))

    def colbert_scores(self, query: np.ndarray, cands: Candidates) -> np.ndarray:
        """ColBERT MaxSim of the candidates -> ``[c]``, one request restricted to them (the
        retriever calls it only when ``candidates`` did not score them already)."""
        from qdrant_client import models

        spec = self._spec()
        if not spec.colbert_dim:
            raise ValueError("this index has no ColBERT vectors")
        q = self._colbert_query(spec, query)
        pids: list[Any] = [point_id(i) for i in cands.ids]
        res = self.client.query_points(
            self.collection,
            query=q.tolist(),
            using="colbert",
            query_filter=models.Filter(must=[models.HasIdCondition(has_id=pids)]),
            limit=len(pids),
            with_payload=False,
        )
        by_pid = {p.id: p.score / len(q) for p in res.points}
        return np.asarray([by_pid.get(p, 0.0) for p in pids], dtype=np.float32)

    def select(self, flt: Filter) -> list[str]:
        """Ids of the stored documents passing the dict filter ``flt`` (paged scroll)."""
        return [p.payload["id"] for page in self._scroll(qdrant_filter(flt), ["id"]) for p in page]

    def fetch(self, ids: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
        """Stored documents among ``ids``, in the order of ``ids``."""
        self._spec()
        by_id = {r.payload["id"]: r.payload for r in self._retrieve([point_id(i) for i in ids])}
        return [
            (i, by_id[i]["text"], copy.deepcopy(by_id[i]["metadata"])) for i in ids if i in by_id
        ]

    def _scroll(self, qf: Any, fields: list[str]) -> Iterator[list[Any]]:
        self._spec()
        offset = None
        while True:
            page, offset = self.client.scroll(
                self.collection, scroll_filter=qf, limit=1000, offset=offset, with_payload=fields
            )
            if page:
                yield page
            if offset is None:
                return

    def docs(self) -> Iterator[dict[str, Any]]:
        """Every stored document as ``{"id", "text", "metadata"}``, 1,000 per request."""
        for page in self._scroll(None, ["id", "text", "metadata"]):
            for p in page:
                yield {
                    "id": p.payload["id"],
                    "text": p.payload["text"],
                    "metadata": p.payload["metadata"],
                }


def _check_indexed_fields(indexed_fields: Any) -> dict[str, str]:
    """``{metadata key: payload index type}``: non-empty str keys Qdrant can address."""
    if indexed_fields is None:
        return {}
    if not isinstance(indexed_fields, Mapping):
        raise TypeError("indexed_fields must be a dict {metadata key: 'keyword' | ...}")
    fields = dict(indexed_fields)
    for key, kind in fields.items():
        if not isinstance(key, str):
            raise TypeError(f"indexed_fields keys must be metadata keys (str), got {key!r}")
        if not key:
            raise ValueError("indexed_fields has an empty key: name the metadata key to index")
        if kind not in PAYLOAD_TYPES:
            raise ValueError(f"indexed_fields[{key!r}] must be one of {PAYLOAD_TYPES}")
        metadata_path(key)
    return fields

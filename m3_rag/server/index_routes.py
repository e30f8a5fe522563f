"""The served index: ``/v1/search``, ``POST /v1/documents`` (add or replace) and
``DELETE /v1/documents``, over :class:`~m3_rag.HybridRetriever` with the index's usual
guarantees (a request is one commit: all of it or nothing)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from m3_rag.indexing import ADD_CHUNK
from m3_rag.retriever import HybridRetriever
from m3_rag.server.errors import ApiError
from m3_rag.server.schemas import DeleteRequest, DocumentsRequest, SearchRequest
from m3_rag.server.state import ServerState, blocking

__all__ = ["register"]


def _safe(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def _index(state: ServerState) -> HybridRetriever:
    if state.retriever is None:
        raise ApiError(404, "this server serves no index: start it with --index DIR")
    return state.retriever


def register(app: Any, state: ServerState) -> None:
    from fastapi.responses import Response

    def _json(body: Any) -> Response:
        raw = json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8")
        return Response(raw, media_type="application/json")

    @app.post("/v1/search")
    async def search(req: SearchRequest) -> Response:
        """Top-``k`` hits of the served index, with per-mode scores."""
        r = _index(state)
        if len(req.query) > state.config.max_chars:
            raise ApiError(413, f"query is over {state.config.max_chars} characters")
        hits = await blocking(
            r.search,
            req.query,
            req.k,
            req.filter,
            weights=req.weights,
            fusion=req.fusion,
            candidates=req.candidates,
            rerank=req.rerank,
        )
        return _json(
            {
                "hits": [
                    {
                        "id": h.id,
                        "text": h.text,
                        "metadata": h.metadata,
                        "score": _safe(h.score),
                        "scores": {m: _safe(s) for m, s in h.scores.items()},
                    }
                    for h in hits
                ]
            }
        )

    @app.post("/v1/documents")
    async def add_documents(req: DocumentsRequest) -> Response:
        """Add documents (an existing id is replaced); one commit."""
        r = _index(state)
        docs = req.documents
        limit = min(state.config.max_texts, ADD_CHUNK)
        if len(docs) > limit:
            raise ApiError(
                413, f"{len(docs)} documents: send at most {limit} per request (one commit each)"
            )
        state.check_texts([d.text for d in docs], "documents")
        ids = [d.id if d.id is not None else uuid.uuid4().hex for d in docs]
        added = await blocking(r.add_texts, [d.text for d in docs], [d.metadata for d in docs], ids)
        return _json({"ids": added, "count": len(added)})

    @app.delete("/v1/documents")
    async def delete_documents(req: DeleteRequest) -> Response:
        """Delete documents by id (an unknown id is a 404 and nothing is deleted, unless
        ``missing_ok``)."""
        r = _index(state)
        if not req.ids:
            raise ApiError(400, "ids is empty: send the ids to delete")
        if len(req.ids) > state.config.max_texts:
            raise ApiError(413, f"{len(req.ids)} ids: send at most {state.config.max_texts}")
        n = await blocking(r.delete, req.ids, missing_ok=req.missing_ok)
        return _json({"deleted": n})

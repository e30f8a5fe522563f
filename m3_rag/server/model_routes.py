"""The model's routes: ``/v1/embeddings`` (OpenAI), ``/v1/encode`` (the three outputs),
``/v1/rerank``, and what describes the server: ``/health``, ``/metrics``, ``/v1/models``,
``/v1/tokenizer``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m3_rag.server.errors import ApiError
from m3_rag.server.schemas import EmbeddingsRequest, EncodeRequest, RerankRequest
from m3_rag.server.state import ServerState, blocking, wait
from m3_rag.server.wire import embeddings_body, encode_body

__all__ = ["register"]


def _json(body: Any, status: int = 200) -> Any:
    from fastapi.responses import Response

    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=False).encode("utf-8")
    return Response(raw, status_code=status, media_type="application/json")


def model_info(state: ServerState) -> dict[str, Any]:
    enc, cfg = state.encoder, state.config
    return {
        "id": enc.model_name,
        "object": "model",
        "owned_by": "m3-rag",
        "dense_dim": enc.dense_dim,
        "colbert_dim": enc.colbert_dim,
        "vocab_size": enc.vocab_size,
        "has_sparse": enc.has_sparse,
        "has_colbert": enc.has_colbert,
        "max_length": enc.max_length,
        "query_max_length": enc.query_max_length,
        "batch_size": enc.batch_size,
        "reranker": None if state.reranker is None else state.reranker.model_name,
        "index": state.retriever is not None,
        "limits": {
            "max_texts": cfg.max_texts,
            "max_chars": cfg.max_chars,
            "max_body_bytes": cfg.max_body_bytes,
        },
    }


def _tokenizer_json(tokenizer: Any) -> str:
    """``tokenizer.json`` without the truncation and padding the encoder's last call left
    set on the tokenizer (a client sets its own)."""
    raw = json.loads(tokenizer.backend_tokenizer.to_str())
    raw["truncation"] = raw["padding"] = None
    return json.dumps(raw, ensure_ascii=False)


def register(app: Any, state: ServerState) -> None:
    from fastapi.responses import PlainTextResponse, Response

    @app.get("/health")
    async def health() -> Response:
        """Model loaded, index size, requests in progress."""
        index = None
        if state.retriever is not None:
            n = await blocking(len, state.retriever)
            index = {"path": str(state.index_path), "documents": n}
        return _json(
            {
                "status": "ok",
                "model": state.encoder.model_name,
                "reranker": None if state.reranker is None else state.reranker.model_name,
                "index": index,
                "queue_depth": state.batcher.depth,
            }
        )

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text."""
        gauges: dict[str, tuple[str, float]] = {
            "m3rag_queue_depth": ("Model requests in progress.", state.batcher.depth),
            "m3rag_queue_jobs": ("Jobs waiting for the model worker.", state.batcher.queued),
            "m3rag_queue_limit": ("Model requests admitted at once.", state.config.max_queue),
        }
        if state.retriever is not None:
            n = await blocking(len, state.retriever)
            gauges["m3rag_index_documents"] = ("Documents in the served index.", n)
        return PlainTextResponse(
            state.metrics.render(gauges), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models() -> Response:
        """The served model and its settings (OpenAI's model list, with M3's fields)."""
        return _json({"object": "list", "data": [model_info(state)]})

    @app.get("/v1/tokenizer")
    async def tokenizer() -> Response:
        """The model's ``tokenizer.json``."""
        if state.tokenizer_json is None:
            state.tokenizer_json = await blocking(_tokenizer_json, state.encoder.tokenizer)
        return Response(state.tokenizer_json, media_type="application/json")

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest) -> Response:
        """OpenAI-compatible dense embeddings."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        state.check_texts(texts)
        if req.dimensions is not None and req.dimensions != state.encoder.dense_dim:
            raise ApiError(
                400,
                f"dimensions={req.dimensions}: this model's vectors have "
                f"{state.encoder.dense_dim} dimensions (leave dimensions out)",
            )
        job = state.batcher.encode(texts, "document", None, True, False, False, wake=False)
        out = await wait(job, state.batcher)
        body = await blocking(embeddings_body, out, state.encoder.model_name, req.encoding_format)
        return _json(body)

    @app.post("/v1/encode")
    async def encode(req: EncodeRequest) -> Response:
        """Dense vectors, lexical weights and ColBERT vectors, as ``encode_queries`` /
        ``encode_documents`` in-process."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        state.check_texts(texts)
        sparse, colbert = (
            state.want("sparse", req.return_sparse),
            state.want("colbert", req.return_colbert),
        )
        if not (req.return_dense or sparse or colbert):
            raise ApiError(400, "nothing to return: ask for dense, sparse or colbert")
        job = state.batcher.encode(
            texts, req.role, req.max_length, req.return_dense, sparse, colbert, wake=False
        )
        out = await wait(job, state.batcher)
        body = await blocking(
            encode_body, out, state.encoder.model_name, req.dense_format, req.colbert_format
        )
        return _json(body)

    @app.post("/v1/rerank")
    async def rerank(req: RerankRequest) -> Response:
        """Cohere/Jina-style rerank: results best first."""
        if state.reranker is None:
            raise ApiError(404, "this server has no reranker: start it with --reranker")
        state.check_texts(req.documents, "documents")
        if len(req.query) > state.config.max_chars:
            raise ApiError(413, f"query is over {state.config.max_chars} characters")
        job = state.batcher.rerank([(req.query, d) for d in req.documents], wake=False)
        scores = await wait(job, state.batcher)
        if req.normalize:
            scores = 1.0 / (1.0 + np.exp(-scores))
        order = np.argsort(-scores, kind="stable")
        if req.top_n is not None:
            order = order[: req.top_n]
        results = []
        for i in order.tolist():
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if req.return_documents:
                item["document"] = {"text": req.documents[i]}
            results.append(item)
        return _json({"model": state.reranker.model_name, "results": results})

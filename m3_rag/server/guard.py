"""The ASGI layer in front of the routes: API key, admission (503 when full), body size and
read timeout, and per-route metrics. Written against ASGI itself, so a request refused here
is refused before its body is read."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from m3_rag.server.batching import Batcher
from m3_rag.server.config import ServerConfig
from m3_rag.server.errors import error_body
from m3_rag.server.metrics import Metrics

__all__ = ["MODEL_ROUTES", "ROUTES", "Guard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/tokenizer",
    "/v1/embeddings",
    "/v1/encode",
    "/v1/rerank",
    "/v1/search",
    "/v1/documents",
    "/openapi.json",
)
MODEL_ROUTES = {
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/encode"),
    ("POST", "/v1/rerank"),
    ("POST", "/v1/search"),
    ("POST", "/v1/documents"),
    ("DELETE", "/v1/documents"),
}
CLIENT_GONE = 499  # nginx's code for a client that closed the connection first


class _Disconnected(Exception):
    pass


class Guard:
    """Wraps the FastAPI app.

    Args:
        app: The routes.
        config: Limits and the API key.
        batcher: Admission to the model routes.
        metrics: Where each request is counted.
    """

    def __init__(
        self, app: ASGIApp, config: ServerConfig, batcher: Batcher, metrics: Metrics
    ) -> None:
        self.app, self.config, self.batcher, self.metrics = app, config, batcher, metrics
        self._key = None if config.api_key is None else config.api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        route = path if path in ROUTES else "other"
        status = [CLIENT_GONE]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, send_status, path, method)
        finally:
            self.metrics.observe_request(route, method, status[0], time.perf_counter() - start)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, path: str, method: str
    ) -> None:
        if self._key is not None and path != "/health" and not self._authorized(scope):
            await _reply(
                send,
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                {"www-authenticate": "Bearer"},
            )
            return
        ticket = None
        if (method, path) in MODEL_ROUTES:
            ticket = self.batcher.admit()
            if ticket is None:
                await _reply(
                    send,
                    503,
                    f"the server has {self.config.max_queue} requests in progress (its limit); "
                    "retry after the Retry-After seconds",
                    {"retry-after": "1"},
                )
                return
        try:
            try:
                body = await self._read_body(scope, receive)
            except _Disconnected:
                return
            except _TooLarge:
                await _reply(
                    send, 413, f"the body is over {self.config.max_body_bytes} bytes, the limit"
                )
                return
            except TimeoutError:
                await _reply(
                    send, 408, f"the body took over {self.config.body_timeout_s:g} s to arrive"
                )
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if body:  # every body is JSON, whatever Content-Type says (curl -d sends a form's)
                headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            await self.app(scope, replay, send)
        finally:
            if ticket is not None:
                self.batcher.release(ticket)

    def _authorized(self, scope: Scope) -> bool:
        assert self._key is not None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.config.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)


class _TooLarge(Exception):
    pass


async def _reply(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = error_body(status, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

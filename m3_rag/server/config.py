"""The server's limits and batching knobs (read from ``M3_RAG_SERVE_*`` environment
variables by ``m3-rag serve``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "M3_RAG_SERVE_"


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts and how it batches.

    Attributes:
        max_queue: Requests to the model routes (``/v1/embeddings``, ``/v1/encode``,
            ``/v1/rerank``, ``/v1/search``, ``/v1/documents``) admitted at once: being read,
            waiting for the model or running. One more is answered ``503`` with
            ``Retry-After`` before its body is read (nothing of it is done).
        max_wait_ms: How long the model worker waits for more requests to merge into a batch,
            and only while admitted requests have not handed in their texts yet (a lone
            request never waits).
        max_batch_tokens: Token bound of one merged model call (estimated from characters:
            ``min(max_length, chars + 2)`` per text; the first request is always taken) and of
            each forward pass (the encoder's ``max_tokens_per_batch``, padding included).
        max_body_bytes: Largest request body (``413`` beyond it).
        max_texts: Texts per request (``input``, ``documents``, ids); ``/v1/documents`` takes
            at most 256 documents per request, so that a request is one commit.
        max_chars: Characters per text.
        body_timeout_s: Seconds a client may take to send its body (``408`` after).
        api_key: When set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    """

    max_queue: int = 64
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    max_body_bytes: int = 16 << 20
    max_texts: int = 2048
    max_chars: int = 65536
    body_timeout_s: float = 30.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError("api_key must be a non-empty str or None")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < (0 if f.name == "max_wait_ms" else 1):
                raise ValueError(f"{f.name} must be a finite number >= 1, got {value!r}")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """The defaults, overridden by ``M3_RAG_SERVE_MAX_QUEUE``, ``..._MAX_WAIT_MS``,
        ``..._MAX_BATCH_TOKENS``, ``..._MAX_BODY_BYTES``, ``..._MAX_TEXTS``,
        ``..._MAX_CHARS`` and ``..._BODY_TIMEOUT_S``.

        Raises:
            ValueError: a variable that is not a number in range (the message names it).
        """
        env = os.environ if environ is None else environ
        config = cls()
        changes: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "api_key":
                continue
            var = ENV_PREFIX + f.name.upper()
            text = env.get(var)
            if text is None or not text.strip():
                continue
            try:
                value: int | float = int(text) if f.type in ("int", int) else float(text)
            except ValueError:
                kind = "an integer" if f.type in ("int", int) else "a number"
                raise ValueError(f"{var} must be {kind}, got {text!r}") from None
            changes[f.name] = value
        try:
            return replace(config, **changes)
        except ValueError as e:
            raise ValueError(f"{ENV_PREFIX}*: {e}") from None

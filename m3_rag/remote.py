"""A model served by ``m3-rag serve``, used like one in this process.

:class:`RemoteEncoder` satisfies :class:`m3_rag.Encoder` (the retriever, the encode cache and
the LangChain / LlamaIndex adapters take it as they take an :class:`~m3_rag.M3Encoder`), and
:class:`RemoteReranker` satisfies :class:`m3_rag.CrossEncoder`. The model's settings are read
once, at construction (``GET /v1/models``); the tokenizer (the BM25 leg's, with
``lexical="bm25"`` and ``analyzer="model"``) on first use (``GET /v1/tokenizer``).
Arrays travel as base64 float32, so the vectors are the server's, bit for bit.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from m3_rag._inputs import check_count, check_pairs, check_texts
from m3_rag._pairs import PairScoring
from m3_rag.encoder import EncodeOutput
from m3_rag.rerank import RerankResult, check_rerank_input, ranked

__all__ = [
    "RemoteEncoder",
    "RemoteError",
    "RemoteReranker",
    "decode_array",
    "encode_array",
]

_DTYPES = {"float32": "<f4", "float16": "<f2"}


def encode_array(arr: np.ndarray, dtype: str = "float32") -> str:
    """An array's values as base64 of little-endian ``dtype`` (``float32`` or ``float16``),
    row-major; OpenAI's ``encoding_format="base64"`` for ``float32``."""
    data = np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes()
    return base64.b64encode(data).decode("ascii")


def decode_array(text: str, dtype: str = "float32", width: int | None = None) -> np.ndarray:
    """The inverse of :func:`encode_array`: float32 values, ``[n, width]`` when ``width``."""
    arr = np.frombuffer(base64.b64decode(text), dtype=_DTYPES[dtype]).astype(np.float32)
    return arr if width is None else arr.reshape(-1, width)


class RemoteError(RuntimeError):
    """The server failed or could not be reached (its message says which). Bad input is a
    ``ValueError``, a wrong API key a ``PermissionError``."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Client:
    """One HTTP connection pool to a server, with its API key, retries on 503."""

    def __init__(
        self, url: str, api_key: str | None, timeout: float, retries: int, client: Any = None
    ) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(
                f"url must be an http(s) URL like 'http://127.0.0.1:8000', got {url!r}"
            )
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = check_count(retries, "retries", 0)
        self.http = client or httpx.Client(timeout=timeout, headers=headers)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, self.url + path, json=body)
            except httpx.HTTPError as e:
                raise RemoteError(f"cannot reach {self.url}: {type(e).__name__}: {e}") from None
            if resp.status_code == 503 and attempt < self.retries:
                time.sleep(min(float(resp.headers.get("retry-after", "1") or 1), 10.0))
                continue
            break
        if resp.status_code >= 400:
            message = _error_message(resp)
            where = f"{method} {self.url}{path}: {resp.status_code}"
            if resp.status_code == 401:
                raise PermissionError(f"{where}: {message}")
            if resp.status_code in (400, 404, 413, 422):
                raise ValueError(f"{where}: {message}")
            raise RemoteError(f"{where}: {message}", resp.status_code)
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text

    def close(self) -> None:
        self.http.close()


def _error_message(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:500]


class _RemoteTokenizer:
    """The server's tokenizer (``tokenizer.json`` fetched on first use) as a Hugging Face
    fast tokenizer: calling it, and any attribute, goes to that tokenizer."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._tok: Any = None

    def _load(self) -> Any:
        if self._tok is None:
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            text = self._client.request("GET", "/v1/tokenizer")
            raw = text if isinstance(text, str) else json.dumps(text)
            self._tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw))
        return self._tok

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._load())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._load(), name)


class RemoteEncoder(PairScoring):
    """The encoder of an ``m3-rag serve`` server, with :class:`~m3_rag.M3Encoder`'s
    interface: ``encode``, ``encode_queries``, ``encode_documents``, ``compute_score`` and the
    model's settings.

    Args:
        url: The server, e.g. ``"http://127.0.0.1:8000"``.
        api_key: Sent as ``Authorization: Bearer <api_key>`` (when the server has one).
        batch_size: Texts per request (the server merges concurrent requests itself).
        timeout: Seconds per request.
        retries: Retries of a request answered 503 (busy), after its ``Retry-After``.

    Raises:
        RemoteError: the server cannot be reached. PermissionError: wrong API key.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        batch_size: int = 32,
        timeout: float = 120.0,
        retries: int = 3,
    ) -> None:
        self.batch_size = check_count(batch_size, "batch_size", 1)
        self._client = _Client(url, api_key, timeout, retries)
        info = self._client.request("GET", "/v1/models")["data"][0]
        self.url = self._client.url
        self.model_name: str = info["id"]
        self._info = info
        self.max_length: int = int(info["max_length"])
        self.query_max_length: int = int(info["query_max_length"])
        self._max_texts = int(info["limits"]["max_texts"])
        self._max_body = int(info["limits"]["max_body_bytes"])
        self.tokenizer: Any = _RemoteTokenizer(self._client)

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.url!r}, model={self.model_name!r})"

    @property
    def has_sparse(self) -> bool:
        return bool(self._info["has_sparse"])

    @property
    def has_colbert(self) -> bool:
        return bool(self._info["has_colbert"])

    @property
    def dense_dim(self) -> int:
        return int(self._info["dense_dim"])

    @property
    def colbert_dim(self) -> int | None:
        dim = self._info["colbert_dim"]
        return None if dim is None else int(dim)

    @property
    def vocab_size(self) -> int:
        return int(self._info["vocab_size"])

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def encode(
        self,
        texts: str | list[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool | None = None,
        return_colbert: bool | None = None,
        show_progress: bool | None = None,
    ) -> EncodeOutput:
        """As :meth:`M3Encoder.encode <m3_rag.M3Encoder.encode>`, on the server."""
        return self._encode(
            "document", texts, batch_size, max_length, return_dense, return_sparse, return_colbert
        )

    def encode_queries(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        """As :meth:`M3Encoder.encode_queries <m3_rag.M3Encoder.encode_queries>`."""
        return self._encode("query", texts, **_options(kwargs))

    def encode_documents(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        """As :meth:`M3Encoder.encode_documents <m3_rag.M3Encoder.encode_documents>`."""
        return self._encode("document", texts, **_options(kwargs))

    def _encode(
        self,
        role: str,
        texts: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool | None = None,
        return_colbert: bool | None = None,
    ) -> EncodeOutput:
        items = check_texts(texts)
        bs = self.batch_size if batch_size is None else check_count(batch_size, "batch_size", 1)
        bs = min(bs, self._max_texts)
        if max_length is not None:
            check_count(max_length, "max_length", 1)
        sparse = self._want("sparse", return_sparse, self.has_sparse)
        colbert = self._want("colbert", return_colbert, self.has_colbert)
        n = len(items)
        dense = np.zeros((n, self.dense_dim), np.float32) if return_dense else None
        lex: list[dict[int, float]] | None = [] if sparse else None
        vecs: list[np.ndarray] | None = [] if colbert else None
        lengths = np.zeros(n, dtype=np.int64)
        for start, end in _spans(items, bs, self._max_body):
            body = {
                "input": items[start:end],
                "role": role,
                "return_dense": bool(return_dense),
                "return_sparse": sparse,
                "return_colbert": colbert,
                "dense_format": "base64",
                "colbert_format": "base64",
            }
            if max_length is not None:
                body["max_length"] = max_length
            if not (return_dense or sparse or colbert):
                break
            data = self._client.request("POST", "/v1/encode", body)["data"]
            for j, item in enumerate(data):
                lengths[start + j] = int(item["tokens"])
                if dense is not None:
                    dense[start + j] = decode_array(item["dense"])
                if lex is not None:
                    lex.append({int(k): float(v) for k, v in item["sparse"].items()})
                if vecs is not None:
                    vecs.append(decode_array(item["colbert"], "float32", self.colbert_dim))
        return EncodeOutput(dense, lex, vecs, lengths)

    def _want(self, mode: str, asked: bool | None, available: bool) -> bool:
        if asked and not available:
            raise ValueError(
                f"{self.model_name!r} is a dense-only model (no {mode} head); pass "
                f"return_{mode}=False or serve a BGE-M3 checkpoint"
            )
        return available if asked is None else bool(asked)


def _json_size(text: str) -> int:
    """An upper bound of ``text``'s bytes in a JSON body (``\\uXXXX`` escapes: 6 bytes per
    UTF-16 unit, 12 per character outside the BMP)."""
    return 12 * len(text) + 8


def _spans(items: list[str], most: int, max_body: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive requests: at most ``most`` texts and about half
    ``max_body`` bytes each (one text alone is sent whatever its size: the server says
    when it is too large)."""
    start, size, budget = 0, 0, max(max_body // 2, 1)
    for i, t in enumerate(items):
        cost = _json_size(t)
        if i > start and (i - start >= most or size + cost > budget):
            yield start, i
            start, size = i, 0
        size += cost
    if start < len(items):
        yield start, len(items)


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    known = {"batch_size", "max_length", "return_dense", "return_sparse", "return_colbert"}
    unknown = set(kwargs) - known - {"show_progress"}
    if unknown:
        raise TypeError(f"unknown encode option(s): {sorted(unknown)}")
    return {k: v for k, v in kwargs.items() if k in known}


class RemoteReranker:
    """The reranker of an ``m3-rag serve --reranker`` server, with
    :class:`~m3_rag.Reranker`'s ``compute_score`` and ``rerank``.

    Args:
        url, api_key, timeout, retries: As :class:`RemoteEncoder`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 3,
    ) -> None:
        self._client = _Client(url, api_key, timeout, retries)
        self.url = self._client.url
        info = self._client.request("GET", "/v1/models")["data"][0]
        if info.get("reranker") is None:
            raise ValueError(f"{self.url} serves no reranker: start it with --reranker")
        self.model_name: str = info["reranker"]
        self._max_texts = int(info["limits"]["max_texts"])
        self._max_body = int(info["limits"]["max_body_bytes"])

    def __repr__(self) -> str:
        return f"RemoteReranker({self.url!r}, model={self.model_name!r})"

    def close(self) -> None:
        self._client.close()

    def _scores(self, query: str, texts: list[str], normalize: bool) -> list[float]:
        scores = [0.0] * len(texts)
        budget = self._max_body - _json_size(query)
        for start, end in _spans(texts, self._max_texts, budget):
            body = {
                "query": query,
                "documents": texts[start:end],
                "normalize": bool(normalize),
            }
            for r in self._client.request("POST", "/v1/rerank", body)["results"]:
                scores[start + int(r["index"])] = float(r["relevance_score"])
        return scores

    def compute_score(
        self,
        pairs: list[tuple[str, str]] | tuple[str, str],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Relevance score of each ``(query, passage)`` pair, in input order (one request
        per distinct query)."""
        items = check_pairs(pairs)
        by_query: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(items):
            by_query.setdefault(q, []).append(i)
        out = [0.0] * len(items)
        for q, idx in by_query.items():
            for i, s in zip(
                idx, self._scores(q, [items[i][1] for i in idx], normalize), strict=True
            ):
                out[i] = s
        return out

    def rerank(
        self,
        query: str,
        texts: list[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
    ) -> list[RerankResult]:
        """Rank ``texts`` for ``query``, best first (up to ``top_n``)."""
        items = check_rerank_input(query, texts, top_n)
        scores = self._scores(query, items, normalize) if items else []
        return ranked(scores, top_n)

"""Encoder outputs as JSON values (what ``/v1/embeddings`` and ``/v1/encode`` answer)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m3_rag.encoder import EncodeOutput
from m3_rag.remote import encode_array

__all__ = ["embeddings_body", "encode_body"]


def _dense(vec: np.ndarray, fmt: str) -> Any:
    return encode_array(vec, "float32") if fmt == "base64" else vec.tolist()


def _colbert(vecs: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return encode_array(vecs, "float32")
    if fmt == "base64-float16":
        return encode_array(vecs, "float16")
    return vecs.tolist()


def embeddings_body(out: EncodeOutput, model: str, fmt: str) -> bytes:
    """OpenAI's embeddings response."""
    assert out.dense is not None
    n_tokens = int(out.lengths.sum())
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _dense(vec, fmt)}
            for i, vec in enumerate(out.dense)
        ],
        "model": model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    return json.dumps(body, allow_nan=False).encode("utf-8")


def encode_body(out: EncodeOutput, model: str, dense_fmt: str, colbert_fmt: str) -> bytes:
    """``/v1/encode``'s response: per text ``dense``, ``sparse``, ``colbert`` (those asked
    for) and ``tokens``."""
    data = []
    for i in range(len(out)):
        item: dict[str, Any] = {"index": i, "tokens": int(out.lengths[i])}
        if out.dense is not None:
            item["dense"] = _dense(out.dense[i], dense_fmt)
        if out.sparse is not None:
            item["sparse"] = {str(k): float(v) for k, v in out.sparse[i].items()}
        if out.colbert is not None:
            item["colbert"] = _colbert(out.colbert[i], colbert_fmt)
        data.append(item)
    n_tokens = int(out.lengths.sum())
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    return json.dumps(body, allow_nan=False).encode("utf-8")

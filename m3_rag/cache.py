"""One forward pass per text: a bounded cache of encoder outputs shared by every adapter.

Vector stores ask for embeddings one kind at a time: ``QdrantVectorStore`` in hybrid mode
calls the dense embedding of a document batch, then the sparse embedding of the same batch;
LlamaIndex's ``VectorStoreIndex`` embeds nodes, then hands them to the store, which needs
their lexical weights and ColBERT vectors too. :func:`encode_cached` keeps each text's dense
vector, lexical weights and (documents only) ColBERT vectors, keyed by role, token limit and
text, in an LRU cache attached to the :class:`~m3_rag.M3Encoder` and bounded in items and
bytes, so every adapter holding the same encoder shares it and the model runs once per text.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from m3_rag._inputs import check_texts
from m3_rag.encoder import EncodeOutput
from m3_rag.encoding import Encoder

__all__ = [
    "CachedEncoding",
    "EncodeCache",
    "Role",
    "as_encode_output",
    "encode_cache",
    "encode_cached",
]

Role = Literal["query", "document"]


@dataclass(frozen=True)
class CachedEncoding:
    """One text's outputs: ``dense [dim]`` float32 (read-only), its lexical weights
    (``None`` for a dense-only model) and, for documents of a model with ColBERT, its
    ``[t, colbert_dim]`` float32 vectors (read-only)."""

    dense: np.ndarray
    sparse: dict[int, float] | None
    colbert: np.ndarray | None = None

    def sparse_pairs(self) -> tuple[list[int], list[float]]:
        """The lexical weights as sorted token ids and their weights (the
        ``indices``/``values`` shape Qdrant's sparse vectors take); empty for a dense-only
        model."""
        weights = self.sparse or {}
        indices = sorted(weights)
        return indices, [float(weights[i]) for i in indices]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.colbert is None else self.colbert.nbytes
        return int(self.dense.nbytes + 16 * len(self.sparse or ()) + extra + 200)


class EncodeCache:
    """A thread-safe LRU of :class:`CachedEncoding` keyed by ``(role, max_length, text)``.

    Args:
        max_items: Texts kept (the least recently used are dropped first).
        max_bytes: Bound on the arrays held (ColBERT vectors dominate).
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 256 << 20) -> None:
        if max_items < 0 or max_bytes < 0:
            raise ValueError(f"max_items and max_bytes must be >= 0, got {max_items}, {max_bytes}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, int, str], CachedEncoding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, int, str]) -> CachedEncoding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, int, str], value: CachedEncoding) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self._items and (
                len(self._items) > self.max_items or self.nbytes > self.max_bytes
            ):
                self.nbytes -= self._items.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


_CACHES: weakref.WeakKeyDictionary[Encoder, EncodeCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def encode_cache(encoder: Encoder) -> EncodeCache:
    """The cache shared by every adapter that holds ``encoder`` (created on first use)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(encoder)
        if cache is None:
            cache = _CACHES[encoder] = EncodeCache()
        return cache


def encode_cached(
    encoder: Encoder,
    texts: Sequence[str],
    role: Role,
    *,
    max_length: int | None = None,
    batch_size: int | None = None,
) -> list[CachedEncoding]:
    """Dense vector and lexical weights of each text, running the model only on the texts
    not cached (once, for both outputs).

    Args:
        encoder: The shared encoder.
        texts: Texts to encode.
        role: ``"query"`` (``encode_queries``) or ``"document"`` (``encode_documents``).
        max_length: Token limit (default: the role's own); part of the cache key.
        batch_size: Texts per forward pass (default: the encoder's).

    Returns:
        One :class:`CachedEncoding` per text, in input order.
    """
    items = check_texts(texts)
    if role not in ("query", "document"):
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    cache = encode_cache(encoder)
    limit = 0 if max_length is None else int(max_length)
    colbert = role == "document" and encoder.has_colbert
    out: list[CachedEncoding | None] = [cache.get((role, limit, t)) for t in items]
    missing = list(dict.fromkeys(t for t, o in zip(items, out, strict=True) if o is None))
    if missing:
        encode = encoder.encode_queries if role == "query" else encoder.encode_documents
        kwargs: dict[str, Any] = {} if max_length is None else {"max_length": max_length}
        res = encode(
            missing,
            batch_size=batch_size,
            return_dense=True,
            return_sparse=encoder.has_sparse,
            return_colbert=colbert,
            **kwargs,
        )
        assert res.dense is not None
        fresh = {}
        for i, t in enumerate(missing):
            dense = np.array(res.dense[i], dtype=np.float32)
            dense.flags.writeable = False
            sparse = dict(res.sparse[i]) if res.sparse is not None else None
            vecs = None
            if res.colbert is not None:
                vecs = np.array(res.colbert[i], dtype=np.float32)
                vecs.flags.writeable = False
            fresh[t] = CachedEncoding(dense, sparse, vecs)
            cache.put((role, limit, t), fresh[t])
        out = [o if o is not None else fresh[t] for t, o in zip(items, out, strict=True)]
    return [o for o in out if o is not None]


def as_encode_output(items: Sequence[CachedEncoding]) -> EncodeOutput:
    """Cached encodings as one :class:`~m3_rag.EncodeOutput` (for
    :meth:`~m3_rag.HybridRetriever.add_encoded`)."""
    if not items:
        return EncodeOutput(np.zeros((0, 0), np.float32), [], [])
    colbert = [c.colbert for c in items]
    return EncodeOutput(
        dense=np.stack([c.dense for c in items]),
        sparse=None if items[0].sparse is None else [dict(c.sparse or {}) for c in items],
        colbert=None if any(c is None for c in colbert) else [np.asarray(c) for c in colbert],
        lengths=np.asarray([0 if c is None else len(c) + 1 for c in colbert], dtype=np.int64),
    )

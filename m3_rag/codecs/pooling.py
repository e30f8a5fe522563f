"""Token pooling: fewer ColBERT vectors per document, by hierarchical clustering.

pylate's method: Ward linkage of a document's token vectors, cut into
``max(1, t // pool_factor)`` clusters (``fcluster(..., criterion="maxclust")``), each
replaced by its mean. Applied to documents at index time, never to queries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_pool_factor", "pool_tokens"]


def check_pool_factor(pool_factor: object) -> int:
    """``pool_factor`` as an int >= 1.

    Raises:
        ValueError: not an int >= 1 (1 means no pooling).
    """
    if type(pool_factor) is not int or pool_factor < 1:
        raise ValueError(
            f"pool_factor must be an int >= 1 (1: no pooling, 2: half the vectors), "
            f"got {pool_factor!r}"
        )
    return pool_factor


def pool_tokens(vectors: np.ndarray, pool_factor: int, *, renormalize: bool = False) -> np.ndarray:
    """Pool one document's ColBERT vectors (deterministic: the same input gives the same
    output).

    Args:
        vectors: ``[t, dim]`` float vectors of one document.
        pool_factor: 1 returns ``vectors`` as float32, unchanged; ``f > 1`` keeps at most
            ``max(1, t // f)`` vectors.
        renormalize: Scale each pooled vector to unit length.

    Returns:
        ``[t', dim]`` float32 vectors, clusters in the order of their first token.
    """
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected [t, dim] vectors, got shape {x.shape}")
    check_pool_factor(pool_factor)
    t = len(x)
    if pool_factor == 1 or t <= 1:
        return x
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(x.astype(np.float64), method="ward", metric="euclidean")
    labels = fcluster(z, t=max(1, t // pool_factor), criterion="maxclust")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # clusters in the order of their first token
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    cluster = rank[inverse.reshape(-1)]
    # each cluster's rows in token order, summed by one reduceat (np.add.at, unbuffered, took
    # most of the time); the same additions in the same order
    by = np.argsort(cluster, kind="stable")
    counts = np.bincount(cluster)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(x[by].astype(np.float64), starts, axis=0)
    pooled = (sums / counts[:, None]).astype(np.float32)
    if renormalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = (pooled / np.where(norms > 0, norms, 1)).astype(np.float32)
    return pooled

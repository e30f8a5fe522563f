"""Batched, vectorised post-processing of the backbone's last hidden state.

Shapes: ``hidden [b, L, h]``, ``input_ids [b, L]``, ``mask [b, L]`` (1 for real tokens,
right-padded).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    max_tokens: int | None = None,
    overhead_tokens: int | None = None,
) -> list[np.ndarray]:
    """Group texts into batches, longest first (padding only to each batch's longest text).

    With ``overhead_tokens`` the sorted texts are cut where the total cost is lowest: each
    batch costs its padded size ``rows * longest`` plus a fixed ``overhead_tokens`` per
    forward pass (dynamic programming, optimal for that cost). Mixed lengths then get small
    batches with little padding, runs of similar lengths big ones. Without it, batches are
    ``batch_size`` consecutive texts (FlagEmbedding's plan).

    Args:
        lengths: ``[n]`` token counts.
        batch_size: Most texts per batch.
        max_tokens: Optional token budget per batch, padding included (``rows * longest``;
            a text longer than the budget gets a batch of its own).
        overhead_tokens: Cost of one forward pass in token-equivalents, ``None`` for
            fixed-count batches.

    Returns:
        Index arrays into ``lengths``, longest batch first; every text in exactly one batch.
    """
    order = np.argsort(-lengths, kind="stable")
    if overhead_tokens is None:
        if max_tokens is None:
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        batches, start = [], 0
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            rows = int(min(batch_size, max(1, max_tokens // longest)))
            batches.append(order[start : start + rows])
            start += rows
        return batches
    s = np.maximum(lengths[order].astype(np.int64), 1)
    n = len(s)
    cost = np.zeros(n + 1, dtype=np.int64)  # cost[j]: best plan of the first j sorted texts
    cut = np.zeros(n + 1, dtype=np.int64)  # where that plan's last batch starts
    for j in range(1, n + 1):
        starts = np.arange(j - 1, max(j - batch_size, 0) - 1, -1)  # rows = j - starts
        size = (j - starts) * s[starts]  # padded tokens of the batch starts:j
        total = cost[starts] + size + overhead_tokens
        if max_tokens is not None:  # one row is always allowed
            total = np.where(
                (starts == j - 1) | (size <= max_tokens), total, np.iinfo(np.int64).max
            )
        best = int(np.argmin(total))
        cost[j], cut[j] = total[best], starts[best]
    bounds, j = [], n
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    return [order[a:b] for a, b in reversed(bounds)]


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of padded positions among all positions computed by ``batches``."""
    computed = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 1.0 - float(lengths.sum()) / computed if computed else 0.0


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence pooling -> ``[b, h]``: ``cls`` (first token), ``mean`` or ``max`` (real tokens)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    raise ValueError(f"unknown pooling mode {mode!r}")


def sparse_weights(
    token_weights: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    unused_ids: torch.Tensor,
) -> list[dict[int, float]]:
    """Per text, ``{token_id: max weight}`` over its tokens, weights > 0 only.

    Args:
        token_weights: ``[b, L]`` ``relu(sparse_linear(hidden))``.
        input_ids: ``[b, L]`` token ids.
        mask: ``[b, L]`` attention mask.
        unused_ids: ``[k]`` ids never kept (cls, eos, pad, unk).

    Returns:
        ``b`` dicts; the reduction runs in one scatter, no loop over tokens.
    """
    b = token_weights.shape[0]
    w = token_weights.float()
    keep = (mask > 0) & (w > 0) & ~torch.isin(input_ids, unused_ids)
    rows, cols = keep.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return [{} for _ in range(b)]
    ids = input_ids[rows, cols].long()
    vals = w[rows, cols]
    span = int(ids.max()) + 1
    key = rows.long() * span + ids
    uniq, inverse = torch.unique(key, return_inverse=True)  # sorted: grouped by row
    best = torch.full((uniq.numel(),), float("-inf"), dtype=vals.dtype, device=vals.device)
    best = best.scatter_reduce(0, inverse, vals, reduce="amax")
    u_rows = (uniq // span).cpu().numpy()
    u_ids = (uniq % span).cpu().numpy().tolist()
    u_vals = best.cpu().numpy().tolist()
    bounds = np.searchsorted(u_rows, np.arange(b + 1)).tolist()
    return [
        dict(zip(u_ids[bounds[i] : bounds[i + 1]], u_vals[bounds[i] : bounds[i + 1]], strict=True))
        for i in range(b)
    ]


def colbert_vectors(colbert_hidden: torch.Tensor, lengths: np.ndarray) -> list[np.ndarray]:
    """L2-normalise ColBERT vectors and trim each text to ``n_tokens - 1`` rows.

    Args:
        colbert_hidden: ``[b, L-1, d]`` ``colbert_linear(hidden[:, 1:])``.
        lengths: ``[b]`` number of real tokens of each text (CLS included).

    Returns:
        ``b`` float32 arrays ``[n_tokens - 1, d]`` (CLS dropped, ``</s>`` kept).
    """
    vecs = F.normalize(colbert_hidden.float(), dim=-1).cpu().numpy()
    return [vecs[i, : int(n) - 1].copy() for i, n in enumerate(lengths)]

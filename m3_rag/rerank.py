"""Cross-encoder reranker (``BAAI/bge-reranker-v2-m3``), identical to ``FlagReranker``.

Input construction: the query is tokenised without special tokens and cut to
``query_max_length`` (default ``3/4 * max_length``), the passage to ``max_length``; the pair is
joined by the tokenizer's own template (``<s> q </s></s> p </s>`` for XLM-R) and only the passage
is truncated to fit ``max_length``. The score is the single logit; ``normalize=True`` applies a
sigmoid.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from m3_rag._inputs import check_count, check_pairs, check_texts
from m3_rag.runtime import RuntimeOptions, load_model

__all__ = ["RerankResult", "Reranker"]


class RerankResult(NamedTuple):
    """One reranked text: its position in the input list and its score."""

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: (index, score)
    score: float


def check_rerank_input(query: object, texts: object, top_n: object) -> list[str]:
    """The texts of a ``rerank(query, texts, top_n)`` call, checked.

    Raises:
        TypeError: ``query`` is not a ``str``, or ``texts`` not a list of them.
        ValueError: ``top_n`` is not a non-negative int or ``None``.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    items = check_texts(texts)
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise ValueError(f"top_n must be a non-negative int or None, got {top_n!r}")
    return items


def ranked(scores: list[float], top_n: int | None) -> list[RerankResult]:
    """``(index, score)`` best first (stable on ties), the first ``top_n`` (all: ``None``)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if top_n is not None:
        order = order[:top_n]
    return [RerankResult(int(i), scores[int(i)]) for i in order]


class Reranker:
    """Cross-encoder reranker.

    Args:
        model_name_or_path: Hub id (default ``"BAAI/bge-reranker-v2-m3"``) or a local
            ``*ForSequenceClassification`` checkpoint directory with one output label.
        device: Default CUDA when available, else CPU.
        dtype: Default float16 on CUDA, float32 on CPU.
        max_length: Token limit of the joined pair.
        batch_size: Pairs per forward pass.
        query_max_length: Token limit of the query (default ``max_length * 3 // 4``).
        cache_dir, revision, local_files_only: Hugging Face Hub options.
        runtime: ``"torch"`` (default) or ``"onnx"`` (ONNX Runtime on CPU, exported once and
            cached; ``pip install 'm3-rag[onnx]'``).
        quantize: ``None`` or ``"int8"`` (``runtime="onnx"`` only).
        onnx_cache_dir: Where exported models are cached (see :class:`~m3_rag.M3Encoder`).
        threads: ONNX Runtime intra-op threads (default ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str] = "BAAI/bge-reranker-v2-m3",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int = 512,
        batch_size: int = 32,
        query_max_length: int | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        runtime: str = "torch",
        quantize: str | None = None,
        onnx_cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> None:
        check_count(max_length, "max_length", 1)
        check_count(batch_size, "batch_size", 1)
        ckpt = load_model(
            model_name_or_path,
            runtime=runtime,
            task="logits",
            options=RuntimeOptions(quantize, device, dtype, onnx_cache_dir, threads),
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
        )
        run = ckpt.backbone
        self.model_name, self.path, self.device, self.dtype = (
            ckpt.model_name,
            ckpt.path,
            run.device,
            run.dtype,
        )
        self.runtime, self.quantize = runtime, quantize
        self.tokenizer, self.config = ckpt.tokenizer, run.config
        self.model = run.model  # the torch module (runtime="torch"), else None
        self._backbone = run.forward
        self._runtime_name = run.describe
        if int(getattr(self.config, "num_labels", 1)) != 1:
            raise ValueError(
                f"{self.path} has {self.config.num_labels} output labels; a reranker has one"
            )
        self.max_length = max_length
        self.query_max_length = query_max_length or max_length * 3 // 4
        self.batch_size = batch_size
        self._backend = self.tokenizer.backend_tokenizer
        self._backend.no_truncation()
        self._backend.no_padding()
        self._n_special = int(self.tokenizer.num_special_tokens_to_add(pair=True))
        self._pad_id = int(self.tokenizer.pad_token_id or 0)

    def __repr__(self) -> str:
        return (
            f"Reranker({self.model_name!r}, device={self.device}, "
            f"runtime={self._runtime_name!r}, max_length={self.max_length})"
        )

    def compute_score(
        self,
        pairs: list[tuple[str, str]] | tuple[str, str],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Relevance score of each ``(query, passage)`` pair (a single pair is accepted).

        Args:
            pairs: The pairs to score.
            normalize: Apply a sigmoid (scores in ``(0, 1)``).
            batch_size: Pairs per forward pass (default: the reranker's).
            show_progress: Progress bar; ``None`` shows it for more than 256 pairs.

        Returns:
            One float per pair, in input order.
        """
        items = check_pairs(pairs)
        if not items:
            return []
        bs = batch_size or self.batch_size
        features = self._encode_pairs(items)
        lengths = np.fromiter((len(f[0]) for f in features), dtype=np.int64, count=len(features))
        order = np.argsort(-lengths, kind="stable")
        scores = np.zeros(len(items), dtype=np.float32)
        progress = len(items) > 256 if show_progress is None else show_progress
        batches = [order[i : i + bs] for i in range(0, len(items), bs)]
        for idx in tqdm(batches, desc="Reranking", unit="batch", disable=not progress):
            scores[idx] = self._forward([features[i] for i in idx], lengths[idx])
        if normalize:
            return [float(s) for s in 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))]
        return [float(s) for s in scores]

    def rerank(
        self,
        query: str,
        texts: list[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
    ) -> list[RerankResult]:
        """Rank ``texts`` for ``query``, best first.

        Returns:
            Up to ``top_n`` :class:`RerankResult` ``(index, score)`` tuples (all when ``None``).
        """
        items = check_rerank_input(query, texts, top_n)
        scores = self.compute_score([(query, t) for t in items], normalize=normalize)
        return ranked(scores, top_n)

    def _encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and token type ids of each joined pair (id-level, no text round trip)."""
        queries = self._backend.encode_batch([p[0] for p in pairs], add_special_tokens=False)
        passages = self._backend.encode_batch([p[1] for p in pairs], add_special_tokens=False)
        post = self._backend.post_processor
        out: list[tuple[list[int], list[int]]] = []
        for q, p in zip(queries, passages, strict=True):
            if len(q.ids) > self.query_max_length:
                q.truncate(self.query_max_length)
            if len(p.ids) > self.max_length:
                p.truncate(self.max_length)
            overflow = len(q.ids) + len(p.ids) + self._n_special - self.max_length
            if 0 < overflow < len(p.ids):
                p.truncate(len(p.ids) - overflow)
            joined = post.process(q, p, add_special_tokens=True) if post is not None else q
            out.append((list(joined.ids), list(joined.type_ids)))
        return out

    @torch.inference_mode()
    def _forward(
        self, features: list[tuple[list[int], list[int]]], lengths: np.ndarray
    ) -> np.ndarray:
        width = int(lengths.max())
        ids = np.full((len(features), width), self._pad_id, dtype=np.int64)
        types = np.zeros((len(features), width), dtype=np.int64)
        for row, (tok, typ) in enumerate(features):
            ids[row, : len(tok)] = tok
            types[row, : len(typ)] = typ
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        token_types = None
        if "token_type_ids" in self.tokenizer.model_input_names:
            token_types = torch.from_numpy(types).to(self.device)
        logits = self._backbone(
            torch.from_numpy(ids).to(self.device),
            torch.from_numpy(mask).to(self.device),
            token_types,
        )
        return logits.reshape(-1).float().cpu().numpy()

"""The M3 encoder: one forward pass, dense + sparse + ColBERT outputs.

Numerically identical to FlagEmbedding's ``BGEM3FlagModel`` (where and why the API differs:
``docs/differences.md``, "Differences from FlagEmbedding"): dense is the L2-normalised CLS
state, sparse is ``relu(sparse_linear(h))`` reduced by max per token id, ColBERT is
``colbert_linear(h[:, 1:])`` L2-normalised and trimmed to ``n_tokens - 1`` rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from m3_rag._inputs import check_count, check_texts
from m3_rag._pairs import PairScoring
from m3_rag._postprocess import colbert_vectors, plan_batches, pool, sparse_weights
from m3_rag.loading import (
    load_heads,
    model_max_positions,
    read_pooling,
)
from m3_rag.runtime import RuntimeOptions, load_model

__all__ = ["EncodeOutput", "M3Encoder"]

logger = logging.getLogger(__name__)

# One CPU forward pass costs about as much as 45 extra tokens (fp32, 2 cores: a 16-token text
# alone runs at 30% of the token rate of batches of 256+ tokens); batch planning uses 64.
_CPU_PASS_OVERHEAD = 64

Weights3 = tuple[float, float, float]


@dataclass(frozen=True)
class EncodeOutput:
    """What one :meth:`M3Encoder.encode` call returns, in input order.

    Attributes:
        dense: ``[n, d]`` float32, L2-normalised; ``None`` when not requested.
        sparse: ``n`` dicts ``{token_id: weight}`` (weights > 0); ``None`` when not requested.
        colbert: ``n`` float32 arrays ``[t_i, d_c]`` (unit rows); ``None`` when not requested.
        lengths: ``[n]`` number of tokens of each text after truncation (special tokens included).
    """

    dense: np.ndarray | None
    sparse: list[dict[int, float]] | None
    colbert: list[np.ndarray] | None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)


class M3Encoder(PairScoring):
    """BGE-M3 (or any BERT/XLM-R sentence encoder) with all its output heads.

    Args:
        model_name_or_path: Hub id (``"BAAI/bge-m3"``) or local checkpoint directory in the
            official layout. Without ``colbert_linear.pt``/``sparse_linear.pt`` the model is
            dense-only (pooling from ``1_Pooling/config.json``, CLS otherwise).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``; default
            float16 on CUDA, float32 on CPU.
        max_length: Token limit for :meth:`encode` and :meth:`encode_documents` (capped by
            the model's own limit).
        batch_size: Texts per forward pass (at most). On CPU the length-sorted texts are
            cut where padded tokens plus a per-pass overhead are lowest, so mixed lengths get
            small batches with little padding (1% instead of 30% on 32 texts of 16-512
            tokens); on GPU batches are ``batch_size`` consecutive sorted texts.
        max_tokens_per_batch: Optional token budget per forward pass, padding included:
            short texts share big batches, long ones get small ones (bounds memory; default
            ``None``: batches of ``batch_size`` texts).
        query_max_length: Token limit for :meth:`encode_queries` (default ``max_length``).
        query_instruction: Prefix added to queries by :meth:`encode_queries` (BGE v1.5 style).
        normalize: L2-normalise dense vectors (BGE-M3 does).
        cache_dir, revision, local_files_only: Hugging Face Hub options for hub ids.
        runtime: ``"torch"`` (default; any device, fp16 on GPU) or ``"onnx"`` (ONNX Runtime
            on CPU: the backbone is exported once and cached; ``pip install 'm3-rag[onnx]'``).
            The heads, pooling and outputs are the same on every runtime.
        quantize: ``None``, or ``"int8"`` (``runtime="onnx"`` only): dynamic int8 linear
            layers, faster on CPU and close to fp32 (figures: ``docs/runtime.md``).
        onnx_cache_dir: Where exported models are cached (default: ``$M3_RAG_ONNX_CACHE``,
            else beside the checkpoint when writable, else ``~/.cache/m3-rag/onnx``).
        threads: ONNX Runtime intra-op threads (default ``torch.get_num_threads()``).

    Raises:
        m3_rag.runtime.RuntimeOptionError: an unknown runtime, ``quantize`` on torch, a GPU
            device or a half dtype for ``runtime="onnx"`` (a ``ValueError``).
        m3_rag.runtime.MissingExtraError: ``runtime="onnx"`` without onnxruntime installed
            (an ``ImportError`` naming the extra).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str] = "BAAI/bge-m3",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int = 512,
        batch_size: int = 32,
        max_tokens_per_batch: int | None = None,
        query_max_length: int | None = None,
        query_instruction: str | None = None,
        normalize: bool = True,
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
        if query_max_length is not None:
            check_count(query_max_length, "query_max_length", 1)
        options = RuntimeOptions(quantize, device, dtype, onnx_cache_dir, threads)
        ckpt = load_model(
            model_name_or_path,
            runtime=runtime,
            task="hidden",
            options=options,
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
        )
        path, run = ckpt.path, ckpt.backbone
        self.model_name, self.path, self.device, self.dtype = (
            ckpt.model_name,
            path,
            run.device,
            run.dtype,
        )
        self.runtime, self.quantize = runtime, quantize
        self.tokenizer, self.config = ckpt.tokenizer, run.config
        self.model = run.model  # the torch module (runtime="torch"), else None
        self._backbone = run.forward
        self._runtime_name = run.describe
        hidden = int(self.config.hidden_size)
        self.pooling = read_pooling(path)

        colbert, sparse = load_heads(path, hidden)  # official .pt files or native tensors
        self.colbert_linear: torch.nn.Linear | None = (
            None if colbert is None else colbert.to(self.device, self.dtype)
        )
        self.sparse_linear: torch.nn.Linear | None = (
            None if sparse is None else sparse.to(self.device, self.dtype)
        )

        limits = [x for x in (model_max_positions(self.config), self.pooling.max_seq_length) if x]
        self.model_max_length: int | None = min(limits) if limits else None
        self.max_length = self._cap(max_length)
        self.query_max_length = self._cap(query_max_length or max_length)
        self.batch_size = batch_size
        self.max_tokens_per_batch = (
            None
            if max_tokens_per_batch is None
            else check_count(max_tokens_per_batch, "max_tokens_per_batch", 1)
        )
        self.query_instruction = query_instruction
        self.normalize = normalize
        special = ("cls_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
        ids = sorted(
            {i for i in (getattr(self.tokenizer, s, None) for s in special) if i is not None}
        )
        self._unused_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        self._pad_id = int(self.tokenizer.pad_token_id or 0)

    # ------------------------------------------------------------------ properties
    @property
    def has_sparse(self) -> bool:
        """Whether the checkpoint has the lexical (sparse) head."""
        return self.sparse_linear is not None

    @property
    def has_colbert(self) -> bool:
        """Whether the checkpoint has the ColBERT head."""
        return self.colbert_linear is not None

    @property
    def dense_dim(self) -> int:
        """Size of dense vectors."""
        return int(self.config.hidden_size)

    @property
    def colbert_dim(self) -> int | None:
        """Size of ColBERT vectors, ``None`` for a dense-only model."""
        return None if self.colbert_linear is None else int(self.colbert_linear.out_features)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (columns of the lexical space)."""
        return max(int(self.config.vocab_size), len(self.tokenizer))

    def __repr__(self) -> str:
        modes = ["dense"] + ["sparse"] * self.has_sparse + ["colbert"] * self.has_colbert
        return (
            f"M3Encoder({self.model_name!r}, device={self.device}, dtype={self.dtype}, "
            f"runtime={self._runtime_name!r}, modes={modes}, max_length={self.max_length})"
        )

    # ------------------------------------------------------------------ encoding
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
        """Encode texts in one forward pass per batch.

        Args:
            texts: Texts to encode (a single ``str`` counts as one text).
            batch_size: Texts per forward pass (default: the encoder's).
            max_length: Token limit; longer texts are truncated (default: the encoder's).
            return_dense: Compute dense vectors.
            return_sparse: Compute lexical weights; ``None`` means "if the model has them".
            return_colbert: Compute ColBERT vectors; ``None`` means "if the model has them".
            show_progress: Progress bar; ``None`` shows it for more than 256 texts.

        Returns:
            An :class:`EncodeOutput` in input order.

        Raises:
            TypeError: an item is not a ``str`` (the message names its index).
            ValueError: sparse/ColBERT asked of a dense-only model, or bad sizes.
        """
        items = check_texts(texts)
        want_sparse = self._want("sparse", return_sparse, self.has_sparse)
        want_colbert = self._want("colbert", return_colbert, self.has_colbert)
        bs = self.batch_size if batch_size is None else check_count(batch_size, "batch_size", 1)
        ml = self.max_length if max_length is None else check_count(max_length, "max_length", 1)
        ml = self._cap(ml)
        n = len(items)
        dense = np.zeros((n, self.dense_dim), dtype=np.float32) if return_dense else None
        sparse: list[dict[int, float]] | None = [{}] * n if want_sparse else None
        colbert: list[np.ndarray] | None = (
            [np.zeros((0, 0), np.float32)] * n if want_colbert else None
        )
        if n == 0:
            if colbert is not None:
                colbert = []
            return EncodeOutput(dense, sparse, colbert, np.zeros(0, dtype=np.int64))

        ids = self.tokenizer(
            items,
            truncation=True,
            max_length=ml,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        overhead = _CPU_PASS_OVERHEAD if self.device.type == "cpu" else None
        batches = plan_batches(lengths, bs, self.max_tokens_per_batch, overhead)
        progress = n > 256 if show_progress is None else show_progress
        for idx in tqdm(batches, desc="Encoding", unit="batch", disable=not progress):
            out = self._forward(
                [ids[i] for i in idx], lengths[idx], return_dense, want_sparse, want_colbert
            )
            if dense is not None:
                dense[idx] = out["dense"]
            if sparse is not None:
                for j, i in enumerate(idx.tolist()):
                    sparse[i] = out["sparse"][j]
            if colbert is not None:
                for j, i in enumerate(idx.tolist()):
                    colbert[i] = out["colbert"][j]
        return EncodeOutput(dense, sparse, colbert, lengths)

    def encode_queries(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        """:meth:`encode` with the query instruction prefix and ``query_max_length``."""
        items = check_texts(texts)
        if self.query_instruction:
            items = [self.query_instruction + t for t in items]
        kwargs.setdefault("max_length", self.query_max_length)
        return self.encode(items, **kwargs)

    def encode_documents(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput:
        """:meth:`encode` with the document ``max_length``."""
        return self.encode(texts, **kwargs)

    @torch.inference_mode()
    def _forward(
        self, ids: list[list[int]], lengths: np.ndarray, dense: bool, sparse: bool, colbert: bool
    ) -> dict[str, Any]:
        width = int(lengths.max())
        arr = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        for row, seq in enumerate(ids):
            arr[row, : len(seq)] = seq
        input_ids = torch.from_numpy(arr).to(self.device)
        mask = (
            (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None])
            .long()
            .to(self.device)
        )
        hidden = self._backbone(input_ids, mask)
        out: dict[str, Any] = {}
        if dense:
            vec = pool(hidden, mask, self.pooling.mode)
            if self.normalize:
                vec = F.normalize(vec.float(), dim=-1)
            out["dense"] = vec.float().cpu().numpy()
        if sparse:
            assert self.sparse_linear is not None
            weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
            out["sparse"] = sparse_weights(weights, input_ids, mask, self._unused_ids)
        if colbert:
            assert self.colbert_linear is not None
            vecs = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:, None].to(hidden.dtype)
            out["colbert"] = colbert_vectors(vecs, lengths)
        return out

    def _cap(self, length: int) -> int:
        return min(length, self.model_max_length) if self.model_max_length else length

    def _want(self, mode: str, asked: bool | None, available: bool) -> bool:
        if asked is None:
            return available
        if asked and not available:
            raise ValueError(
                f"{self.model_name!r} is a dense-only model (no {mode} head: colbert_linear.pt / "
                f"sparse_linear.pt); pass return_{mode}=False or load a BGE-M3 checkpoint"
            )
        return bool(asked)

    # ------------------------------------------------------------------ scoring

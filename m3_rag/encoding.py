"""The encoder seam: what the retriever, the encode cache and the adapters need from an
encoder.

:class:`~m3_rag.M3Encoder` (the model in this process, torch or ONNX Runtime) and
``RemoteEncoder`` (a model served by ``m3-rag serve``) both satisfy :class:`Encoder`; code
that takes an encoder checks ``isinstance(x, Encoder)`` and uses nothing else. Rerankers
likewise satisfy :class:`CrossEncoder`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from m3_rag.encoder import EncodeOutput
from m3_rag.rerank import RerankResult

__all__ = ["CrossEncoder", "Encoder"]


@runtime_checkable
class Encoder(Protocol):
    """An M3-style encoder: dense vectors, and lexical weights / ColBERT vectors when its
    checkpoint has those heads.

    Attributes:
        model_name: The checkpoint's name (recorded in an index and checked on reopen).
        tokenizer: A Hugging Face tokenizer (the BM25 lexical leg tokenises with it).
        batch_size: Texts per request or forward pass (adapters batch by it).
    """

    model_name: str
    tokenizer: Any
    batch_size: int

    @property
    def has_sparse(self) -> bool: ...

    @property
    def has_colbert(self) -> bool: ...

    @property
    def dense_dim(self) -> int: ...

    @property
    def colbert_dim(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

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
    ) -> EncodeOutput: ...

    def encode_queries(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput: ...

    def encode_documents(self, texts: str | list[str], **kwargs: Any) -> EncodeOutput: ...


@runtime_checkable
class CrossEncoder(Protocol):
    """A reranker (a cross-encoder scoring ``(query, passage)`` pairs): :class:`~m3_rag.Reranker`
    in this process, ``RemoteReranker`` over ``m3-rag serve``."""

    def compute_score(
        self,
        pairs: list[tuple[str, str]] | tuple[str, str],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[float]: ...

    def rerank(
        self,
        query: str,
        texts: list[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
    ) -> list[RerankResult]: ...

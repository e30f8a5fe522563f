"""``M3Embeddings``: the dense BGE-M3 vectors as a LangChain ``Embeddings``."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, model_validator

from m3_rag import Encoder, M3Encoder
from m3_rag.cache import encode_cached


class M3Embeddings(BaseModel, Embeddings):
    """Dense embeddings from an :class:`m3_rag.M3Encoder` (shared, or loaded here).

    Example:
        .. code-block:: python

            from m3_rag import M3Encoder
            from langchain_m3rag import M3Embeddings

            enc = M3Encoder("BAAI/bge-m3")
            emb = M3Embeddings(encoder=enc, query_max_length=64)
            emb.embed_query("what is BGE-M3?")   # list[float], 1024 values

    Attributes:
        model_name_or_path: Hub id or local directory, used when ``encoder`` is not given.
        encoder: An existing ``M3Encoder`` to share with other components.
        model_kwargs: Keyword arguments for ``M3Encoder`` (device, dtype, batch_size...).
        query_max_length: Token limit of queries (default: the encoder's).
        document_max_length: Token limit of documents (default: the encoder's).
        batch_size: Texts per forward pass (default: the encoder's).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    model_name_or_path: str = "BAAI/bge-m3"
    encoder: Encoder | None = Field(default=None, exclude=True)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    query_max_length: int | None = None
    document_max_length: int | None = None
    batch_size: int | None = None

    @model_validator(mode="after")
    def _load(self) -> M3Embeddings:
        if self.encoder is None:
            self.encoder = M3Encoder(self.model_name_or_path, **self.model_kwargs)
        return self

    @property
    def _enc(self) -> Encoder:
        assert self.encoder is not None
        return self.encoder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Dense vectors of documents, as lists of Python floats."""
        out = encode_cached(
            self._enc,
            texts,
            "document",
            max_length=self.document_max_length,
            batch_size=self.batch_size,
        )
        return [o.dense.tolist() for o in out]

    def embed_query(self, text: str) -> list[float]:
        """Dense vector of a query (query instruction and query max length applied)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        (out,) = encode_cached(
            self._enc,
            [text],
            "query",
            max_length=self.query_max_length,
            batch_size=self.batch_size,
        )
        return out.dense.tolist()

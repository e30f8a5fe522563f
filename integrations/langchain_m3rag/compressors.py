"""``M3Reranker``: the bge-reranker-v2-m3 cross-encoder as a LangChain document compressor."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, model_validator

from m3_rag import CrossEncoder, Reranker


class M3Reranker(BaseDocumentCompressor):
    """Rerank documents for a query; use with ``ContextualCompressionRetriever``.

    Attributes:
        reranker: An existing :class:`m3_rag.Reranker` (loaded from ``model_name_or_path``
            when not given).
        model_name_or_path: Hub id or local directory of the cross-encoder.
        top_n: Documents kept, best first.
        normalize: Sigmoid-normalised scores in ``(0, 1)``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    reranker: CrossEncoder | None = Field(default=None, exclude=True)
    model_name_or_path: str = "BAAI/bge-reranker-v2-m3"
    top_n: int = 3
    normalize: bool = False

    @model_validator(mode="after")
    def _load(self) -> M3Reranker:
        if self.reranker is None:
            self.reranker = Reranker(self.model_name_or_path)
        return self

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """The ``top_n`` best documents, each with ``metadata['relevance_score']``."""
        assert self.reranker is not None
        docs = list(documents)
        ranked = self.reranker.rerank(
            query, [d.page_content for d in docs], top_n=self.top_n, normalize=self.normalize
        )
        return [
            Document(
                id=docs[i].id,
                page_content=docs[i].page_content,
                metadata={**docs[i].metadata, "relevance_score": score},
            )
            for i, score in ranked
        ]

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks)

"""``M3Rerank``: the bge-reranker-v2-m3 cross-encoder as a LlamaIndex node postprocessor."""

from __future__ import annotations

from typing import Any

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr

from m3_rag import CrossEncoder, Reranker


class M3Rerank(BaseNodePostprocessor):
    """Rerank retrieved nodes with a cross-encoder; keeps the ``top_n`` best.

    Args:
        top_n: Nodes kept.
        model: Hub id or local directory (ignored when ``reranker`` is given).
        reranker: An existing :class:`m3_rag.Reranker`.
        normalize: Sigmoid-normalised scores in ``(0, 1)``.
    """

    top_n: int = Field(default=3, description="nodes kept")
    model: str = Field(default="BAAI/bge-reranker-v2-m3")
    normalize: bool = False
    _reranker: CrossEncoder = PrivateAttr()

    def __init__(
        self,
        top_n: int = 3,
        model: str = "BAAI/bge-reranker-v2-m3",
        reranker: CrossEncoder | None = None,
        normalize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(top_n=top_n, model=model, normalize=normalize, **kwargs)  # type: ignore[call-arg]
        self._reranker = reranker if reranker is not None else Reranker(model)

    @classmethod
    def class_name(cls) -> str:
        return "M3Rerank"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("M3Rerank needs the query: pass query_bundle (or query_str)")
        if not nodes:
            return []
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        ranked = self._reranker.rerank(
            query_bundle.query_str, texts, top_n=self.top_n, normalize=self.normalize
        )
        return [NodeWithScore(node=nodes[i].node, score=score) for i, score in ranked]

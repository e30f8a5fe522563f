"""Request bodies (pydantic): unknown fields, wrong types, NaN and lone surrogates are
refused before anything runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from m3_rag._inputs import check_unicode

__all__ = [
    "DeleteRequest",
    "Document",
    "DocumentsRequest",
    "EmbeddingsRequest",
    "EncodeRequest",
    "RerankRequest",
    "SearchRequest",
]

Count = Annotated[int, Field(ge=1, le=100_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _texts(value: Any, name: str) -> Any:
    """Texts: a str or a list of str, each valid Unicode (the types are checked by pydantic)."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list):
        for i, t in enumerate(items):
            if isinstance(t, str):
                check_unicode(t, f"{name}[{i}]" if not isinstance(value, str) else name)
    return value


class EmbeddingsRequest(_Body):
    """``POST /v1/embeddings`` (OpenAI's request; token-id input is not supported)."""

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: StrictStr | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
            raise ValueError("token ids are not accepted: send the text itself")
        return value

    @field_validator("input", mode="after")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return _texts(value, "input")


class EncodeRequest(_Body):
    """``POST /v1/encode``: the three outputs of the served model."""

    input: StrictStr | list[StrictStr]
    role: Literal["query", "document"] = "document"
    return_dense: bool = True
    return_sparse: bool | None = None
    return_colbert: bool | None = None
    max_length: Count | None = None
    dense_format: Literal["float", "base64"] = "float"
    colbert_format: Literal["float", "base64", "base64-float16"] = "float"
    model: StrictStr | None = None

    @field_validator("input", mode="after")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return _texts(value, "input")


class RerankRequest(_Body):
    """``POST /v1/rerank`` (the Cohere / Jina request)."""

    query: StrictStr
    documents: list[StrictStr]
    top_n: Annotated[int, Field(ge=0)] | None = None
    return_documents: bool = False
    normalize: bool = False
    model: StrictStr | None = None

    @field_validator("query", mode="after")
    @classmethod
    def _query(cls, value: str) -> str:
        return check_unicode(value, "query")

    @field_validator("documents", mode="after")
    @classmethod
    def _documents(cls, value: list[str]) -> list[str]:
        _texts(value, "documents")
        return value


class SearchRequest(_Body):
    """``POST /v1/search`` over the served index."""

    query: StrictStr
    k: Annotated[int, Field(ge=0, le=10_000)] = 10
    filter: dict[str, Any] | None = None
    weights: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    fusion: Literal["weighted", "rrf"] | None = None
    candidates: Annotated[int, Field(ge=1, le=10_000)] | None = None
    rerank: bool | None = None

    @field_validator("query", mode="after")
    @classmethod
    def _query(cls, value: str) -> str:
        return check_unicode(value, "query")


class Document(_Body):
    """One document to add (an existing id is replaced)."""

    id: StrictStr | None = None
    text: StrictStr
    metadata: dict[str, Any] | None = None

    @field_validator("text", mode="after")
    @classmethod
    def _text(cls, value: str) -> str:
        return check_unicode(value, "text")


class DocumentsRequest(_Body):
    """``POST /v1/documents``."""

    documents: list[Document]


class DeleteRequest(_Body):
    """``DELETE /v1/documents``."""

    ids: list[StrictStr]
    missing_ok: bool = False

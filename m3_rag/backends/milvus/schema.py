"""Milvus collection layout, the record a collection keeps of its index, the limits of a row,
and expression helpers (no pymilvus import at module level).

Collection formats: 2 (this version) names the lexical field ``lexical``; 1 (earlier
versions) named it ``sparse``. Both open: the field is read from the collection's schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.filters import milvus_literal
from m3_rag.backends.protocol import IndexSpec
from m3_rag.backends.server import check_int64

__all__ = [
    "FORMAT",
    "FORMATS",
    "LEXICAL_FIELDS",
    "MAX_ID_BYTES",
    "MAX_TEXT_BYTES",
    "check_documents",
    "check_json",
    "check_sizes",
    "create_collections",
    "is_server",
    "lexical_field",
    "record",
    "str_list",
]

MAX_ID_BYTES = 512
MAX_TEXT_BYTES = 65535
FORMAT = 2  # the collection format written
FORMATS = (1, 2)  # the formats read
LEXICAL_FIELDS = ("lexical", "sparse")  # the lexical field's name: format 2, format 1


def create_collections(
    client: Any,
    spec: IndexSpec,
    collection: str,
    meta_collection: str,
    index_type: str,
    index_params: Mapping[str, Any],
) -> None:
    """Create the document collection for ``spec`` and its side (meta) collection."""
    from pymilvus import DataType

    c = client
    meta = c.create_schema(auto_id=False, enable_dynamic_field=False)
    meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    meta.add_field("value", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    meta.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
    meta_index = c.prepare_index_params()
    meta_index.add_index("vec", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    c.create_collection(
        meta_collection,
        schema=meta,
        index_params=meta_index,
        consistency_level="Strong",
    )
    s = c.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    s.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    s.add_field("metadata", DataType.JSON)
    s.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dense_dim)
    index = c.prepare_index_params()
    index.add_index("dense", index_type=index_type, metric_type="IP", params=dict(index_params))
    if spec.lexical:
        s.add_field("lexical", DataType.SPARSE_FLOAT_VECTOR)
        index.add_index("lexical", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    if spec.lexical == "bm25":
        s.add_field("dl", DataType.DOUBLE)
        s.add_field("avgdl", DataType.DOUBLE)
    if spec.colbert_dim:
        s.add_field(
            "colbert",
            DataType.ARRAY,
            element_type=DataType.VARCHAR,
            max_capacity=codec.MAX_CHUNKS,
            max_length=codec.CHUNK_CHARS,
        )
    c.create_collection(collection, schema=s, index_params=index, consistency_level="Strong")


def lexical_field(client: Any, collection: str) -> str | None:
    """The name of the lexical field of an existing ``collection`` (``"lexical"``, or
    ``"sparse"`` in a format-1 collection), ``None`` when it has none."""
    names = {f["name"] for f in client.describe_collection(collection)["fields"]}
    return next((n for n in LEXICAL_FIELDS if n in names), None)


def record(spec: IndexSpec) -> dict[str, Any]:
    """What a collection records of its index: ``spec.to_json()`` and the format."""
    return spec.to_json() | {"format": FORMAT}


def check_sizes(ids: Sequence[str], texts: Sequence[str]) -> None:
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        if len(doc_id.encode()) > MAX_ID_BYTES:
            raise ValueError(f"ids[{i}] is longer than {MAX_ID_BYTES} bytes")
        milvus_literal(doc_id)  # no control characters: ids appear in expressions
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise ValueError(
                f"texts[{i}] is {len(text.encode())} bytes, over Milvus's {MAX_TEXT_BYTES}; "
                "split long texts (m3_rag.sources.chunk_text)"
            )


MAX_JSON_BYTES = 65536


def check_json(value: Any, name: str) -> None:
    """Refuse metadata Milvus's JSON field cannot hold: integers outside int64, or more than
    ``MAX_JSON_BYTES`` once encoded.

    Raises:
        ValueError: naming ``name``.
    """
    check_int64(value, name, "Milvus")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{name} is {size} bytes of JSON, over Milvus's {MAX_JSON_BYTES}")


def check_documents(ids: Sequence[str], texts: Sequence[str], metadatas: Sequence[Any]) -> None:
    """Refuse what a Milvus row cannot hold, every row before any is written: ids and
    texts too long, ids with control characters, metadata :func:`check_json` refuses.

    Raises:
        ValueError: naming the first bad row.
    """
    check_sizes(ids, texts)
    for i, m in enumerate(metadatas):
        check_json(m, f"metadatas[{i}]")


def str_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(milvus_literal(v) for v in values) + "]"


def is_server(uri: str) -> bool:
    """True for a server URI, False for a Milvus Lite file path."""
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))

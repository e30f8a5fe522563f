"""Rows of a Milvus collection: encoding a validated batch, reading rows by id (in chunks
whose replies stay far below gRPC limits) or page by page, and removing them by id."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.milvus import codec
from m3_rag.backends.milvus.schema import str_list
from m3_rag.backends.validate import PreparedBatch

__all__ = ["delete_ids", "encode_rows", "fetch_rows", "pages"]

PAGE = 1000  # rows per paged request


def encode_rows(
    batch: PreparedBatch,
    lexical_field: str,
    lexical: sp.csr_matrix | None,
    vocab_size: int,
    lengths: tuple[np.ndarray, float] | None = None,
) -> list[dict[str, Any]]:
    """The Milvus rows of ``batch``.

    Args:
        batch: What :func:`~m3_rag.backends.validate.prepare_batch` returned.
        lexical_field: The collection's lexical field.
        lexical: ``[m, V]`` lexical weights to store (BM25: the document side), or ``None``.
        vocab_size: The vocabulary size (an empty sparse row stores a sentinel beyond it).
        lengths: BM25 only: ``(dl, avgdl)``, each document's length and the mean length
            its weights were computed with.

    Raises:
        ValueError: a document with more ColBERT vectors than one row holds.
    """
    rows: list[dict[str, Any]] = [
        {"id": i, "text": t, "metadata": m, "dense": v}
        for i, t, m, v in zip(batch.ids, batch.texts, batch.metadatas, batch.dense, strict=True)
    ]
    if batch.colbert is not None and batch.colbert_offsets is not None:
        packed, offsets, scales = batch.colbert, batch.colbert_offsets, batch.colbert_scales
        for r, a, b in zip(rows, offsets[:-1], offsets[1:], strict=True):
            r["colbert"] = codec.encode_blob(packed[a:b], None if scales is None else scales[a:b])
    if lexical is not None:
        for i, r in enumerate(rows):
            r[lexical_field] = codec.encode_sparse(lexical[i], vocab_size)
    if lengths is not None:
        for r, length in zip(rows, lengths[0].tolist(), strict=True):
            r["dl"], r["avgdl"] = length, lengths[1]
    return rows


def fetch_rows(
    client: Any, collection: str, ids: Sequence[str], fields: Sequence[str]
) -> list[dict[str, Any]]:
    """The stored rows among ``ids`` with ``fields`` (``"*"``: all), in no particular order."""
    found: list[dict[str, Any]] = []
    step = 32 if "colbert" in fields or "*" in fields else 512  # replies far below gRPC limits
    for start in range(0, len(ids), step):
        part = list(ids[start : start + step])
        found += client.query(
            collection,
            filter=f"id in {str_list(part)}",
            output_fields=list(fields),
            limit=len(part),
        )
    return found


def delete_ids(client: Any, collection: str, ids: Sequence[str], batch_size: int) -> None:
    """Remove the rows of ``ids``, ``batch_size`` ids per request."""
    for start in range(0, len(ids), batch_size):
        part = list(ids[start : start + batch_size])
        client.delete(collection, filter=f"id in {str_list(part)}")


def pages(
    client: Any, collection: str, fields: list[str], expr: str, *, server: bool
) -> Iterator[list[dict[str, Any]]]:
    """``fields`` of every stored row matching the Milvus expression ``expr`` (all rows for
    ``""``), :data:`PAGE` rows per request."""
    if server:  # a server pages consistently with its query iterator
        it = client.query_iterator(collection, batch_size=PAGE, filter=expr, output_fields=fields)
        yield from iter(it.next, [])
        return
    for start in itertools.count(0, PAGE):  # Milvus Lite: offsets in a fixed order
        batch = client.query(
            collection, filter=expr, output_fields=fields, limit=PAGE, offset=start
        )
        if not batch:
            return
        yield batch

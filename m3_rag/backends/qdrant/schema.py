"""Qdrant collection layout and point encoding (no qdrant-client import at module level)."""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.legacy.colbert import ColbertStore
from m3_rag.backends.legacy.dense import DenseStore
from m3_rag.backends.protocol import IndexSpec
from m3_rag.backends.qdrant.filters import metadata_path
from m3_rag.backends.server import check_int64
from m3_rag.bm25 import BM25Params, bm25_tf

__all__ = ["FORMAT", "PAYLOAD_TYPES", "check_payload", "create_collection", "point_id", "to_points"]

FORMAT = 1
PAYLOAD_TYPES = ("keyword", "integer", "float", "bool")
_NAMESPACE = uuid.UUID("6b1f4c52-3f0e-5d8a-9c57-0b6f2a7e4d11")


def point_id(doc_id: str) -> str:
    """The Qdrant point id of document ``doc_id`` (UUIDv5: Qdrant ids are ints or UUIDs)."""
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def create_collection(
    client: Any,
    name: str,
    spec: IndexSpec,
    metadata: dict[str, Any],
    *,
    dense_on_disk: bool,
    colbert_on_disk: bool,
    colbert_quantization: str | None,
    indexed_fields: Mapping[str, str],
) -> None:
    """Create collection ``name`` for ``spec``: named vectors ``dense`` (dot product),
    ``colbert`` (multivector, MaxSim, no HNSW graph) and sparse ``lexical`` (the IDF
    modifier for BM25), ``metadata`` as the collection's metadata, payload indexes on
    ``id`` and on ``indexed_fields``."""
    from qdrant_client import models

    def dtype(name: str) -> Any:
        return models.Datatype.FLOAT16 if name == "float16" else models.Datatype.FLOAT32

    vectors = {
        "dense": models.VectorParams(
            size=spec.dense_dim,
            distance=models.Distance.DOT,
            on_disk=dense_on_disk,
            datatype=dtype(spec.dense_dtype),
        )
    }
    if spec.colbert_dim:
        quant = None
        if colbert_quantization == "int8":
            quant = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
        vectors["colbert"] = models.VectorParams(
            size=spec.colbert_dim,
            distance=models.Distance.DOT,
            multivector_config=models.MultiVectorConfig(
                comparator=models.MultiVectorComparator.MAX_SIM
            ),
            hnsw_config=models.HnswConfigDiff(m=0),  # rescoring only: no graph
            on_disk=colbert_on_disk,
            quantization_config=quant,
            datatype=dtype(spec.colbert_dtype),
        )
    sparse = {}
    if spec.lexical:
        sparse["lexical"] = models.SparseVectorParams(
            modifier=models.Modifier.IDF if spec.lexical == "bm25" else None
        )
    client.create_collection(
        name, vectors_config=vectors, sparse_vectors_config=sparse, metadata=metadata
    )
    kinds = {
        "keyword": models.PayloadSchemaType.KEYWORD,
        "integer": models.PayloadSchemaType.INTEGER,
        "float": models.PayloadSchemaType.FLOAT,
        "bool": models.PayloadSchemaType.BOOL,
    }
    with warnings.catch_warnings():  # local mode warns that it has no payload indexes
        warnings.simplefilter("ignore", UserWarning)
        client.create_payload_index(name, "id", kinds["keyword"])
        for key, kind in indexed_fields.items():
            client.create_payload_index(name, metadata_path(key), kinds[kind])


def to_points(
    spec: IndexSpec,
    ids: Sequence[str],
    texts: Sequence[str],
    metadatas: Sequence[dict[str, Any]],
    dense: np.ndarray,
    lexical: sp.csr_matrix | None,
    colbert: Sequence[np.ndarray] | None,
    avgdl: float | None,
) -> list[Any]:
    """Validate vectors and metadata and encode documents as ``PointStruct`` s (nothing is
    written). ``ids`` and the batch's shape are checked already (``check_batch``), and
    ``lexical`` is the validated ``[m, vocab]`` block (``LexicalStore._prepare``).

    Vectors are rounded to the index's storage dtypes first, so Qdrant scores the values
    the local engine stores. BM25 ``lexical`` is term counts, stored as the document side
    of BM25 with reference length ``avgdl``.

    Raises:
        ValueError: NaN/inf vectors, metadata a payload cannot hold.
    """
    from qdrant_client import models

    for i, m in enumerate(metadatas):
        check_payload(m, f"metadatas[{i}]")
    vecs = DenseStore(spec.dense_dim, spec.dense_dtype)._prepare(ids, dense)[1]
    vecs = vecs.astype(spec.dense_dtype).astype(np.float32)
    named: list[dict[str, Any]] = [{"dense": v.tolist()} for v in vecs]
    if spec.colbert_dim and colbert is not None:
        store = ColbertStore(spec.colbert_dim, spec.colbert_dtype)
        _, block, lengths, scales = store._prepare(ids, colbert)
        values = block.astype(np.float32)
        if scales is not None:  # int8: what the local engine scores, dequantised
            values *= scales[:, None]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for v, a, b in zip(named, offsets[:-1], offsets[1:], strict=True):
            if b > a:  # a point without ColBERT vectors scores 0 on that leg
                v["colbert"] = values[a:b].tolist()
    if spec.lexical and lexical is not None:
        weights = lexical
        if spec.lexical == "bm25":
            weights = bm25_weights(weights, avgdl or 1.0, spec.bm25 or BM25Params())
        for i, v in enumerate(named):
            a, b = weights.indptr[i], weights.indptr[i + 1]
            v["lexical"] = models.SparseVector(
                indices=weights.indices[a:b].tolist(), values=weights.data[a:b].tolist()
            )
    return [
        models.PointStruct(id=point_id(i), vector=v, payload={"id": i, "text": t, "metadata": m})
        for i, t, m, v in zip(ids, texts, metadatas, named, strict=True)
    ]


def bm25_weights(counts: sp.csr_matrix, avgdl: float, p: BM25Params) -> sp.csr_matrix:
    """``[m, vocab]`` BM25 document side ``tf (k1+1) / (tf + k1 (1 - b + b dl/avgdl))`` of
    term counts ``[m, vocab]``."""
    dl = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    data = bm25_tf(counts.data, dl[rows], avgdl, p).astype(np.float32)
    return sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)


def check_payload(value: Any, name: str) -> None:
    """Refuse metadata a Qdrant payload cannot hold: integers outside int64, NaN or
    infinity, objects JSON cannot encode.

    Raises:
        ValueError: naming ``name``.
    """
    check_int64(value, name, "Qdrant")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} is not plain JSON ({e})") from e

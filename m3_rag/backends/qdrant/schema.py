"""Qdrant collection layout, the record a collection keeps of its index, and point encoding
(no qdrant-client import at module level).

Collection formats: 2 (this version) records ``IndexSpec.to_json()``, and its ColBERT
multivector is int8 scalar-quantised when the spec's ``colbert_dtype`` is ``"int8"``,
binary-quantised (a 1-bit copy in RAM, the codes' own bits; the stored values are the
codes' ``±1 / sqrt(dim)`` float32 values, ``ColbertCodec.float_vectors``) when it is
``"binary"`` or ``"rotated-binary"`` (whose queries are rotated, ``float_query``); 1
(earlier versions) recorded the same keys without ``dense_dtype`` and quantised ColBERT on a
constructor switch (``colbert_quantization="int8"``), which such collections keep. Both open.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag.backends.protocol import IndexSpec
from m3_rag.backends.qdrant.filters import metadata_path
from m3_rag.backends.server import check_int64
from m3_rag.backends.validate import PreparedBatch
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.codecs import get_codec

__all__ = [
    "FORMAT",
    "FORMATS",
    "PAYLOAD_TYPES",
    "check_payload",
    "create_collection",
    "point_id",
    "record",
    "to_points",
]

FORMAT = 2  # the collection format written
FORMATS = (1, 2)  # the formats read
PAYLOAD_TYPES = ("keyword", "integer", "float", "bool")
_NAMESPACE = uuid.UUID("6b1f4c52-3f0e-5d8a-9c57-0b6f2a7e4d11")


def point_id(doc_id: str) -> str:
    """The Qdrant point id of document ``doc_id`` (UUIDv5: Qdrant ids are ints or UUIDs)."""
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def record(spec: IndexSpec) -> dict[str, Any]:
    """What a collection records of its index: ``spec.to_json()`` and the format."""
    return spec.to_json() | {"format": FORMAT}


def create_collection(
    client: Any,
    name: str,
    spec: IndexSpec,
    metadata: dict[str, Any],
    *,
    dense_on_disk: bool,
    colbert_on_disk: bool,
    indexed_fields: Mapping[str, str],
) -> None:
    """Create collection ``name`` for ``spec``: named vectors ``dense`` (dot product),
    ``colbert`` (multivector, MaxSim, no HNSW graph; int8 scalar-quantised, kept in RAM,
    when ``spec.colbert_dtype`` is ``"int8"``) and sparse ``lexical`` (the IDF modifier for
    BM25), ``metadata`` as the collection's metadata, payload indexes on ``id`` and on
    ``indexed_fields``."""
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
        quant: Any = None
        if spec.colbert_dtype == "int8":
            quant = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
        elif get_codec(spec.colbert_dtype).dtype.kind == "u":  # bit codes: binary, rotated-binary
            quant = models.BinaryQuantization(
                binary=models.BinaryQuantizationConfig(always_ram=True)
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


def to_points(spec: IndexSpec, batch: PreparedBatch, avgdl: float | None) -> list[Any]:
    """Encode a validated batch (:func:`~m3_rag.backends.validate.prepare_batch`, its
    metadata checked by :func:`check_payload`) as ``PointStruct`` s (nothing is written).

    Vectors are in the index's storage dtypes already, so Qdrant scores the values the
    local engine stores (ColBERT codes as their codec's ``float_vectors``: int8 codes
    dequantised, binary and rotated-binary codes as ``±1 / sqrt(dim)``, the latter scored
    with the rotated query). BM25
    ``batch.lexical`` is term
    counts, stored as the document side of BM25 with reference length ``avgdl``.
    """
    from qdrant_client import models

    named: list[dict[str, Any]] = [{"dense": v.tolist()} for v in batch.dense.astype(np.float32)]
    if batch.colbert is not None and batch.colbert_offsets is not None:
        codec = get_codec(spec.colbert_dtype)  # what the local engine scores
        dim = int(spec.colbert_dim or 0)
        values = codec.float_vectors(batch.colbert, batch.colbert_scales, dim)
        offsets = batch.colbert_offsets
        for v, a, b in zip(named, offsets[:-1], offsets[1:], strict=True):
            if b > a:  # a point without ColBERT vectors scores 0 on that leg
                v["colbert"] = values[a:b].tolist()
    if batch.lexical is not None:
        weights = batch.lexical
        if spec.lexical == "bm25":
            weights = bm25_weights(weights, avgdl or 1.0, spec.bm25 or BM25Params())
        for i, v in enumerate(named):
            a, b = weights.indptr[i], weights.indptr[i + 1]
            v["lexical"] = models.SparseVector(
                indices=weights.indices[a:b].tolist(), values=weights.data[a:b].tolist()
            )
    return [
        models.PointStruct(id=point_id(i), vector=v, payload={"id": i, "text": t, "metadata": m})
        for i, t, m, v in zip(batch.ids, batch.texts, batch.metadatas, named, strict=True)
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

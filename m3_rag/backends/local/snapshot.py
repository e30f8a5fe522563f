"""The in-memory face of the local engine, and the snapshot format (version 2) it saves.

:class:`MemoryBackend` is a :class:`~m3_rag.backends.LocalBackend` without a directory,
built from its dimensions (for tests and tools that use a backend without a retriever).
``HybridRetriever.save`` writes any local index as one snapshot (``m3_rag.persist``);
:func:`from_snapshot` reads it back as one in-memory segment, validating every array as
``add`` validates its input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from m3_rag.backends.legacy.colbert import DTYPES as COLBERT_DTYPES
from m3_rag.backends.legacy.colbert import ColbertStore
from m3_rag.backends.legacy.dense import DenseStore
from m3_rag.backends.legacy.lexical import LexicalStore
from m3_rag.backends.local.engine import ANN_THRESHOLD, LocalBackend
from m3_rag.backends.local.segment import ColbertBlock, DocTable, LexicalPostings, Segment
from m3_rag.backends.local.segment_io import SegmentOptions, build_segment
from m3_rag.backends.protocol import IndexSpec
from m3_rag.bm25 import BM25Params
from m3_rag.persist import IndexFormatError, read_index, write_index

__all__ = ["MemoryBackend", "check_config", "from_snapshot", "snapshot"]


class MemoryBackend(LocalBackend):
    """An in-memory local backend for the given shapes.

    Args:
        dense_dim: Dense vector size.
        colbert_dim: ColBERT vector size, ``None`` for no ColBERT store.
        lexical: ``"m3"``, ``"bm25"`` or ``None`` (no lexical leg).
        vocab_size: Token-id space of the lexical store.
        dense_dtype: ``"float32"`` or ``"float16"``.
        colbert_dtype: ``"float16"``, ``"float32"`` or ``"int8"`` (+ a scale per vector).
        bm25: BM25 parameters.
        ann_threshold: See :class:`~m3_rag.backends.LocalBackend`.
    """

    def __init__(
        self,
        dense_dim: int,
        colbert_dim: int | None,
        lexical: str | None,
        vocab_size: int,
        *,
        dense_dtype: str = "float32",
        colbert_dtype: str = "float16",
        bm25: BM25Params | None = None,
        ann_threshold: int | None = ANN_THRESHOLD,
    ) -> None:
        super().__init__(None, ann_threshold=ann_threshold)
        self.open(
            IndexSpec(
                "",
                dense_dim,
                colbert_dim,
                lexical,  # type: ignore[arg-type]  # this module is removed next
                vocab_size,
                dense_dtype=dense_dtype,
                colbert_dtype=colbert_dtype,
                bm25=bm25,
            )
        )

    def save(self, path: str | os.PathLike[str], settings: Mapping[str, Any] | None = None) -> None:
        """Write the backend as one snapshot, atomically."""
        config, arrays = snapshot(self)
        write_index(path, {"store": "MemoryBackend", **config}, arrays, self.docs())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalBackend:
        """Read a snapshot written by :meth:`save` (or ``HybridRetriever.save``)."""
        manifest, arrays, docs = read_index(path)
        if manifest.get("store", "MemoryBackend") != "MemoryBackend":
            raise ValueError(f"{path} holds a {manifest.get('store')!r}, not a MemoryBackend")
        return from_snapshot(manifest, arrays, docs)

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], docs: list[dict[str, Any]]
    ) -> LocalBackend:
        return from_snapshot(config, arrays, docs)


def snapshot(backend: LocalBackend) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The live documents of ``backend`` as snapshot arrays (one merged segment in RAM)."""
    spec = backend._need_spec()
    view = backend._view
    parts = [(s, view.live_rows(i)) for i, s in enumerate(view.segments)]
    parts = [(s, r) for s, r in parts if len(r)]
    arrays: dict[str, np.ndarray] = {}
    if not parts:
        arrays["dense_vectors"] = np.zeros((0, spec.dense_dim), spec.dense_dtype)
        if spec.lexical:
            arrays |= {
                "lexical_indptr": np.zeros(1, np.int64),
                "lexical_indices": np.zeros(0, np.int32),
                "lexical_data": np.zeros(0, np.float32),
            }
        if spec.colbert_dim:
            arrays["colbert_vectors"] = np.zeros((0, spec.colbert_dim), spec.colbert_dtype)
            arrays["colbert_offsets"] = np.zeros(1, np.int64)
            if spec.colbert_dtype == "int8":
                arrays["colbert_scales"] = np.zeros(0, np.float32)
        return backend.config(), arrays
    opts = SegmentOptions(spec.dense_dtype, spec.colbert_dtype, None)
    seg = parts[0][0] if len(parts) == 1 and len(parts[0][1]) == len(parts[0][0]) else None
    if seg is None:
        seg = build_segment("seg-00000000", parts, opts, spec.vocab_size)
    arrays["dense_vectors"] = np.asarray(seg.dense)
    if seg.lexical is not None:
        arrays |= {
            "lexical_indptr": np.asarray(seg.lexical.indptr),
            "lexical_indices": np.asarray(seg.lexical.indices),
            "lexical_data": np.asarray(seg.lexical.data),
        }
    if seg.colbert is not None:
        arrays["colbert_vectors"] = np.asarray(seg.colbert.vectors)
        arrays["colbert_offsets"] = np.asarray(seg.colbert.offsets)
        if seg.colbert.scales is not None:
            arrays["colbert_scales"] = np.asarray(seg.colbert.scales)
    return backend.config(), arrays


def from_snapshot(
    config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], docs: list[dict[str, Any]]
) -> LocalBackend:
    """Rebuild an in-memory backend from :func:`~m3_rag.persist.read_index` output.

    Raises:
        IndexFormatError: a configuration value of the wrong type, or arrays that are
            inconsistent, non-finite or out of range (the message names the file).
    """
    check_config(config)
    ids = [d["id"] for d in docs]

    def pick(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    for prefix, need in (("dense_", ("vectors",)), ("lexical_", ("indptr", "indices", "data"))):
        if prefix == "lexical_" and not config["lexical"]:
            continue
        missing = [n for n in need if n not in pick(prefix)]
        if missing:
            raise IndexFormatError(f"the index has no {prefix}{missing[0]}.npy")
    if config["colbert_dim"] and not {"vectors", "offsets"} <= set(pick("colbert_")):
        raise IndexFormatError("the index has no colbert_vectors.npy / colbert_offsets.npy")
    dense = DenseStore.from_state(ids, pick("dense_"), config["dense_dtype"], config["dense_dim"])
    lexical = None
    if config["lexical"]:
        store = LexicalStore.from_state(
            ids, pick("lexical_"), config["vocab_size"], config["lexical"], config.get("bm25")
        )
        lexical = LexicalPostings.from_csr(store._matrix())
    colbert = None
    if config["colbert_dim"]:
        c = ColbertStore.from_state(
            ids, pick("colbert_"), config["colbert_dtype"], config["colbert_dim"]
        )
        state = c.state()
        colbert = ColbertBlock(state["vectors"], state["offsets"], state.get("scales"))
    backend = MemoryBackend(
        config["dense_dim"],
        config["colbert_dim"],
        config["lexical"],
        config["vocab_size"] or 1,
        dense_dtype=config["dense_dtype"],
        colbert_dtype=config["colbert_dtype"] or "float16",
        bm25=BM25Params(**config["bm25"]) if config.get("bm25") else None,
    )
    if ids:
        seg = Segment(
            "",
            ids,
            dense.vectors,
            lexical,
            colbert,
            DocTable(
                texts=[d["text"] for d in docs], metas=[d.get("metadata") or {} for d in docs]
            ),
        )
        with backend._lock:
            new = build_segment(
                backend._name(),
                [(seg, np.arange(len(ids)))],
                backend.options,
                backend._need_spec().vocab_size,
            )
            backend._publish(backend._with_segment(backend._view, new), {}, added=[new])
    return backend


def _is_int(x: Any, minimum: int = 1) -> bool:
    return type(x) is int and x >= minimum


def check_config(config: Mapping[str, Any]) -> None:
    """Check the types and ranges of a saved memory backend's configuration.

    Raises:
        IndexFormatError: naming the first bad key.
    """
    checks: dict[str, Any] = {
        "dense_dim": _is_int,
        "dense_dtype": lambda x: x in ("float32", "float16"),
        "colbert_dim": lambda x: x is None or _is_int(x),
        "colbert_dtype": lambda x: x is None or x in COLBERT_DTYPES,
        "lexical": lambda x: x in (None, "m3", "bm25"),
        "vocab_size": lambda x: x is None or _is_int(x),
        "bm25": lambda x: (
            x is None
            or (
                isinstance(x, dict)
                and set(x) == {"k1", "b", "epsilon"}
                and all(type(v) in (int, float) and np.isfinite(v) for v in x.values())
            )
        ),
    }
    for key, ok in checks.items():
        if key not in config or not ok(config[key]):
            raise IndexFormatError(f"manifest.json: bad or missing {key!r}: {config.get(key)!r}")
    if config["lexical"] and not config["vocab_size"]:
        raise IndexFormatError("manifest.json: a lexical index needs 'vocab_size'")
    if config["colbert_dim"] and not config["colbert_dtype"]:
        raise IndexFormatError("manifest.json: a ColBERT index needs 'colbert_dtype'")

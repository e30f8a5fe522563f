"""Index format 2 (the snapshot m3-rag wrote before format 3), kept for tests only.

:func:`write_index` is the old ``m3_rag.persist.write_index``, unchanged, so migration and
the refusal of tampered snapshots are tested against genuine snapshots;
:func:`write_format2` writes a backend's live documents as ``HybridRetriever.save`` did.
The library no longer writes this format.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m3_rag.backends.local import LocalBackend
from m3_rag.backends.validate import quantize_int8
from m3_rag.persist import check_target, flock, fsync_dir, remove, write_file, writer_lock

FORMAT = "m3-rag-index"
VERSION = 2
_POINTER = "CURRENT"
_READ_LOCK = ".m3-rag.readers"
_SNAPSHOT = re.compile(r"^snap-\d{8}T\d{6}-[0-9a-f]{8}$")
_ARRAY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def write_index(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    docs: Iterable[dict[str, Any]],
) -> Path:
    """Write a snapshot and make it current, atomically, under the writer lock (the old
    format-2 writer) -> the new snapshot directory."""
    root = Path(path)
    for key in arrays:
        if not _ARRAY.match(key):
            raise ValueError(f"array name {key!r} must match {_ARRAY.pattern}")
    check_target(root)
    root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root):
        check_target(root)
        for stale in root.iterdir():
            if stale.name.startswith((".tmp-snap-", f".{_POINTER}.")):
                remove(stale)
        name = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = root / f".tmp-{name}"
        tmp.mkdir()
        try:
            files: dict[str, dict[str, Any]] = {}
            shapes = {}
            for key, arr in arrays.items():
                a = np.ascontiguousarray(arr)
                files[f"{key}.npy"] = write_file(
                    tmp / f"{key}.npy", lambda f, a=a: np.save(f, a, allow_pickle=False)
                )
                shapes[key] = {"shape": list(a.shape), "dtype": str(a.dtype)}

            def write_docs(f: Any) -> None:
                buf = io.BufferedWriter(f, buffer_size=1 << 20)
                for doc in docs:
                    line = json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n"
                    buf.write(line.encode("utf-8"))
                buf.flush()
                buf.detach()

            files["docs.jsonl"] = write_file(tmp / "docs.jsonl", write_docs)
            full = {"format": FORMAT, "version": VERSION, **manifest}
            full |= {"arrays": shapes, "files": files}
            body = json.dumps(full, indent=1).encode("utf-8")
            write_file(tmp / "manifest.json", lambda f: f.write(body))
            fsync_dir(tmp)
            os.rename(tmp, root / name)
            pointer = root / f".{_POINTER}.{uuid.uuid4().hex[:8]}"
            current = {
                "format": FORMAT,
                "snapshot": name,
                "manifest_sha256": hashlib.sha256(body).hexdigest(),
            }
            pointer.write_text(json.dumps(current), encoding="utf-8")
            with open(pointer, "rb") as f:
                os.fsync(f.fileno())
            os.replace(pointer, root / _POINTER)
            fsync_dir(root)
        except BaseException:
            remove(tmp)
            raise
        with flock(root / _READ_LOCK, exclusive=True, blocking=False) as no_readers:
            if no_readers:
                for stale in root.iterdir():
                    if stale.name != name and _SNAPSHOT.match(stale.name):
                        remove(stale)
    return root / name


def snapshot_of(backend: LocalBackend) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The configuration keys and arrays ``HybridRetriever.save`` wrote for ``backend``."""
    spec = backend.spec
    assert spec is not None
    batches = list(backend.export(1 << 30))
    dense = [b.dense for b in batches] or [np.zeros((0, spec.dense_dim), np.float32)]
    arrays = {"dense_vectors": np.concatenate(dense).astype(spec.dense_dtype)}
    if spec.lexical is not None:
        import scipy.sparse as sp

        parts = [b.lexical for b in batches if b.lexical is not None]
        csr = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, spec.vocab_size))
        arrays |= {
            "lexical_indptr": csr.indptr.astype(np.int64),
            "lexical_indices": csr.indices.astype(np.int32),
            "lexical_data": csr.data.astype(np.float32),
        }
    if spec.colbert_dim is not None:
        mats = [m for b in batches for m in (b.colbert or [])]
        lengths = [len(m) for m in mats]
        vecs = np.concatenate(mats) if mats else np.zeros((0, spec.colbert_dim), np.float32)
        arrays["colbert_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if spec.colbert_dtype == "int8":
            arrays["colbert_vectors"], arrays["colbert_scales"] = quantize_int8(vecs)
        else:
            arrays["colbert_vectors"] = vecs.astype(spec.colbert_dtype)
    config = {
        "count": len(backend),
        "dense_dim": spec.dense_dim,
        "dense_dtype": spec.dense_dtype,
        "colbert_dim": spec.colbert_dim,
        "colbert_dtype": spec.colbert_dtype if spec.colbert_dim else None,
        "lexical": spec.lexical,
        "vocab_size": spec.vocab_size if spec.lexical else None,
        "bm25": spec.bm25_params.as_dict() if spec.lexical else None,
    }
    return config, arrays


def docs_of(backend: LocalBackend) -> Iterator[dict[str, Any]]:
    for batch in backend.export(1000):
        for i, t, m in zip(batch.ids, batch.texts, batch.metadatas, strict=True):
            yield {"id": i, "text": t, "metadata": m}


def write_format2(
    path: str | os.PathLike[str], backend: LocalBackend, settings: Mapping[str, Any]
) -> Path:
    """Write ``backend`` as ``HybridRetriever.save`` wrote a format-2 snapshot (``settings``:
    the retriever's) -> the snapshot directory."""
    spec = backend.spec
    assert spec is not None
    config, arrays = snapshot_of(backend)
    manifest = {"model": spec.model, "backend": "memory", **config, "retriever": dict(settings)}
    return write_index(path, manifest, arrays, docs_of(backend))

"""Subprocess helper of test_local_engine.py: streams documents into a disk-backed index.

``python _ingest_writer.py DIR START``: adds chunks of ``CHUNK`` deterministic documents from
chunk ``START`` on (each chunk one commit; every third chunk also deletes one document of the
chunk before), with ``merge_factor=3`` so merges run too. Prints ``ready`` once the index is
open, then ``chunk N`` after each commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.protocol import IndexSpec

CHUNK, CHUNKS, DIM, COL, VOCAB = 40, 30, 16, 8, 300
SPEC = IndexSpec("synthetic", DIM, COL, "m3", VOCAB, colbert_dtype="int8")


def doc(i: int) -> tuple[np.ndarray, dict[int, float], np.ndarray]:
    """The dense vector, lexical weights and ColBERT vectors of document ``i``."""
    rng = np.random.default_rng(i)
    terms = rng.integers(0, VOCAB, 12)
    return (
        rng.standard_normal(DIM).astype(np.float32),
        {int(t): float(w) + 0.01 for t, w in zip(terms, rng.random(12), strict=True)},
        rng.standard_normal((int(rng.integers(1, 6)), COL)).astype(np.float32),
    )


def deleted_by(chunk: int) -> str | None:
    """The id chunk ``chunk`` deletes (from the chunk before), if any."""
    return f"d{(chunk - 1) * CHUNK + 7}" if chunk % 3 == 2 else None


def open_index(path: str | Path) -> LocalBackend:
    return LocalBackend(path, merge_factor=3, ann_threshold=None).open(SPEC)


def add_chunk(b: LocalBackend, c: int) -> None:
    ids = [f"d{i}" for i in range(c * CHUNK, (c + 1) * CHUNK)]
    docs = [doc(i) for i in range(c * CHUNK, (c + 1) * CHUNK)]
    b.add(
        ids,
        [f"text of {i}" for i in ids],
        [{"chunk": c} for _ in ids],
        np.stack([d[0] for d in docs]),
        [d[1] for d in docs],
        [d[2] for d in docs],
    )
    gone = deleted_by(c)
    if gone is not None and gone in b:  # (a resumed chunk may have done it already)
        b.delete([gone])


if __name__ == "__main__":
    backend = open_index(sys.argv[1])
    print("ready", flush=True)
    for c in range(int(sys.argv[2]), CHUNKS):
        add_chunk(backend, c)
        print(f"chunk {c}", flush=True)

"""Subprocess helper of test_persist_faults.py: saves indexes A and B to one directory.

``python _index_writer.py DIR MODE N``: MODE ``a``/``b`` saves that index N times, ``alt``
alternates A and B; N = -1 repeats until killed. Prints ``ready`` once imports are done.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

from m3_rag.backends.local.snapshot import MemoryBackend

SIZES = {"a": 40, "b": 70}


def build(which: str) -> MemoryBackend:
    """A deterministic backend: ``which`` in ``a``/``b`` (different ids, sizes and values)."""
    n = SIZES[which]
    rng = np.random.default_rng(len(which) * 7 + n)
    b = MemoryBackend(64, 32, "m3", 500, colbert_dtype="float16")
    ids = [f"{which}-{i}" for i in range(n)]
    lexical = [
        {int(t): float(w) for t, w in zip(rng.integers(0, 500, 20), rng.random(20), strict=True)}
        for _ in range(n)
    ]
    colbert = [rng.standard_normal((300, 32)).astype(np.float32) for _ in range(n)]
    b.add(
        ids,
        [f"text {i}" for i in ids],
        [{"which": which, "i": i} for i in range(n)],
        rng.standard_normal((n, 64)).astype(np.float32),
        lexical,
        colbert,
    )
    return b


if __name__ == "__main__":
    path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backends = {w: build(w) for w in ("a", "b")}
    order = itertools.cycle("ab") if mode == "alt" else itertools.repeat(mode)
    print("ready", flush=True)
    for step, which in enumerate(order):
        if count >= 0 and step >= count:
            break
        backends[which].save(path)

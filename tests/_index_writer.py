"""Subprocess helper of test_persist_faults.py: saves indexes A and B to one directory.

``python _index_writer.py DIR MODE N``: MODE ``a``/``b`` saves that index N times, ``alt``
alternates A and B; N = -1 repeats until killed. Prints ``ready`` once imports are done,
then ``saved a`` or ``saved b`` after each save.
Each is an in-memory :class:`LocalBackend` written with ``LocalBackend.save`` (format 3).
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

from m3_rag.backends.local import LocalBackend
from m3_rag.spec import IndexSpec

ADDED = {"a": 40, "b": 70}
SIZES = {"a": 38, "b": 70}  # live documents: A deletes two
SPEC = IndexSpec("writer-test", 64, 32, "m3", 500, colbert_dtype="float16")


def settings(which: str) -> dict[str, object]:
    """What each index records as its retriever's settings."""
    return {"which": which}


def build(which: str) -> LocalBackend:
    """A deterministic backend: ``which`` in ``a``/``b`` (different ids, sizes and values),
    stored as three segments, a few documents deleted (A) or replaced (B)."""
    n = ADDED[which]
    rng = np.random.default_rng(len(which) * 7 + n)
    b = LocalBackend().open(SPEC)
    ids = [f"{which}-{i}" for i in range(n)]
    lexical = [
        {int(t): float(w) for t, w in zip(rng.integers(0, 500, 20), rng.random(20), strict=True)}
        for _ in range(n)
    ]
    colbert = [rng.standard_normal((300, 32)).astype(np.float32) for _ in range(n)]
    dense = rng.standard_normal((n, 64)).astype(np.float32)
    for s in range(0, n, 15):
        e = min(n, s + 15)
        b.add(
            ids[s:e],
            [f"text {i}" for i in ids[s:e]],
            [{"which": which, "i": i} for i in range(s, e)],
            dense[s:e],
            lexical[s:e],
            colbert[s:e],
        )
    if which == "a":
        b.delete([ids[3], ids[20]])
    else:
        b.add([ids[5]], ["text replaced"], [{}], dense[5:6], lexical[5:6], colbert[5:6])
    return b


if __name__ == "__main__":
    path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backends = {w: build(w) for w in ("a", "b")}
    order = itertools.cycle("ab") if mode == "alt" else itertools.repeat(mode)
    print("ready", flush=True)
    for step, which in enumerate(order):
        if count >= 0 and step >= count:
            break
        backends[which].save(path, settings(which))
        print(f"saved {which}", flush=True)

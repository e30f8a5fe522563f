"""Where the approximate dense leg starts to pay: exact scan vs faiss IVF-SQ8 per segment size.

For each segment size: the exact dense top-100 (torch scan of float32 vectors in RAM) against
the IVF-SQ8 index (``nprobe=32``, 200 proposals rescored exactly, as the engine does), with
the index's build time and its recall@100. Vectors: 1024-d, clustered in topics of ~500.

    python benchmarks/bench_ann_threshold.py

Writes ``benchmarks/results/ann_threshold.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from m3_rag.backends.local.ann import DenseANN
from m3_rag.backends.validate import top_k
from m3_rag.scoring import dense_scan

DIM = 1024


def data(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((max(1, n // 500), DIM), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, DIM), dtype=np.float32) * 0.03
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = c[rng.integers(0, len(c), queries)] + rng.standard_normal((queries, DIM), np.float32) * 0.03
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def main() -> None:
    rows = []
    for n in (5_000, 20_000, 50_000, 100_000, 200_000):
        x, qs = data(n, 50)
        t = time.perf_counter()
        ann = DenseANN.build(lambda r, x=x: x[r], n, DIM, nprobe=32)
        build = time.perf_counter() - t
        exact_t, ann_t, recall = [], [], []
        for q in qs:
            t = time.perf_counter()
            want = top_k(dense_scan(x, q), 100)
            exact_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            prop = np.sort(ann.search(q, 200, None))
            got = prop[top_k(x[prop] @ q, 100)]
            ann_t.append(time.perf_counter() - t)
            recall.append(len(set(want.tolist()) & set(got.tolist())) / 100)
        row = {
            "n": n,
            "exact_ms_p50": round(float(np.median(exact_t)) * 1000, 2),
            "ann_ms_p50": round(float(np.median(ann_t)) * 1000, 2),
            "ann_recall_at_100": round(float(np.mean(recall)), 4),
            "ann_build_s": round(build, 1),
        }
        rows.append(row)
        print(
            f"{n:>8}  exact {row['exact_ms_p50']:7.2f} ms  ann {row['ann_ms_p50']:6.2f} ms  "
            f"recall {row['ann_recall_at_100']:.3f}  build {row['ann_build_s']:6.1f} s"
        )
    out = Path(__file__).parent / "results" / "ann_threshold.json"
    out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

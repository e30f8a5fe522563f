"""Index time and search latency: the memory backend vs Milvus Lite on the same synthetic data.

Documents are BGE-M3-shaped (1024-d dense, ~100 M3 sparse terms, ``--colbert-tokens`` float16
ColBERT vectors); queries are synthetic (no model pass). A search is the whole hybrid path:
dense top-100 + lexical top-100 candidates, ColBERT rescoring of their union, fusion, top-10.

    python benchmarks/bench_backends.py                         # 100k docs, writes JSON
    python benchmarks/bench_backends.py --docs 10000 --queries 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _synthetic import query_terms, unit_rows
from bench_search import DIM, VOCAB, build, synthetic_encoder

from m3_rag import EncodeOutput, HybridRetriever
from m3_rag.stores.milvus import MilvusBackend


def _latency(r: HybridRetriever, n_queries: int, seed: int = 1) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    times = []
    for i in range(n_queries + 3):
        q = EncodeOutput(
            dense=unit_rows(rng, 1, DIM),
            sparse=[query_terms(rng, 12, VOCAB)],
            colbert=[unit_rows(rng, 16, DIM)],
            lengths=np.array([17]),
        )
        t = time.perf_counter()
        hits = r.search_encoded(q, k=10)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t)
        assert len(hits) == 10
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--colbert-tokens", type=int, default=32)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/bench_backends.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = synthetic_encoder()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backends: dict[str, object] = {
            "memory": "memory",
            "milvus-lite": MilvusBackend(str(Path(tmp) / "bench.db"), "bench", batch_size=500),
        }
        for name, backend in backends.items():
            t = time.perf_counter()
            r = build(encoder, args.docs, args.colbert_tokens, backend=backend)
            index_s = time.perf_counter() - t
            assert len(r) == args.docs
            row = {
                "backend": name,
                "docs": args.docs,
                "colbert_tokens_per_doc": args.colbert_tokens,
                "index_s": index_s,
                "docs_per_s": args.docs / index_s,
                **_latency(r, args.queries),
            }
            if name != "memory":
                row["disk_gib"] = _dir_bytes(Path(tmp)) / 2**30
            rows.append(row)
            print(row, flush=True)
            del r
    print(
        f"\nMemory vs Milvus Lite, {args.docs} docs x {args.colbert_tokens} ColBERT tokens, "
        f"{args.queries} queries ({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(f"{'backend':<12} {'index s':>8} {'docs/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for row in rows:
        print(
            f"{row['backend']:<12} {row['index_s']:>8.1f} {row['docs_per_s']:>8.0f} "
            f"{row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

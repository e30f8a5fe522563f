"""Index time, search latency and round trips per search of every backend that runs here.

The same synthetic BGE-M3-shaped documents (1024-d dense, ~100 M3 sparse terms,
``--colbert-tokens`` ColBERT vectors) go into each backend; queries are synthetic (no model
pass). A search is the whole hybrid path: dense top-100 + lexical top-100 candidates,
ColBERT rescoring of their union, fusion, top-10. Round trips are the client calls a search
makes to the engine (counted on the real client; 0 for the in-process local engine).

Backends: the local engine in RAM and on disk; Milvus Lite embedded and ``milvus-lite
server`` as a separate process on 127.0.0.1; Qdrant through qdrant-client's local mode (in
RAM and on disk). Qdrant's local mode is an exact, pure-Python engine meant for tests: its
figures say nothing of a Qdrant server's speed (that needs a real Qdrant, not run here).

    python benchmarks/bench_backends.py                      # 10k docs, writes JSON
    python benchmarks/bench_backends.py --docs 2000 --queries 20 --only qdrant-ram
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _synthetic import query_terms, unit_rows
from bench_search import DIM, VOCAB, build, synthetic_encoder

from m3_rag import EncodeOutput, HybridRetriever
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.milvus.engine import MilvusBackend
from m3_rag.backends.qdrant.engine import QdrantBackend
from m3_rag.testing import CountingClient, milvus_lite_server


def _latency(r: HybridRetriever, n_queries: int, seed: int = 1) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    backend: Any = r.backend
    counting = None
    if isinstance(backend, (MilvusBackend, QdrantBackend)):  # count the client's calls
        counting = backend._client = CountingClient(backend.client)
    times, trips = [], []
    for i in range(n_queries + 3):
        q = EncodeOutput(
            dense=unit_rows(rng, 1, DIM),
            sparse=[query_terms(rng, 12, VOCAB)],
            colbert=[unit_rows(rng, 16, DIM)],
            lengths=np.array([17]),
        )
        before = len(counting.calls) if counting else 0
        t = time.perf_counter()
        hits = r.search_encoded(q, k=10)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t)
            trips.append((len(counting.calls) if counting else 0) - before)
        assert len(hits) == 10
    if counting is not None:
        backend._client = counting.client
    ms = np.asarray(times) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "round_trips": float(np.mean(trips)),
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _backends(tmp: Path, server: Callable[[], str]) -> dict[str, Callable[[], Any]]:
    return {
        "local-ram": lambda: LocalBackend(),
        "local-disk": lambda: LocalBackend(tmp / "local"),
        "milvus-lite": lambda: MilvusBackend(
            str(tmp / "milvus.db"), "bench", batch_size=500, show_progress=False
        ),
        "milvus-server": lambda: MilvusBackend(
            server(), "bench", batch_size=500, show_progress=False
        ),
        "qdrant-ram": lambda: QdrantBackend(":memory:", collection="bench", batch_size=500),
        "qdrant-disk": lambda: QdrantBackend(
            path=str(tmp / "qdrant"), collection="bench", batch_size=500
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--colbert-tokens", type=int, default=32)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--only", nargs="*", help="backend names (default: all)")
    ap.add_argument("--out", default="benchmarks/results/bench_backends.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = synthetic_encoder()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, milvus_lite_server(Path(tmp) / "server") as uri:
        for name, make in _backends(Path(tmp), lambda: uri).items():
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            r = build(encoder, args.docs, args.colbert_tokens, backend=make())
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
            rows.append(row)
            print(row, flush=True)
            if isinstance(r.backend, (MilvusBackend, QdrantBackend)):
                r.backend.close()
            del r
    print(
        f"\n{args.docs} docs x {args.colbert_tokens} ColBERT tokens, {args.queries} queries "
        f"({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(f"{'backend':<14} {'index s':>8} {'docs/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'trips':>6}")
    for row in rows:
        print(
            f"{row['backend']:<14} {row['index_s']:>8.1f} {row['docs_per_s']:>8.0f} "
            f"{row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['round_trips']:>6.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

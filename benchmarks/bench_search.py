"""Search latency of HybridRetriever per leg at 10k and 100k synthetic BGE-M3-shaped documents.

Query encoding is excluded (queries are synthetic vectors). Per query: dense top-k over all
documents, lexical top-k (M3 sparse, ~100 terms/doc), ColBERT MaxSim of the union of both
candidate lists, weighted fusion (``search_encoded``, the whole stage 1 + 2).

    python benchmarks/bench_search.py                      # 10k and 100k, writes JSON
    python benchmarks/bench_search.py --sizes 10000 --queries 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _synthetic import query_terms, unit_rows, zipf_terms

from m3_rag import EncodeOutput, HybridRetriever, M3Encoder
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.testing import build_m3_checkpoint

DIM = 1024
VOCAB = 30_000


def synthetic_encoder() -> M3Encoder:
    """A 1-layer model with BGE-M3's output shapes (1024-d, 30k vocabulary): only its
    dimensions matter here, queries and documents are synthetic."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_m3_checkpoint(
            Path(tmp) / "m3-1024", hidden=DIM, layers=1, heads=16, intermediate=64, vocab_size=VOCAB
        )
        return M3Encoder(ckpt, device="cpu")


def _stats(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def build(
    encoder: M3Encoder,
    n: int,
    colbert_tokens: int,
    seed: int = 0,
    backend: Any = None,
    colbert_dtype: str = "float16",
) -> HybridRetriever:
    rng = np.random.default_rng(seed)
    r = HybridRetriever(encoder, candidates=100, backend=backend, colbert_dtype=colbert_dtype)
    chunk = 2000
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        ids = [f"d{i}" for i in range(s, s + m)]
        colbert = unit_rows(rng, m * colbert_tokens, DIM, np.float16).reshape(
            m, colbert_tokens, DIM
        )
        r.add_encoded([""] * m, encoded(rng, m, colbert), ids=ids)
    return r


def bench(r: HybridRetriever, n_queries: int, seed: int = 1) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    backend = r.backend
    legs: dict[str, list[float]] = {
        "dense": [],
        "lexical": [],
        "colbert_rescore": [],
        "hybrid_total": [],
    }
    n_cand: list[int] = []
    for i in range(n_queries + 5):
        qd = unit_rows(rng, 1, DIM)[0]
        qs = query_terms(rng, 12, VOCAB)
        qc = unit_rows(rng, 16, DIM)
        t0 = time.perf_counter()
        backend.candidates(qd, None, 100, None)  # the dense leg alone
        t1 = time.perf_counter()
        cands = backend.candidates(qd, qs, 100, None)  # both legs
        t2 = time.perf_counter()
        backend.colbert_scores(qc, cands)
        t3 = time.perf_counter()
        q = EncodeOutput(dense=qd[None], sparse=[qs], colbert=[qc], lengths=np.array([17]))
        r.search_encoded(q, k=10)
        t4 = time.perf_counter()
        if i >= 5:  # warm-up
            legs["dense"].append(t1 - t0)
            legs["lexical"].append(max(0.0, (t2 - t1) - (t1 - t0)))  # both legs - dense
            legs["colbert_rescore"].append(t3 - t2)
            legs["hybrid_total"].append(t4 - t3)
            n_cand.append(len(cands.ids))
    out = {k: _stats(v) for k, v in legs.items()}
    out["candidates"] = {"mean": float(np.mean(n_cand))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument(
        "--colbert-tokens",
        type=int,
        nargs="+",
        default=[200, 32],
        help="ColBERT vectors per document for each size "
        "(fp16; 100k x 200 x 1024 would need 41 GB)",
    )
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--colbert-dtype", default="float16", choices=["float16", "float32", "int8"])
    ap.add_argument("--out", default="benchmarks/results/bench_search.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = synthetic_encoder()
    results = []
    tokens = dict(
        zip(
            args.sizes,
            args.colbert_tokens + [args.colbert_tokens[-1]] * len(args.sizes),
            strict=False,
        )
    )
    for n in args.sizes:
        t = time.perf_counter()
        r = build(encoder, n, tokens[n], colbert_dtype=args.colbert_dtype)
        build_s = time.perf_counter() - t
        b = r.backend
        assert isinstance(b, LocalBackend)
        segs = b.segments
        lex_bytes = sum(
            sum(int(a.nbytes) for a in x.lexical.arrays().values()) for x in segs if x.lexical
        )
        col_bytes = sum(
            int(x.colbert.vectors.nbytes + x.colbert.offsets.nbytes)
            + (0 if x.colbert.scales is None else int(x.colbert.scales.nbytes))
            for x in segs
            if x.colbert
        )
        n_vectors = sum(len(x.colbert.vectors) for x in segs if x.colbert)
        row = {
            "docs": n,
            "colbert_tokens_per_doc": tokens[n],
            "colbert_dtype": args.colbert_dtype,
            "build_s": build_s,
            "bytes_per_doc": {
                "dense": sum(int(x.dense.nbytes) for x in segs) / n,
                "lexical": lex_bytes / n,
                "colbert": col_bytes / n,
            },
            "colbert_bytes_per_dim": col_bytes / (n_vectors * DIM),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            **bench(r, args.queries),
        }
        results.append(row)
        del r
    print(
        f"\nHybridRetriever search latency, {args.queries} queries, query encoding excluded "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})"
    )
    print(f"{'docs':>8} {'tok/doc':>7} {'leg':<16} {'p50 ms':>8} {'p95 ms':>8}")
    for row in results:
        for leg in ("dense", "lexical", "colbert_rescore", "hybrid_total"):
            print(
                f"{row['docs']:>8} {row['colbert_tokens_per_doc']:>7} {leg:<16} "
                f"{row[leg]['p50_ms']:>8.2f} {row[leg]['p95_ms']:>8.2f}"
            )
        print(f"{'':>8} {'':>7} {'(candidates)':<16} {row['candidates']['mean']:>8.0f}")
    print(
        f"\n{'docs':>8} {'dense B/doc':>12} {'lexical B/doc':>14} {'colbert B/doc':>14} "
        f"{'colbert B/dim':>14} {'peak RSS GiB':>13}"
    )
    for row in results:
        m = row["bytes_per_doc"]
        print(
            f"{row['docs']:>8} {m['dense']:>12.0f} {m['lexical']:>14.0f} {m['colbert']:>14.0f} "
            f"{row['colbert_bytes_per_dim']:>14.3f} {row['peak_rss_gib']:>13.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "results": results},
            indent=1,
        )
    )
    print(f"\nwrote {out}")


def encoded(rng: np.random.Generator, m: int, colbert: np.ndarray) -> EncodeOutput:
    """Synthetic ``encode_documents`` output for ``m`` documents."""
    lex = zipf_terms(rng, m, 100, VOCAB)
    sparse = [
        dict(zip(lex.indices[a:b].tolist(), lex.data[a:b].tolist(), strict=True))
        for a, b in zip(lex.indptr[:-1], lex.indptr[1:], strict=True)
    ]
    dense = unit_rows(rng, m, DIM)
    return EncodeOutput(dense, sparse, list(colbert.astype(np.float32)), np.full(m, 1))


if __name__ == "__main__":
    main()

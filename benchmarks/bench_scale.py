"""Scale of the local engine: synthetic BGE-M3-shaped documents streamed into a disk index.

Each document: a 1024-d unit dense vector (clustered in topics of ~500 documents, so a
query's nearest neighbours are meaningful, as with real embeddings; with unclustered random
vectors every neighbour beyond the first few is noise and no index can find it), ~100 M3
lexical terms (Zipf over a 30,000-id space), 16 ColBERT vectors of 1024 dims stored int8.
They go in through the public ``HybridRetriever.add_encoded`` in chunks (each chunk one
commit), then the index is compacted into one segment (with its faiss IVF-SQ8 index).
Reported, as a table and JSON:

* ingestion time, peak RSS of this process (``ru_maxrss``), bytes on disk per document;
* hybrid search (dense + lexical candidates, ColBERT rescoring, weighted fusion; query
  encodings precomputed): p50 / p95 latency, and throughput with 1 and 2 threads;
* recall@100 of the dense candidates against the exact top-100 (computed while generating);
* adding 1,000 documents and committing: bytes written vs the new documents' own bytes;
* deleting one id: the in-memory tombstone and the durable commit (fsync included).

    python benchmarks/bench_scale.py --n 100000
    python benchmarks/bench_scale.py --n 1000000   # ~22 GB of disk, ~30 min on 2 cores

The JSON goes to ``benchmarks/results/scale_<n>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from m3_rag import HybridRetriever, M3Encoder
from m3_rag._memory import fix_mmap_threshold
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.local.view import tombstone
from m3_rag.encoder import EncodeOutput
from m3_rag.testing import build_m3_checkpoint

DIM, VOCAB, TERMS, COLBERT, QUERY_VECS = 1024, 30000, 100, 16, 16
PER_TOPIC = 500  # documents per topic: a query's 100 nearest neighbours share its topic


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Corpus:
    """Deterministic synthetic documents, generated a chunk at a time."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.topics = max(1, n // PER_TOPIC)
        c = rng.standard_normal((self.topics, DIM)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.perm = rng.permutation(VOCAB)
        self.seed = seed

    def chunk(self, start: int, n: int) -> tuple[list[str], EncodeOutput]:
        rng = np.random.default_rng([self.seed, start])
        topic = rng.integers(0, self.topics, n)
        dense = self.centres[topic] + rng.standard_normal((n, DIM), dtype=np.float32) * 0.03
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        ids = self.perm[np.minimum(rng.zipf(1.2, size=(n, TERMS)), VOCAB - 1)]
        weights = rng.uniform(0.01, 0.3, size=(n, TERMS)).astype(np.float32)
        sparse = [
            dict(zip(i.tolist(), w.tolist(), strict=True))
            for i, w in zip(ids, weights, strict=True)
        ]
        colbert = rng.standard_normal((n, COLBERT, DIM), dtype=np.float32)
        colbert += dense[:, None, :] * 8
        colbert /= np.linalg.norm(colbert, axis=2, keepdims=True)
        texts = [f"synthetic passage {start + i} about topic {t}" for i, t in enumerate(topic)]
        out = EncodeOutput(dense, sparse, list(colbert), np.full(n, COLBERT + 2))
        return texts, out

    def queries(self, n: int) -> list[EncodeOutput]:
        rng = np.random.default_rng([self.seed, 2**40])
        out = []
        for t in rng.integers(0, self.topics, n):
            d = self.centres[t] + rng.standard_normal(DIM, dtype=np.float32) * 0.03
            d /= np.linalg.norm(d)
            terms = self.perm[np.minimum(rng.zipf(1.2, size=8), VOCAB - 1)]
            sparse = {
                int(i): float(w) for i, w in zip(terms, rng.uniform(0.05, 0.3, 8), strict=True)
            }
            col = rng.standard_normal((QUERY_VECS, DIM), dtype=np.float32) + d * 8
            col /= np.linalg.norm(col, axis=1, keepdims=True)
            out.append(EncodeOutput(d[None], [sparse], [col], np.array([QUERY_VECS])))
        return out


def _encoder(tmp: Path) -> M3Encoder:
    path = build_m3_checkpoint(
        tmp / "m3-shaped", hidden=DIM, layers=1, heads=16, intermediate=64, vocab_size=VOCAB
    )
    return M3Encoder(path, device="cpu")


def _tree(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _search_all(r: HybridRetriever, queries: list[EncodeOutput]) -> list[float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        r.search_encoded(q, k=10)
        times.append(time.perf_counter() - t)
    return times


def _throughput(r: HybridRetriever, queries: list[EncodeOutput], threads: int) -> float:
    per = [queries[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=_search_all, args=(r, p)) for p in per]
    t = time.perf_counter()
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    return len(queries) / (time.perf_counter() - t)


def run(n: int, chunk: int, n_queries: int, root: Path) -> dict[str, object]:
    fix_mmap_threshold()  # an ingestion process, as `m3-rag index` (see m3_rag/_memory.py)
    corpus = Corpus(n)
    queries = corpus.queries(n_queries)
    qd = np.stack([q.dense[0] for q in queries])  # type: ignore[index]
    best = np.full((n_queries, 100), -np.inf, np.float32)
    best_ids = np.zeros((n_queries, 100), np.int64)
    enc = _encoder(root)
    index = root / "index"
    r = HybridRetriever(enc, colbert_dtype="int8", backend=LocalBackend(index))
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        texts, out = corpus.chunk(s, m)
        assert out.dense is not None
        scores = np.concatenate([best, qd @ out.dense.T], axis=1)  # exact top-100 so far
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(s, s + m), (n_queries, m))], 1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
        best, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        r.add_encoded(texts, out, ids=[f"d{i}" for i in range(s, s + m)])
        del texts, out
    ingest_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    r.backend.compact()  # type: ignore[attr-defined]
    compact_s = time.perf_counter() - t1
    rss_ingest = _rss_gib()
    disk = sum(_tree(index).values())
    backend = r.backend
    assert isinstance(backend, LocalBackend)
    _search_all(r, queries[:10])  # warm-up
    times = np.array(_search_all(r, queries)) * 1000
    recall = []
    for q, want in zip(queries, best_ids, strict=True):
        got = backend.candidates(q.dense[0], None, 100)  # type: ignore[index]
        recall.append(len({int(i[1:]) for i in got.ids} & set(want.tolist())) / 100)
    qps1 = _throughput(r, queries, 1)
    qps2 = _throughput(r, queries, 2)
    rss_search = _rss_gib()
    # add 1,000 documents and commit
    before = _tree(index)
    texts, out = corpus.chunk(n, 1000)
    assert out.dense is not None and out.colbert is not None and out.sparse is not None
    new_bytes = (
        out.dense.nbytes
        + sum(c.shape[0] * (DIM + 4) for c in out.colbert)  # int8 codes + a scale per vector
        + sum(len(s) * 8 for s in out.sparse)  # int32 id + float32 weight per term
        + sum(len(t.encode()) for t in texts)
    )
    t = time.perf_counter()
    r.add_encoded(texts, out, ids=[f"d{i}" for i in range(n, n + 1000)])
    add_s = time.perf_counter() - t
    after = _tree(index)
    written = sum(v for k, v in after.items() if before.get(k) != v)
    # single-id deletes: durable commits, and the in-memory tombstone alone
    dels = []
    for i in range(0, 50):
        t = time.perf_counter()
        r.delete([f"d{(i * 997) % n}"])
        dels.append(time.perf_counter() - t)
    tomb = []
    view = backend._view
    for i in range(50, 100):
        t = time.perf_counter()
        tombstone(view, backend._ids, [f"d{(i * 997) % n}"])  # the new view, unpublished
        tomb.append(time.perf_counter() - t)
    return {
        "n": n,
        "chunk": chunk,
        "ingest_s": round(ingest_s, 1),
        "compact_s": round(compact_s, 1),
        "peak_rss_gib_ingest": round(rss_ingest, 2),
        "peak_rss_gib_after_search": round(rss_search, 2),
        "disk_bytes_per_doc": round(disk / n),
        "segments": len(backend.segments),
        "search_p50_ms": round(float(np.percentile(times, 50)), 2),
        "search_p95_ms": round(float(np.percentile(times, 95)), 2),
        "dense_recall_at_100": round(float(np.mean(recall)), 4),
        "qps_1_thread": round(qps1, 1),
        "qps_2_threads": round(qps2, 1),
        "add_1000_written_bytes": written,
        "add_1000_new_data_bytes": new_bytes,
        "add_1000_write_ratio": round(written / new_bytes, 3),
        "add_1000_s": round(add_s, 3),
        "delete_commit_ms_p50": round(float(np.median(dels)) * 1000, 3),
        "delete_tombstone_ms_p50": round(float(np.median(tomb)) * 1000, 4),
        "ann_nprobe": backend.ann_nprobe,
        "ann_threshold": backend.ann_threshold,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the index")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="m3rag-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        row = run(args.n, args.chunk, args.queries, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for k, v in row.items():
        print(f"{k:>28}  {v}")
    out = Path(__file__).parent / "results" / f"scale_{args.n}.json"
    out.parent.mkdir(exist_ok=True)
    row["cpu_count"] = os.cpu_count()
    out.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

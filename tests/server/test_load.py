"""A bounded load test on loopback: 2,000 requests from 16 clients over every route, some
malformed. Every valid request is answered 200, every malformed one a 4xx, none a 5xx; the
server's RSS before and after is reported (and bounded generously: no test here asserts a
time). ``benchmarks/bench_server.py`` measures the same with latencies."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from _serving import API_KEY, Server, main_server

from m3_rag.testing import SAMPLE_TEXTS

N_REQUESTS, N_CLIENTS = 2000, 16
RSS_GROWTH_LIMIT = 300 << 20  # generous: allocator noise and caches, not a leak


@pytest.fixture(scope="module")
def server(tiny_m3_dir: Path, tiny_reranker_dir: Path) -> Server:
    return main_server(tiny_m3_dir, tiny_reranker_dir)


def _request(i: int) -> tuple[str, str, object, bool]:
    """The i-th request: (method, path, body, valid)."""
    rng = random.Random(i)
    text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
    if rng.random() < 0.05:  # malformed
        return rng.choice(
            [
                ("POST", "/v1/embeddings", '{"input": ', False),
                ("POST", "/v1/encode", {"input": [1, 2]}, False),
                ("POST", "/v1/rerank", {"query": "q", "documents": []}, False),
                ("POST", "/v1/search", {"query": "x", "k": -1}, False),
                ("POST", "/v1/embeddings", {"input": "x", "extra": True}, False),
                ("DELETE", "/v1/documents", {"ids": ["never-there"]}, False),
            ]
        )
    kind = rng.random()
    if kind < 0.35:
        return ("POST", "/v1/embeddings", {"input": [text] * rng.randint(1, 3)}, True)
    if kind < 0.6:
        role = rng.choice(["query", "document"])
        return ("POST", "/v1/encode", {"input": text, "role": role}, True)
    if kind < 0.75:
        docs = SAMPLE_TEXTS[: rng.randint(1, 6)]
        return ("POST", "/v1/rerank", {"query": text, "documents": docs, "top_n": 2}, True)
    if kind < 0.92:
        return ("POST", "/v1/search", {"query": text, "k": 3}, True)
    if kind < 0.94:
        doc = {"id": f"load-{i % 5}", "text": text, "metadata": {"i": i}}
        return ("POST", "/v1/documents", {"documents": [doc]}, True)
    return ("GET", rng.choice(["/health", "/metrics", "/v1/models"]), None, True)


def _send(client: httpx.Client, i: int) -> tuple[bool, int]:
    method, path, body, valid = _request(i)
    if isinstance(body, str):
        resp = client.request(method, path, content=body.encode())
    else:
        resp = client.request(method, path, json=body)
    return valid, resp.status_code


def test_load_2000_requests_16_clients_no_server_error(server: Server) -> None:
    proc = psutil.Process(server.proc.pid)
    seed = [{"id": f"load-{i}", "text": t} for i, t in enumerate(SAMPLE_TEXTS)]
    assert server.post("/v1/documents", {"documents": seed}).status_code == 200
    headers = {"authorization": f"Bearer {API_KEY}"}
    clients = [httpx.Client(base_url=server.url, headers=headers, timeout=300) for _ in range(16)]
    try:
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            list(pool.map(lambda i: _send(clients[i % N_CLIENTS], i), range(100)))  # warm up
            rss_before = proc.memory_info().rss
            results = list(pool.map(lambda i: _send(clients[i % N_CLIENTS], i), range(N_REQUESTS)))
            rss_after = proc.memory_info().rss
    finally:
        for c in clients:
            c.close()
        ids = [f"load-{i}" for i in range(len(SAMPLE_TEXTS))]
        server.client.request("DELETE", "/v1/documents", json={"ids": ids, "missing_ok": True})
    statuses = Counter(status for _, status in results)
    print(
        f"\nload: {N_REQUESTS} requests, {N_CLIENTS} clients: statuses {dict(statuses)}; "
        f"server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    assert not [s for s in statuses if s >= 500], statuses
    assert all(s == 200 for valid, s in results if valid), statuses
    assert all(400 <= s < 500 for valid, s in results if not valid), statuses
    assert sum(not valid for valid, _ in results) > 50  # the mix did hold malformed ones
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    server.wait_idle()  # every admitted request released

"""The server's routes against the real ``m3-rag serve`` process: auth, the OpenAI client and
LangChain's ``OpenAIEmbeddings`` round trip, ``/v1/encode`` and ``/v1/rerank`` equal to the
model in this process, the served index, metrics, and every class of bad input as a 4xx."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from _serving import API_KEY, MAX_BODY, MAX_CHARS, MAX_TEXTS, Server, main_server
from conftest import MULTILINGUAL, require

from m3_rag import HybridRetriever, M3Encoder, Reranker
from m3_rag.testing import SAMPLE_TEXTS

TEXTS = [*MULTILINGUAL, *SAMPLE_TEXTS[:6]]


@pytest.fixture(scope="module")
def server(tiny_m3_dir: Path, tiny_reranker_dir: Path) -> Server:
    return main_server(tiny_m3_dir, tiny_reranker_dir)


@pytest.fixture(scope="module")
def local(tiny_m3_dir: Path) -> M3Encoder:
    """The served model in this process, with the server's settings."""
    return M3Encoder(tiny_m3_dir, device="cpu")


@pytest.fixture(scope="module")
def local_rr(tiny_reranker_dir: Path) -> Reranker:
    return Reranker(tiny_reranker_dir, device="cpu")


def _error(resp, status: int, fragment: str = "") -> str:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type"} and err["message"] and err["type"]
    assert fragment.lower() in err["message"].lower(), err["message"]
    return str(err["message"])


# ------------------------------------------------------------------------ auth and info
PROTECTED = [
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/tokenizer"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/encode"),
    ("POST", "/v1/rerank"),
    ("POST", "/v1/search"),
    ("POST", "/v1/documents"),
    ("DELETE", "/v1/documents"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_but_health_needs_the_key(server: Server, method: str, path: str) -> None:
    import httpx

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEY}"}):
        resp = httpx.request(method, server.url + path, headers=headers, json={"input": "x"})
        _error(resp, 401, "api key")
        assert resp.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_describes_the_server(server: Server, tiny_m3_dir: Path) -> None:
    import httpx

    server.wait_idle()
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == str(tiny_m3_dir)
    assert health["reranker"] is not None and isinstance(health["index"]["documents"], int)
    assert health["queue_depth"] == 0
    info = server.client.get("/v1/models").json()["data"][0]
    assert info["has_sparse"] and info["has_colbert"] and info["dense_dim"] == 32
    assert info["limits"] == {
        "max_texts": MAX_TEXTS,
        "max_chars": MAX_CHARS,
        "max_body_bytes": MAX_BODY,
    }


def test_tokenizer_route_serves_the_models_tokenizer(server: Server, local: M3Encoder) -> None:
    from tokenizers import Tokenizer

    resp = server.client.get("/v1/tokenizer")
    assert resp.status_code == 200
    tok = Tokenizer.from_str(resp.text)
    want = local.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert [e.ids for e in tok.encode_batch(TEXTS, add_special_tokens=False)] == want


# ------------------------------------------------------------------------ OpenAI clients
def test_openai_client_round_trips_dense_vectors(server: Server, local: M3Encoder) -> None:
    openai = require("openai", 'pip install -e ".[dev]"')
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    want = local.encode(TEXTS).dense
    assert want is not None
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        kwargs = {} if fmt == "base64" else {"encoding_format": "float"}
        resp = client.embeddings.create(input=TEXTS, model="bge-m3", **kwargs)
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        assert [d.index for d in resp.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert resp.usage.prompt_tokens == int(local.encode(TEXTS).lengths.sum())
    one = client.embeddings.create(input="Paris is the capital of France.", model="m")
    np.testing.assert_allclose(one.data[0].embedding, want[6], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(input="x", model="m", dimensions=7)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(input="x", model="m")


def test_langchain_openai_embeddings(server: Server, local: M3Encoder) -> None:
    lc = require("langchain_openai", 'pip install -e ".[dev]"')
    emb = lc.OpenAIEmbeddings(
        base_url=server.url + "/v1",
        api_key=API_KEY,
        model="bge-m3",
        check_embedding_ctx_length=False,
    )
    texts = [t for t in TEXTS if t]  # LangChain drops nothing, the server takes "" too
    want = local.encode(texts).dense
    assert want is not None
    np.testing.assert_allclose(np.array(emb.embed_documents(texts)), want, atol=1e-6)
    np.testing.assert_allclose(emb.embed_query(texts[1]), want[1], atol=1e-6)


def test_raw_embeddings_base64_is_little_endian_float32(server: Server, local: M3Encoder) -> None:
    resp = server.post("/v1/embeddings", {"input": ["hello"], "encoding_format": "base64"})
    body = resp.json()
    assert body["object"] == "list" and body["model"] == local.model_name
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    want = local.encode(["hello"]).dense
    assert want is not None
    np.testing.assert_allclose(vec, want[0], atol=1e-6)


# ------------------------------------------------------------------------ /v1/encode
def _colbert(value: object, fmt: str, dim: int) -> np.ndarray:
    if fmt == "float":
        return np.array(value, dtype=np.float32).reshape(-1, dim)
    dtype = "<f2" if fmt == "base64-float16" else "<f4"
    assert isinstance(value, str)
    return np.frombuffer(base64.b64decode(value), dtype=dtype).astype(np.float32).reshape(-1, dim)


@pytest.mark.parametrize("role", ["query", "document"])
@pytest.mark.parametrize("fmt", ["float", "base64", "base64-float16"])
def test_encode_equals_the_model_in_process(
    server: Server, local: M3Encoder, role: str, fmt: str
) -> None:
    resp = server.post(
        "/v1/encode", {"input": TEXTS, "role": role, "colbert_format": fmt, "dense_format": "float"}
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    want = (local.encode_queries if role == "query" else local.encode_documents)(TEXTS)
    assert want.dense is not None and want.sparse is not None and want.colbert is not None
    assert [d["index"] for d in data] == list(range(len(TEXTS)))
    np.testing.assert_allclose([d["dense"] for d in data], want.dense, atol=1e-6)
    assert [d["tokens"] for d in data] == want.lengths.tolist()
    for d, sparse, colbert in zip(data, want.sparse, want.colbert, strict=True):
        got = {int(k): v for k, v in d["sparse"].items()}
        assert got.keys() == sparse.keys()
        np.testing.assert_allclose([got[k] for k in sparse], list(sparse.values()), atol=1e-6)
        vecs = _colbert(d["colbert"], fmt, 32)
        atol = 1e-3 if fmt == "base64-float16" else 1e-6  # float16 rounding
        np.testing.assert_allclose(vecs, colbert, atol=atol)


def test_encode_options(server: Server, local: M3Encoder) -> None:
    resp = server.post(
        "/v1/encode",
        {"input": "a query", "role": "query", "return_colbert": False, "max_length": 4},
    )
    item = resp.json()["data"][0]
    assert set(item) == {"index", "tokens", "dense", "sparse"} and item["tokens"] == 4
    want = local.encode_queries(["a query"], max_length=4)
    assert want.dense is not None
    np.testing.assert_allclose(item["dense"], want.dense[0], atol=1e-6)
    only = server.post("/v1/encode", {"input": ["x"], "return_dense": False}).json()["data"][0]
    assert set(only) == {"index", "tokens", "sparse", "colbert"}


# ------------------------------------------------------------------------ /v1/rerank
def test_rerank_equals_the_reranker(server: Server, local_rr: Reranker) -> None:
    query, docs = "capital of France", SAMPLE_TEXTS[:9]
    want = local_rr.compute_score([(query, d) for d in docs])
    body = server.post("/v1/rerank", {"query": query, "documents": docs}).json()
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(9)) and "document" not in results[0]
    got = {r["index"]: r["relevance_score"] for r in results}
    np.testing.assert_allclose([got[i] for i in range(9)], want, atol=1e-5)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    top = server.post(
        "/v1/rerank",
        {
            "query": query,
            "documents": docs,
            "top_n": 2,
            "return_documents": True,
            "normalize": True,
        },
    ).json()["results"]
    norm = local_rr.compute_score([(query, d) for d in docs], normalize=True)
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert top[0]["document"] == {"text": docs[top[0]["index"]]}
    assert top[0]["relevance_score"] == pytest.approx(norm[top[0]["index"]], abs=1e-6)


# ------------------------------------------------------------------------ the served index
def test_documents_and_search(
    server: Server, local: M3Encoder, local_rr: Reranker, tmp_path: Path
) -> None:
    docs = [
        {"id": f"s{i}", "text": t, "metadata": {"i": i, "lang": "zh" if 8 <= i <= 12 else "x"}}
        for i, t in enumerate(SAMPLE_TEXTS)
    ]
    before = server.client.get("/health").json()["index"]["documents"]
    resp = server.post("/v1/documents", {"documents": docs})
    assert resp.json() == {"ids": [d["id"] for d in docs], "count": len(docs)}
    generated = server.post("/v1/documents", {"documents": [{"text": "no id given"}]}).json()
    assert generated["count"] == 1 and len(generated["ids"][0]) == 32
    assert server.client.get("/health").json()["index"]["documents"] == before + len(docs) + 1
    mine = HybridRetriever(local)
    mine.add_texts(
        [d["text"] for d in docs], [d["metadata"] for d in docs], [d["id"] for d in docs]
    )
    mine.add_texts(["no id given"], ids=generated["ids"])
    for opts in ({}, {"fusion": "rrf"}, {"weights": [1, 0, 0]}, {"filter": {"lang": "zh"}}):
        body = {"query": SAMPLE_TEXTS[3], "k": 5, "rerank": False, **opts}
        hits = server.post("/v1/search", body).json()
        want = mine.search(SAMPLE_TEXTS[3], k=5, **opts)  # type: ignore[arg-type]
        got = [h for h in hits["hits"] if h["id"].startswith("s") or len(h["id"]) == 32]
        assert [h["id"] for h in got] == [h.id for h in want]
        assert got[0]["text"] == want[0].text and got[0]["metadata"] == want[0].metadata
        for g, w in zip(got, want, strict=True):
            assert g["score"] == pytest.approx(w.score, abs=1e-5)
            assert g["scores"] == pytest.approx(w.scores, abs=1e-5)
    with_rr = HybridRetriever(local, local_rr)
    with_rr.add_texts(
        [d["text"] for d in docs], [d["metadata"] for d in docs], [d["id"] for d in docs]
    )
    with_rr.add_texts(["no id given"], ids=generated["ids"])
    reranked = server.post("/v1/search", {"query": "capital", "k": 3}).json()["hits"]
    assert [h["id"] for h in reranked] == [h.id for h in with_rr.search("capital", k=3)]
    assert all("rerank" in h["scores"] for h in reranked)
    server.post("/v1/documents", {"documents": [{"id": "s0", "text": "replaced text"}]})
    body = {"query": "replaced text", "k": 1, "rerank": False, "weights": [1, 0, 0]}
    got = server.post("/v1/search", body).json()["hits"][0]  # cosine 1 with itself
    assert got["id"] == "s0" and got["text"] == "replaced text" and got["metadata"] == {}
    resp = server.client.request("DELETE", "/v1/documents", json={"ids": ["s1", "s2"]})
    assert resp.json() == {"deleted": 2}
    _error(server.client.request("DELETE", "/v1/documents", json={"ids": ["s1"]}), 404, "s1")
    resp = server.client.request(
        "DELETE", "/v1/documents", json={"ids": ["s1", "s3"], "missing_ok": True}
    )
    assert resp.json() == {"deleted": 1}
    ids = [d["id"] for d in docs if d["id"] not in ("s1", "s2", "s3")] + generated["ids"]
    server.client.request("DELETE", "/v1/documents", json={"ids": ids})
    assert server.client.get("/health").json()["index"]["documents"] == before


# ------------------------------------------------------------------------ metrics
def test_metrics_are_prometheus_text(server: Server) -> None:
    server.post("/v1/embeddings", {"input": ["a", "b"]})
    resp = server.client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'm3rag_requests_total{route="/v1/embeddings",method="POST",status="200"}' in text
    assert 'm3rag_request_duration_seconds_bucket{route="/v1/embeddings",le="+Inf"}' in text
    assert 'm3rag_batch_texts_count{kind="encode"}' in text
    assert 'm3rag_batch_requests_bucket{kind="encode",le="1.0"}' in text
    assert "# TYPE m3rag_queue_depth gauge" in text and "m3rag_index_documents " in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("m3rag_")


# ------------------------------------------------------------------------ bad input
LONE = '{"input": ["ok", "\\ud800"]}'
BAD = [
    ("POST", "/v1/embeddings", '{"input": ', 400, "not valid json"),
    ("POST", "/v1/embeddings", "[1, 2]", 422, "dictionary"),
    ("POST", "/v1/embeddings", '"just a string"', 422, "dictionary"),
    ("POST", "/v1/embeddings", b'{"input": "\xff\xfe"}', 400, "utf-8"),
    ("POST", "/v1/embeddings", "[" * 50_000 + "]" * 50_000, 400, ""),
    ("POST", "/v1/embeddings", "", 422, "field required"),
    ("POST", "/v1/embeddings", {"input": []}, 400, "empty"),
    ("POST", "/v1/embeddings", {"input": 5}, 422, "valid string"),
    ("POST", "/v1/embeddings", {"input": ["a", None]}, 422, "input.1"),
    ("POST", "/v1/embeddings", {"input": [1, 2, 3]}, 422, "token ids"),
    ("POST", "/v1/embeddings", {"input": "x", "foo": 1}, 422, "foo: unknown field"),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ("POST", "/v1/embeddings", LONE, 422, "lone surrogate"),
    ("POST", "/v1/embeddings", {"input": ["a"] * (MAX_TEXTS + 1)}, 413, "per request"),
    ("POST", "/v1/embeddings", {"input": "a" * (MAX_CHARS + 1)}, 413, "characters"),
    ("POST", "/v1/embeddings", {"input": "a" * (MAX_BODY + 10)}, 413, "bytes"),
    ("POST", "/v1/encode", {"input": "x", "role": "passage"}, 422, "role"),
    ("POST", "/v1/encode", {"input": "x", "return_sparse": "yes"}, 422, "return_sparse"),
    ("POST", "/v1/encode", {"input": "x", "max_length": 0}, 422, "max_length"),
    ("POST", "/v1/encode", {"input": "x", "colbert_format": "int8"}, 422, "colbert_format"),
    (
        "POST",
        "/v1/encode",
        {"input": "x", "return_dense": False, "return_sparse": False, "return_colbert": False},
        400,
        "nothing to return",
    ),
    ("POST", "/v1/rerank", {"query": "q"}, 422, "documents"),
    ("POST", "/v1/rerank", {"query": "q", "documents": []}, 400, "empty"),
    ("POST", "/v1/rerank", {"query": 3, "documents": ["a"]}, 422, "query"),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
    ("POST", "/v1/search", {"query": "   "}, 400, "blank"),
    ("POST", "/v1/search", {"query": "x", "k": -1}, 422, "k"),
    ("POST", "/v1/search", {"query": "x", "k": "3"}, 422, "k"),
    ("POST", "/v1/search", {"query": "x", "weights": [1, 1]}, 422, "weights"),
    ("POST", "/v1/search", '{"query": "x", "weights": [1, NaN, 1]}', 422, "finite"),
    ("POST", "/v1/search", {"query": "x", "weights": [-1, 1, 1]}, 400, "weights"),
    ("POST", "/v1/search", {"query": "x", "fusion": "max"}, 422, "fusion"),
    ("POST", "/v1/search", {"query": "x", "filter": {"a": {"b": 1}}}, 400, "filter"),
    ("POST", "/v1/search", {"query": "x", "filter": [1]}, 422, "filter"),
    ("POST", "/v1/documents", {"documents": []}, 400, "empty"),
    ("POST", "/v1/documents", {"documents": [{"id": "a"}]}, 422, "text"),
    ("POST", "/v1/documents", {"documents": [{"text": "a", "metadata": 5}]}, 422, "metadata"),
    ("POST", "/v1/documents", {"documents": [{"id": "", "text": "a"}]}, 400, "id"),
    ("POST", "/v1/documents", {"documents": [{"id": "d", "text": "a"}] * 2}, 400, "d"),
    (
        "POST",
        "/v1/documents",
        {"documents": [{"text": "a", "metadata": {"m3_rag_scores": 1}}]},
        400,
        "m3_rag_scores",
    ),
    ("DELETE", "/v1/documents", {"ids": []}, 400, "empty"),
    ("DELETE", "/v1/documents", {"ids": ["never-added"]}, 404, "never-added"),
    ("DELETE", "/v1/documents", {"ids": "abc"}, 422, "ids"),
    ("PUT", "/v1/encode", {"input": "x"}, 405, "not allowed"),
    ("GET", "/v1/encode", None, 405, "not allowed"),
    ("GET", "/v2/nothing", None, 404, "not found"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), BAD)
def test_bad_input_is_a_4xx_with_a_message(
    server: Server, method: str, path: str, body: object, status: int, fragment: str
) -> None:
    if isinstance(body, (dict, list)):
        content = json.dumps(body).encode()
    elif isinstance(body, str):
        content = body.encode()
    else:
        content = body if isinstance(body, bytes) else b""
    resp = server.client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )
    _error(resp, status, fragment)


def test_the_server_survived_the_bad_input(server: Server) -> None:
    """After every bad request above: healthy, nothing answered 5xx."""
    assert server.client.get("/health").json()["status"] == "ok"
    assert server.post("/v1/embeddings", {"input": "still fine"}).status_code == 200
    text = server.client.get("/metrics").text
    assert 'status="5' not in text, [x for x in text.splitlines() if 'status="5' in x]

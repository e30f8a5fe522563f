"""Admission and disconnects on a server admitting one model request at a time
(``M3_RAG_SERVE_MAX_QUEUE=1``), and ``m3-rag serve``'s refusals of bad options.

A client that has sent its headers and half its body holds the one place: the next model
request is answered 503 with ``Retry-After`` before its body is read (nothing of it done),
and when that client goes away the place is free again. No test here waits on a clock: each
polls a state the server reports (``/metrics``) with a generous deadline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _serving import ROOT, Server

from m3_rag.remote import RemoteEncoder, RemoteError

DEADLINE_S = 120.0
BODY_TIMEOUT_S = 15  # the holder below does its checks well within it


@pytest.fixture(scope="module")
def small(tiny_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    index = tmp_path_factory.mktemp("small") / "index"
    server = Server(
        ["--model", str(tiny_m3_dir), "--index", str(index), "--device", "cpu"],
        {"M3_RAG_SERVE_MAX_QUEUE": "1", "M3_RAG_SERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)},
    )
    yield server
    server.stop()


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never reported {what}")


def _half_request(server: Server, path: str = "/v1/embeddings") -> socket.socket:
    """A client that sends the headers and half the body of a request, and waits."""
    body = json.dumps({"input": ["a text"] * 4}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_full_server_answers_503_then_recovers(small: Server) -> None:
    assert small.metric("m3rag_queue_limit") == 1
    holder = _half_request(small)
    try:
        _until(lambda: small.metric("m3rag_queue_depth") == 1, "the held request")
        for path, body in (
            ("/v1/embeddings", {"input": "x"}),
            ("/v1/encode", {"input": "x"}),
            ("/v1/search", {"query": "x"}),
            ("/v1/documents", {"documents": [{"id": "d", "text": "x"}]}),
        ):
            resp = small.post(path, body)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["type"] == "server_busy"
        busy = RemoteEncoder(small.url, retries=0)  # /v1/models is not a model route
        with pytest.raises(RemoteError, match="503") as err:
            busy.encode(["x"])
        assert err.value.status == 503
        busy.close()
        health = small.client.get("/health").json()  # not a model route: always answered
        assert health["queue_depth"] == 1 and health["index"]["documents"] == 0  # nothing added
    finally:
        holder.close()  # the client goes away mid-body
    _until(lambda: small.metric("m3rag_queue_depth") == 0, "the place freed")
    assert small.post("/v1/embeddings", {"input": "x"}).status_code == 200
    _until(lambda: 'status="499"' in small.client.get("/metrics").text, "a 499 (client gone)")


def test_a_body_that_never_arrives_is_a_408_and_frees_its_place(small: Server) -> None:
    holder = _half_request(small, "/v1/encode")
    try:
        holder.settimeout(BODY_TIMEOUT_S + DEADLINE_S)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = holder.recv(4096)
            if not chunk:
                break
            answer += chunk
    finally:
        holder.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    _until(lambda: small.metric("m3rag_queue_depth") == 0, "the place freed")


def test_disconnect_while_the_model_runs_leaves_it_healthy(small: Server) -> None:
    body = json.dumps({"input": ["a long text " * 40] * 64, "colbert_format": "float"}).encode()
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", small.port))
        sock.sendall(
            f"POST /v1/encode HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        sock.close()  # before the answer
    _until(lambda: small.metric("m3rag_queue_depth") == 0, "every request finished")
    assert small.client.get("/health").json()["status"] == "ok"
    # a closed connection may still be admitted after the depth read 0 (its bytes wait in
    # the accept queue): this server admits one request, so a 503 until then is right
    answers: list[int] = []

    def served() -> bool:
        resp = small.post("/v1/encode", {"input": ["after"]})
        answers.append(resp.status_code)
        return resp.status_code == 200 and resp.json()["data"][0]["tokens"] > 0

    _until(served, "a 200 after the disconnects")
    assert set(answers) <= {200, 503}, answers
    assert 'status="5' not in small.client.get("/metrics").text.replace('status="503"', "")


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "m3_rag", "serve", *args, "--port", "0"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_options_are_one_line_and_exit_2(tiny_m3_dir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not an index")
    cases = [
        (["--model", str(tmp_path / "missing")], {}, "cannot load model"),
        (["--model", str(tiny_m3_dir), "--api-key-env", "M3_UNSET_KEY"], {}, "M3_UNSET_KEY"),
        (["--model", str(tiny_m3_dir)], {"M3_RAG_SERVE_MAX_QUEUE": "many"}, "MAX_QUEUE"),
        (["--model", str(tiny_m3_dir), "--index", str(a_file)], {}, "--index"),
    ]
    env_clear = {"M3_UNSET_KEY": ""}
    for args, env, fragment in cases:
        run = _serve([*args, "--device", "cpu"], {**env_clear, **env})
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("m3-rag: "), run.stderr
        assert fragment in lines[0], lines[0]
        assert "listening" not in run.stdout

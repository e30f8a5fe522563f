"""docs/server.md stays true: its Python snippets (marked ``<!-- server-snippet: NAME -->``;
tests/docs/test_doc_snippets.py runs the ``snippet:`` ones, which need no server) and its
``curl`` examples run against the real server."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx
import pytest
from _serving import API_KEY, ROOT, Server, main_server

PAGE = ROOT / "docs" / "server.md"
TEXT = PAGE.read_text(encoding="utf-8")
SNIPPETS = dict(re.findall(r"<!-- server-snippet: ([\w-]+) -->\n```python\n(.*?)```", TEXT, re.S))
CURLS = [
    " ".join(cmd.replace("\\\n", " ").split())
    for block in re.findall(r"```bash\n(.*?)```", TEXT, re.S)
    for cmd in re.split(r"\n(?=curl )", block)
    if cmd.startswith("curl ")
]
DOCS_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def server(tiny_m3_dir: Path, tiny_reranker_dir: Path) -> Server:
    return main_server(tiny_m3_dir, tiny_reranker_dir)


def test_the_page_has_its_snippets_and_examples() -> None:
    assert set(SNIPPETS) == {
        "openai-client",
        "remote-retriever",
        "remote-langchain",
        "remote-llamaindex",
    }
    paths = {re.search(r"\$URL(/\S*)", c).group(1) for c in CURLS}  # type: ignore[union-attr]
    assert paths == {
        "/health",
        "/v1/models",
        "/v1/tokenizer",
        "/v1/embeddings",
        "/v1/encode",
        "/v1/rerank",
        "/v1/search",
        "/v1/documents",
        "/metrics",
    }
    assert "BATCHING_FIGURES" not in TEXT


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_runs_against_the_server(
    server: Server, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M3_RAG_API_KEY", API_KEY)
    code = SNIPPETS[name].replace(DOCS_URL, server.url)
    exec(compile(code, f"docs/server.md:{name}", "exec"), {})


@pytest.mark.parametrize("command", CURLS)
def test_curl_example_is_answered_200(server: Server, command: str) -> None:
    """Each example, sent as curl would send it (its method, path, headers and body)."""
    args = shlex.split(command.replace("$URL", server.url).replace("$M3_RAG_API_KEY", API_KEY))
    method, url, headers, body = "GET", "", {}, None
    it = iter(args[1:])
    for a in it:
        if a == "-X":
            method = next(it)
        elif a == "-H":
            k, v = next(it).split(":", 1)
            headers[k.strip().lower()] = v.strip()
        elif a == "-d":
            body = next(it).encode()
            method = "POST" if method == "GET" else method
        elif a == "-o":
            next(it)
        elif a.startswith("http"):
            url = a
    if body is not None:  # what curl -d sends
        headers.setdefault("content-type", "application/x-www-form-urlencoded")
    resp = httpx.request(method, url, headers=headers, content=body, timeout=120)
    if method == "DELETE" and resp.status_code == 404:  # the document is gone already
        return
    assert resp.status_code == 200, (command, resp.text)

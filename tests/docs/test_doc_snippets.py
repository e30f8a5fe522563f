"""The documentation stays true: every snippet marked ``<!-- snippet: NAME -->`` in README.md
and docs/**/*.md runs, the README stays short, its links resolve, the pages use the current
names, and ``mkdocs build --strict`` passes with every page in the nav.

A snippet runs in a scratch working directory (so it writes relative paths such as
``"my-index"``), with a tiny checkpoint as ``enc`` and a few passages as ``texts``; the hub ids
``"BAAI/bge-m3"`` and ``"BAAI/bge-reranker-v2-m3"`` written in a snippet are replaced by tiny
checkpoints of the same layout (the tests are offline).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from m3_rag import M3Encoder
from m3_rag.testing import SAMPLE_TEXTS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
MARKER = re.compile(r"<!-- snippet: ([\w-]+) -->")
SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", re.S)
README_LIMIT = 12_000  # bytes, as `wc -c` counts them

# every snippet, and the page that holds it
EXPECTED = {
    "tour-encoder": "README.md",
    "tour-retriever": "README.md",
    "tour-langchain": "README.md",
    "tour-llamaindex": "README.md",
    "encoder": "docs/index.md",
    "retriever": "docs/index.md",
    "langchain-retriever": "docs/usage/langchain.md",
    "langchain-vectorstore": "docs/usage/langchain.md",
    "llama-index-retriever": "docs/usage/llamaindex.md",
    "llama-index-vectorstore": "docs/usage/llamaindex.md",
    "local-engine": "docs/usage/stores.md",
    "milvus-backend": "docs/usage/stores.md",
    "qdrant-backend": "docs/usage/stores.md",
    "langchain-qdrant": "docs/usage/stores.md",
    "langchain-milvus": "docs/usage/stores.md",
    "llama-index-qdrant": "docs/usage/stores.md",
    "llama-index-milvus-contract": "docs/usage/stores.md",
    "engine-options": "docs/engine.md",
    "bm25-analyzer": "docs/bm25-analyzer.md",
}

# names that no longer exist in the API; a page that uses one is out of date
STALE = {
    "m3_rag.stores": "the engines are in m3_rag.backends",
    'backend="memory"': "HybridRetriever(enc) is the in-RAM engine",
    "MemoryBackend": "LocalBackend() is the in-RAM engine",
    "colbert_quantization": 'int8 ColBERT comes from colbert_dtype="int8"',
    "test_readme_snippets": "the snippet test is tests/docs/test_doc_snippets.py",
    "['sparse']": "the lexical leg's score key is 'lexical'",
    '["sparse"]': "the lexical leg's score key is 'lexical'",
    "['bm25']": "the lexical leg's score key is 'lexical'",
    '["bm25"]': "the lexical leg's score key is 'lexical'",
}


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _snippets() -> tuple[dict[str, tuple[str, str]], list[str]]:
    """name -> (page, code), and the names defined more than once."""
    found: dict[str, tuple[str, str]] = {}
    twice: list[str] = []
    for page in PAGES:
        for name, code in SNIPPET.findall(page.read_text(encoding="utf-8")):
            if name in found:
                twice.append(name)
            found[name] = (_rel(page), code)
    return found, twice


SNIPPETS, DUPLICATES = _snippets()


def test_every_section_has_its_snippet() -> None:
    assert not DUPLICATES, f"snippet names used twice: {DUPLICATES}"
    assert {name: page for name, (page, _) in SNIPPETS.items()} == EXPECTED


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_marker_is_followed_by_a_python_block(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert len(MARKER.findall(text)) == len(SNIPPET.findall(text)), (
        f"{_rel(page)}: a snippet marker must be followed directly by a ```python block"
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_runs(
    name: str,
    tiny_m3_dir: Path,
    tiny_reranker_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    page, code = SNIPPETS[name]
    code = code.replace('"BAAI/bge-m3"', repr(str(tiny_m3_dir)))
    code = code.replace('"BAAI/bge-reranker-v2-m3"', repr(str(tiny_reranker_dir)))
    enc = M3Encoder(tiny_m3_dir, device="cpu", max_length=64)
    namespace = {"enc": enc, "texts": SAMPLE_TEXTS[:8]}
    exec(compile(code, f"{page}:{name}", "exec"), namespace)


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move details to docs/"


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    local = [x for x in links if "://" not in x]
    assert local, "the README links to the docs pages"
    missing = [x for x in local if not (ROOT / x).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_pages_use_current_names(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    stale = {name: why for name, why in STALE.items() if name in text}
    assert not stale, f"{_rel(page)} uses names that no longer exist: {stale}"
    assert not re.search(r"(?<![\w&])#\d+\b", text), f"{_rel(page)}: no issue numbers in docs"


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {nav!r}")


def test_mkdocs_nav_lists_every_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is listed twice in the nav: {nav}"
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WARNING" not in run.stderr, run.stderr[-4000:]
    assert (tmp_path / "site" / "glossary" / "index.html").is_file()

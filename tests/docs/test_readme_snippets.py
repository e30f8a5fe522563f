"""Every README snippet marked ``<!-- snippet: NAME -->`` runs (issue: drop-in everywhere,
item 5), with a tiny checkpoint as ``enc``, a few passages as ``texts`` and a scratch
directory as ``tmp_dir``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from m3_rag import M3Encoder
from m3_rag.testing import SAMPLE_TEXTS

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", re.S)
SNIPPETS = dict(SNIPPET.findall(README.read_text(encoding="utf-8")))
EXPECTED = {
    "langchain-vectorstore",
    "langchain-qdrant",
    "langchain-milvus",
    "llama-index-vectorstore",
    "llama-index-qdrant",
    "llama-index-milvus-contract",
}


def test_every_store_section_has_its_snippet() -> None:
    assert set(SNIPPETS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_runs(name: str, tiny_m3_dir: Path, tmp_path: Path) -> None:
    enc = M3Encoder(tiny_m3_dir, device="cpu", max_length=64)
    namespace = {"enc": enc, "texts": SAMPLE_TEXTS[:8], "tmp_dir": str(tmp_path)}
    exec(compile(SNIPPETS[name], f"README.md:{name}", "exec"), namespace)

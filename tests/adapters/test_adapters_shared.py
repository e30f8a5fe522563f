"""Rules shared by both adapters: one encoder load, a framework-free core, install hints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import m3_rag.loading as loading_module
from m3_rag import HybridRetriever, M3Encoder
from m3_rag.testing import SAMPLE_TEXTS


def test_one_encoder_backs_every_adapter(
    tiny_m3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_m3rag import M3Embeddings, M3Retriever
    from llama_index_m3rag import M3Embedding, M3SparseEmbedding
    from llama_index_m3rag import M3Retriever as LlamaRetriever

    loads = []
    real = loading_module.load_backbone
    monkeypatch.setattr(
        loading_module, "load_backbone", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    enc = M3Encoder(tiny_m3_dir)
    M3Embeddings(encoder=enc).embed_query("x")
    M3Retriever.from_texts(SAMPLE_TEXTS[:3], enc).invoke("x")
    M3Embedding(encoder=enc).get_query_embedding("x")
    M3SparseEmbedding(encoder=enc).get_query_embedding("x")
    LlamaRetriever(HybridRetriever(enc)).retrieve("x")
    assert len(loads) == 1


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, m3_rag, m3_rag.cli, m3_rag.eval, m3_rag.backends; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('langchain_core', 'llama_index')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("package", "framework", "extra"),
    [
        ("langchain_m3rag", "langchain_core", "m3-rag[langchain]"),
        ("llama_index_m3rag", "llama_index", "m3-rag[llama-index]"),
        ("langchain_m3rag.sparse_qdrant", "langchain_qdrant", "m3-rag[langchain-qdrant]"),
        ("langchain_m3rag.sparse_milvus", "langchain_milvus", "m3-rag[langchain-milvus]"),
    ],
)
def test_missing_framework_names_the_extra(package: str, framework: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        f"sys.modules[{framework + '.core'!r}] = None\n"
        f"try:\n    import {package}\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert extra in out.stdout

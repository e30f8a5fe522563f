"""Metric code against hand-computed cases; BEIR loading errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from m3_rag.eval import evaluate_run, load_beir, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_graded_hand_computed() -> None:
    judged = {"a": 2, "b": 1, "c": 0, "d": 1}  # c is judged non-relevant
    ranked = ["c", "a", "x", "b"]
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, judged, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b", "d"], judged, 10) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, judged, 1) == 0.0
    assert ndcg_at_k(ranked, {"c": 0}, 10) == 0.0


def test_recall_and_mrr_hand_computed() -> None:
    judged = {"a": 1, "b": 3, "c": 0}
    assert recall_at_k(["c", "x", "b"], judged, 2) == 0.0
    assert recall_at_k(["c", "x", "b"], judged, 3) == 0.5
    assert mrr_at_k(["c", "x", "b"], judged, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x", "b"], judged, 2) == 0.0


def test_evaluate_run_skips_unjudged_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}}
    out = evaluate_run({"q1": ["a"], "q2": ["b"]}, qrels)
    assert out == {"ndcg@10": 1.0, "recall@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    with pytest.raises(ValueError, match="no query"):
        evaluate_run({"q2": ["b"]}, qrels)


def test_load_beir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_beir(tmp_path / "none")
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "text": "t"}\n')
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl"):
        load_beir(tmp_path)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "t"}\nnot json\n')
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\t1\t1\n")
    with pytest.raises(ValueError, match=r"queries\.jsonl:2"):
        load_beir(tmp_path)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "t"}\n')
    data = load_beir(tmp_path)
    assert (
        data.qrels == {"q": {"1": 1}} and data.queries == {"q": "t"} and list(data.corpus) == ["1"]
    )

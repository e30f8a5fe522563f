"""BEIR-layout loading and retrieval metrics (nDCG@k, Recall@k, MRR@k).

Conventions: graded relevance from ``qrels/test.tsv``; a qrel with score 0 (or below) is
non-relevant; nDCG uses gain ``rel`` with a ``log2(rank + 1)`` discount (as BEIR/pytrec_eval);
Recall@k is the share of a query's relevant documents in its top k; MRR@k is ``1 / rank`` of the
first relevant document within the top k (0 if none). Queries without any relevant document are
skipped, as BEIR does.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BeirData", "evaluate_run", "load_beir", "mrr_at_k", "ndcg_at_k", "recall_at_k"]

Qrels = Mapping[str, Mapping[str, int]]


@dataclass
class BeirData:
    """A BEIR collection: ``corpus`` id -> {"text", "title", ...}, ``queries`` id -> text."""

    corpus: dict[str, dict[str, Any]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
    return rows


def load_beir(path: str | Path, split: str = "test") -> BeirData:
    """Load ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv``.

    Raises:
        FileNotFoundError: naming a missing file.
        ValueError: a malformed line (file and line number named).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR directory {root} does not exist")
    files = {
        "corpus": root / "corpus.jsonl",
        "queries": root / "queries.jsonl",
        "qrels": root / "qrels" / f"{split}.tsv",
    }
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(
                f"{root} is not a BEIR collection: missing {file.relative_to(root)}"
            )
    corpus = {}
    for row in _read_jsonl(files["corpus"]):
        doc_id = str(row.get("_id", row.get("id", "")))
        if not doc_id or "text" not in row:
            raise ValueError(
                f"{files['corpus']}: each line needs '_id' and 'text', got keys {sorted(row)}"
            )
        corpus[doc_id] = row
    queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(files["queries"])}
    qrels: dict[str, dict[str, int]] = {}
    with open(files["qrels"], encoding="utf-8") as handle:
        for n, cells in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if n == 1 and cells and not cells[-1].lstrip("-").isdigit():
                continue  # header
            if len(cells) < 3 or not cells[2].lstrip("-").isdigit():
                raise ValueError(
                    f"{files['qrels']}:{n}: expected query-id, corpus-id, integer score"
                )
            qrels.setdefault(cells[0], {})[cells[1]] = int(cells[2])
    return BeirData(corpus, queries, qrels)


def _relevant(judged: Mapping[str, int]) -> dict[str, int]:
    return {d: r for d, r in judged.items() if r > 0}


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k of one ranking against graded judgements (score <= 0 is non-relevant)."""
    rel = _relevant(judged)
    if not rel:
        return 0.0
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """Share of the relevant documents found in the top k."""
    rel = _relevant(judged)
    if not rel:
        return 0.0
    return len(set(ranked[:k]) & rel.keys()) / len(rel)


def mrr_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document in the top k (0 if none)."""
    rel = _relevant(judged)
    for i, d in enumerate(ranked[:k]):
        if d in rel:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@10, Recall@100 and MRR@10 over the judged queries of ``run``."""
    judged = [q for q in run if _relevant(qrels.get(q, {}))]
    if not judged:
        raise ValueError("no query of the run has a relevant document in the qrels")
    metrics = {
        "ndcg@10": lambda r, j: ndcg_at_k(r, j, 10),
        "recall@10": lambda r, j: recall_at_k(r, j, 10),
        "recall@100": lambda r, j: recall_at_k(r, j, 100),
        "mrr@10": lambda r, j: mrr_at_k(r, j, 10),
    }
    return {
        name: sum(f(run[q], qrels[q]) for q in judged) / len(judged) for name, f in metrics.items()
    }


MODES = ("dense", "lexical", "colbert", "hybrid", "hybrid-rrf")


def mode_options(mode: str) -> dict[str, Any]:
    """``HybridRetriever.search`` options of an evaluation mode.

    ``colbert`` rescoring runs over the stage-1 candidates (dense + lexical union), as in
    hybrid search; ``hybrid`` uses the retriever's own weights.
    """
    options: dict[str, dict[str, Any]] = {
        "dense": {"weights": (1.0, 0.0, 0.0)},
        "lexical": {"weights": (0.0, 1.0, 0.0)},
        "colbert": {"weights": (0.0, 0.0, 1.0)},
        "hybrid": {},
        "hybrid-rrf": {"fusion": "rrf"},
    }
    if mode not in options:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return options[mode]


def available_modes(lexical: str | None, has_colbert: bool) -> list[str]:
    """The modes a retriever can run (``lexical`` whatever the leg's kind, M3 or BM25)."""
    modes = ["dense"]
    if lexical is not None:
        modes.append("lexical")
    if has_colbert:
        modes.append("colbert")
    return [*modes, "hybrid", "hybrid-rrf"]

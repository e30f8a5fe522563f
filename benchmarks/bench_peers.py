"""Search latency of m3-rag against the LangChain and LlamaIndex hybrid pipelines, same data.

Synthetic BGE-M3-shaped corpus (1024-d dense; ~100 Zipf-distributed terms per document, also
written out as text ``"t17 t4032 ..."`` so that the peers' BM25 sees the same terms; float16
ColBERT vectors). Query encoding is excluded everywhere: the peers get an ``Embeddings`` /
embed model that looks up the precomputed vectors.

- m3-rag: ``HybridRetriever.search_encoded`` (dense + lexical top-100, ColBERT rescoring, k=10)
- LangChain: ``EnsembleRetriever([BM25Retriever, InMemoryVectorStore retriever])``, top-100 each
- LlamaIndex: ``QueryFusionRetriever([VectorStoreIndex retriever, BM25Retriever])``, top-100 each
- ColBERT stage alone: m3-rag ``colbert_scores`` vs FlagEmbedding ``colbert_score`` looped over
  the same candidates (float32 copies, as FlagEmbedding returns them)

Needs ``pip install langchain-community llama-index-retrievers-bm25`` (not in ``[dev]``).

    python benchmarks/bench_peers.py                   # 10k (200 ColBERT tokens) and 100k (32)
    python benchmarks/bench_peers.py --sizes 10000 --peer-queries 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _synthetic import query_terms, unit_rows, zipf_terms
from bench_search import DIM, VOCAB, synthetic_encoder

from m3_rag import EncodeOutput, HybridRetriever

warnings.filterwarnings("ignore")


def _ms(fn: Callable[[], Any], n: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


class _Lookup:
    """Text -> precomputed vector (so no model runs inside the peers)."""

    def __init__(self) -> None:
        self.vectors: dict[str, list[float]] = {}

    def get(self, text: str) -> list[float]:
        return self.vectors[text]


def run(n: int, tokens: int, n_queries: int, peer_queries: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dense = unit_rows(rng, n, DIM)
    lexical = zipf_terms(rng, n, 100, VOCAB)
    texts = [
        " ".join(f"t{t}" for t in lexical.indices[a:b]) or "empty"
        for a, b in zip(lexical.indptr[:-1], lexical.indptr[1:], strict=True)
    ]
    ids = [f"d{i}" for i in range(n)]
    r = HybridRetriever(synthetic_encoder(), candidates=100)
    for s in range(0, n, 2000):
        m = min(2000, n - s)
        col = unit_rows(rng, m * tokens, DIM, np.float16).reshape(m, tokens, DIM)
        sl = slice(s, s + m)
        lex = lexical[sl]
        sparse = [
            dict(zip(lex.indices[a:b].tolist(), lex.data[a:b].tolist(), strict=True))
            for a, b in zip(lex.indptr[:-1], lex.indptr[1:], strict=True)
        ]
        enc = EncodeOutput(dense[sl], sparse, list(col.astype(np.float32)), np.full(m, tokens))
        r.add_encoded(texts[sl], enc, ids=ids[sl])
    queries = []
    for _ in range(max(n_queries, peer_queries) + 1):
        qs = query_terms(rng, 12, VOCAB)
        queries.append(
            (
                " ".join(f"t{t}" for t in qs),
                EncodeOutput(
                    dense=unit_rows(rng, 1, DIM),
                    sparse=[qs],
                    colbert=[unit_rows(rng, 16, DIM)],
                    lengths=np.array([17]),
                ),
            )
        )
    lookup = _Lookup()
    for t, q in queries:
        assert q.dense is not None
        lookup.vectors[t] = q.dense[0].tolist()
    it = iter(range(10**9))

    def nxt(pool: int) -> tuple[str, EncodeOutput]:
        return queries[next(it) % pool]

    out: dict[str, Any] = {"docs": n, "colbert_tokens_per_doc": tokens}
    out["m3-rag"] = _ms(lambda: r.search_encoded(nxt(n_queries)[1], k=10), n_queries)

    # ColBERT stage: the same candidates, m3-rag packed scoring vs FlagEmbedding's loop
    from FlagEmbedding.inference.embedder.encoder_only.m3 import M3Embedder

    q = queries[0][1]
    assert q.dense is not None and q.colbert is not None
    cands = r.backend.candidates(q.dense[0], q.sparse[0] if q.sparse else None, 100, None)
    vecs = _stored_colbert(r, cands.ids)
    qc = q.colbert[0]
    out["colbert_candidates"] = len(cands.ids)
    out["colbert_m3rag"] = _ms(lambda: r.backend.colbert_scores(qc, cands), n_queries)
    out["colbert_flagembedding_loop"] = _ms(
        lambda: [M3Embedder.colbert_score(None, qc, v) for v in vecs],  # type: ignore[arg-type]
        n_queries,
    )
    out |= _langchain(ids, texts, dense, lookup, lambda: nxt(peer_queries)[0], peer_queries)
    out |= _llama_index(ids, texts, dense, lookup, lambda: nxt(peer_queries)[0], peer_queries)
    return out


def _langchain(
    ids: list[str],
    texts: list[str],
    dense: np.ndarray,
    lookup: _Lookup,
    query: Callable[[], str],
    n: int,
) -> dict[str, Any]:
    """LangChain: EnsembleRetriever(BM25Retriever + InMemoryVectorStore), top-100 each."""
    from langchain_classic.retrievers import EnsembleRetriever
    from langchain_community.retrievers import BM25Retriever
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    class LookupEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise AssertionError("documents are added with their vectors")

        def embed_query(self, text: str) -> list[float]:
            return lookup.get(text)

    t = time.perf_counter()
    store = InMemoryVectorStore(LookupEmbeddings())
    store.store = {
        i: {"id": i, "vector": v, "text": txt, "metadata": {}}
        for i, v, txt in zip(ids, dense.tolist(), texts, strict=True)
    }
    bm25 = BM25Retriever.from_texts(texts, ids=ids, k=100)
    ens = EnsembleRetriever(
        retrievers=[bm25, store.as_retriever(search_kwargs={"k": 100})], weights=[0.5, 0.5]
    )
    build_s = time.perf_counter() - t
    return {"langchain_build_s": build_s, "langchain": _ms(lambda: ens.invoke(query()), n)}


def _llama_index(
    ids: list[str],
    texts: list[str],
    dense: np.ndarray,
    lookup: _Lookup,
    query: Callable[[], str],
    n: int,
) -> dict[str, Any]:
    """LlamaIndex: QueryFusionRetriever(vector retriever + BM25Retriever), top-100 each."""
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.retrievers import QueryFusionRetriever
    from llama_index.core.schema import TextNode
    from llama_index.retrievers.bm25 import BM25Retriever as LlamaBM25

    class LookupEmbed(BaseEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            return lookup.get(query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return lookup.get(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            raise AssertionError("nodes carry their vectors")

    t = time.perf_counter()
    nodes = [
        TextNode(id_=i, text=txt, embedding=v)
        for i, txt, v in zip(ids, texts, dense.tolist(), strict=True)
    ]
    index = VectorStoreIndex(nodes, embed_model=LookupEmbed())
    fusion = QueryFusionRetriever(
        [
            index.as_retriever(similarity_top_k=100),
            LlamaBM25.from_defaults(nodes=nodes, similarity_top_k=100),
        ],
        similarity_top_k=10,
        num_queries=1,  # no query generation: the LLM is never called
        llm=MockLLM(),
        mode="reciprocal_rerank",  # type: ignore[arg-type]
        use_async=False,
    )
    build_s = time.perf_counter() - t
    return {"llama_index_build_s": build_s, "llama_index": _ms(lambda: fusion.retrieve(query()), n)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--colbert-tokens", type=int, nargs="+", default=[200, 32])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--peer-queries", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/bench_peers.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tokens = args.colbert_tokens + [args.colbert_tokens[-1]] * len(args.sizes)
    rows = []
    for n, tok in zip(args.sizes, tokens, strict=False):
        rows.append(run(n, tok, args.queries, args.peer_queries))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nPer-query search latency, query encoding excluded ({os.cpu_count()} cores)")
    print(f"{'docs':>8} {'pipeline':<34} {'p50 ms':>9} {'p95 ms':>9} {'vs m3-rag':>10}")
    for row in rows:
        base = row["m3-rag"]["p50_ms"]
        for key, name in (
            ("m3-rag", "m3-rag HybridRetriever (+ColBERT)"),
            ("langchain", "LangChain EnsembleRetriever"),
            ("llama_index", "LlamaIndex QueryFusionRetriever"),
        ):
            p = row[key]
            print(
                f"{row['docs']:>8} {name:<34} {p['p50_ms']:>9.1f} {p['p95_ms']:>9.1f} "
                f"{p['p50_ms'] / base:>9.1f}x"
            )
        c, f = row["colbert_m3rag"]["p50_ms"], row["colbert_flagembedding_loop"]["p50_ms"]
        print(
            f"{'':>8} ColBERT stage, {row['colbert_candidates']} candidates x "
            f"{row['colbert_tokens_per_doc']} tokens: m3-rag {c:.1f} ms, FlagEmbedding loop "
            f"{f:.1f} ms ({f / c:.1f}x)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": rows}, indent=1))
    print(f"\nwrote {out}")


def _stored_colbert(r: HybridRetriever, ids: list[str]) -> list[np.ndarray]:
    """The stored ColBERT vectors of ``ids`` (read back through ``export``)."""
    want, out = set(ids), {}
    for batch in r.backend.export(4096):  # type: ignore[attr-defined]
        assert batch.colbert is not None
        for i, v in zip(batch.ids, batch.colbert, strict=True):
            if i in want:
                out[i] = v
    return [out[i] for i in ids]


if __name__ == "__main__":
    main()

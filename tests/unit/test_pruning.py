"""Exact dynamic pruning of the lexical leg (m3_rag.backends.local.pruning): the pruned top
``n`` and the probed row scores equal exhaustive scoring bit for bit (rows, ties by row,
float32 scores), on random and Zipf corpora, M3 weights and BM25, with masks, with postings
in RAM, memory-mapped and read on demand; it falls back where it would not be exact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from m3_rag.backends.local import pruning
from m3_rag.backends.local.diskarray import map_npy, open_array
from m3_rag.backends.local.search import _lexical_query, _lexical_scores
from m3_rag.backends.local.segment import DocTable, LexicalPostings, Segment
from m3_rag.backends.local.view import View
from m3_rag.backends.validate import top_k
from m3_rag.bm25 import BM25Params, bm25_tf
from m3_rag.spec import IndexSpec

VOCAB = 2000


def _corpus(rng: np.random.Generator, n: int, kind: str, lexical: str) -> sp.csr_matrix:
    """``[n, VOCAB]``: ~30 terms per row, uniform or Zipf ids; M3 weights (frequent terms
    lighter, as BGE-M3's) or BM25 term counts."""
    per = 30
    if kind == "zipf":
        ids = np.minimum(rng.zipf(1.15, size=n * per), VOCAB) - 1
    else:
        ids = rng.integers(0, VOCAB, n * per)
    rows = np.repeat(np.arange(n), per)
    if lexical == "m3":
        vals = rng.uniform(0.01, 0.3, len(ids)) * (0.1 + np.log1p(ids) / np.log(VOCAB))
    else:
        vals = np.ones(len(ids))
    m = sp.csr_matrix((vals.astype(np.float32), (rows, ids)), shape=(n, VOCAB))
    m.sum_duplicates()
    return m


def _query(rng: np.random.Generator, kind: str, lexical: str) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(1, 14))
    pick = np.minimum(rng.zipf(1.15, size=k), VOCAB) - 1 if kind == "zipf" else None
    terms = np.unique(pick if pick is not None else rng.integers(0, VOCAB + 50, k))
    terms = rng.permutation(terms).astype(np.int64)  # query order is not term order
    if lexical == "m3":
        w = rng.uniform(0.0, 0.3, len(terms))
    else:  # counts times a positive IDF
        w = rng.integers(1, 3, len(terms)) * rng.uniform(0.2, 6.0, len(terms))
    return terms, w


def _bm25(lex: LexicalPostings, lexical: str) -> pruning.BM25Doc | None:
    if lexical != "bm25":
        return None
    return pruning.BM25Doc(float(np.mean(lex.length)) * 1.1, BM25Params())


def reference(
    docs: sp.csr_matrix,
    lex: LexicalPostings,
    terms: np.ndarray,
    w: np.ndarray,
    bm25: pruning.BM25Doc | None,
) -> np.ndarray:
    """Exhaustive float32 scores from the CSR matrix directly: column by column in query
    order, each term's float32 contributions added into a float32 accumulator."""
    csc = docs.tocsc()
    out = np.zeros(docs.shape[0], np.float32)
    for q, t in enumerate(terms.tolist()):
        if not 0 <= t < docs.shape[1]:
            continue
        a, b = csc.indptr[t], csc.indptr[t + 1]
        rows, vals = csc.indices[a:b].astype(np.int64), csc.data[a:b]
        if bm25 is None:
            out[rows] += np.float32(w[q]) * vals
        else:
            length = np.asarray(lex.length[rows], np.float64)
            out[rows] += (w[q] * bm25_tf(vals, length, bm25.avgdl, bm25.params)).astype(np.float32)
    return out


def _check(
    docs: sp.csr_matrix,
    lex: LexicalPostings,
    terms: np.ndarray,
    w: np.ndarray,
    n: int,
    allowed: np.ndarray | None,
    bm25: pruning.BM25Doc | None,
) -> pruning.LexicalTop:
    s = reference(docs, lex, terms, w, bm25)
    ok = s > 0 if allowed is None else (s > 0) & allowed
    want = top_k(s, n, ok)
    got = pruning.top_n(lex, terms, w, n, allowed, bm25=bm25)
    assert got is not None
    np.testing.assert_array_equal(got.rows, want)
    assert got.scores.dtype == np.float32
    assert got.scores.tobytes() == s[want].tobytes()  # bit for bit
    assert got.read <= got.exhaustive + len(terms) * pruning.BLOCK
    return got


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_reference_is_the_engines_exhaustive_leg(lexical: str) -> None:
    """The reference below scores as the local engine's search does (same float32 bits),
    with the weights (BM25: IDF applied) and avgdl the engine uses: what pruning must equal."""
    rng = np.random.default_rng(1)
    docs = _corpus(rng, 1500, "zipf", lexical)
    lex = LexicalPostings.from_csr(docs)
    seg = Segment(
        "seg-00000001",
        [f"d{i}" for i in range(1500)],
        np.zeros((1500, 1), np.float32),
        lex,
        None,
        DocTable(texts=[""] * 1500, metas=[{}] * 1500),
    )
    view = View.of([seg], [None], lexical == "bm25")
    kind: Any = lexical
    spec = IndexSpec(model="m", dense_dim=1, colbert_dim=None, lexical=kind, vocab_size=VOCAB)
    bm25 = None if view.stats is None else pruning.BM25Doc(view.stats.avgdl, spec.bm25_params)
    for _ in range(10):
        terms, w = _query(rng, "zipf", lexical)
        lq = _lexical_query(view, spec, dict(zip(terms.tolist(), w.tolist(), strict=True)))
        assert lq is not None
        want = _lexical_scores(seg, lq, view, spec)
        assert reference(docs, lex, lq[0], lq[1], bm25).tobytes() == want.tobytes()
        got = pruning.top_n(lex, lq[0], lq[1], 10, bm25=bm25)
        assert got is not None
        np.testing.assert_array_equal(got.rows, top_k(want, 10, want > 0))


@pytest.mark.parametrize("kind", ["random", "zipf"])
@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_top_n_equals_exhaustive(kind: str, lexical: str) -> None:
    rng = np.random.default_rng([len(kind), len(lexical)])
    docs = _corpus(rng, 3000, kind, lexical)
    lex = LexicalPostings.from_csr(docs)
    bm25 = _bm25(lex, lexical)
    for i in range(40):
        terms, w = _query(rng, kind, lexical)
        allowed = None if i % 3 == 0 else rng.random(3000) < (0.9 if i % 3 == 1 else 0.02)
        n = [1, 10, 100, 5000][i % 4]
        _check(docs, lex, terms, w, n, allowed, bm25)


def test_ties_break_by_row_like_top_k() -> None:
    """Every weight equal: scores tie in large groups; the rows kept are the lowest."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, (2000, 6))
    docs = sp.csr_matrix(
        (np.full(ids.size, 0.25, np.float32), (np.repeat(np.arange(2000), 6), ids.ravel())),
        shape=(2000, 40),
    )
    docs.data[:] = 0.25  # duplicates summed: set them back, ties everywhere
    lex = LexicalPostings.from_csr(docs)
    for n in (1, 7, 50, 300):
        for terms in ([3, 9], [0, 1, 2, 3, 4, 5], [17]):
            t = np.asarray(terms, np.int64)
            _check(docs, lex, t, np.full(len(t), 0.5), n, None, None)


def test_pruning_skips_a_frequent_light_term() -> None:
    """A term in every row with a small weight next to a rare heavy one: the frequent
    term's postings are probed for a few candidates, not read whole."""
    rng = np.random.default_rng(4)
    n = 20000
    rare = rng.choice(n, 300, replace=False)
    rows = np.concatenate([np.arange(n), rare])
    cols = np.concatenate([np.zeros(n, np.int64), np.ones(300, np.int64)])
    vals = np.concatenate([rng.uniform(0.001, 0.005, n), rng.uniform(0.2, 0.3, 300)])
    docs = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, 5))
    lex = LexicalPostings.from_csr(docs)
    got = _check(docs, lex, np.array([0, 1]), np.array([0.1, 0.3]), 10, None, None)
    assert got.exhaustive == n + 300
    # the rare term whole, then the blocks of the frequent one holding the candidates
    # within its bound (blocks close together read as one range)
    assert got.read < got.exhaustive / 4
    assert got.essential == 1
    # a few rows' scores: only the blocks holding them are read
    rows = np.array([19999, 5, int(rare[0]), 5])
    want = reference(docs, lex, np.array([0, 1]), np.array([0.1, 0.3]), None)[rows]
    assert pruning.row_scores(lex, np.array([0, 1]), np.array([0.1, 0.3]), rows).tobytes() == (
        want.tobytes()
    )


def _on_disk(lex: LexicalPostings, tmp: Path, how: str) -> LexicalPostings:
    """``lex`` with its term-major arrays read from ``.npy`` files (pread or mmap)."""
    out: dict[str, Any] = {}
    for name in ("trows", "tdata"):
        path = tmp / f"{name}.npy"
        np.save(path, np.asarray(getattr(lex, name)))
        if how == "mmap":
            out[name] = map_npy(path)
        else:
            out[name] = open_array(path, os.open(path, os.O_RDONLY))
    arrays = lex.arrays() | out
    return LexicalPostings(**arrays)


@pytest.mark.parametrize("how", ["pread", "mmap"])
def test_postings_on_disk(tmp_path: Path, how: str) -> None:
    rng = np.random.default_rng(5)
    docs = _corpus(rng, 4000, "zipf", "m3")
    lex = _on_disk(LexicalPostings.from_csr(docs), tmp_path, how)
    for i in range(15):
        terms, w = _query(rng, "zipf", "m3")
        allowed = None if i % 2 else rng.random(4000) < 0.5
        _check(docs, lex, terms, w, 20, allowed, None)
        rows = rng.integers(0, 4000, 50)
        want = reference(docs, lex, terms, w, None)[rows]
        assert pruning.row_scores(lex, terms, w, rows).tobytes() == want.tobytes()


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_row_scores_equal_exhaustive(lexical: str) -> None:
    rng = np.random.default_rng(6)
    docs = _corpus(rng, 2500, "zipf", lexical)
    keep = np.ones(docs.shape[0], np.float32)
    keep[7] = 0  # a row with no term at all
    docs = sp.csr_matrix(sp.diags(keep) @ docs)
    docs.eliminate_zeros()
    lex = LexicalPostings.from_csr(docs)
    bm25 = _bm25(lex, lexical)
    for _ in range(20):
        terms, w = _query(rng, "zipf", lexical)
        rows = np.concatenate([rng.integers(0, 2500, 40), [7, 7, 0, 2499]])
        want = reference(docs, lex, terms, w, bm25)[rows]
        got = pruning.row_scores(lex, terms, w, rows, bm25=bm25)
        assert got.tobytes() == want.tobytes()
        every = np.arange(2500)[::-1]  # many rows: looked up densely
        want = reference(docs, lex, terms, w, bm25)[every]
        assert pruning.row_scores(lex, terms, w, every, bm25=bm25).tobytes() == want.tobytes()
    assert len(pruning.row_scores(lex, np.array([1]), np.array([1.0]), np.zeros(0, np.int64))) == 0


def test_falls_back_where_pruning_is_not_exact() -> None:
    rng = np.random.default_rng(7)
    docs = _corpus(rng, 500, "random", "m3")
    lex = LexicalPostings.from_csr(docs)
    t = np.array([1, 2, 3], np.int64)
    assert pruning.top_n(lex, t, np.array([0.1, -0.2, 0.1]), 10) is None  # negative weight
    assert pruning.top_n(lex, t, np.array([0.1, 0.2, 0.1]), 0) is None
    bad = {"k1": 1.2, "b": 1.5}  # b > 1: the tf part is not monotone in the length
    b = pruning.BM25Doc(10.0, BM25Params(**bad))
    assert pruning.top_n(lex, t, np.ones(3), 10, bm25=b) is None
    # a non-finite stored value in a query term: fall back (the exhaustive leg reports it)
    tdata = np.array(lex.tdata)
    tdata[int(lex.tptr[np.searchsorted(lex.terms, 2)])] = np.nan
    broken = LexicalPostings(**(lex.arrays() | {"tdata": tdata}))
    assert pruning.top_n(broken, t, np.ones(3), 10) is None
    assert pruning.top_n(broken, np.array([5], np.int64), np.ones(1), 10) is not None
    # float32 sums that could overflow, and values not stored as float32
    big = LexicalPostings.from_csr(sp.csr_matrix(np.full((4, 2), 2.0, np.float32)))
    assert pruning.top_n(big, np.array([0, 1]), np.full(2, 3e38), 10) is None
    wide = LexicalPostings(**(lex.arrays() | {"tdata": np.asarray(lex.tdata, np.float64)}))
    assert pruning.top_n(wide, t, np.ones(3), 10) is None
    # a term no row holds, and an empty query: nothing, exactly
    empty = pruning.top_n(lex, np.array([VOCAB + 9], np.int64), np.ones(1), 10)
    assert empty is not None and len(empty.rows) == 0 and empty.exhaustive == 0


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_docs=st.integers(1, 300),
    n=st.integers(1, 40),
    lexical=st.sampled_from(["m3", "bm25"]),
    masked=st.booleans(),
)
def test_property_equal_to_exhaustive(
    seed: int, n_docs: int, n: int, lexical: str, masked: bool
) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 60))
    nnz = int(rng.integers(0, n_docs * 8 + 1))
    vals = (
        rng.choice([0.0, 0.125, 0.25, 0.5, 1.0], nnz)  # few distinct values: many ties
        if lexical == "m3"
        else rng.integers(1, 4, nnz).astype(np.float64)
    )
    docs = sp.csr_matrix(
        (vals.astype(np.float32), (rng.integers(0, n_docs, nnz), rng.integers(0, vocab, nnz))),
        shape=(n_docs, vocab),
    )
    docs.sum_duplicates()
    lex = LexicalPostings.from_csr(docs)
    bm25 = _bm25(lex, lexical) if nnz else None
    terms = rng.permutation(rng.integers(0, vocab + 2, int(rng.integers(1, 8)))).astype(np.int64)
    terms = terms[np.sort(np.unique(terms, return_index=True)[1])]
    w = rng.choice([0.0, 0.5, 1.0, 0.3], len(terms)) * (3.0 if lexical == "bm25" else 1.0)
    allowed = rng.random(n_docs) < 0.6 if masked else None
    _check(docs, lex, terms, w, n, allowed, bm25)

"""Parity with the oracles: FlagEmbedding's BGEM3FlagModel and FlagReranker (fp32, CPU), on
every runtime: torch, and ONNX Runtime fp32 (``runtime="onnx"``, exported once per session)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MULTILINGUAL, require

from m3_rag import M3Encoder, Reranker
from m3_rag.testing import SAMPLE_TEXTS

FlagEmbedding = require(
    "FlagEmbedding",
    "the parity oracle; install the reference environment: "
    'pip install -e ".[dev]" -c constraints.txt (transformers 4.57.6)',
)
pytestmark = pytest.mark.parity

MAX_LEN = 24  # the long texts are cut: truncation is part of the parity
RUNTIMES = ["torch", "onnx"]
RERANK_ATOL = {"torch": 1e-5, "onnx": 1e-4}  # logits of a few units: ONNX kernels sum otherwise


@pytest.fixture(scope="module")
def flag_m3(tiny_m3_dir: Path):  # type: ignore[no-untyped-def]
    return FlagEmbedding.BGEM3FlagModel(
        str(tiny_m3_dir),
        use_fp16=False,
        devices="cpu",
        passage_max_length=MAX_LEN,
        query_max_length=MAX_LEN,
    )


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity-onnx-cache")


def _runtime_kwargs(runtime: str, cache: Path) -> dict[str, Any]:
    if runtime == "torch":
        return {"device": "cpu"}
    require("onnxruntime", "the ONNX runtime's parity: pip install -e '.[onnx]'")
    return {"runtime": runtime, "onnx_cache_dir": cache}


@pytest.fixture(scope="module", params=RUNTIMES)
def ours(tiny_m3_dir: Path, onnx_cache: Path, request: pytest.FixtureRequest) -> M3Encoder:
    return M3Encoder(tiny_m3_dir, max_length=MAX_LEN, **_runtime_kwargs(request.param, onnx_cache))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_encode_matches_bgem3flagmodel(flag_m3, ours: M3Encoder, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    texts = MULTILINGUAL + SAMPLE_TEXTS
    ref = flag_m3.encode(
        texts,
        batch_size=batch_size,
        max_length=MAX_LEN,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    out = ours.encode(texts, batch_size=batch_size)
    assert out.dense is not None and out.sparse is not None and out.colbert is not None
    np.testing.assert_allclose(out.dense, ref["dense_vecs"], atol=1e-5)
    for i, (mine, theirs) in enumerate(zip(out.sparse, ref["lexical_weights"], strict=True)):
        assert set(mine) == {int(k) for k in theirs}, f"sparse keys differ for text {i}"
        for k, v in mine.items():
            assert v == pytest.approx(float(theirs[str(k)]), abs=1e-5)
    for mine, theirs in zip(out.colbert, ref["colbert_vecs"], strict=True):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_scores_match_flagembedding_scoring_functions(flag_m3, ours: M3Encoder) -> None:  # type: ignore[no-untyped-def]
    q, d = ours.encode(SAMPLE_TEXTS[:4]), ours.encode(SAMPLE_TEXTS[4:12])
    assert q.sparse is not None and d.sparse is not None and q.colbert and d.colbert
    for qs, qc in zip(q.sparse, q.colbert, strict=True):
        for ds, dc in zip(d.sparse, d.colbert, strict=True):
            lex = flag_m3.compute_lexical_matching_score(
                {str(k): v for k, v in qs.items()}, {str(k): v for k, v in ds.items()}
            )
            from m3_rag.scoring import pairwise_colbert, pairwise_sparse

            assert pairwise_sparse([qs], [ds])[0] == pytest.approx(lex, abs=1e-5)
            assert pairwise_colbert([qc], [dc])[0] == pytest.approx(
                float(flag_m3.colbert_score(qc, dc)), abs=1e-5
            )


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("weights", [None, (0.4, 0.2, 0.4)])
def test_compute_score_matches(flag_m3, ours: M3Encoder, weights, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    """Every mode equals BGEM3FlagModel.compute_score.

    One known difference, not reproduced on purpose: with batches of several pairs,
    FlagEmbedding takes the ColBERT max over the zero vectors of the padding too, so a pair's
    ColBERT score depends on its batch neighbours (it becomes ``max(., 0)`` per query token).
    m3-rag's ColBERT score is batch-independent and equals FlagEmbedding's at batch size 1,
    which is also what its ``colbert_score`` gives.
    """
    texts = MULTILINGUAL + SAMPLE_TEXTS
    pairs = [(texts[i], texts[(i * 7 + 3) % len(texts)]) for i in range(len(texts))]
    w = list(weights) if weights else None

    def ref(bs: int) -> dict[str, list[float]]:
        return flag_m3.compute_score(  # type: ignore[no-any-return]
            pairs,
            batch_size=bs,
            max_query_length=MAX_LEN,
            max_passage_length=MAX_LEN,
            weights_for_different_modes=w,
        )

    expected = ref(batch_size)
    mine = ours.compute_score(pairs, weights=weights or (1.0, 1.0, 1.0), batch_size=batch_size)
    assert set(mine) == set(expected)
    for key in ("dense", "sparse", "sparse+dense"):
        np.testing.assert_allclose(mine[key], expected[key], atol=1e-5, err_msg=key)
    unbatched = expected if batch_size == 1 else ref(1)
    for key in ("colbert", "colbert+sparse+dense"):
        np.testing.assert_allclose(mine[key], unbatched[key], atol=1e-5, err_msg=key)


def _legacy_pair_ids(tok, query: str, passage: str, max_length: int) -> list[int]:  # type: ignore[no-untyped-def]
    """FlagReranker's construction as transformers 4's prepare_for_model did it, by hand."""
    q = tok(query, add_special_tokens=False, truncation=True, max_length=max_length * 3 // 4)[
        "input_ids"
    ]
    p = tok(passage, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    overflow = len(q) + len(p) + 4 - max_length
    if 0 < overflow < len(p):
        p = p[: len(p) - overflow]
    return [tok.cls_token_id, *q, tok.sep_token_id, tok.sep_token_id, *p, tok.sep_token_id]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_reranker_input_ids_follow_flagreranker_construction(
    tiny_reranker_dir: Path, onnx_cache: Path, runtime: str
) -> None:
    rr = Reranker(tiny_reranker_dir, max_length=MAX_LEN, **_runtime_kwargs(runtime, onnx_cache))
    texts = MULTILINGUAL + SAMPLE_TEXTS
    pairs = [(texts[i], texts[-1 - i]) for i in range(len(texts))]
    features = rr._encode_pairs(pairs)
    for (q, p), (ids, _) in zip(pairs, features, strict=True):
        assert ids == _legacy_pair_ids(rr.tokenizer, q, p, MAX_LEN)
        assert len(ids) <= MAX_LEN or len(q) == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_reranker_scores_match_flagreranker(
    tiny_reranker_dir: Path, onnx_cache: Path, runtime: str
) -> None:
    """Same scores as FlagReranker wherever its transformers-5 path sees the same token ids.

    FlagEmbedding 1.4 under transformers 5 rebuilds each pair by decoding the ids to text and
    tokenising again; for a few SentencePiece pieces that round trip changes the ids (and the
    score). m3-rag builds the pair at id level as FlagReranker did with transformers 4, so the
    comparison is made on the pairs whose round trip is exact — the large majority.
    """
    ref_model = FlagEmbedding.FlagReranker(
        str(tiny_reranker_dir), use_fp16=False, devices="cpu", max_length=MAX_LEN
    )
    rr = Reranker(
        tiny_reranker_dir,
        max_length=MAX_LEN,
        batch_size=4,
        **_runtime_kwargs(runtime, onnx_cache),
    )
    texts = MULTILINGUAL + SAMPLE_TEXTS
    pairs = [(texts[i], texts[(i * 5 + 1) % len(texts)]) for i in range(len(texts))]
    ref = ref_model.compute_score(pairs, max_length=MAX_LEN)
    mine = rr.compute_score(pairs)
    tok = rr.tokenizer
    exact = 0
    for (q, p), a, b, (ids, _) in zip(pairs, mine, ref, rr._encode_pairs(pairs), strict=True):
        round_trip = tok(
            tok.decode(ids[1 : ids.index(tok.sep_token_id)], skip_special_tokens=False),
            add_special_tokens=False,
        )["input_ids"]
        if round_trip == ids[1 : ids.index(tok.sep_token_id)] and _roundtrip_ok(tok, ids):
            exact += 1
            assert a == pytest.approx(b, abs=RERANK_ATOL[runtime]), (q, p)
    assert exact >= 0.7 * len(pairs)
    sig = rr.compute_score(pairs, normalize=True)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-np.asarray(mine))), atol=1e-6)


def _roundtrip_ok(tok, ids: list[int]) -> bool:  # type: ignore[no-untyped-def]
    """Whether decoding the passage ids and tokenising again gives them back."""
    sep = tok.sep_token_id
    start = ids.index(sep) + 2
    passage = ids[start:-1]
    again = tok(tok.decode(passage, skip_special_tokens=False), add_special_tokens=False)[
        "input_ids"
    ]
    return bool(again == passage)

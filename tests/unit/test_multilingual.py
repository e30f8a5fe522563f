"""The BM25 leg's multilingual analyzer (issue: BM25 analyzer for dense-only models)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import MULTILINGUAL, require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.analysis import HASH_SPACE, UnicodeAnalyzer, term_id
from m3_rag.testing import SAMPLE_TEXTS

MIXED = [t for t in MULTILINGUAL + SAMPLE_TEXTS if t.strip()] + [
    "ภาษาไทย ไม่มีช่องว่าง ระหว่างคำ",
    "नमस्ते दुनिया, यह हिंदी पाठ है",
    "Ελληνικά: ΣΊΣΥΦΟΣ και σίσυφος",
    "עברית היא שפה שמית",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ and Straße, STRASSE",
]


def test_segmentation_normalisation_and_bigrams() -> None:
    a = UnicodeAnalyzer(stemmer=None)
    assert a("BGE-M3 支持多语言 retrieval и Поиск") == [
        "bge", "m3", "支持", "持多", "多语", "语言", "retrieval", "и", "поиск",
    ]  # fmt: skip
    assert a("Ｆｕｌｌｗｉｄｔｈ Straße ΣΊΣΥΦΟΣ") == ["fullwidth", "strasse", "σίσυφοσ"]
    assert a("東京は日本") == ["東京", "京は", "は日", "日本"]  # kana and Han: one run
    assert a("中 文") == ["中", "文"]  # a lone character is its own term
    assert a("नमस्ते") == ["नमस्ते"]  # combining vowel signs stay in the word
    assert a("ما اهمية مكة المكرمة؟") == ["ما", "اهمية", "مكة", "المكرمة"]
    assert a("ภาษาไทย") == ["ภา", "าษ", "ษา", "าไ", "ไท", "ทย"]
    assert a("") == [] and a(" ,;!? ") == []
    with pytest.raises(TypeError, match="takes one str"):
        a(None)  # type: ignore[arg-type]
    assert UnicodeAnalyzer(None, stopwords=["The", "и"])("the cat и dog") == ["cat", "dog"]


def test_stemming_and_term_ids_are_stable() -> None:
    assert UnicodeAnalyzer()("The running dogs") == ["the", "run", "dog"]  # English default
    assert UnicodeAnalyzer("russian")("столицы России") == ["столиц", "росс"]
    with pytest.raises(ValueError, match="unknown stemmer"):
        UnicodeAnalyzer("klingon")
    # stored reference values: hashed ids must never drift, or saved indexes break
    assert [term_id(t) for t in ("bm25", "поиск", "支持", "")] == [
        1269246133, 990627247, 1622612317, 0,
    ]  # fmt: skip
    assert all(0 <= term_id(t) < HASH_SPACE for t in UnicodeAnalyzer()(" ".join(MIXED)))
    # the English stemmer leaves other scripts as they are
    assert UnicodeAnalyzer()("столицы 支持 القاهرة") == UnicodeAnalyzer(None)(
        "столицы 支持 القاهرة"
    )


def test_bm25_equals_rank_bm25_over_the_analyzer_tokens(tiny_dense_dir: Path) -> None:
    rank_bm25 = require("rank_bm25", "the BM25 oracle; pip install rank-bm25")
    enc = M3Encoder(tiny_dense_dir, device="cpu", max_length=64)
    analyzer = UnicodeAnalyzer()
    r = HybridRetriever(enc, analyzer="unicode")
    ids = [f"d{i}" for i in range(len(MIXED))]
    r.add_texts(MIXED, ids=ids)
    tokens = [analyzer(t) for t in MIXED]
    vocab = {t for doc in tokens for t in doc}
    assert len({term_id(t) for t in vocab}) == len(vocab), "no hash collision in this corpus"
    oracle = rank_bm25.BM25Okapi(tokens)
    n = len(MIXED)
    for query in ("поиск retrieval 支持", "القاهرة عاصمة", "Straße σίσυφος", "ไทย हिंदी", "Paris"):
        want = oracle.get_scores(analyzer(query))
        hits = r.search(query, k=n, candidates=n, weights=(0, 1, 0))
        got = {h.id: h.scores["lexical"] for h in hits}
        for i, doc_id in enumerate(ids):
            if want[i] > 0:
                assert got[doc_id] == pytest.approx(want[i], abs=1e-5), (query, doc_id)
            else:
                assert got.get(doc_id, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_analyzer_is_recorded_in_the_index(tiny_dense_dir: Path, tmp_path: Path) -> None:
    enc = M3Encoder(tiny_dense_dir, device="cpu", max_length=64)
    r = HybridRetriever(enc, analyzer=UnicodeAnalyzer("russian", stopwords=["the"]))
    r.add_texts(SAMPLE_TEXTS, ids=[f"d{i}" for i in range(len(SAMPLE_TEXTS))])
    r.save(tmp_path / "idx")
    loaded = HybridRetriever.load(tmp_path / "idx", enc)
    assert isinstance(loaded.analyzer, UnicodeAnalyzer) and loaded.analyzer.stemmer == "russian"
    assert loaded.analyzer.stopwords == {"the"}
    for q in ("jumping foxes", "capitals of France"):
        assert [(h.id, h.score) for h in loaded.search(q)] == [(h.id, h.score) for h in r.search(q)]
    # a callable analyzer cannot be saved: it must be passed again
    custom = HybridRetriever(enc, analyzer=str.split)
    custom.add_texts(SAMPLE_TEXTS[:3])
    custom.save(tmp_path / "custom")
    with pytest.raises(ValueError, match="custom analyzer"):
        HybridRetriever.load(tmp_path / "custom", enc)
    again = HybridRetriever.load(tmp_path / "custom", enc, analyzer=str.split)
    assert len(again) == 3
    with pytest.raises(TypeError, match="analyzer must be"):
        HybridRetriever(enc, analyzer=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of str"):
        HybridRetriever(enc, analyzer=lambda t: t).add_texts(["abc"])  # type: ignore[arg-type,return-value]


@pytest.mark.slow
def test_minilm_bm25_finds_non_english_passages(minilm_dir: Path) -> None:
    """The English dense-only model over the shipped multilingual set: the BM25 leg finds
    the passage in the query's own language for most non-English queries."""
    from m3_rag.eval import load_beir

    path = Path(str(resources.files("m3_rag").joinpath("data/multilingual")))
    data = load_beir(path)
    with open(path / "queries.jsonl", encoding="utf-8") as f:
        langs = {q["_id"]: q["lang"] for q in map(json.loads, f)}
    enc = M3Encoder(minilm_dir, device="cpu", batch_size=64)
    r = HybridRetriever(enc)  # the default analyzer: unicode
    ids = list(data.corpus)
    r.add_texts([data.corpus[i]["text"] for i in ids], ids=ids, show_progress=False)
    found = []
    for q, text in data.queries.items():
        if langs[q] == "en":
            continue
        best = {d for d, g in data.qrels[q].items() if g == 2}
        top = [h.id for h in r.search(text, k=3, weights=(0, 1, 0))]
        found.append(bool(best & set(top)))
    assert len(found) == 33 and np.mean(found) >= 0.75, np.mean(found)

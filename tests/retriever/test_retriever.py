"""HybridRetriever end to end on the tiny checkpoint: stages, filters, mutation, persistence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _format2 import write_format2
from conftest import require, resign

from m3_rag import (
    HybridRetriever,
    IndexFormatError,
    IndexMismatchError,
    M3Encoder,
    Reranker,
    SearchHit,
)
from m3_rag.backends import LocalBackend
from m3_rag.testing import SAMPLE_TEXTS

META = [
    {"i": i, "lang": "zh" if 8 <= i <= 12 else "ar" if 13 <= i <= 16 else "other"}
    for i in range(len(SAMPLE_TEXTS))
]
IDS = [f"doc{i}" for i in range(len(SAMPLE_TEXTS))]


@pytest.fixture
def retriever(tiny_encoder: M3Encoder) -> HybridRetriever:
    r = HybridRetriever(tiny_encoder, candidates=5)
    r.add_texts(SAMPLE_TEXTS, metadatas=META, ids=IDS)
    return r


def _brute_force(
    r: HybridRetriever, query: str, w: tuple[float, float, float]
) -> list[tuple[str, float]]:
    """Fused score of every document, computed directly from encoder outputs."""
    enc = r.encoder
    q, d = enc.encode_queries([query]), enc.encode_documents(SAMPLE_TEXTS)
    assert (
        q.dense is not None
        and d.dense is not None
        and q.sparse
        and d.sparse
        and q.colbert
        and d.colbert
    )
    dense = d.dense @ q.dense[0]
    sparse = np.array(
        [sum(v * doc.get(t, 0.0) for t, v in q.sparse[0].items()) for doc in d.sparse]
    )
    colbert = np.array([(q.colbert[0] @ c.T).max(axis=1).mean() for c in d.colbert])
    fused = (w[0] * dense + w[1] * sparse + w[2] * colbert) / sum(w)
    return sorted(zip(IDS, fused.tolist(), strict=True), key=lambda x: -x[1])


def test_search_equals_brute_force_when_candidates_cover_the_corpus(
    tiny_encoder: M3Encoder,
) -> None:
    r = HybridRetriever(
        tiny_encoder, candidates=len(SAMPLE_TEXTS), colbert_dtype="float32", pool_factor=1
    )
    r.add_texts(SAMPLE_TEXTS, ids=IDS)
    for query in ("capital of France", "机器学习", SAMPLE_TEXTS[14]):
        hits = r.search(query, k=5)
        want = _brute_force(r, query, r.weights)[:5]
        assert [h.id for h in hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=1e-4)
        assert set(hits[0].scores) == {"dense", "lexical", "colbert", "fused"}


def test_hits_are_typed_and_ranked(retriever: HybridRetriever) -> None:
    hits = retriever.search(SAMPLE_TEXTS[3], k=4)
    assert len(hits) == 4 and all(isinstance(h, SearchHit) for h in hits)
    assert hits[0].id == "doc3" and hits[0].text == SAMPLE_TEXTS[3] and hits[0].metadata == META[3]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    hits[0].metadata["i"] = -1  # a copy: the store is untouched
    assert retriever.search(SAMPLE_TEXTS[3], k=1)[0].metadata == META[3]


def test_weights_and_fusion_per_call(retriever: HybridRetriever) -> None:
    dense_only = retriever.search("capital", k=3, weights=(1, 0, 0))
    assert all(h.score == pytest.approx(h.scores["dense"], abs=1e-6) for h in dense_only)
    assert "lexical" not in dense_only[0].scores and "colbert" not in dense_only[0].scores
    rrf = retriever.search("capital", k=3, fusion="rrf")
    assert all(0 < h.score <= 3 / 61 + 1e-9 for h in rrf)
    with pytest.raises(ValueError, match="fusion"):
        retriever.search("x", fusion="max")
    with pytest.raises(ValueError, match="weights"):
        retriever.search("x", weights=(0, 0, 0))


def test_filters_apply_before_top_k(retriever: HybridRetriever) -> None:
    zh = retriever.search("capital of France", k=10, filter={"lang": "zh"})
    assert len(zh) == 5 and {h.metadata["lang"] for h in zh} == {"zh"}
    anyof = retriever.search("x", k=50, filter={"lang": ["zh", "ar"]})
    assert len(anyof) == 9
    assert retriever.search("x", k=3, filter=lambda m: m["i"] % 2 == 0)[0].metadata["i"] % 2 == 0
    assert retriever.search("x", k=3, filter={"lang": "none-such"}) == []
    assert retriever.search("x", k=3, filter={"missing-key": 1}) == []
    with pytest.raises(TypeError, match="filter"):
        retriever.search("x", filter="lang=zh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty list"):
        retriever.search("x", filter={"lang": []})


def test_k_bounds_and_empty_store(tiny_encoder: M3Encoder, retriever: HybridRetriever) -> None:
    assert len(retriever.search("x", k=1000)) == len(SAMPLE_TEXTS)
    assert retriever.search("x", k=0) == []
    assert HybridRetriever(tiny_encoder).search("anything") == []
    with pytest.raises(ValueError, match="k must be"):
        retriever.search("x", k=-1)
    with pytest.raises(TypeError, match="query"):
        retriever.search(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["ram", "disk", "ann"])
def test_a_huge_k_returns_the_index_without_sizing_anything_by_k(
    tiny_encoder: M3Encoder, tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``k`` and ``candidates`` of 10**9 (and more) return every document once, ranked as
    ``k=len(index)`` ranks them: nothing (faiss included) is asked for 10**9 rows (it was:
    2 x 10**9 results, a MemoryError or an OOM kill)."""
    if engine == "ann":
        require("faiss", "pip install -e '.[ann]'")
        from m3_rag.backends.local import search

        monkeypatch.setattr(search, "EXACT_FILTERED", 1)  # faiss even for a few rows
    backend = {
        "ram": lambda: LocalBackend(),
        "disk": lambda: LocalBackend(tmp_path / "idx", merge_factor=2),
        "ann": lambda: LocalBackend(ann_threshold=1, ann_nprobe=1000),
    }[engine]()
    r = HybridRetriever(tiny_encoder, backend=backend)
    for start in range(0, len(SAMPLE_TEXTS), 6):  # several segments on disk
        r.add_texts(
            SAMPLE_TEXTS[start : start + 6], META[start : start + 6], IDS[start : start + 6]
        )
    n = len(r)
    every = [h.id for h in r.search("capital", k=n, candidates=n)]
    assert sorted(every) == sorted(IDS)
    for k, candidates in ((10**9, None), (10**9, 10**9), (10**18, 10**18)):
        assert [h.id for h in r.search("capital", k=k, candidates=candidates)] == every
    assert len(r.search("capital", k=3, candidates=10**9)) == 3
    zh = r.search("capital", k=10**9, candidates=10**9, filter={"lang": "zh"})
    assert sorted(h.id for h in zh) == sorted(f"doc{i}" for i in range(8, 13))


def test_add_texts_failing_after_a_committed_chunk_stores_each_text_once(
    tiny_encoder: M3Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up at the second chunk of an ``add_texts``: with generated ids the
    first chunk is removed again, so a retry stores every text once (it was stored twice);
    with ids given it stays, and the retry replaces it. The error's note says which."""
    from m3_rag import indexing
    from m3_rag.backends.local import build

    monkeypatch.setattr(indexing, "ADD_CHUNK", 2)
    real = build._Sink.raw
    fail = {"at": 2, "seen": 0}  # the docs.jsonl of the 2nd segment written from now on

    def raw(self: Any, name: str, data: bytes) -> None:
        if name == "docs.jsonl":
            fail["seen"] += 1
            if fail["seen"] == fail["at"]:
                raise OSError(28, "No space left on device", str(self.dir / name))
        real(self, name, data)

    monkeypatch.setattr(build._Sink, "raw", raw)
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx"))
    texts = SAMPLE_TEXTS[:5]
    with pytest.raises(OSError, match="No space") as caught:
        r.add_texts(texts)
    assert "were removed: nothing of this call is stored" in "".join(caught.value.__notes__)
    assert len(r) == 0 and len(HybridRetriever.load(tmp_path / "idx", tiny_encoder)) == 0
    r.add_texts(texts)  # the retry
    stored = sorted(t for _, t, _ in r.get(r.select()))
    assert stored == sorted(texts) and len(r) == 5
    # ids given: the committed chunk stays, a retry with the same ids replaces it
    fail.update(seen=0)
    more, ids = SAMPLE_TEXTS[5:10], [f"m{i}" for i in range(5)]
    with pytest.raises(OSError, match="No space") as caught:
        r.add_texts(more, ids=ids)
    assert "the first 2 of 5 documents" in "".join(caught.value.__notes__)
    assert sorted(i for i in r.select() if i.startswith("m")) == ids[:2] and len(r) == 7
    r.add_texts(more, ids=ids)
    assert len(r) == 10 and len(HybridRetriever.load(tmp_path / "idx", tiny_encoder)) == 10


def test_delete_update_and_bad_ids(retriever: HybridRetriever) -> None:
    retriever.delete(["doc3"])
    assert "doc3" not in [h.id for h in retriever.search(SAMPLE_TEXTS[3], k=100)]
    with pytest.raises(KeyError, match="nope"):
        retriever.delete(["doc4", "nope"])
    assert len(retriever) == len(SAMPLE_TEXTS) - 1  # doc4 survived the failed call
    retriever.add_texts(["a brand new text about Paris"], metadatas=[{"lang": "en"}], ids=["doc4"])
    assert len(retriever) == len(SAMPLE_TEXTS) - 1
    hit = retriever.search("a brand new text about Paris", k=1)[0]
    assert (hit.id, hit.metadata) == ("doc4", {"lang": "en"})
    with pytest.raises(ValueError, match="duplicate id 'z'"):
        retriever.add_texts(["a", "b"], ids=["z", "z"])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        retriever.add_texts(["a", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="JSON"):
        retriever.add_texts(["a"], metadatas=[{"when": object()}])
    with pytest.raises(ValueError, match="metadatas"):
        retriever.add_texts(["a", "b"], metadatas=[{}])
    assert len(retriever) == len(SAMPLE_TEXTS) - 1
    generated = retriever.add_texts(["x", "y"])
    assert len(set(generated)) == 2 and retriever.add_texts([]) == []


def test_rerank_stage(tiny_encoder: M3Encoder, tiny_reranker_dir: Path) -> None:
    rr = Reranker(tiny_reranker_dir)
    r = HybridRetriever(tiny_encoder, reranker=rr, rerank_top_n=6)
    r.add_texts(SAMPLE_TEXTS, ids=IDS)
    hits = r.search("capital of France", k=3)
    assert len(hits) == 3 and all("rerank" in h.scores for h in hits)
    assert [h.score for h in hits] == sorted((h.scores["rerank"] for h in hits), reverse=True)
    pool = r.search("capital of France", k=6, rerank=False)
    want = rr.rerank("capital of France", [h.text for h in pool], top_n=3)
    assert [h.id for h in hits] == [pool[i].id for i, _ in want]
    assert "rerank" not in pool[0].scores
    with pytest.raises(ValueError, match="reranker"):
        HybridRetriever(tiny_encoder).search("x", rerank=True)


def test_dense_only_model_uses_bm25(tiny_dense_dir: Path) -> None:
    enc = M3Encoder(tiny_dense_dir)
    r = HybridRetriever(enc)
    assert r.lexical == "bm25"
    r.add_texts(SAMPLE_TEXTS, ids=IDS)
    hits = r.search("北京是中华人民共和国的首都", k=2)
    assert set(hits[0].scores) == {"dense", "lexical", "fused"}
    assert r.search("北京是中华人民共和国的首都", k=1, weights=(0, 1, 0))[0].id == "doc9"
    with pytest.raises(ValueError, match="dense-only"):
        HybridRetriever(enc, lexical="m3")


def _commit_files(path: Path) -> list[str]:
    """The segments and manifests in an index directory: after a complete save, exactly the
    files of the commit ``CURRENT`` names (leftovers of replaced or killed saves swept)."""
    current = json.loads((path / "CURRENT").read_text())
    manifest = json.loads((path / current["manifest"]).read_text())
    want = sorted([current["manifest"], *(e["name"] for e in manifest["segments"])])
    have = sorted(p.name for p in path.iterdir() if not p.name.startswith((".m3-rag.", "CURRENT")))
    assert have == want
    return have


def test_save_load_round_trip(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    retriever = HybridRetriever(
        tiny_encoder, candidates=5, rerank_top_n=7, fusion="rrf", source={"path": "corpus/"}
    )
    retriever.add_texts(SAMPLE_TEXTS[:12], metadatas=META[:12], ids=IDS[:12])
    retriever.add_texts(SAMPLE_TEXTS[12:], metadatas=META[12:], ids=IDS[12:])  # two segments
    retriever.delete(["doc1"])
    retriever.save(tmp_path / "idx")
    loaded = HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    assert isinstance(loaded.backend, LocalBackend) and loaded.backend.path == tmp_path / "idx"
    assert len(loaded) == len(retriever) and loaded.weights == retriever.weights
    assert (loaded.fusion, loaded.candidates, loaded.rerank_top_n, loaded.lexical) == (
        "rrf",
        5,
        7,
        "m3",
    )
    assert loaded.source == {"path": "corpus/"} and loaded.get(["doc1"]) == []
    for query in ("capital of France", "机器学习", "بحث"):
        for kwargs in ({}, {"filter": {"lang": "zh"}}, {"fusion": "weighted"}):
            assert loaded.search(query, k=7, **kwargs) == retriever.search(query, k=7, **kwargs)
    loaded.backend.close()
    del loaded
    retriever.add_texts(["one more passage about Paris"], ids=["late"])
    retriever.save(tmp_path / "idx")  # overwrite: one index, the new one
    _commit_files(tmp_path / "idx")
    again = HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    assert len(again) == len(retriever) and again.get(["late"])[0][1].endswith("about Paris")
    assert not list((tmp_path / "idx").glob("**/*.pkl")) and not list(
        (tmp_path / "idx").glob("**/snap-*")
    )
    # a disk-backed index: every write is committed, save to its own directory is a no-op
    disk = HybridRetriever(tiny_encoder, weights=(1, 0, 1), backend=LocalBackend(tmp_path / "d"))
    disk.add_texts(SAMPLE_TEXTS[:5], ids=IDS[:5])
    before = sorted(p.name for p in (tmp_path / "d").iterdir())
    disk.save(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == before
    reopened = HybridRetriever.load(tmp_path / "d", tiny_encoder)
    assert reopened.weights == (1.0, 0.0, 1.0) and len(reopened) == 5


def test_int8_colbert_saves_loads_and_ranks_like_float16(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    half = HybridRetriever(tiny_encoder, weights=(0, 0, 1), colbert_dtype="float16", pool_factor=1)
    small = HybridRetriever(tiny_encoder, weights=(0, 0, 1), colbert_dtype="int8", pool_factor=1)
    for r in (half, small):
        r.add_texts(SAMPLE_TEXTS, ids=[str(i) for i in range(len(SAMPLE_TEXTS))])
    small.save(tmp_path / "i8")
    loaded = HybridRetriever.load(tmp_path / "i8", tiny_encoder)
    col = loaded.backend.segments[0].colbert  # type: ignore[attr-defined]
    assert col is not None and col.vectors.dtype == np.int8
    for q in SAMPLE_TEXTS[:5]:
        a, b = half.search(q, k=5), loaded.search(q, k=5)
        assert loaded.search(q, k=5) == small.search(q, k=5)
        for x in b:
            ref = next((h for h in half.search(q, k=30) if h.id == x.id), None)
            assert ref is not None and abs(ref.scores["colbert"] - x.scores["colbert"]) < 0.01
        assert a[0].id == b[0].id


def test_load_refuses_other_models_and_corruption(
    retriever: HybridRetriever, tiny_m3_bin_dir: Path, tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    retriever.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="allow_model_mismatch"):
        HybridRetriever.load(tmp_path / "idx", _renamed(tiny_encoder))
    with pytest.raises(IndexMismatchError, match="dims"):
        HybridRetriever.load(
            tmp_path / "idx", M3Encoder(tiny_m3_bin_dir), allow_model_mismatch=True
        )
    assert len(
        HybridRetriever.load(tmp_path / "idx", _renamed(tiny_encoder), allow_model_mismatch=True)
    ) == len(retriever)
    current = json.loads((tmp_path / "idx" / "CURRENT").read_text())
    manifest_file = tmp_path / "idx" / current["manifest"]
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps(manifest | {"count": 99}))
    with pytest.raises(IndexFormatError, match=r"manifest-\d+\.json does not match its checksum"):
        HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    with pytest.raises(FileNotFoundError, match="no m3-rag index"):
        HybridRetriever.load(tmp_path / "nothing", tiny_encoder)
    (tmp_path / "user-data").mkdir()
    (tmp_path / "user-data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an m3-rag index"):
        retriever.save(tmp_path / "user-data")
    assert (tmp_path / "user-data" / "notes.txt").read_text() == "mine"


def test_load_converts_a_format2_snapshot_and_refuses_a_tampered_one(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    """An index saved by m3-rag 0.1 (format 2: float16 or int8 ColBERT, unpooled) loads
    into RAM with identical results, once every checksum is verified; a tampered one is an
    IndexFormatError naming the file."""
    retriever = HybridRetriever(tiny_encoder, candidates=5, colbert_dtype="float16", pool_factor=1)
    retriever.add_texts(SAMPLE_TEXTS, metadatas=META, ids=IDS)
    old = tmp_path / "old"
    snap = write_format2(old, retriever.backend, retriever._settings())
    loaded = HybridRetriever.load(old, tiny_encoder)
    assert isinstance(loaded.backend, LocalBackend) and loaded.backend.path is None
    assert (loaded.weights, loaded.candidates) == (retriever.weights, retriever.candidates)
    for query in ("capital of France", "机器学习"):
        assert loaded.search(query, k=7) == retriever.search(query, k=7)
    with pytest.raises(IndexMismatchError, match="allow_model_mismatch"):
        HybridRetriever.load(old, _renamed(tiny_encoder))
    manifest = json.loads((snap / "manifest.json").read_text())
    (snap / "manifest.json").write_text(json.dumps(manifest | {"count": 99}))
    with pytest.raises(IndexFormatError, match=r"manifest\.json does not match its checksum"):
        HybridRetriever.load(old, tiny_encoder)
    (snap / "manifest.json").write_text(json.dumps(manifest | {"version": 99}))
    resign(old)  # past the checksums, the contents are checked too
    with pytest.raises(IndexFormatError, match="version 99"):
        HybridRetriever.load(old, tiny_encoder)
    (snap / "manifest.json").write_text(json.dumps(manifest))
    resign(old)
    dense = (snap / "dense_vectors.npy").read_bytes()
    np.save(snap / "dense_vectors.npy", np.zeros((3, 32), np.float32))
    with pytest.raises(IndexFormatError, match=r"dense_vectors\.npy does not match its checksum"):
        HybridRetriever.load(old, tiny_encoder)
    resign(old)
    with pytest.raises(IndexFormatError, match=r"dense_vectors\.npy has shape"):
        HybridRetriever.load(old, tiny_encoder)
    bad = manifest | {"retriever": manifest["retriever"] | {"weights": [0, 0, 0]}}
    (snap / "manifest.json").write_text(json.dumps(bad))
    (snap / "dense_vectors.npy").write_bytes(dense)
    resign(old)
    with pytest.raises(IndexFormatError, match="bad retriever setting: weights"):
        HybridRetriever.load(old, tiny_encoder)


def _renamed(enc: M3Encoder) -> M3Encoder:
    clone = object.__new__(M3Encoder)
    clone.__dict__.update(enc.__dict__, model_name="another/model")
    return clone


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from m3_rag import M3Encoder, HybridRetriever
    enc = M3Encoder(sys.argv[1], max_length=64)
    r = HybridRetriever(enc)
    r.add_texts(["new text %d" % i for i in range(30)])
    real_fsync = os.fsync
    def slow_fsync(fd):
        real_fsync(fd)
        open(sys.argv[3], "w").write("writing")
        time.sleep(600)  # killed here, at the first file the save makes durable
    os.fsync = slow_fsync
    r.save(sys.argv[2])
    """
)


def test_killed_save_leaves_previous_index_loadable(
    retriever: HybridRetriever, tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    idx = tmp_path / "idx"
    retriever.save(idx)
    committed = _commit_files(idx)
    before = retriever.search("capital of France", k=5)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tiny_encoder.path), str(idx), str(marker)]
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the saving process never reached the middle of its save"
    finally:
        proc.kill()
        proc.wait()
    leftovers = {p.name for p in idx.iterdir()} - set(committed) - {"CURRENT"}
    assert {n for n in leftovers if not n.startswith(".m3-rag.")}  # the half-written save
    loaded = HybridRetriever.load(idx, tiny_encoder)
    assert len(loaded) == len(retriever) and loaded.search("capital of France", k=5) == before
    loaded.backend.close()  # type: ignore[attr-defined]
    del loaded
    retriever.save(idx)  # the next save cleans the leftovers
    _commit_files(idx)


def test_concurrent_search_and_add(tiny_encoder: M3Encoder) -> None:
    r = HybridRetriever(tiny_encoder)
    r.add_texts(SAMPLE_TEXTS, ids=IDS)
    errors: list[BaseException] = []
    results: list[list[str]] = []

    def searcher() -> None:
        try:
            for _ in range(15):
                hits = r.search("capital of France", k=5)
                assert len({h.id for h in hits}) == len(hits) == 5
                assert all(h.text for h in hits)
                results.append([h.id for h in hits])
        except BaseException as e:
            errors.append(e)

    def adder() -> None:
        try:
            for i in range(10):
                r.add_texts([f"extra document {i}"], ids=[f"extra{i}"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [
        threading.Thread(target=adder)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(r) == len(SAMPLE_TEXTS) + 10 and len(results) == 45


def test_pooled_binary_colbert_stores_half_the_vectors_and_reopens(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    """pool_factor pools documents (never queries) at index time; binary stores one bit
    per dimension; both are recorded, so load() and a reopened disk index score the same
    codes, and opening with other settings is refused by name."""
    ids = [str(i) for i in range(len(SAMPLE_TEXTS))]
    enc = tiny_encoder.encode_documents(SAMPLE_TEXTS)
    assert enc.colbert is not None and tiny_encoder.colbert_dim is not None
    disk = HybridRetriever(
        tiny_encoder,
        colbert_dtype="binary",
        pool_factor=2,
        backend=LocalBackend(tmp_path / "bin"),
    )
    disk.add_texts(SAMPLE_TEXTS, ids=ids)
    col = disk.backend.segments[0].colbert  # type: ignore[attr-defined]
    assert col is not None and col.vectors.dtype == np.uint8
    assert col.vectors.shape[1] == -(-tiny_encoder.colbert_dim // 8)
    assert np.diff(col.offsets).tolist() == [max(1, len(v) // 2) for v in enc.colbert]
    disk.save(tmp_path / "saved")
    loaded = HybridRetriever.load(tmp_path / "saved", tiny_encoder)
    again = HybridRetriever(
        tiny_encoder, colbert_dtype="binary", pool_factor=2, backend=LocalBackend(tmp_path / "bin")
    )
    assert loaded.pool_factor == 2 and loaded.backend.spec.colbert_dtype == "binary"  # type: ignore[attr-defined]
    for q in SAMPLE_TEXTS[:3]:
        assert disk.search(q, k=5) == loaded.search(q, k=5) == again.search(q, k=5)
    # unset: what the index records; set: checked against it
    adopted = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "bin"))
    assert adopted.pool_factor == 2
    assert adopted.backend.spec.colbert_dtype == "binary"  # type: ignore[attr-defined]
    assert adopted.search(SAMPLE_TEXTS[0], k=5) == disk.search(SAMPLE_TEXTS[0], k=5)
    with pytest.raises(IndexMismatchError, match="colbert_pool_factor"):
        HybridRetriever(tiny_encoder, pool_factor=1, backend=LocalBackend(tmp_path / "bin"))
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        HybridRetriever(tiny_encoder, colbert_dtype="int8", backend=LocalBackend(tmp_path / "bin"))
    with pytest.raises(ValueError, match="pool_factor must be an int >= 1"):
        HybridRetriever(tiny_encoder, pool_factor=0)


def test_add_from_pools_an_unpooled_source_and_refuses_another_factor(
    tiny_encoder: M3Encoder,
) -> None:
    ids = [str(i) for i in range(len(SAMPLE_TEXTS))]
    # float32 in the source: the copied vectors are the ones `direct` pools (a lossy source
    # code would move the pooled vectors, and a sign bit with them)
    plain = HybridRetriever(tiny_encoder, colbert_dtype="float32")
    plain.add_texts(SAMPLE_TEXTS, ids=ids)
    pooled = HybridRetriever(tiny_encoder, colbert_dtype="binary", pool_factor=2)
    direct = HybridRetriever(tiny_encoder, colbert_dtype="binary", pool_factor=2)
    assert pooled.add_from(plain) == len(ids)
    direct.add_texts(SAMPLE_TEXTS, ids=ids)
    for q in SAMPLE_TEXTS[:3]:  # the same vectors pooled as they are copied: the same codes
        got, want = pooled.search(q, k=5), direct.search(q, k=5)
        assert [(h.id, h.scores) for h in got] == [(h.id, h.scores) for h in want]
    with pytest.raises(IndexMismatchError, match="pooled by 2"):
        HybridRetriever(tiny_encoder, pool_factor=3).add_from(pooled)


def test_bad_constructor_arguments(tiny_encoder: M3Encoder) -> None:
    with pytest.raises(TypeError, match="M3Encoder"):
        HybridRetriever("BAAI/bge-m3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lexical"):
        HybridRetriever(tiny_encoder, lexical="tfidf")
    with pytest.raises(ValueError, match="candidates"):
        HybridRetriever(tiny_encoder, candidates=0)
    with pytest.raises(ValueError, match="dtype"):
        HybridRetriever(tiny_encoder, colbert_dtype="int4")
    assert os.fspath(tiny_encoder.path)


def test_one_name_for_the_ram_engine(tiny_encoder: M3Encoder) -> None:
    ram = HybridRetriever(tiny_encoder)
    assert isinstance(ram.backend, LocalBackend) and ram.backend.path is None
    for old in ("memory", "local", b"memory"):
        with pytest.raises(TypeError, match=r"pass nothing \(or backend=LocalBackend\(\)\)"):
            HybridRetriever(tiny_encoder, backend=old)  # type: ignore[arg-type]
    explicit = HybridRetriever(tiny_encoder, backend=LocalBackend())
    explicit.add_texts(SAMPLE_TEXTS, ids=IDS)
    ram.add_texts(SAMPLE_TEXTS, ids=IDS)
    assert explicit.search("capital of France", k=5) == ram.search("capital of France", k=5)


def test_capabilities_are_checked_not_probed(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    """save needs a Savable engine, add_from an Exportable source; Qdrant is neither."""
    require("qdrant_client", "pip install -e '.[qdrant]'")
    from m3_rag.backends import QdrantBackend

    q = HybridRetriever(tiny_encoder, backend=QdrantBackend(location=":memory:", collection="c"))
    q.add_texts(SAMPLE_TEXTS[:4], ids=IDS[:4])
    ram = HybridRetriever(tiny_encoder)
    with pytest.raises(TypeError, match="can export its encodings"):
        ram.add_from(q)
    with pytest.raises(TypeError, match="can export its encodings"):
        ram.add_from(q.backend)  # type: ignore[arg-type]
    assert len(ram) == 0
    with pytest.raises(ValueError, match="persists"):
        q.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    ram.add_texts(SAMPLE_TEXTS[4:9], ids=IDS[4:9])
    assert q.add_from(ram, batch_size=2) == 5 and len(q) == 9
    # the engine's own refusals (DocumentChecking) run on every document before the first
    # chunk of add_texts, and on each chunk of add_documents before it is encoded
    metas: list[dict[str, Any]] = [{"i": i} for i in range(300)]
    metas[290] = {"big": 2**70}
    with pytest.raises(ValueError, match=r"metadatas\[290\].*64-bit"):
        q.add_texts([f"passage {i}" for i in range(300)], metas, [f"p{i}" for i in range(300)])
    assert len(q) == 9
    docs = [{"text": f"passage {i}", "id": f"s{i}", "metadata": metas[288 + i]} for i in range(4)]
    with pytest.raises(ValueError, match="64-bit"):
        q.add_documents(docs, chunk_size=2)
    assert len(q) == 11 and q.get(["s0", "s1", "s2"]) == [
        ("s0", "passage 0", {"i": 288}),
        ("s1", "passage 1", {"i": 289}),
    ]


def test_allow_model_mismatch_is_a_retriever_option(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    built = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "disk"))
    built.add_texts(SAMPLE_TEXTS, ids=IDS)
    want = built.search("capital of France", k=5)
    built.backend.close()  # type: ignore[attr-defined]
    with pytest.raises(IndexMismatchError, match="allow_model_mismatch"):
        HybridRetriever(_renamed(tiny_encoder), backend=LocalBackend(tmp_path / "disk"))
    again = HybridRetriever(
        _renamed(tiny_encoder), backend=LocalBackend(tmp_path / "disk"), allow_model_mismatch=True
    )
    assert again.search("capital of France", k=5) == want


def test_filters_combine(retriever: HybridRetriever) -> None:
    from m3_rag.filters import all_of, matches

    zh, low = {"lang": "zh"}, {"i": [8, 9, 13]}
    assert all_of(None, zh) is zh and all_of(zh, None) is zh and all_of(None, None) is None
    assert all_of(zh, {"x": 1}) == {"lang": "zh", "x": 1}  # one dict: compared column-wise
    for a, b, want, kind in (
        (zh, low, {"doc8", "doc9"}, dict),
        (zh, {"lang": "ar"}, set(), None),  # the same key twice: both must hold
        (lambda m: m["i"] % 2 == 0, zh, {"doc8", "doc10", "doc12"}, None),
    ):
        combined = all_of(a, b)
        assert isinstance(combined, dict) if kind is dict else callable(combined)
        assert {h.id for h in retriever.search("x", k=50, filter=combined)} == want
        assert set(retriever.select(combined)) == want
    assert matches({"lang": "zh"}, zh) and not matches({}, zh) and matches({}, None)


def test_add_from_copies_encodings_and_refuses_other_indexes(
    retriever: HybridRetriever, tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    disk = HybridRetriever(tiny_encoder, candidates=5, backend=LocalBackend(tmp_path / "d"))
    assert disk.add_from(retriever, batch_size=4) == len(SAMPLE_TEXTS)
    for q in ("capital of France", "机器学习"):
        a = disk.search(q, k=7, filter={"lang": ["zh", "other"]})
        b = retriever.search(q, k=7, filter={"lang": ["zh", "other"]})
        assert [(h.id, h.text, h.metadata) for h in a] == [(h.id, h.text, h.metadata) for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
    bm25 = HybridRetriever(tiny_encoder, lexical="bm25")
    with pytest.raises(IndexMismatchError, match="lexical kind"):
        bm25.add_from(retriever)
    stemmed = HybridRetriever(tiny_encoder, lexical="bm25", analyzer="model")
    stemmed.add_texts(SAMPLE_TEXTS[:3])
    with pytest.raises(IndexMismatchError, match="analyzer"):
        bm25.add_from(stemmed)
    assert len(bm25) == 0


def test_an_object_that_is_not_a_backend_is_a_type_error(tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"must implement m3_rag\.backends\.Backend"):
        HybridRetriever(tiny_encoder, backend=object())  # type: ignore[arg-type]


def test_adapters_pass_the_colbert_code_and_pool_factor_through(tiny_encoder: M3Encoder) -> None:
    """LangChain and LlamaIndex hand their retriever kwargs to HybridRetriever unchanged."""
    from langchain_m3rag import M3Retriever
    from langchain_m3rag import M3VectorStore as LangChainStore
    from llama_index.core.schema import TextNode
    from llama_index_m3rag import M3Retriever as LlamaRetriever
    from llama_index_m3rag import M3VectorStore as LlamaStore

    kw = {"colbert_dtype": "binary", "pool_factor": 2}
    lc = M3Retriever.from_texts(SAMPLE_TEXTS[:3], tiny_encoder, retriever_kwargs=kw)
    nodes = [TextNode(text=t, id_=f"n{i}") for i, t in enumerate(SAMPLE_TEXTS[:3])]
    li = LlamaRetriever.from_nodes(nodes, tiny_encoder, retriever_kwargs=kw)
    cores = [
        lc.retriever,
        li.retriever,
        LangChainStore.from_encoder(tiny_encoder, **kw).retriever,
        LlamaStore.from_encoder(tiny_encoder, **kw)._retriever,
    ]
    for core in cores:
        spec = core.backend.spec
        assert (spec.colbert_dtype, spec.colbert_pool_factor, core.pool_factor) == ("binary", 2, 2)


def test_new_index_defaults_and_a_codec_chosen_alone(tiny_encoder: M3Encoder) -> None:
    """A new index stores the default pair (rotated-binary, pooled x2); a codec given without
    a pool factor keeps every vector (int8 for exact scores is not pooled behind one's back)."""
    spec = HybridRetriever(tiny_encoder).backend.spec  # type: ignore[attr-defined]
    assert (spec.colbert_dtype, spec.colbert_pool_factor) == ("rotated-binary", 2)
    for codec in ("int8", "rotated-binary"):
        spec = HybridRetriever(tiny_encoder, colbert_dtype=codec).backend.spec  # type: ignore[attr-defined]
        assert (spec.colbert_dtype, spec.colbert_pool_factor) == (codec, 1)

"""The local engine: segments on disk, tombstones, merges, ANN, concurrency, crashes, streaming."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _ingest_writer import CHUNK, CHUNKS, add_chunk, deleted_by, doc, open_index
from conftest import require
from hypothesis import example, given, settings
from hypothesis import strategies as st

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.errors import IndexFormatError
from m3_rag.testing import SAMPLE_TEXTS

HERE = Path(__file__).resolve().parents[1]
IDS = [f"doc-{i}" for i in range(len(SAMPLE_TEXTS))]
METAS = [{"i": i, "par": i % 2} for i in range(len(IDS))]
QUERIES = ["capital city", "机器学习", SAMPLE_TEXTS[6], "retrieval model"]


class _Hits(list):  # type: ignore[type-arg]
    """Hits compared by id and by score within 1e-5 (BM25 sums in another order)."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, list)
            and [i for i, _ in self] == [i for i, _ in other]
            and all(
                a == pytest.approx(b, rel=1e-5, abs=1e-5)
                for (_, a), (_, b) in zip(self, other, strict=True)
            )
        )


@pytest.fixture(autouse=True)
def _arrays_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read every segment array from disk, however small (as large ones are)."""
    from m3_rag.backends.local import segment_io

    monkeypatch.setattr(segment_io, "_IN_RAM", 0)


def _hits(r: HybridRetriever, q: str, **kw: object) -> list[tuple[str, float]]:
    return _Hits((h.id, h.score) for h in r.search(q, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("lexical", ["m3", "bm25"])
def test_disk_index_commits_and_reopens(
    tiny_encoder: M3Encoder, tmp_path: Path, lexical: str
) -> None:
    mem = HybridRetriever(tiny_encoder, lexical=lexical)
    disk = HybridRetriever(
        tiny_encoder, lexical=lexical, backend=LocalBackend(tmp_path / "idx", merge_factor=2)
    )
    for s in range(0, len(IDS), 3):  # 7 commits, merges on the way (same encoder batches)
        for r in (mem, disk):
            r.add_texts(SAMPLE_TEXTS[s : s + 3], METAS[s : s + 3], IDS[s : s + 3])
    for r in (mem, disk):
        r.delete([IDS[2], IDS[9]])
        r.add_texts(["a replaced passage about Paris"], [{"new": True}], [IDS[4]])
    assert len(disk.backend.segments) < 7  # type: ignore[attr-defined]
    again = HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    assert len(again) == len(mem) == len(IDS) - 2
    for q in [*QUERIES, "Paris"]:
        for r in (disk, again):
            assert _hits(r, q, k=6) == _hits(mem, q, k=6)
            assert _hits(r, q, k=4, filter={"par": 1}) == _hits(mem, q, k=4, filter={"par": 1})
    assert again.get([IDS[4]]) == [(IDS[4], "a replaced passage about Paris", {"new": True})]
    again.backend.compact()  # type: ignore[attr-defined]
    assert len(again.backend.segments) == 1  # type: ignore[attr-defined]
    names = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-"))
    assert len(names) == 1  # merged-away segments were removed
    for q in QUERIES:
        assert _hits(HybridRetriever.load(tmp_path / "idx", tiny_encoder), q, k=6) == _hits(
            mem, q, k=6
        )


def test_a_delete_commits_a_tombstone_not_a_rewrite(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx"))
    r.add_texts(SAMPLE_TEXTS, METAS, IDS)
    seg = next(p for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-"))
    before = {p.name: p.stat().st_mtime_ns for p in seg.iterdir()}
    r.delete([IDS[0]])
    after = {p.name: p.stat().st_mtime_ns for p in seg.iterdir()}
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("del-")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten
    assert IDS[0] not in {h.id for h in r.search(SAMPLE_TEXTS[0], k=30)}


def test_another_writer_is_detected(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    a = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx"))
    a.add_texts(SAMPLE_TEXTS[:4], ids=IDS[:4])
    b = HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    b.add_texts(SAMPLE_TEXTS[4:6], ids=IDS[4:6])
    with pytest.raises(RuntimeError, match="another writer"):
        a.add_texts(SAMPLE_TEXTS[6:8], ids=IDS[6:8])
    assert len(HybridRetriever.load(tmp_path / "idx", tiny_encoder)) == 6
    # the refused write stored nothing; a read of the stale handle then reads b's commit
    assert a.get(IDS[6:8]) == [] and len(a) == 6 and a.get(IDS[4:5])[0][0] == IDS[4]
    a.add_texts(SAMPLE_TEXTS[6:8], ids=IDS[6:8])  # on top of it, now that it read it
    assert len(HybridRetriever.load(tmp_path / "idx", tiny_encoder)) == 8


def test_settings_that_do_not_fit_the_directory_are_refused(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx")).add_texts(["x"])
    with pytest.raises(ValueError, match="colbert_dtype"):
        HybridRetriever(
            tiny_encoder, colbert_dtype="binary", backend=LocalBackend(tmp_path / "idx")
        )
    with pytest.raises(ValueError, match="lexical"):
        HybridRetriever(tiny_encoder, lexical="bm25", backend=LocalBackend(tmp_path / "idx"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="not an m3-rag index"):
        HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "notes"))
    assert (tmp_path / "notes" / "a.txt").read_text(encoding="utf-8") == "mine"


def test_tampering_is_detected_on_open(tiny_encoder: M3Encoder, tmp_path: Path) -> None:
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx"))
    r.add_texts(SAMPLE_TEXTS, METAS, IDS)
    r.delete([IDS[1]])
    seg = next(p for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-"))
    for name, match in [
        ("dense.npy", "checksum"),
        ("ids.json", "checksum"),
        ("colbert_offsets.npy", "checksum"),
        (next(p.name for p in seg.iterdir() if p.name.startswith("del-")), "checksum"),
    ]:
        f = seg / name
        data = f.read_bytes()
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(IndexFormatError, match=match):
            HybridRetriever.load(tmp_path / "idx", tiny_encoder)
        f.write_bytes(data)
    (seg / "dense.npy").rename(seg / "moved")
    with pytest.raises(IndexFormatError, match=r"dense\.npy"):
        HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    (seg / "moved").rename(seg / "dense.npy")
    manifest = json.loads((tmp_path / "idx" / "CURRENT").read_text())["manifest"]
    (tmp_path / "idx" / manifest).write_text("{}")
    with pytest.raises(IndexFormatError, match="checksum"):
        HybridRetriever.load(tmp_path / "idx", tiny_encoder)


def _synthetic(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (documents) and queries near some of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    docs = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, dim))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.integers(0, n, 20)] + 0.3 * rng.standard_normal((20, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return docs.astype(np.float32), queries.astype(np.float32)


def test_ann_leg_finds_the_exact_neighbours_and_scores_them_exactly(tmp_path: Path) -> None:
    require("faiss", "pip install -e '.[ann]'")
    from m3_rag.backends.protocol import IndexSpec

    docs, queries = _synthetic(3000, 32, 0)
    spec = IndexSpec("synthetic", 32, None, None, 1)
    exact = LocalBackend(ann_threshold=None).open(spec)
    ann = LocalBackend(tmp_path / "ann", ann_threshold=1000, ann_nprobe=16).open(spec)
    ids = [f"d{i}" for i in range(len(docs))]
    for b in (exact, ann):
        b.add(ids, ids, [{"half": i % 2} for i in range(len(ids))], docs, None, None)
    assert ann.segments[0].ann is not None and exact.segments[0].ann is None
    ann.delete(ids[:50])
    exact.delete(ids[:50])
    reopened = LocalBackend(tmp_path / "ann", ann_threshold=1000, ann_nprobe=16).open(spec)
    assert reopened.segments[0].ann is not None
    # its documents are read from docs.jsonl (once they were read from the ANN index's bytes)
    assert reopened.fetch(ids[50:52]) == [(i, i, {"half": int(i[1:]) % 2}) for i in ids[50:52]]
    recall = []
    for q in queries:
        want = exact.candidates(q, None, 50)
        for b in (ann, reopened):
            got = b.candidates(q, None, 50)
            assert not set(got.ids) & set(ids[:50])  # tombstones hold in the ANN leg
            common = {i: s for i, s in zip(got.ids, got.dense, strict=True)}
            for i, s in zip(want.ids, want.dense, strict=True):
                if i in common:
                    assert common[i] == pytest.approx(s, abs=1e-6)  # exact scores
            recall.append(len(set(got.ids) & set(want.ids)) / len(want.ids))
        got = ann.candidates(q, None, 20, {"half": 1})
        assert {int(i[1:]) % 2 for i in got.ids} == {1} and len(got.ids) == 20
    assert np.mean(recall) >= 0.95


def test_searches_run_during_writes_and_never_see_deleted_documents(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx", merge_factor=3))
    texts = [f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} #{i}" for i in range(120)]
    ids = [f"x{i}" for i in range(120)]
    r.add_texts(texts, ids=ids)
    deleted: set[str] = set()
    errors: list[BaseException] = []
    done = threading.Event()
    lock = threading.Lock()

    def search() -> None:
        try:
            while not done.is_set():
                with lock:
                    gone = set(deleted)  # deleted before this search started
                hits = r.search(SAMPLE_TEXTS[3], k=40, candidates=60)
                assert not {h.id for h in hits} & gone
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(0, 100, 2):
        r.delete([ids[i]])
        with lock:
            deleted.add(ids[i])
        if i % 10 == 0:
            r.add_texts([f"new passage {i}"], ids=[f"n{i}"])
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(r) == 120 - 50 + 10


def _check_index(path: Path) -> int:
    """Open the index after a kill: it must be a whole prefix of chunks (the last one's
    delete done or not). -> the chunk to resume from (the last one again: adds replace)."""
    b = open_index(path)
    live = set(b.ids)
    top = max((int(i[1:]) // CHUNK for i in live), default=-1)
    want = {f"d{i}" for i in range((top + 1) * CHUNK)}
    gone = {deleted_by(c) for c in range(top + 1)} - {None}
    assert live in (want - gone, want - (gone - {deleted_by(top)})), "lost or partial commit"
    ids = sorted(live, key=lambda x: int(x[1:]))
    for batch in b.export(1000):
        for i, dense, meta in zip(batch.ids, batch.dense, batch.metadatas, strict=True):
            np.testing.assert_array_equal(dense, doc(int(i[1:]))[0])
            assert meta == {"chunk": int(i[1:]) // CHUNK}
    if ids:
        assert b.fetch(ids[:1]) == [(ids[0], f"text of {ids[0]}", {"chunk": 0})]
    return max(top, 0)


def test_killed_ingestion_always_reopens_at_its_last_commit(tmp_path: Path) -> None:
    """kill -9 at random points of a streaming ingestion (adds, deletes, merges), 24 times."""
    idx = tmp_path / "idx"
    rng = random.Random(7)
    start, kills = 0, 0
    while kills < 24:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_ingest_writer.py"), str(idx), str(start)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        start = _check_index(idx)
        if start >= CHUNKS - 1:
            start = 0
            for p in idx.iterdir():
                p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    b = open_index(idx)  # resume to the end, as a rerun would
    for c in range(start, CHUNKS):
        add_chunk(b, c)
    assert _check_index(idx) == CHUNKS - 1
    assert len(open_index(idx)) == CHUNKS * CHUNK - sum(
        deleted_by(c) is not None for c in range(CHUNKS)
    )


def test_add_documents_streams_in_chunks_and_resumes(
    tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx"))
    pulled = 0
    stored_when_pulled: list[int] = []

    def docs():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for i in range(50):
            pulled += 1
            stored_when_pulled.append(len(r))
            yield {"id": f"s{i}", "text": SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], "metadata": {"i": i}}

    assert r.add_documents(docs(), chunk_size=8) == 50
    # never more than one chunk read ahead of what is stored
    assert all(i - stored <= 8 for i, stored in enumerate(stored_when_pulled))
    assert len(r) == 50 and r.get(["s7"]) == [("s7", SAMPLE_TEXTS[7], {"i": 7})]
    again = HybridRetriever.load(tmp_path / "idx", tiny_encoder)
    more = [{"id": f"s{i}", "text": f"passage {i}"} for i in range(40, 60)]
    assert again.add_documents(more, chunk_size=8, skip_existing=True) == 10
    assert again.get(["s45"])[0][1] == SAMPLE_TEXTS[45 % len(SAMPLE_TEXTS)]  # kept, not redone
    with pytest.raises(TypeError, match="iterable"):
        again.add_documents("not a list of docs")
    with pytest.raises(TypeError, match="each document"):
        again.add_documents([3.5])


# ------------------------------------------------------------------------------ reliability
def _tiny(path: Path | None = None, **kw: object) -> LocalBackend:
    from m3_rag.spec import IndexSpec

    return LocalBackend(path, ann_threshold=None, **kw).open(  # type: ignore[arg-type]
        IndexSpec("tiny", 2, None, None, 0)
    )


def _add(b: LocalBackend, ids: list[str]) -> None:
    b.add(ids, ids, [{}] * len(ids), np.ones((len(ids), 2), np.float32), None, None)


@pytest.mark.parametrize("how", ["open_saved", "LocalBackend.open"])
def test_a_commit_while_an_index_opens_does_not_break_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Another writer commits (and would remove the old manifest) right after the opener
    read CURRENT: the opener holds the reader lock, so it still opens the commit it read."""
    from m3_rag.backends.local import manifest
    from m3_rag.backends.registry import open_saved
    from m3_rag.spec import IndexSpec

    idx = tmp_path / "idx"
    writer = _tiny(idx)
    _add(writer, ["a", "b"])
    real = manifest.read_bytes
    fired: list[int] = []

    def read_bytes(path: Path, limit: int | None = None) -> bytes:
        if path.name.startswith("manifest-") and not fired:
            fired.append(1)
            _add(writer, ["c"])  # a commit between reading CURRENT and the manifest it names
            assert len(list(idx.glob("manifest-*"))) == 2, "the old manifest must stay"
        return real(path, limit)

    monkeypatch.setattr(manifest, "read_bytes", read_bytes)
    spec = IndexSpec("tiny", 2, None, None, 0)
    if how == "open_saved":
        opened = open_saved(idx).backend.open(spec)
    else:
        opened = LocalBackend(idx, ann_threshold=None).open(spec)
    # it opened the commit it read CURRENT of ...
    assert isinstance(opened, LocalBackend)
    assert fired and [s.ids for s in opened.segments] == [["a", "b"]]
    monkeypatch.undo()
    assert len(opened) == 3  # ... and its first read reads the one committed since
    assert len(LocalBackend(idx).open(spec)) == 3


def test_faiss_is_never_asked_for_more_rows_than_a_segment_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("faiss", "pip install -e '.[ann]'")
    from m3_rag.backends.local import search
    from m3_rag.backends.local.ann import DenseANN
    from m3_rag.spec import IndexSpec

    monkeypatch.setattr(search, "EXACT_FILTERED", 100)
    docs, queries = _synthetic(1500, 16, 3)
    b = LocalBackend(ann_threshold=1000).open(IndexSpec("s", 16, None, None, 0))
    ids = [f"d{i}" for i in range(len(docs))]
    b.add(ids, ids, [{}] * len(ids), docs, None, None)
    b.delete(ids[:300])
    asked: list[int] = []
    real = DenseANN.search

    def spy(self: DenseANN, query: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
        asked.append(k)
        return real(self, query, k, allowed)

    monkeypatch.setattr(DenseANN, "search", spy)
    got = b.candidates(queries[0], None, 10**9)  # "everything": 1200 live rows
    assert asked and max(asked) <= 1200
    assert 0 < len(got.ids) <= 1200 and not set(got.ids) & set(ids[:300])


def test_bad_engine_options_are_refused() -> None:
    for bad in (0, -1, 1.5, True, "32", None):
        with pytest.raises(ValueError, match="ann_nprobe must be an int >= 1"):
            LocalBackend(ann_nprobe=bad)  # type: ignore[arg-type]
    from m3_rag.spec import IndexSpec

    spec = IndexSpec("tiny", 2, None, None, 0)
    for bad in ("yes", 1, 0, None):
        with pytest.raises(TypeError, match="allow_model_mismatch must be a bool"):
            LocalBackend().open(spec, allow_model_mismatch=bad)  # type: ignore[arg-type]
    assert len(LocalBackend(ann_nprobe=1).open(spec, allow_model_mismatch=True)) == 0


@settings(max_examples=60, deadline=None)
@example(factor=2, ops=[1, 300] * 15)  # tiers alternate: the newest two never share one
@example(factor=3, ops=[5, 200, 1] * 10)
@given(
    factor=st.integers(2, 4),
    ops=st.lists(
        st.one_of(st.integers(1, 300), st.tuples(st.just("delete"), st.integers(1, 50))),
        min_size=1,
        max_size=30,
    ),
)
def test_merges_keep_a_logarithmic_number_of_segments(
    factor: int, ops: list[int | tuple[str, int]]
) -> None:
    """Whatever the sizes of the adds (and deletes between them), ``n`` stored rows sit in
    at most ``(factor - 1) * (floor(log_factor n) + 1)`` segments."""
    b = _tiny(merge_factor=factor)
    live: list[str] = []
    added = 0
    for op in ops:
        if isinstance(op, tuple):
            gone, live = live[: op[1]], live[op[1] :]
            if gone:
                b.delete(gone)
        else:
            ids = [f"d{added + i}" for i in range(op)]
            added += op
            _add(b, ids)
            live += ids
        stored = sum(len(s) for s in b.segments)
        tiers = int(np.floor(np.log(max(stored, 1)) / np.log(factor) + 1e-9)) + 1
        assert len(b.segments) <= (factor - 1) * tiers, [len(s) for s in b.segments]
        assert len(b) == len(live) and sorted(b.ids) == sorted(live)


def test_the_manifest_count_is_the_committed_one(tmp_path: Path) -> None:
    b = _tiny(tmp_path / "idx")

    def manifest_count() -> int:
        current = json.loads((tmp_path / "idx" / "CURRENT").read_text())
        return int(json.loads((tmp_path / "idx" / current["manifest"]).read_text())["count"])

    _add(b, ["a", "b", "c"])
    assert manifest_count() == len(b) == 3
    b.delete(["a"])
    assert manifest_count() == len(b) == 2
    _add(b, ["b", "d"])  # one replaced, one new
    assert manifest_count() == len(b) == 3
    b.compact()
    assert manifest_count() == 3


def test_a_symlinked_segment_directory_is_refused(tmp_path: Path) -> None:
    b = _tiny(tmp_path / "idx")
    _add(b, ["a", "b"])
    seg = next(p for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-"))
    moved = tmp_path / "elsewhere"
    seg.rename(moved)
    seg.symlink_to(moved, target_is_directory=True)
    with pytest.raises(IndexFormatError, match="symlink"):
        _tiny(tmp_path / "idx")


def test_the_ann_index_is_streamed_back_from_its_file(tmp_path: Path) -> None:
    """``ann.npy`` is read into faiss in pieces: the same index back (same answers), and a
    file that is not exactly one faiss index is a ValueError naming what is wrong."""
    require("faiss", "pip install -e '.[ann]'")
    from m3_rag.backends.local.ann import DenseANN
    from m3_rag.backends.local.segment_io import _read_ann

    docs, queries = _synthetic(2000, 16, 5)
    ann = DenseANN.build(lambda rows: docs[rows], len(docs), 16, nprobe=4)
    parts: list[bytes] = []
    ann.write_to(parts.append)
    blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
    path = tmp_path / "ann.npy"
    np.save(path, blob)
    with open(path, "rb") as f:
        back = _read_ann(f, path, 4)
    assert back.index.ntotal == len(docs)
    for q in queries:
        assert back.search(q, 10, None).tolist() == ann.search(q, 10, None).tolist()
    for bad, why in (
        (np.append(blob, np.uint8(7)), "1 bytes after the index"),
        (blob[: len(blob) // 2], None),  # cut short: faiss's own message
        (np.frombuffer(b"not a faiss index" * 4, dtype=np.uint8), None),
        (blob.astype(np.int16), "expected a 1-d uint8 array"),
    ):
        np.save(path, bad)
        with open(path, "rb") as f, pytest.raises(ValueError, match=why):
            _read_ann(f, path, 4)
    np.save(path, blob)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)  # shorter than its header says
    with open(path, "rb") as f, pytest.raises(ValueError, match="its header says"):
        _read_ann(f, path, 4)


def test_a_dropped_index_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """No reference cycle through the backend: its segments (the ANN indexes, ~1 GB at 1M
    rows) are freed when the last reference goes, not whenever the collector runs."""
    import gc
    import weakref

    from m3_rag.spec import IndexSpec

    spec = IndexSpec("freed", 4, None, "m3", 10)
    rng = np.random.default_rng(0)
    gc.collect()
    gc.disable()
    try:
        for path in (None, tmp_path / "idx"):
            b = LocalBackend(path).open(spec)
            dense = rng.standard_normal((3, 4)).astype(np.float32)
            b.add(["a", "b", "c"], ["x", "y", "z"], [{}] * 3, dense, [{1: 0.5}] * 3, None)
            assert b.candidates(dense[0], {1: 1.0}, 2).ids  # a search ran
            backend, segment = weakref.ref(b), weakref.ref(b.segments[0])
            del b
            assert backend() is None and segment() is None, path
    finally:
        gc.enable()


@pytest.mark.parametrize(("on_disk", "spread"), [(False, 1), (True, 1), (True, 30_000_000)])
def test_a_merge_streams_the_postings_from_csr_would_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: bool, spread: int
) -> None:
    """The merged segment's postings (streamed a block of terms at a time by lexmerge)
    equal ``LexicalPostings.from_csr`` of the rows it keeps, array for array: three
    segments, rows deleted from each, a block of ~40 postings so that terms span blocks;
    term ids ``spread`` apart as BM25's hashed ids are (up to ~2^31)."""
    import scipy.sparse as sp

    from m3_rag.backends.local import lexmerge
    from m3_rag.backends.local.segment import LexicalPostings
    from m3_rag.spec import IndexSpec

    monkeypatch.setattr(lexmerge, "_BLOCK", 40)
    rng = np.random.default_rng(11)
    vocab = 60 * spread
    spec = IndexSpec("lexmerge", 4, None, "m3", vocab)
    b = LocalBackend(tmp_path / "idx" if on_disk else None, merge_factor=100).open(spec)
    rows: dict[str, dict[int, float]] = {}
    for batch in range(3):
        ids = [f"b{batch}-{i}" for i in range(30)]
        lex = []
        for _ in ids:
            terms = rng.choice(60, size=int(rng.integers(0, 9)), replace=False) * spread
            lex.append({int(t): float(rng.uniform(0.01, 1)) for t in terms})
        dense = rng.standard_normal((30, 4)).astype(np.float32)
        b.add(ids, ids, [{}] * 30, dense, lex, None)
        rows.update(zip(ids, lex, strict=True))
    gone = [f"b{batch}-{i}" for batch in range(3) for i in (0, 7, 8, 29)]
    b.delete(gone)
    assert len(b.segments) == 3
    b.compact()
    (seg,) = b.segments
    kept = [i for i in rows if i not in gone]
    assert list(seg.ids) == kept
    want = LexicalPostings.from_csr(
        sp.vstack(
            [
                sp.csr_matrix(
                    (list(rows[i].values()), ([0] * len(rows[i]), list(rows[i]))),
                    shape=(1, vocab),
                    dtype=np.float32,
                )
                for i in kept
            ],
            format="csr",
        )
    )
    assert seg.lexical is not None
    for name in LexicalPostings.NAMES:
        got, exp = np.asarray(getattr(seg.lexical, name)), getattr(want, name)
        assert got.dtype == exp.dtype, name
        np.testing.assert_array_equal(got, exp, err_msg=name)

"""The local engine under faults (#22): a merge failing after a committed write, corrupted
values in files too large to check on open, a corrupted ``docs.jsonl`` whose checksums were
re-signed, and handles that stay open while other handles and processes commit."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends.local import build, search, segment_io
from m3_rag.backends.local.engine import LocalBackend, MergeWarning
from m3_rag.errors import IndexFormatError, IndexMismatchError, WriteConflictError
from m3_rag.spec import IndexSpec

SPEC = IndexSpec("faults", 8, 4, "m3", 50)


def _docs(ids: list[str], seed: int = 0) -> tuple[Any, ...]:
    """``add()`` arguments for ``ids`` (deterministic vectors, terms and ColBERT rows)."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((len(ids), 8)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lexical = [{int(t): 0.5 for t in rng.choice(50, 4, replace=False)} for _ in ids]
    colbert = [rng.standard_normal((3, 4)).astype(np.float32) for _ in ids]
    metas = [{"i": i} for i in range(len(ids))]
    return ids, [f"text of {i}" for i in ids], metas, dense, lexical, colbert


def _add(b: LocalBackend, ids: list[str], seed: int = 0) -> None:
    b.add(*_docs(ids, seed))


def _open(path: Path, spec: IndexSpec = SPEC, **kw: Any) -> LocalBackend:
    return LocalBackend(path, ann_threshold=None, **kw).open(spec)


def _committed(idx: Path) -> tuple[list[str], list[str]]:
    """(segments the current manifest names, segment directories on disk)."""
    current = json.loads((idx / "CURRENT").read_text())
    manifest = json.loads((idx / current["manifest"]).read_text())
    named = sorted(e["name"] for e in manifest["segments"])
    return named, sorted(p.name for p in idx.iterdir() if p.name.startswith("seg-"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _resign(idx: Path) -> None:
    """Recompute every checksum of a format-3 index's current commit after a test edited
    its files (what someone who can write the directory can do)."""
    current = json.loads((idx / "CURRENT").read_text())
    path = idx / current["manifest"]
    manifest = json.loads(path.read_text())
    for e in manifest["segments"]:
        d = idx / e["name"]
        meta = json.loads((d / "segment.json").read_text())
        for name in meta["files"]:
            data = (d / name).read_bytes()
            meta["files"][name] = {"sha256": _sha(data), "bytes": len(data)}
        body = json.dumps(meta, indent=1).encode("utf-8")
        (d / "segment.json").write_bytes(body)
        e["meta_sha256"] = _sha(body)
    body = json.dumps(manifest, indent=1).encode("utf-8")
    path.write_bytes(body)
    current["manifest_sha256"] = _sha(body)
    (idx / "CURRENT").write_text(json.dumps(current))


# ------------------------------------------------------------------ a merge after a commit
def _full_disk(monkeypatch: pytest.MonkeyPatch, when: Callable[[Path, bytes], bool]) -> list[Path]:
    """The segment builder's next write of ``docs.jsonl`` for which ``when(dir, data)``
    holds writes half of it and fails with ENOSPC (once). -> [the directory it failed in]."""
    real = build._Sink.raw
    fired: list[Path] = []

    def raw(self: Any, name: str, data: bytes) -> None:
        if name == "docs.jsonl" and not fired and when(self.dir, data):
            fired.append(self.dir)
            (self.dir / name).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.dir / name))
        real(self, name, data)

    monkeypatch.setattr(build._Sink, "raw", raw)
    return fired


def _a_merge(d: Path, data: bytes) -> bool:
    return data.count(b"\n") > 1  # the adds here write one document, a merge more


@pytest.mark.parametrize("retry", ["add", "delete", "compact"])
def test_a_merge_failing_after_an_add_committed_does_not_fail_the_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry: str
) -> None:
    idx = tmp_path / "idx"
    b = _open(idx, merge_factor=2)
    _add(b, ["a"])
    fired = _full_disk(monkeypatch, _a_merge)
    with pytest.warns(MergeWarning, match="No space left on device.*tried again"):
        _add(b, ["b"], seed=1)  # two segments of one tier: the merge fails
    assert fired, "the merge must have run"
    assert sorted(b.ids) == ["a", "b"] and len(b.segments) == 2
    named, on_disk = _committed(idx)
    assert on_disk == named and len(named) == 2  # the partial merge was removed
    again = _open(idx)
    assert sorted(again.ids) == ["a", "b"] and len(again) == 2
    # the next write (or compact) merges
    if retry == "add":
        _add(b, ["c"], seed=2)
        want = ["a", "b", "c"]
    elif retry == "delete":
        b.delete(["a"])
        want = ["b"]
    else:
        b.compact()
        want = ["a", "b"]
    assert len(b.segments) == 1 and sorted(b.ids) == want
    named, on_disk = _committed(idx)
    assert on_disk == named and len(named) == 1
    assert sorted(_open(idx).ids) == want


def test_add_texts_without_ids_stores_them_once_when_the_merge_fails(
    tiny_encoder: M3Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller retries an add that raised: the add must not raise once committed."""
    r = HybridRetriever(tiny_encoder, backend=LocalBackend(tmp_path / "idx", merge_factor=2))
    r.add_texts(["the first passage"])
    _full_disk(monkeypatch, _a_merge)
    with pytest.warns(MergeWarning):
        r.add_texts(["the second passage"])  # generated ids: a retry would add it twice
    assert len(r) == 2
    assert sorted(t for _, t, _ in r.get(r.select())) == ["the first passage", "the second passage"]
    assert len(HybridRetriever.load(tmp_path / "idx", tiny_encoder)) == 2


def test_an_add_that_fails_commits_nothing_and_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = tmp_path / "idx"
    b = _open(idx, merge_factor=2)
    _add(b, ["a"])
    fired = _full_disk(monkeypatch, lambda d, data: True)
    with pytest.raises(OSError, match="No space left"):
        _add(b, ["b"], seed=1)
    assert fired and not fired[0].exists()  # its partial segment is removed at once
    assert b.ids == ["a"] and _open(idx).ids == ["a"]
    named, on_disk = _committed(idx)
    assert on_disk == named
    _add(b, ["b"], seed=1)  # the disk has room again
    assert sorted(_open(idx).ids) == ["a", "b"]


# ------------------------------------------------------------------ values of large files
@pytest.fixture
def _large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file counts as too large to hash (and to check) on open; arrays are read from
    disk, however small."""
    monkeypatch.setattr(segment_io, "_HASH_ON_OPEN", 64)
    monkeypatch.setattr(segment_io, "_IN_RAM", 0)


def _poke(path: Path, at: tuple[int, ...], value: float) -> None:
    """Set one element of a stored ``.npy`` file in place (same size; checksums stale)."""
    a = np.load(path, allow_pickle=False)
    a[at] = value
    with open(path, "r+b") as f:
        np.save(f, a, allow_pickle=False)


@contextlib.contextmanager
def _no_error() -> Iterator[None]:
    """No error, and no MergeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        yield


CORRUPTIONS = {  # file: (colbert dtype, element, value, what reads it)
    "dense.npy nan": ("float16", (2, 0), np.nan, "search export merge"),
    "dense.npy inf": ("float16", (2, 3), np.inf, "search export merge"),
    "colbert_vectors.npy nan": ("float16", (7, 1), np.nan, "search export merge"),
    "colbert_scales.npy inf": ("int8", (7,), np.inf, "search export merge"),
    "lex_tdata.npy nan": ("float16", (0,), np.nan, "search merge"),  # term-major
    "lex_data.npy nan": ("float16", (0,), np.nan, "export merge"),  # doc-major
}


@pytest.mark.usefixtures("_large")
@pytest.mark.parametrize("io", ["pread", "mmap"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_non_finite_value_in_a_large_file_is_an_error_where_it_is_read(
    tmp_path: Path, case: str, io: str
) -> None:
    file = case.split()[0]
    dtype, at, value, reads = CORRUPTIONS[case]
    spec = IndexSpec("faults", 8, 4, "m3", 50, colbert_dtype=dtype)
    idx = tmp_path / "idx"
    ids = [f"d{i}" for i in range(6)]
    args = _docs(ids)
    _add(_open(idx, spec), ids)
    seg = next(p for p in idx.iterdir() if p.name.startswith("seg-"))
    _poke(seg / file, at, value)
    b = _open(idx, spec, io=io, merge_factor=2)  # opens: the file is not checked on open
    lexical = {t: 1.0 for t in range(50)}  # every term: every posting is read

    def searched() -> None:
        cands = b.candidates(args[3][2], lexical, 10)
        b.colbert_scores(args[5][2], cands)
        assert len(cands.ids) == 6

    error = pytest.raises(IndexFormatError, match=rf"{seg}/{file} holds NaN or inf")
    with error if "search" in reads else _no_error():
        searched()
    with error if "export" in reads else _no_error():
        list(b.export())
    # a merge never copies the value into a new segment (whose checksum would cover it)
    new = [f"n{i}" for i in range(6)]
    with pytest.warns(MergeWarning, match=file) if "merge" in reads else _no_error():
        _add(b, new, seed=5)  # two segments of one tier: a merge
    assert sorted(_open(idx, spec).ids) == sorted([*ids, *new])
    named, on_disk = _committed(idx)
    assert on_disk == named and len(named) == (2 if "merge" in reads else 1)
    if "merge" in reads:
        with pytest.raises(IndexFormatError, match=file):
            b.compact()


@pytest.mark.usefixtures("_large")
def test_a_non_finite_vector_proposed_by_the_ann_index_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("faiss", "pip install -e '.[ann]'")
    monkeypatch.setattr(search, "EXACT_FILTERED", 50)
    spec = IndexSpec("faults", 8, None, None, 0)
    idx = tmp_path / "idx"
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((400, 8)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(400)]
    LocalBackend(idx, ann_threshold=300).open(spec).add(ids, ids, [{}] * 400, dense, None, None)
    seg = next(p for p in idx.iterdir() if p.name.startswith("seg-"))
    b = LocalBackend(idx, ann_threshold=300).open(spec)
    assert b.segments[0].ann is not None
    assert "d5" in b.candidates(dense[5], None, 5).ids  # faiss proposes it
    _poke(seg / "dense.npy", (5, 0), np.nan)
    b = LocalBackend(idx, ann_threshold=300).open(spec)
    with pytest.raises(IndexFormatError, match=r"dense\.npy holds NaN or inf"):
        b.candidates(dense[5], None, 5)


def test_a_non_finite_query_is_refused_not_blamed_on_the_index(tmp_path: Path) -> None:
    b = _open(tmp_path / "idx")
    args = _docs(["a", "b"])
    _add(b, ["a", "b"])
    q = np.full(8, np.nan, np.float32)
    with pytest.raises(ValueError, match="dense query holds NaN") as e:
        b.candidates(q, None, 5)
    assert not isinstance(e.value, IndexFormatError)
    with pytest.raises(ValueError, match="lexical query"):
        b.candidates(args[3][0], {1: float("inf")}, 5)
    cands = b.candidates(args[3][0], None, 5)
    with pytest.raises(ValueError, match="ColBERT query"):
        b.colbert_scores(np.full((2, 4), np.inf, np.float32), cands)


# ------------------------------------------------------------------ docs.jsonl
BAD_LINES = {
    "not JSON": (b'{"text": "x", "metadata": {', "not valid JSON"),
    "metadata a list": (b'{"text": "x", "metadata": [1]}', "object 'metadata'"),
    "no text": (b'{"metadata": {"i": 1}}', "str 'text'"),
    "NaN": (b'{"text": "x", "metadata": {"i": NaN}}', "not valid JSON"),
    "not UTF-8": (b'{"text": "\xff", "metadata": {}}', "not valid JSON"),
    "reserved key": (b'{"text": "x", "metadata": {"m3_rag_scores": 1}}', "reserved key"),
    "lone surrogate": (b'{"text": "\\ud800", "metadata": {}}', "lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_docs_line_is_an_index_format_error_naming_file_and_line(
    tmp_path: Path, case: str
) -> None:
    idx = tmp_path / "idx"
    ids = ["d0", "d1", "d2"]
    args = _docs(ids)
    _add(_open(idx), ids)
    seg = next(p for p in idx.iterdir() if p.name.startswith("seg-"))
    lines = (seg / "docs.jsonl").read_bytes().split(b"\n")[:-1]
    line, message = BAD_LINES[case]
    lines[1] = line
    blob = b"".join(x + b"\n" for x in lines)
    (seg / "docs.jsonl").write_bytes(blob)
    offsets = np.concatenate([[0], np.cumsum([len(x) + 1 for x in lines])]).astype(np.int64)
    (seg / "docs_offsets.npy").unlink()
    np.save(seg / "docs_offsets.npy", offsets, allow_pickle=False)
    _resign(idx)  # the checksums pass: the lines themselves are checked
    b = _open(idx)
    where = rf"{seg}/docs\.jsonl, line 2: .*{message}"
    assert b.fetch(["d0"]) == [("d0", "text of d0", {"i": 0})]  # other lines read
    with pytest.raises(IndexFormatError, match=where):
        b.fetch(["d1"])
    with pytest.raises(IndexFormatError, match=where):
        b.select({"i": 1})
    cands = b.candidates(args[3][1], None, 3)
    with pytest.raises(IndexFormatError, match=where):
        b.documents(cands, np.arange(len(cands.ids)))
    with pytest.raises(IndexFormatError, match=where):
        list(b.export())


# ------------------------------------------------------------------ other handles' commits
def test_an_open_handle_reads_the_commits_of_another_handle(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    w = _open(idx)
    args = _docs(["a", "b", "c"])
    _add(w, ["a", "b", "c"])
    r = _open(idx)
    pinned = _open(idx, refresh=False)
    seg = r.segments[0]
    w.delete(["a"])
    assert r.fetch(["a"]) == [] and "a" not in r and len(r) == 2
    assert sorted(r.candidates(args[3][0], None, 10).ids) == ["b", "c"]
    assert sorted(r.select({"i": [0, 1, 2]})) == ["b", "c"]
    assert r.segments[0] is seg  # kept open: only the new tombstone was read
    _add(w, ["d"], seed=1)
    assert sorted(r.ids) == ["b", "c", "d"] and [x[0] for x in r.fetch(["d"])] == ["d"]
    # a pinned handle keeps its commit, and cannot write over the newer one
    assert pinned.fetch(["a"])[0][0] == "a" and len(pinned) == 3
    with pytest.raises(WriteConflictError):
        pinned.delete(["b"])
    # r read the latest commit: it can write on top; w has not read it: refused
    _add(r, ["e"], seed=2)
    with pytest.raises(WriteConflictError):
        w.delete(["b"])
    assert sorted(_open(idx).ids) == ["b", "c", "d", "e"]


def test_an_empty_handle_sees_documents_another_handle_added(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    r = _open(idx)
    assert r.known_empty()
    _add(_open(idx), ["a"])
    assert not r.known_empty() and r.ids == ["a"]


def test_an_open_handle_reads_the_commits_of_another_process(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    r = _open(idx)
    _add(r, ["a", "b"])
    assert sorted(r.ids) == ["a", "b"]
    script = (
        "import sys, numpy as np\n"
        "from m3_rag.backends.local import LocalBackend\n"
        "from m3_rag.spec import IndexSpec\n"
        "b = LocalBackend(sys.argv[1]).open(IndexSpec('faults', 8, 4, 'm3', 50))\n"
        "b.delete(['a'])\n"
        "b.add(['z'], ['z'], [{}], np.ones((1, 8), np.float32), [{1: 1.0}], [np.ones((2, 4))])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(idx)], check=True, timeout=120)
    assert r.fetch(["a"]) == [] and sorted(r.ids) == ["b", "z"]


def test_an_index_replaced_by_one_of_another_spec_is_refused_on_read(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    r = _open(idx)
    _add(r, ["a"])
    other = IndexSpec("faults", 8, None, None, 0)
    ram = LocalBackend().open(other)
    ram.add(["x"], ["x"], [{}], np.ones((1, 8), np.float32), None, None)
    ram.save(idx, {})
    with pytest.raises(IndexMismatchError):
        r.fetch(["a"])


def test_refresh_must_be_a_bool_and_a_closed_handle_never_writes(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="refresh must be a bool"):
        LocalBackend(refresh="no")  # type: ignore[arg-type]
    idx = tmp_path / "idx"
    b = _open(idx)
    _add(b, ["a", "b"])
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        _add(b, ["c"])
    assert sorted(_open(idx).ids) == ["a", "b"]  # not replaced by a view of one document


def test_an_id_live_in_two_segments_is_refused_on_open(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    b = _open(idx)
    _add(b, ["a", "b"])
    _add(b, ["b", "c"], seed=1)  # replaces b: dead in the first segment
    assert sorted(_open(idx).ids) == ["a", "b", "c"]
    second = sorted(p for p in idx.iterdir() if p.name.startswith("seg-"))[1]
    (second / "ids.json").write_text(json.dumps(["a", "c"]))  # a: live in both
    _resign(idx)
    with pytest.raises(IndexFormatError, match="id 'a' is live in two segments"):
        _open(idx)


def test_segment_files_are_read_without_ast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """np.load parses .npy headers with ast.literal_eval, and CPython 3.11's AST
    constructor is not thread-safe (a SystemError when an open raced a commit in another
    thread): the engine reads its headers itself."""
    import ast

    idx = tmp_path / "idx"
    w = _open(idx, merge_factor=2)
    _add(w, ["a", "b"])
    _add(w, ["c"], seed=1)
    w.delete(["b"])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ast used")

    monkeypatch.setattr(ast, "literal_eval", refuse)
    monkeypatch.setattr(segment_io, "_IN_RAM", 0)
    for io in ("pread", "mmap"):
        b = _open(idx, io=io)
        _add(w, [f"d-{io}"], seed=2)  # another handle's commit: b reads it
        cands = b.candidates(_docs(["a"])[3][0], {1: 1.0}, 10)
        b.colbert_scores(np.ones((2, 4), np.float32), cands)
        assert set(b.ids) == {"a", "c", "d-pread", *(["d-mmap"] if io == "mmap" else [])}
        assert sorted(i for batch in b.export() for i in batch.ids) == sorted(b.ids)
    w.compact()


def test_a_npy_header_numpy_would_not_write_is_refused(tmp_path: Path) -> None:
    from m3_rag.backends.local.diskarray import load_npy

    for arr in (np.zeros((6, 8), np.float32), np.arange(5), np.zeros((0, 3), np.float16)):
        np.save(tmp_path / "a.npy", arr, allow_pickle=False)
        with open(tmp_path / "a.npy", "rb") as f:
            got = load_npy(f, "a.npy")
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 2))), allow_pickle=False)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "t.npy", np.zeros((6, 8), np.float32), allow_pickle=False)
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-2])  # truncated
    for name, match in [("f", "C-order"), ("o", "C-order|numbers"), ("t", "bytes")]:
        with open(tmp_path / f"{name}.npy", "rb") as f, pytest.raises(ValueError, match=match):
            load_npy(f, f"{name}.npy")

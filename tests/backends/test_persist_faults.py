"""Persistence under faults: killed saves, racing writers, readers during saves, tampering.

Every case must end with the directory loading as one complete index (the old or the new),
or with an :class:`IndexFormatError` that names the bad file: never a wrong result. Saves
write format 3 (``LocalBackend.save``); the tampering cases run on genuine format-2
snapshots (``tests/_format2.py``), which are only read to be converted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _format2 import write_format2
from _index_writer import SIZES, SPEC, build, settings
from conftest import resign

from m3_rag.backends.local import LocalBackend
from m3_rag.backends.local.migrate import migrate
from m3_rag.backends.registry import open_saved
from m3_rag.errors import IndexFormatError
from m3_rag.persist import is_index, reader_lock

HERE = Path(__file__).resolve().parents[1]
WRITER = [sys.executable, str(HERE / "_index_writer.py")]


def _concat(backend: object) -> tuple[list[str], np.ndarray, list[str], list[dict], list]:
    batches = list(backend.export(10**6))  # type: ignore[attr-defined]
    return (
        [i for b in batches for i in b.ids],
        np.concatenate([b.dense for b in batches]),
        [t for b in batches for t in b.texts],
        [m for b in batches for m in b.metadatas],
        [c for b in batches for c in b.colbert],
    )


def _which(path: Path) -> str:
    """Load the index and say which complete index it is (fails on anything else)."""
    saved = open_saved(path)
    assert isinstance(saved.backend, LocalBackend)
    saved.backend.refresh = False  # its documents must be those of the settings read
    b = saved.backend.open(SPEC)
    ids = b.ids
    which = ids[0].split("-")[0]
    ref = build(which)
    assert saved.spec == SPEC and saved.settings == settings(which)
    assert ids == ref.ids and len(b) == SIZES[which]
    got, want = _concat(b), _concat(ref)
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[0], got[2], got[3]) == (want[0], want[2], want[3])
    for a, c in zip(got[4], want[4], strict=True):
        np.testing.assert_array_equal(a, c)
    assert b.fetch(ids) == ref.fetch(ids)
    return which


def _entries(path: Path) -> list[str]:
    """What commits put in the directory (segments, manifests, pointers in the making)."""
    return sorted(
        p.name
        for p in path.iterdir()
        if p.name.startswith(("seg-", "manifest-", ".CURRENT.", "snap-", ".tmp-snap-"))
    )


def _only_the_current_commit(path: Path) -> None:
    """Nothing is left in ``path`` but the files of the commit ``CURRENT`` names."""
    current = json.loads((path / "CURRENT").read_text())
    manifest = json.loads((path / current["manifest"]).read_text())
    want = sorted([current["manifest"], *(e["name"] for e in manifest["segments"])])
    assert _entries(path) == want


def test_killed_saves_leave_old_or_new_index(tmp_path: Path) -> None:
    """kill -9 a process that saves A, B, A... in turn, at random points of its first,
    second or third save, 21 times; the index holds A or B, whole."""
    idx = tmp_path / "idx"
    b = build("b")
    t = time.perf_counter()
    b.save(tmp_path / "timing", settings("b"))  # how long one save takes here
    span = time.perf_counter() - t
    build("a").save(idx, settings("a"))
    rng = random.Random(1234)
    seen: set[str] = set()
    for i in range(21):
        proc = subprocess.Popen([*WRITER, str(idx), "alt", "-1"], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        done = [proc.stdout.readline().strip() for _ in range(i % 3)]  # saves committed
        assert done == [b"saved a", b"saved b"][: i % 3]
        # the last kill lands as B is committed and the next save has just begun: a "b"
        # seen whatever the machine's load (the random ones may all fall one way)
        time.sleep(0.0 if i == 20 else rng.uniform(0.0, span))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(_which(idx))
    assert seen == {"a", "b"}, "the kills should land on both sides of a commit"
    # one more complete save cleans up every leftover of the killed ones
    build("b").save(idx, settings("b"))
    _only_the_current_commit(idx)
    assert _which(idx) == "b"


def test_a_killed_first_save_leaves_no_index(tmp_path: Path) -> None:
    """A save killed before its commit leaves nothing that opens, and the next save there
    succeeds (its leftovers are not mistaken for someone else's files)."""
    idx = tmp_path / "idx"
    rng = random.Random(99)
    for _ in range(8):
        proc = subprocess.Popen([*WRITER, str(idx), "b", "1"], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if is_index(idx):
            assert _which(idx) == "b"
        else:
            with pytest.raises(FileNotFoundError):
                open_saved(idx)
    build("a").save(idx, settings("a"))
    _only_the_current_commit(idx)
    assert _which(idx) == "a"


def _complete(b: LocalBackend) -> str:
    """Which complete index one read (an export: one view) of ``b`` returns."""
    got = _concat(b)
    which = got[0][0].split("-")[0]
    want = _concat(build(which))
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[0], got[2], got[3]) == (want[0], want[2], want[3])
    for a, c in zip(got[4], want[4], strict=True):
        np.testing.assert_array_equal(a, c)
    return which


def test_racing_writers_and_readers_across_processes(tmp_path: Path) -> None:
    """Two processes save A and B in turn while a thread loads the index again and again,
    and another reads through one handle opened once (each read takes the latest commit)."""
    idx = tmp_path / "idx"
    build("a").save(idx, settings("a"))
    errors: list[BaseException] = []
    stop = threading.Event()
    held = LocalBackend(idx).open(SPEC)

    def read() -> None:
        while not stop.is_set():
            try:
                _which(idx)
            except BaseException as e:
                errors.append(e)

    def follow() -> None:
        while not stop.is_set():
            try:
                _complete(held)
            except BaseException as e:
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    follower = threading.Thread(target=follow)
    follower.start()
    try:
        for _ in range(4):  # 4 rounds x 2 processes x 5 saves
            procs = [
                subprocess.Popen([*WRITER, str(idx), w, "5"], stdout=subprocess.DEVNULL)
                for w in "ab"
            ]
            assert [p.wait(timeout=120) for p in procs] == [0, 0]
            assert _which(idx) in ("a", "b")
    finally:
        stop.set()
        reader.join()
        follower.join()
    assert not errors, errors[:3]
    assert _complete(held) == _which(idx)  # the held handle reads the last commit


def test_racing_writer_threads_20_rounds(tmp_path: Path) -> None:
    """Two threads save different indexes to one directory while a third loads it."""
    idx = tmp_path / "idx"
    a, b = build("a"), build("b")
    a.save(idx, settings("a"))
    errors: list[BaseException] = []
    stop = threading.Event()

    def guard(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    def read() -> None:
        while not stop.is_set():
            guard(lambda: _which(idx))()

    reader = threading.Thread(target=read)
    reader.start()
    results = []
    for _ in range(20):
        writers = [
            threading.Thread(target=guard(lambda x=x, w=w: x.save(idx, settings(w))))
            for x, w in ((a, "a"), (b, "b"), (a, "a"))
        ]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        results.append(_which(idx))
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    assert set(results) <= {"a", "b"}
    # a save skips removing old segments while a reader is active (the reader ran until
    # now); the next save, with no reader left, removes them
    b.save(idx, settings("b"))
    _only_the_current_commit(idx)
    assert _which(idx) == "b"


def test_reader_holds_its_files_while_a_writer_commits(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build("a").save(idx, settings("a"))
    old = _entries(idx)
    with reader_lock(idx):  # a reader is between CURRENT and its files
        build("b").save(idx, settings("b"))
        assert set(old) < set(_entries(idx)), "the old commit's files must stay while read"
    assert _which(idx) == "b"
    build("b").save(idx, settings("b"))
    _only_the_current_commit(idx)


def test_a_save_replaces_a_format2_snapshot(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    write_format2(idx, build("a"), settings("a"))
    assert _which(idx) == "a"  # converted on open
    build("b").save(idx, settings("b"))
    _only_the_current_commit(idx)  # the snapshot is gone
    assert _which(idx) == "b"


# ------------------------------------------------------------------------------ tampering
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine format-2 snapshot of index A."""
    path = tmp_path_factory.mktemp("pristine") / "idx"
    write_format2(path, build("a"), settings("a"))
    return path


def _snap(idx: Path) -> Path:
    return idx / json.loads((idx / "CURRENT").read_text())["snapshot"]


def _edit_manifest(idx: Path, fn: Callable[[dict], object]) -> None:
    """Change the manifest in place (``fn`` mutates it; what it returns is ignored)."""
    path = _snap(idx) / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def _save_array(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(idx: Path) -> None:
        path = _snap(idx) / f"{name}.npy"
        arr = fn(np.load(path))
        np.save(path, arr)
        _edit_manifest(
            idx,
            lambda m: m["arrays"].update(
                {name: {"shape": list(arr.shape), "dtype": str(arr.dtype)}}
            ),
        )

    return edit


def _rewrite_docs(fn: Callable[[list[dict]], list[object]]) -> Callable[[Path], None]:
    def edit(idx: Path) -> None:
        path = _snap(idx) / "docs.jsonl"
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(d) + "\n" for d in fn(docs)))

    return edit


def _nan_first(a: np.ndarray, value: float) -> np.ndarray:
    a = a.copy()
    a.flat[0] = value
    return a


def _pointer(snapshot: str) -> Callable[[Path], None]:
    def edit(idx: Path) -> None:
        current = json.loads((idx / "CURRENT").read_text())
        (idx / "CURRENT").write_text(json.dumps(current | {"snapshot": snapshot}))

    return edit


def _symlink_array(idx: Path) -> None:
    path = _snap(idx) / "dense_vectors.npy"
    target = idx.parent / "elsewhere.npy"
    shutil.copy(path, target)
    path.unlink()
    path.symlink_to(target)


def _symlink_snapshot(idx: Path) -> None:
    snap = _snap(idx)
    moved = idx.parent / "moved-snapshot"
    snap.rename(moved)
    snap.symlink_to(moved)


TAMPERING: dict[str, tuple[Callable[[Path], None], bool, str]] = {
    # name: (edit, re-sign the checksums after it, expected message)
    "flipped byte": (
        lambda idx: (_snap(idx) / "dense_vectors.npy").write_bytes(
            (_snap(idx) / "dense_vectors.npy").read_bytes()[:-1] + b"\x01"
        ),
        False,
        r"dense_vectors\.npy does not match its checksum",
    ),
    "CURRENT ../": (_pointer("../other/snap-20260101T000000-abcdef12"), False, "not a snapshot"),
    "CURRENT absolute": (_pointer("/tmp"), False, "not a snapshot"),
    "array name leaves the dir": (
        lambda idx: _edit_manifest(
            idx, lambda m: m["arrays"].update({"../../x": {"shape": [1], "dtype": "float32"}})
        ),
        True,
        "array name",
    ),
    "symlinked array": (_symlink_array, True, "dense_vectors.npy"),
    "symlinked snapshot": (_symlink_snapshot, True, "missing or not a directory"),
    "NaN dense": (_save_array("dense_vectors", lambda a: _nan_first(a, np.nan)), True, "NaN"),
    "inf dense": (
        _save_array("dense_vectors", lambda a: _nan_first(a, np.inf)),
        True,
        "NaN or inf",
    ),
    "indptr decreasing": (
        _save_array("lexical_indptr", lambda a: np.concatenate([[0, 30, 10], a[3:]])),
        True,
        "never decrease",
    ),
    "negative lexical weight": (
        _save_array("lexical_data", lambda a: _nan_first(a, -1.0)),
        True,
        "finite weights >= 0",
    ),
    "NaN lexical weight": (
        _save_array("lexical_data", lambda a: _nan_first(a, np.nan)),
        True,
        "finite weights >= 0",
    ),
    "ColBERT offsets": (
        _save_array("colbert_offsets", lambda a: np.concatenate([a[:-1], [a[-1] + 5]])),
        True,
        "colbert_offsets",
    ),
    "NaN ColBERT": (_save_array("colbert_vectors", lambda a: _nan_first(a, np.nan)), True, "NaN"),
    "duplicate ids": (_rewrite_docs(lambda d: [*d[:-1], d[0]]), True, "duplicate id"),
    "non-dict metadata": (
        _rewrite_docs(lambda d: [d[0] | {"metadata": [1, 2]}, *d[1:]]),
        True,
        "'metadata' must be an object",
    ),
    "NaN in docs": (
        lambda idx: (_snap(idx) / "docs.jsonl").write_text(
            (_snap(idx) / "docs.jsonl").read_text().replace('"i": 0', '"i": NaN', 1)
        ),
        True,
        "not valid JSON",
    ),
    "lone surrogate in docs": (
        lambda idx: (_snap(idx) / "docs.jsonl").write_text(
            (_snap(idx) / "docs.jsonl").read_text().replace('"text a-0"', '"text a-0 \\udcff"', 1)
        ),
        True,
        "lone surrogate",
    ),
    "empty-list metadata": (
        _rewrite_docs(lambda d: [d[0] | {"metadata": []}, *d[1:]]),
        True,
        "'metadata' must be an object",
    ),
    "0-byte npy": (
        lambda idx: (_snap(idx) / "dense_vectors.npy").write_bytes(b""),
        True,
        "cannot read",
    ),
    "garbage npy": (
        lambda idx: (_snap(idx) / "dense_vectors.npy").write_bytes(b"\x93NUMPY\x01\x00{'descr'"),
        True,
        "cannot read",
    ),
    "manifest null": (
        lambda idx: (_snap(idx) / "manifest.json").write_text("null"),
        True,
        "JSON object",
    ),
    "manifest [1]": (
        lambda idx: (_snap(idx) / "manifest.json").write_text("[1]"),
        True,
        "JSON object",
    ),
    "missing key": (
        lambda idx: _edit_manifest(idx, lambda m: m.pop("dense_dim")),
        True,
        "dense_dim",
    ),
    "deep nesting": (
        lambda idx: (_snap(idx) / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        True,
        "not valid JSON",
    ),
    "count mismatch": (
        lambda idx: _edit_manifest(idx, lambda m: m.update(count=3)),
        True,
        "documents",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_index_raises_index_format_error(
    pristine: Path, tmp_path: Path, case: str
) -> None:
    edit, sign, message = TAMPERING[case]
    idx = tmp_path / "idx"
    shutil.copytree(pristine, idx, symlinks=True)
    edit(idx)
    if sign:
        resign(idx)
    with pytest.raises(IndexFormatError, match=message):
        open_saved(idx)
    with pytest.raises(IndexFormatError, match=message):
        migrate(idx, tmp_path / "new")
    assert not is_index(tmp_path / "new")  # nothing committed


def test_the_pristine_snapshot_converts(pristine: Path, tmp_path: Path) -> None:
    """The tampering cases start from a snapshot that reads: each failure is the edit's."""
    assert _which(pristine) == "a"
    assert migrate(pristine, tmp_path / "new") == SIZES["a"]
    assert _which(tmp_path / "new") == "a"


def test_bad_names_are_refused_before_any_path_is_built(pristine: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    shutil.copytree(pristine, idx)
    outside = tmp_path / "outside"
    outside.mkdir()
    _pointer(os.path.relpath(outside, idx))(idx)
    with pytest.raises(IndexFormatError, match="not a snapshot"):
        open_saved(idx)

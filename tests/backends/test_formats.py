"""One on-disk format: LocalBackend.save writes format 3, format 2 is only converted (with
every checksum verified), format 1 is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _format2 import write_format2
from conftest import resign

from m3_rag.backends.local import LocalBackend
from m3_rag.backends.local.migrate import migrate
from m3_rag.backends.protocol import Savable
from m3_rag.backends.registry import open_saved
from m3_rag.errors import IndexFormatError, IndexMismatchError, WriteConflictError
from m3_rag.persist import is_index
from m3_rag.spec import IndexSpec

DIM, COL, VOCAB = 16, 8, 200
SETTINGS = {"weights": [0.4, 0.2, 0.4], "fusion": "weighted", "candidates": 50}


def _spec(lexical: str = "m3", colbert_dtype: str = "float16", dense: str = "float32") -> IndexSpec:
    analyzer = "model" if lexical == "bm25" else None
    return IndexSpec(
        "fmt-test",
        DIM,
        COL,
        lexical,  # type: ignore[arg-type]
        VOCAB,
        dense_dtype=dense,
        colbert_dtype=colbert_dtype,
        analyzer=analyzer,
    )


def _fill(b: LocalBackend, n: int = 90, seed: int = 0) -> LocalBackend:
    """``n`` documents in three adds, two deleted, one replaced (tombstones, segments)."""
    rng = np.random.default_rng(seed)
    ids = [f"d{i}" for i in range(n)]
    dense = rng.standard_normal((n, DIM)).astype(np.float32)
    lex = [{int(t): float(rng.integers(1, 4)) for t in rng.integers(0, VOCAB, 8)} for _ in range(n)]
    col = [rng.standard_normal((int(rng.integers(1, 6)), COL)).astype(np.float32) for _ in ids]
    for s in range(0, n, 30):
        e = s + 30
        b.add(ids[s:e], ids[s:e], [{"i": i} for i in range(s, e)], dense[s:e], lex[s:e], col[s:e])
    b.delete(["d3", f"d{n - 20}"])
    b.add(["d7"], ["seven again"], [{"new": True}], dense[8:9], lex[8:9], col[8:9])
    return b


def _queries(seed: int = 1) -> list[tuple[np.ndarray, dict[int, float], np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal(DIM).astype(np.float32),
            {int(t): 1.0 for t in rng.integers(0, VOCAB, 4)},
            rng.standard_normal((3, COL)).astype(np.float32),
        )
        for _ in range(6)
    ]


def _same_results(a: LocalBackend, b: LocalBackend, exact: bool = True) -> None:
    """Same candidates with the same scores on every leg (``exact``: bit for bit, else
    within float32 rounding: BLAS sums a segment of another size in another order), same
    documents."""
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-6}
    for dq, lq, cq in _queries():
        for n, flt in ((10, None), (200, None), (5, {"i": [1, 2, 50, 60]})):
            x, y = a.candidates(dq, lq, n, flt), b.candidates(dq, lq, n, flt)
            assert x.ids == y.ids
            for u, v in ((x.dense, y.dense), (x.lexical, y.lexical)):
                np.testing.assert_allclose(u, v, **tol)
            np.testing.assert_allclose(a.colbert_scores(cq, x), b.colbert_scores(cq, y), **tol)
            order = np.arange(len(x.ids))
            assert a.documents(x, order) == b.documents(y, order)
    assert a.ids == b.ids and a.fetch(a.ids) == b.fetch(b.ids)


def _tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".m3-rag.")
    }


# ------------------------------------------------------------------------------ save
@pytest.mark.parametrize("colbert_dtype", ["float16", "int8"])
def test_save_of_a_ram_index_writes_format_3_that_reopens_the_same(
    tmp_path: Path, colbert_dtype: str
) -> None:
    spec = _spec("bm25", colbert_dtype)
    ram = _fill(LocalBackend().open(spec, SETTINGS))
    assert isinstance(ram, Savable)
    ram.save(tmp_path / "idx", {"mine": 1})
    assert json.loads((tmp_path / "idx" / "CURRENT").read_text())["version"] == 3
    saved = open_saved(tmp_path / "idx")
    assert saved.spec == spec and saved.settings == {"mine": 1}
    assert isinstance(saved.backend, LocalBackend) and saved.backend.path == tmp_path / "idx"
    again = saved.backend.open(spec)
    assert len(again) == len(ram) == 88
    _same_results(ram, again)
    # the deleted rows were not written: every stored row is live
    assert sum(len(s) for s in again.segments) == len(again)


def test_save_of_a_disk_index_copies_its_segments(tmp_path: Path) -> None:
    spec = _spec()
    disk = _fill(LocalBackend(tmp_path / "src", merge_factor=10).open(spec, SETTINGS))
    before = _tree_hashes(tmp_path / "src")
    disk.save(tmp_path / "copy", {"copied": True})
    assert _tree_hashes(tmp_path / "src") == before  # the source is only read
    saved = open_saved(tmp_path / "copy")
    assert saved.spec == spec and saved.settings == {"copied": True}
    again = saved.backend.open(spec)
    _same_results(disk, again)
    # copied as they are: the same segment files (renumbered), tombstones included
    src = sorted(p for p in (tmp_path / "src").iterdir() if p.name.startswith("seg-"))
    dst = sorted(p for p in (tmp_path / "copy").iterdir() if p.name.startswith("seg-"))
    assert len(src) == len(dst) == len(disk.segments)
    for a, b in zip(src, dst, strict=True):
        assert _tree_hashes(a) == _tree_hashes(b)
    # and the copy is an index like any other: it takes writes
    rng = np.random.default_rng(5)
    again.add(["x"], ["x"], [{}], rng.standard_normal((1, DIM)), [{1: 1.0}], [np.ones((2, COL))])
    assert len(LocalBackend(tmp_path / "copy").open(spec)) == len(disk) + 1


def test_save_to_its_own_directory_is_a_no_op(tmp_path: Path) -> None:
    disk = _fill(LocalBackend(tmp_path / "idx").open(_spec(), SETTINGS))
    before = _tree_hashes(tmp_path / "idx")
    disk.save(tmp_path / "idx", {"other": 1})
    disk.save(tmp_path / "." / "idx", {"other": 1})
    assert _tree_hashes(tmp_path / "idx") == before


def test_save_replaces_an_index_atomically_and_other_handles_notice(tmp_path: Path) -> None:
    spec = _spec()
    target = tmp_path / "idx"
    held = _fill(LocalBackend(target).open(spec, SETTINGS), n=60, seed=3)
    ram = _fill(LocalBackend().open(spec, SETTINGS), n=30, seed=4)
    ram.save(target, {"replaced": True})
    again = LocalBackend(target).open(spec)
    _same_results(ram, again)
    assert open_saved(target).settings == {"replaced": True}
    with pytest.raises(WriteConflictError, match="another writer"):
        held.delete(["d1"])
    names = {p.name for p in target.iterdir()}
    assert len([n for n in names if n.startswith("manifest-")]) == 1  # old commit removed


def test_save_refuses_unrelated_places_and_changes_nothing(tmp_path: Path) -> None:
    ram = _fill(LocalBackend().open(_spec(), SETTINGS), n=30)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="not an m3-rag index"):
        ram.save(tmp_path / "notes", {})
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["a.txt"]
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="is a file"):
        ram.save(tmp_path / "file", {})


def test_a_corrupt_source_segment_commits_nothing(tmp_path: Path) -> None:
    disk = _fill(LocalBackend(tmp_path / "src").open(_spec(), SETTINGS))
    seg = next(p for p in (tmp_path / "src").iterdir() if p.name.startswith("seg-"))
    data = (seg / "dense.npy").read_bytes()
    (seg / "dense.npy").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexFormatError, match=r"dense\.npy does not match its checksum"):
        disk.save(tmp_path / "copy", {})
    assert not is_index(tmp_path / "copy")
    assert not [p for p in (tmp_path / "copy").iterdir() if p.name.startswith("seg-")]


# ------------------------------------------------------------------------------ format 2
@pytest.mark.parametrize(
    ("lexical", "colbert_dtype", "dense"),
    [("m3", "float16", "float32"), ("bm25", "int8", "float16"), ("m3", "float32", "float32")],
)
def test_migrate_converts_a_format2_snapshot_with_identical_results(
    tmp_path: Path, lexical: str, colbert_dtype: str, dense: str
) -> None:
    spec = _spec(lexical, colbert_dtype, dense)
    ref = _fill(LocalBackend().open(spec, SETTINGS))
    write_format2(tmp_path / "old", ref, SETTINGS)
    before = _tree_hashes(tmp_path / "old")
    assert migrate(tmp_path / "old", tmp_path / "new") == len(ref) == 88
    assert _tree_hashes(tmp_path / "old") == before  # only read
    assert json.loads((tmp_path / "new" / "CURRENT").read_text())["version"] == 3
    saved = open_saved(tmp_path / "new")
    assert saved.spec == spec and saved.settings == SETTINGS
    _same_results(ref, saved.backend.open(spec), exact=False)
    # open_saved converts the snapshot in RAM through the same code: the same index
    in_ram = open_saved(tmp_path / "old")
    assert in_ram.spec == spec and in_ram.settings == SETTINGS
    assert isinstance(in_ram.backend, LocalBackend) and in_ram.backend.path is None
    _same_results(ref, in_ram.backend.open(spec, SETTINGS), exact=False)


def test_an_empty_snapshot_migrates(tmp_path: Path) -> None:
    spec = _spec()
    write_format2(tmp_path / "old", LocalBackend().open(spec), SETTINGS)
    assert migrate(tmp_path / "old", tmp_path / "new") == 0
    assert len(LocalBackend(tmp_path / "new").open(spec)) == 0


def test_a_converted_snapshot_is_checked_against_the_spec_it_is_opened_with(
    tmp_path: Path,
) -> None:
    write_format2(tmp_path / "old", _fill(LocalBackend().open(_spec(), SETTINGS)), SETTINGS)
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        open_saved(tmp_path / "old").backend.open(_spec(colbert_dtype="int8"))
    other = IndexSpec("another-model", DIM, COL, "m3", VOCAB)
    with pytest.raises(IndexMismatchError, match="allow_model_mismatch"):
        open_saved(tmp_path / "old").backend.open(other)
    assert len(open_saved(tmp_path / "old").backend.open(other, allow_model_mismatch=True)) == 88


def test_format_1_is_refused(tmp_path: Path) -> None:
    """A snapshot relabelled as format 1 (no checksums), its pointer re-signed as an
    attacker would: refused, whatever entry point reads it."""
    write_format2(tmp_path / "old", _fill(LocalBackend().open(_spec(), SETTINGS)), SETTINGS)
    current = json.loads((tmp_path / "old" / "CURRENT").read_text())
    path = tmp_path / "old" / current["snapshot"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = 1
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    resign(tmp_path / "old")
    for read in (open_saved, lambda p: migrate(p, tmp_path / "new")):
        with pytest.raises(IndexFormatError, match=r"format 1.*no checksums.*rebuild"):
            read(tmp_path / "old")
    assert not is_index(tmp_path / "new")
    with pytest.raises(IndexFormatError, match="migrate"):
        LocalBackend(tmp_path / "old").open(_spec())


def test_a_swapped_vector_file_is_refused(tmp_path: Path) -> None:
    """Two snapshots of the same shapes; one's dense vectors moved into the other."""
    spec = _spec()
    write_format2(tmp_path / "a", _fill(LocalBackend().open(spec), seed=1), SETTINGS)
    write_format2(tmp_path / "b", _fill(LocalBackend().open(spec), seed=2), SETTINGS)

    def snap(p: Path) -> Path:
        return p / json.loads((p / "CURRENT").read_text())["snapshot"]

    for name in ("dense_vectors.npy", "colbert_vectors.npy", "lexical_data.npy"):
        idx = tmp_path / f"swapped-{name}"
        shutil.copytree(tmp_path / "a", idx)
        shutil.copy(snap(tmp_path / "b") / name, snap(idx) / name)
        for read in (open_saved, lambda p: migrate(p, tmp_path / "new")):
            with pytest.raises(IndexFormatError, match=rf"{name} does not match its checksum"):
                read(idx)
        assert not is_index(tmp_path / "new")


def test_a_snapshot_is_not_opened_in_place(tmp_path: Path) -> None:
    write_format2(tmp_path / "old", _fill(LocalBackend().open(_spec()), n=30), SETTINGS)
    with pytest.raises(IndexFormatError, match="m3-rag migrate"):
        LocalBackend(tmp_path / "old").open(_spec())


def test_a_format3_index_of_the_previous_release_still_opens(tmp_path: Path) -> None:
    """Manifests written before the 'spec' key held the specification's keys at top level
    (with a 'count' one commit behind): such an index opens, in place and via open_saved."""
    spec = _spec("bm25", "int8")
    disk = _fill(LocalBackend(tmp_path / "idx").open(spec, SETTINGS))
    current = json.loads((tmp_path / "idx" / "CURRENT").read_text())
    manifest = json.loads((tmp_path / "idx" / current["manifest"]).read_text())
    record = manifest.pop("spec")
    old = {
        **manifest,
        "model": record["model"],
        "backend": "local",
        "count": manifest["count"] - 1,
        **{k: v for k, v in record.items() if k != "model"},
        "bm25": spec.bm25_params.as_dict(),
    }
    body = json.dumps(old, indent=1).encode()
    (tmp_path / "idx" / current["manifest"]).write_bytes(body)
    current["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    (tmp_path / "idx" / "CURRENT").write_text(json.dumps(current))
    saved = open_saved(tmp_path / "idx")
    assert saved.spec == spec and saved.settings == SETTINGS
    _same_results(disk, saved.backend.open(spec))
    again = LocalBackend(tmp_path / "idx").open(spec, SETTINGS)
    _same_results(disk, again)
    with pytest.raises(IndexMismatchError, match="colbert_dtype"):
        LocalBackend(tmp_path / "idx").open(_spec("bm25", "float16"))
    again.delete(["d1"])  # the next commit writes this release's manifest
    manifest = json.loads(
        (
            tmp_path / "idx" / json.loads((tmp_path / "idx" / "CURRENT").read_text())["manifest"]
        ).read_text()
    )
    assert manifest["spec"] == spec.to_json() and manifest["count"] == len(again)

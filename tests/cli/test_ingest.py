"""m3_rag.ingest: the crash-safe replacement of an index (issue #22.8), the library API the
CLI calls, and what its first pass refuses (issue #22.3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.errors import WriteConflictError
from m3_rag.ingest import (
    check_source,
    index_source,
    plan_index,
    recover_replacement,
    replace_index,
    staging_path,
)
from m3_rag.persist import is_index
from m3_rag.testing import SAMPLE_TEXTS

OLD = ["old-0", "old-1"]
NEW = ["new-0", "new-1", "new-2"]


@pytest.fixture(scope="module")
def enc(tiny_m3_dir: Path) -> M3Encoder:
    return M3Encoder(str(tiny_m3_dir), device="cpu")


@pytest.fixture(scope="module")
def built(enc: M3Encoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small complete indexes, ``old`` and ``new``, to copy per test."""
    root = tmp_path_factory.mktemp("built")
    out = {}
    for name, ids in (("old", OLD), ("new", NEW)):
        r = HybridRetriever(enc, backend=LocalBackend(root / name))
        r.add_texts(SAMPLE_TEXTS[: len(ids)], ids=ids)
        out[name] = root / name
    return out


def _ids(path: Path, enc: M3Encoder) -> list[str] | None:
    """The sorted ids of the index at ``path`` (``None`` when there is no index)."""
    if not path.exists():
        return None
    return sorted(HybridRetriever.load(path, enc).backend.select(None))


def _pair(built: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "idx"
    shutil.copytree(built["old"], out)
    stage = staging_path(out)
    shutil.copytree(built["new"], stage)
    return out, stage


_REPLACE = (
    "import sys; from m3_rag.ingest import replace_index; "
    "replace_index(sys.argv[1], sys.argv[2], exchange=sys.argv[3] == 'yes')"
)


@pytest.mark.parametrize(
    ("exchange", "step"),
    [
        ("yes", "locked"),
        ("yes", "exchanged"),
        ("yes", "removing"),
        ("no", "locked"),
        ("no", "aside"),
        ("no", "renamed"),
        ("no", "removing"),
    ],
)
def test_a_replacement_killed_at_any_step_leaves_an_index(
    built: dict[str, Path], enc: M3Encoder, tmp_path: Path, exchange: str, step: str
) -> None:
    """SIGKILL at each step of replace_index: with the atomic swap, --out opens as the old
    or the new index at once; with the two-rename fallback, at once too except between the
    renames, where recover_replacement (what the next run calls first) puts the old one
    back. Either way the leftovers go."""
    out, stage = _pair(built, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _REPLACE, str(stage), str(out), exchange],
        env={**os.environ, "M3_RAG_CRASH_AT": step},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it died at that step
    at_once = _ids(out, enc)
    if exchange == "no" and step == "aside":
        assert at_once is None  # the one moment of the fallback without an index
    else:
        assert at_once in (OLD, NEW)
    recover_replacement(out)
    assert _ids(out, enc) == (at_once or OLD)
    assert not stage.exists() and not out.with_name(".idx.m3-rag-old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_puts_the_new_index_in_place(
    built: dict[str, Path], enc: M3Encoder, tmp_path: Path, exchange: bool
) -> None:
    out, stage = _pair(built, tmp_path)
    replace_index(stage, out, exchange=exchange)
    assert _ids(out, enc) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    # into nothing, and refusals
    shutil.copytree(built["new"], tmp_path / "b")
    replace_index(tmp_path / "b", tmp_path / "fresh", exchange=exchange)
    assert _ids(tmp_path / "fresh", enc) == NEW
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    shutil.copytree(built["new"], tmp_path / "c")
    with pytest.raises(ValueError, match="never replaced"):
        replace_index(tmp_path / "c", tmp_path / "notes", exchange=exchange)
    with pytest.raises(ValueError, match="holds no index"):
        replace_index(tmp_path / "notes", out, exchange=exchange)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "mine"
    assert _ids(out, enc) == NEW


def test_a_live_force_run_is_left_alone_and_leftovers_are_removed(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """A staging directory another live run holds (flock) is never removed: a second
    --force run is refused; once released it is a leftover and goes."""
    import fcntl

    out, stage = _pair(built, tmp_path)
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"_id": "a", "text": "x"}) + "\n")
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(WriteConflictError, match="in use by another m3-rag run"):
            plan_index(src, out, force=True)
        assert is_index(stage)
    finally:
        os.close(fd)
    plan_index(src, out, force=True)
    assert not stage.exists() and is_index(out)
    # a directory beside --out that is not an index is never touched
    stage.mkdir()
    (stage / "mine.txt").write_text("mine")
    recover_replacement(out)
    assert (stage / "mine.txt").read_text() == "mine"


def test_index_source_resumes_and_replaces(enc: M3Encoder, tmp_path: Path) -> None:
    src, out = tmp_path / "c.jsonl", tmp_path / "idx"
    src.write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SAMPLE_TEXTS))
    )
    infos: list[str] = []
    n = len(SAMPLE_TEXTS)
    first = index_source(src, out, enc, commit_every=7)
    assert (first.added, first.total, first.resumed, first.count) == (n, n, 0, n)
    again = index_source(src, out, enc, on_info=infos.append)
    assert (again.added, again.resumed, again.count) == (0, n, n)
    assert infos == [f"resuming: {n} passages already in {out}"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"_id": "only", "text": "one passage"}) + "\n")
    with pytest.raises(ValueError, match="another source"):
        index_source(other, out, enc)
    done = index_source(other, out, enc, force=True, compact=True)
    assert (done.added, done.count) == (1, 1)
    assert _ids(out, enc) == ["only"] and not staging_path(out).exists()
    saved = HybridRetriever.load(out, enc)
    assert saved.source == {
        "path": str(other.resolve()),
        "chunk_size": 1000,
        "chunk_overlap": 150,
        "globs": ["*.txt", "*.md"],
    }
    with pytest.raises(ValueError, match="commit_every must be >= 1"):
        index_source(other, out, enc, force=True, commit_every=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        index_source(other, out, enc, force=True, batch_size=0)
    assert _ids(out, enc) == ["only"]
    with pytest.raises(ValueError, match="inside the source"):
        plan_index(tmp_path, tmp_path / "sub" / "idx")
    with pytest.raises(ValueError, match="is inside"):
        plan_index(out / "c.jsonl", out)


BAD_LINES = [
    ('{"_id": "a", "text": "t", "score": NaN}', "NaN or infinity"),
    ('{"_id": "a", "text": "t", "x": [1, -Infinity]}', "NaN or infinity"),
    ('{"_id": "a", "text": "caf\\udce9"}', "lone surrogate"),
    ('{"_id": "caf\\udce9", "text": "t"}', "lone surrogate"),
    ('{"_id": "a", "text": "t", "title": "\\ud800"}', "lone surrogate"),
    ('{"_id": "a", "text": "t", "m3_rag_scores": {}}', "reserved"),
    ('{"_id": "a", "text": "t", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_the_first_pass_refuses_what_the_index_would(
    tmp_path: Path, line: str, message: str
) -> None:
    """Issue #22.3: a record add() would refuse stops the run in the first pass, before
    anything is written (it failed mid-ingestion, after earlier chunks were committed),
    and the error names the file and line."""
    src = tmp_path / "c.jsonl"
    good = [json.dumps({"_id": f"g{i}", "text": "fine"}) for i in range(300)]
    src.write_text("\n".join([*good, line]) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        plan_index(src, tmp_path / "idx")
    assert f"{src}:301" in str(e.value)
    assert not (tmp_path / "idx").exists()


def test_check_source_counts_and_warns(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("\n\n".join(SAMPLE_TEXTS))
    (docs / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    warnings: list[str] = []
    n = check_source(docs, chunk_size=200, chunk_overlap=20, on_warning=warnings.append)
    assert n > 1 and len(warnings) == 1 and "bin.txt: binary" in warnings[0]

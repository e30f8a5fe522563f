"""Every CLI failure is one line on stderr with exit 2 (130 for Ctrl-C), and never loses data
(issue: trust, items 1, 8 and 9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3_rag.cli import main
from m3_rag.persist import is_index
from m3_rag.testing import SAMPLE_TEXTS


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SAMPLE_TEXTS)),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def index(tiny_m3_dir: Path, corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "idx"
    assert main(["index", str(corpus), "--out", str(out), "--model", str(tiny_m3_dir)]) == 0
    return out


def test_force_never_deletes_what_is_not_an_index(
    tiny_m3_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("my notes", encoding="utf-8")
    model = ["--model", str(tiny_m3_dir)]
    assert main(["index", str(corpus), "--out", str(notes), "--force", *model]) == 2
    assert "never replaced" in _one_line_error(capsys)
    assert (notes / "mine.txt").read_text(encoding="utf-8") == "my notes"
    # the source folder itself as --out
    assert main(["index", str(notes), "--out", str(notes), "--force", *model]) == 2
    _one_line_error(capsys)
    assert [p.name for p in notes.iterdir()] == ["mine.txt"]
    # a file as --out
    assert main(["index", str(corpus), "--out", str(corpus), "--force", *model]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert corpus.read_text(encoding="utf-8").count("\n") == len(SAMPLE_TEXTS)


def test_force_replaces_an_index_and_only_with_force(
    index: Path, tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"_id": "only", "text": "one passage"}) + "\n", encoding="utf-8")
    model = ["--model", str(tiny_m3_dir)]
    assert main(["index", str(other), "--out", str(index), *model]) == 2
    assert "--force" in _one_line_error(capsys)
    assert main(["index", str(other), "--out", str(index), "--force", *model]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "passage", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]] == ["only"]


def test_input_errors_are_one_line(
    index: Path, tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"_id": "x", "text": "a"}\n{"_id": "x", "text": "b"}\n', encoding="utf-8")
    model = ["--model", str(tiny_m3_dir)]
    cases = [
        (["index", str(dup), "--out", str(tmp_path / "n1"), *model], "duplicate id 'x'"),
        (["demo", "--model", str(tiny_m3_dir), "--device", "cuda"], "no usable CUDA"),
        (["search", str(index), "caf\udce9"], "lone surrogate"),
        (["search", str(index), "   "], "empty or blank"),
        (["search", str(index), "q", "--weights", "-1,1,1", "--model", "/nope"], "--weights"),
        (["search", str(index), "q", "--weights=1,2", "--model", "/nope"], "three numbers"),
        (["search", str(tmp_path / "none"), "q"], "no m3-rag index"),
        (["search", str(index), "q", "--rerank", str(tmp_path / "nope")], "hf download"),
        (["demo", "--model", str(tmp_path / "nope")], "hf download BAAI/bge-m3"),
        (["search", str(index)], "required"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_line_error(capsys), argv
    assert not (tmp_path / "n1").exists()


def test_corrupt_index_is_one_line(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = next(index.glob("seg-*"))
    (seg / "dense.npy").write_bytes(b"")
    assert main(["search", str(index), "Paris"]) == 2
    assert "does not match its checksum" in _one_line_error(capsys)
    (index / "CURRENT").write_text("null")
    assert main(["search", str(index), "Paris"]) == 2
    assert "not an m3-rag index pointer" in _one_line_error(capsys)


def test_search_help_says_what_each_option_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the model the index was built with" in text and "default None" not in text
    for words in (
        "the text to search for",
        "hits to print",
        "reciprocal rank fusion",
        "stage-1 candidates",
    ):
        assert words in text
    assert main(["index", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "texts per forward pass" in text and "--glob" in text and "--encoding-errors" in text


def test_folder_globs_and_non_utf8_files(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(SAMPLE_TEXTS[3], encoding="utf-8")
    (docs / "latin1.txt").write_bytes("Café au lait à Paris".encode("latin-1"))
    (docs / "notes.rst").write_text(SAMPLE_TEXTS[4], encoding="utf-8")
    model = ["--model", str(tiny_m3_dir)]
    assert main(["index", str(docs), "--out", str(tmp_path / "a"), *model]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped" in captured.err and "latin1.txt" in captured.err
    assert "indexed 1 passages" in captured.out
    assert main(["index", str(docs), "--out", str(tmp_path / "b"), "--glob", "*.rst", *model]) == 0
    assert "indexed 1 passages" in capsys.readouterr().out
    assert (
        main(
            [
                "index",
                str(docs),
                "--out",
                str(tmp_path / "c"),
                "--encoding-errors",
                "replace",
                *model,
            ]
        )
        == 0
    )
    assert "indexed 2 passages" in capsys.readouterr().out
    assert (
        main(
            [
                "index",
                str(docs),
                "--out",
                str(tmp_path / "d"),
                "--encoding-errors",
                "strict",
                *model,
            ]
        )
        == 2
    )
    assert "not UTF-8" in _one_line_error(capsys)


def test_interrupted_index_keeps_the_old_index(
    index: Path, tiny_m3_dir: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) during a long `m3-rag index --force`: one line, exit 130, and the old
    index still loads unchanged."""
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(
            json.dumps({"_id": f"b{i}", "text": f"{SAMPLE_TEXTS[i % 20]} {i}"}) + "\n"
            for i in range(20_000)
        ),
        encoding="utf-8",
    )
    before = sorted(p.name for p in index.iterdir())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "m3_rag",
            "index",
            str(big),
            "--out",
            str(index),
            "--force",
            "--model",
            str(tiny_m3_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    seen = b""
    while b"doc/s" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.read1(4096)  # the progress bar: encoding has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [x for x in (seen + err).decode().replace("\r", "\n").splitlines() if "m3-rag:" in x]
    assert proc.returncode == 130, (seen + err).decode()[-2000:]
    assert lines == ["m3-rag: interrupted; nothing was changed on disk"]
    assert "Traceback" not in (seen + err).decode()
    assert sorted(p.name for p in index.iterdir()) == before and is_index(index)
    assert main(["search", str(index), "Paris", "--json"]) == 0


def test_closed_pipe_is_quiet(tiny_m3_dir: Path, tmp_path: Path) -> None:
    """``m3-rag search ... | head -1``: no traceback and no error line when head exits.

    The output (3,000 hits) is far larger than a pipe's buffer, so the write fails."""
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(json.dumps({"_id": f"b{i}", "text": f"Paris {i}"}) + "\n" for i in range(3000)),
        encoding="utf-8",
    )
    idx = tmp_path / "idx"
    assert main(["index", str(big), "--out", str(idx), "--model", str(tiny_m3_dir)]) == 0
    cmd = (
        f"{sys.executable} -m m3_rag search {idx} Paris -k 3000 --candidates 3000 | head -1; "
        'echo "rc=${PIPESTATUS[0]}"'
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("query: Paris") and out.stdout.strip().endswith("rc=141"), out
    assert "Error" not in out.stderr and "Traceback" not in out.stderr, out.stderr

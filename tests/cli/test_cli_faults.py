"""Every CLI failure is one line on stderr with exit 2 (130 for Ctrl-C), and never loses data
(issue: trust, items 1, 8 and 9)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.cli import main
from m3_rag.ingest import staging_path
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


class _Run:
    """``m3-rag ARGS`` in a subprocess whose stderr is collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "m3_rag", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` (observable state), failing if the process ends first."""
        deadline = time.monotonic() + 300
        while not done():
            assert self.proc.poll() is None, f"ended before {what}: {self.stderr()[-2000:]}"
            assert time.monotonic() < deadline, f"no {what} after 300 s: {self.stderr()[-2000:]}"
            time.sleep(0.02)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=120)
        self._reader.join(timeout=60)
        return rc

    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def _feed(run: _Run, fifo: Path, lines: list[str], keep_open: bool = False) -> int | None:
    """Write ``lines`` to the named pipe ``fifo`` once ``run`` opens it for reading (one
    pass over the source); close it (the reader sees its end) unless ``keep_open``: then
    the reader waits for more, and the file descriptor is returned."""
    fd: int | None = None

    def reader_is_there() -> bool:
        nonlocal fd
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no reader yet
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        return fd is not None

    run.wait_for(f"a reader of {fifo.name}", reader_is_there)
    assert fd is not None
    os.set_blocking(fd, True)
    os.write(fd, "".join(lines).encode())
    if keep_open:
        return fd
    os.close(fd)
    return None


def _lines(n: int, prefix: str = "b") -> list[str]:
    return [
        json.dumps({"_id": f"{prefix}{i}", "text": f"{SAMPLE_TEXTS[i % 20]} {i}"}) + "\n"
        for i in range(n)
    ]


def _count(path: Path, enc: M3Encoder) -> int:
    """Documents in the index at ``path`` (0 while it holds none, or no index yet)."""
    if not is_index(path):
        return 0
    return len(HybridRetriever.load(path, enc))


@pytest.fixture(scope="module")
def tiny_encoder(tiny_m3_dir: Path) -> M3Encoder:
    return M3Encoder(str(tiny_m3_dir), device="cpu")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_interrupted_index_keeps_the_old_index(
    index: Path, tiny_m3_dir: Path, tiny_encoder: M3Encoder, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) during `m3-rag index --force`, after passages were committed to the
    new index: one line, exit 130, the half-built index removed and the old one unchanged.

    The source is a named pipe the test writes: the second pass (encoding) cannot end
    before the test closes it, so the SIGINT always lands mid-ingestion, however slow or
    fast the machine (no timing)."""
    fifo = tmp_path / "big.jsonl"
    os.mkfifo(fifo)
    before = sorted(p.name for p in index.iterdir())
    stage = staging_path(index)
    run = _Run(
        [
            "index",
            str(fifo),
            "--out",
            str(index),
            "--force",
            "--commit-every",
            "5",
            "--model",
            str(tiny_m3_dir),
        ]
    )
    try:
        _feed(run, fifo, _lines(20))  # the first pass (the check) reads it all
        run.wait_for("the progress bar", lambda: b"doc/s" in run.err)  # first pass over
        writer = _feed(run, fifo, _lines(5), keep_open=True)  # one commit, then it waits
        run.wait_for("a commit", lambda: _count(stage, tiny_encoder) == 5)
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish()
        assert writer is not None
        os.close(writer)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    err = run.stderr()
    lines = [x for x in err.replace("\r", "\n").splitlines() if "m3-rag:" in x]
    assert rc == 130, err[-2000:]
    assert lines == ["m3-rag: interrupted; nothing was changed on disk"]
    assert "Traceback" not in err
    assert sorted(p.name for p in index.iterdir()) == before and is_index(index)
    assert not stage.exists()
    assert main(["search", str(index), "Paris", "--json"]) == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_resume_after_an_interruption_before_the_first_passage(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #22.1: an index interrupted after its first commit but before any passage
    was committed is resumed by the same command, not refused as "another source" (the
    source is recorded from the first commit)."""
    src, out = tmp_path / "c.jsonl", tmp_path / "idx"
    os.mkfifo(src)
    args = ["index", str(src), "--out", str(out), "--model", str(tiny_m3_dir)]
    run = _Run(args)
    try:
        _feed(run, src, _lines(3))
        run.wait_for("the progress bar", lambda: b"doc/s" in run.err)
        writer = _feed(run, src, [], keep_open=True)  # the first chunk never completes
        assert is_index(out)  # the first commit was made before the progress bar
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish()
        assert writer is not None
        os.close(writer)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert rc == 130, run.stderr()[-2000:]
    assert "run the same command again to resume" in run.stderr()
    src.unlink()  # the same source, now a plain file
    src.write_text("".join(_lines(3)), encoding="utf-8")
    assert main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "resuming: 0 passages already in" in captured.err
    assert "indexed 3 passages" in captured.out


def test_a_refused_option_writes_nothing(
    tiny_m3_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #22.1: `--commit-every 0` is refused before anything is written, so the same
    command without it starts afresh (it said "already holds an index of another source")."""
    out = tmp_path / "idx"
    args = ["index", str(corpus), "--out", str(out), "--model", str(tiny_m3_dir)]
    assert main([*args, "--commit-every", "0"]) == 2
    assert "--commit-every: must be an integer >= 1, got '0'" in _one_line_error(capsys)
    assert not out.exists()
    assert main(args) == 0
    assert f"indexed {len(SAMPLE_TEXTS)} passages" in capsys.readouterr().out


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


def test_bad_options_get_their_own_line(
    index: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #22.9: a bad --batch-size or --device says so (it said "cannot load model ...
    offline?"), before the source is read or the model loaded; nothing is written."""
    out = str(tmp_path / "n")
    cases = [
        (["index", str(corpus), "--out", out, "--batch-size", "0"], "--batch-size: must be"),
        (["index", str(corpus), "--out", out, "--chunk-size", "x"], "--chunk-size: must be"),
        (["index", str(corpus), "--out", out, "--chunk-overlap", "-1"], ">= 0, got '-1'"),
        (["index", str(corpus), "--out", out, "--device", "nonsense"], "unknown device"),
        (["eval", str(tmp_path), "--batch-size", "-3"], "--batch-size: must be"),
        (["search", str(index), "q", "--device", "nonsense"], "--device: unknown device"),
        (["search", str(index), "q", "-k", "0"], "-k: must be an integer >= 1"),
        (["demo", "--device", "cuda:x"], "--device: unknown device"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = _one_line_error(capsys)
        assert message in err and "cannot load model" not in err, (argv, err)
    assert not (tmp_path / "n").exists()


def test_search_json_is_always_valid_json(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`search --json` never prints NaN or Infinity (not JSON; jq and JSON.parse refuse
    them): a score that is not a finite number is null."""
    from m3_rag import SearchHit
    from m3_rag.cli import hits_json

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    hits = [
        SearchHit("a", "t", {"n": 1}, float("nan"), {"dense": float("inf"), "fused": 0.5}),
        SearchHit("b", "u", {}, 0.25, {"dense": -float("inf")}),
    ]
    assert strict(hits_json("q", hits)) == {
        "query": "q",
        "hits": [
            {
                "id": "a",
                "score": None,
                "scores": {"dense": None, "fused": 0.5},
                "text": "t",
                "metadata": {"n": 1},
            },
            {"id": "b", "score": 0.25, "scores": {"dense": None}, "text": "u", "metadata": {}},
        ],
    }
    assert main(["search", str(index), "Paris", "--json", "-k", "3"]) == 0
    result = strict(capsys.readouterr().out)
    assert isinstance(result, dict) and len(result["hits"]) == 3

"""m3_rag.sources: folders are streamed (bounded memory, the same chunks), binary files and
file names that are not UTF-8 are skipped with a warning (issues #22.3 and #22.9)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m3_rag.cli import main
from m3_rag.sources import chunk_text, iter_chunks, read_source
from m3_rag.testing import SAMPLE_TEXTS

_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?。！？])\s*"), re.compile(r"\s+"))


def _reference_chunks(text: str, size: int, overlap: int) -> list[str]:
    """chunk_text as it was before streaming (the whole text in memory): the oracle."""
    text = text.strip()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            window = text[start:end]
            for pattern in _BREAKS:
                cuts = [m.end() for m in pattern.finditer(window) if m.end() > size // 2]
                if cuts:
                    end = start + cuts[-1]
                    break
        chunk = text[start:end].strip()
        if chunk:
            chunks.append(chunk)
        if end >= len(text):
            break
        nxt = max(end - overlap, start + 1)
        space = text.find(" ", nxt, end)
        start = space + 1 if overlap and space != -1 else nxt
    return chunks


def test_streamed_chunks_are_the_chunks_of_the_whole_text() -> None:
    rng = random.Random(0)
    alphabet = ["a", "bc", "é", "中", " ", "  ", "\n", "\n\n", ".", "!", "。", "\t", "\u3000"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        size = rng.randint(1, 60)
        overlap = rng.randint(0, size - 1)
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected = _reference_chunks(text, size, overlap)
        assert list(iter_chunks(pieces, size, overlap)) == expected, (text, size, overlap)
        assert chunk_text(text, size, overlap) == expected
    # longer than the reader's block (1 MiB), with a long run of spaces across blocks
    long = ("\n\n".join(SAMPLE_TEXTS) + "\n\n") * 150 + " " * 1_500_000 + "end."
    pieces = [long[i : i + 65_536] for i in range(0, len(long), 65_536)]
    assert list(iter_chunks(pieces, 1000, 150)) == _reference_chunks(long, 1000, 150)


def test_a_folder_skips_binary_files_and_bad_names(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(SAMPLE_TEXTS[3], encoding="utf-8")
    with open(docs / "sparse.txt", "wb") as f:  # text, then a hole: NUL bytes, no disk used
        f.write(b"a log that stops here\n")
        f.truncate(16 << 20)
    (docs / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    bad_name = os.path.join(os.fsencode(docs), b"caf\xe9.txt")  # Latin-1 bytes in the name
    with open(bad_name, "wb") as f:
        f.write(SAMPLE_TEXTS[4].encode())
    model = ["--model", str(tiny_m3_dir)]
    assert main(["index", str(docs), "--out", str(tmp_path / "a"), *model]) == 0
    captured = capsys.readouterr()
    warnings = [x for x in captured.err.splitlines() if "warning: skipped" in x]
    assert len(warnings) == 3, captured.err
    assert any("sparse.txt: binary, not text (a NUL byte at byte 22)" in w for w in warnings)
    assert any("image.md: binary" in w for w in warnings)
    assert any("'caf\\udce9.txt': its name is not valid UTF-8" in w for w in warnings)
    assert "indexed 1 passages" in captured.out
    assert main(["search", str(tmp_path / "a"), "x", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["metadata"]["source"] for h in hits] == ["good.txt"]
    strict = ["--encoding-errors", "strict"]
    assert main(["index", str(docs), "--out", str(tmp_path / "b"), *strict, *model]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not valid UTF-8" in err and not (tmp_path / "b").exists()
    os.remove(bad_name)
    assert main(["index", str(docs), "--out", str(tmp_path / "b"), *strict, *model]) == 2
    assert "image.md: binary, not text" in capsys.readouterr().err


def test_a_big_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """The first pass over a folder holding a 48 MiB text file grows the process by far
    less than the file (it read the whole file, then held all its chunks: 200+ MiB)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    block = "\n\n".join(SAMPLE_TEXTS) + "\n\n"
    with open(docs / "big.txt", "w", encoding="utf-8") as f:
        for _ in range((48 << 20) // len(block.encode())):
            f.write(block)
    script = (
        "import resource, sys\n"
        "from m3_rag.ingest import check_source\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = check_source(sys.argv[1])\n"
        "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(docs)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    n, grown_kib = map(int, out.stdout.split())
    assert n > 40_000
    assert grown_kib < 40 << 10, f"peak RSS grew by {grown_kib >> 10} MiB"


def test_read_source_accepts_a_jsonl_of_any_suffix_case(tmp_path: Path) -> None:
    src = tmp_path / "c.JSONL"
    src.write_text('{"_id": "a", "text": "t", "lang": "x"}\r\n\r\n{"text": "u"}\n')
    records = read_source(src)
    assert [(r.id, r.text, r.metadata) for r in records] == [
        ("a", "t", {"lang": "x"}),
        ("line-3", "u", {}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not UTF-8 text"):
        read_source(bad)

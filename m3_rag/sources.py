"""Reading what ``m3-rag index`` indexes: folders of .txt/.md files (chunked) or JSONL records."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ENCODING_ERRORS",
    "TEXT_GLOBS",
    "Record",
    "chunk_text",
    "demo_corpus",
    "iter_source",
    "read_source",
]

TEXT_GLOBS = ("*.txt", "*.md")
ENCODING_ERRORS = ("skip", "strict", "replace")
# cut points, best first: paragraph break, sentence end, any whitespace
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?。！？])\s*"), re.compile(r"\s+"))


@dataclass(frozen=True)
class Record:
    """One passage to index."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def chunk_text(text: str, size: int = 1000, overlap: int = 150) -> list[str]:
    """Split ``text`` into chunks of at most ``size`` characters, overlapping by ~``overlap``.

    Cuts fall on the last paragraph break, else sentence end, else whitespace inside the
    window (a hard cut only for a long run without any). Empty text gives no chunk.

    Raises:
        ValueError: ``size <= 0`` or ``overlap`` not in ``[0, size)``.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(
            f"need size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}"
        )
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
        space = text.find(" ", nxt, end)  # start the overlap on a word boundary
        start = space + 1 if overlap and space != -1 else nxt
    return chunks


def read_source(
    source: str | Path,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    *,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    on_skip: Callable[[str], None] | None = None,
) -> list[Record]:
    """Records of a folder of text files (chunked) or a JSONL file.

    JSONL lines: ``{"_id" or "id", "text", "title"?, ...}``; other fields become metadata,
    ``title`` is prefixed to the text. Folder chunks get ``{"source", "chunk"}`` metadata.

    Args:
        source: A folder or a ``.jsonl`` file.
        chunk_size, chunk_overlap: Folder chunking (characters).
        globs: File-name patterns a folder's files must match (any of them; ``*.txt``,
            ``docs/**/*.rst``...), relative to the folder.
        encoding_errors: A folder file that is not UTF-8: ``"skip"`` it (``on_skip`` is told
            why), stop (``"strict"``, ValueError), or decode it with U+FFFD (``"replace"``).
        on_skip: Called with a one-line reason for each skipped file.

    Raises:
        FileNotFoundError: missing source. ValueError: wrong format, duplicate ids, or no
            text at all.
    """
    return list(
        iter_source(
            source,
            chunk_size,
            chunk_overlap,
            globs=globs,
            encoding_errors=encoding_errors,
            on_skip=on_skip,
        )
    )


def iter_source(
    source: str | Path,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    *,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[Record]:
    """:func:`read_source` as a stream: one file (or one JSONL line) read at a time, so a
    corpus of any size is indexed in bounded memory. Errors are raised when reached (a bad
    line after good ones: the good ones were yielded already); the source is checked (exists,
    format, matching files) before the first record."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(
            f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}"
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.is_file():
        records = _read_jsonl(path)
    else:
        records = _read_folder(path, chunk_size, chunk_overlap, globs, encoding_errors, on_skip)
    return _nonempty(path, records)


def _nonempty(path: Path, records: Iterator[Record]) -> Iterator[Record]:
    n = 0
    for n, record in enumerate(records, start=1):  # noqa: B007 - n counts
        yield record
    if n == 0:
        raise ValueError(f"{path} holds no text to index (empty corpus)")


def _read_folder(
    path: Path,
    size: int,
    overlap: int,
    globs: Sequence[str],
    encoding_errors: str,
    on_skip: Callable[[str], None] | None,
) -> Iterator[Record]:
    # a bare name pattern (*.txt) matches at any depth; one with a / is relative to the folder
    found = (path.rglob(pat) if "/" not in pat else path.glob(pat) for pat in globs)
    files = sorted({p for matches in found for p in matches if p.is_file()})
    if not files:
        raise ValueError(f"{path} has no files matching {', '.join(globs)} (see --glob)")
    return _folder_records(path, files, size, overlap, encoding_errors, on_skip)


def _folder_records(
    path: Path,
    files: list[Path],
    size: int,
    overlap: int,
    encoding_errors: str,
    on_skip: Callable[[str], None] | None,
) -> Iterator[Record]:
    for file in files:
        rel = file.relative_to(path).as_posix()
        try:
            text = file.read_text(encoding="utf-8", errors=_ERRORS[encoding_errors])
        except UnicodeDecodeError as e:
            if encoding_errors == "strict":
                raise ValueError(
                    f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); pass "
                    "--encoding-errors skip or replace"
                ) from None
            if on_skip is not None:
                on_skip(f"skipped {file}: not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        for i, chunk in enumerate(chunk_text(text, size, overlap)):
            yield Record(f"{rel}#{i}", chunk, {"source": rel, "chunk": i})


_ERRORS = {"skip": "strict", "strict": "strict", "replace": "replace"}


def _read_jsonl(path: Path) -> Iterator[Record]:
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a folder of text files or a .jsonl file")
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[Record]:
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, start=1):  # streamed; decoding fails at its line
                record = _jsonl_record(path, n, line, seen)
                if record is not None:
                    yield record
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_record(path: Path, n: int, line: str, seen: dict[str, int]) -> Record | None:
    """The record of JSONL line ``n`` (``None`` for a blank line); ``seen`` maps the ids
    read so far to their line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}:{n} is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{path}:{n}: each line needs a 'text' string")
    doc_id = str(row.pop("_id", None) or row.pop("id", None) or f"line-{n}")
    if doc_id in seen:
        raise ValueError(f"{path}:{n}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
    seen[doc_id] = n
    text = row.pop("text")
    title = row.get("title")
    return Record(doc_id, f"{title}\n{text}" if title else text, row)


def demo_corpus() -> list[Record]:
    """The embedded multilingual demo corpus (106 short passages, 8 languages)."""
    data = resources.files("m3_rag").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    return [Record(r.pop("id"), r.pop("text"), r) for r in rows]

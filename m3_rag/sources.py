"""Reading what ``m3-rag index`` indexes: folders of .txt/.md files (chunked) or JSONL records."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Record", "chunk_text", "demo_corpus", "read_source"]

TEXT_SUFFIXES = (".txt", ".md")
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
    source: str | Path, chunk_size: int = 1000, chunk_overlap: int = 150
) -> list[Record]:
    """Records of a folder of .txt/.md files (chunked) or a JSONL file.

    JSONL lines: ``{"_id" or "id", "text", "title"?, ...}``; other fields become metadata,
    ``title`` is prefixed to the text. Folder chunks get ``{"source", "chunk"}`` metadata.

    Raises:
        FileNotFoundError: missing source. ValueError: wrong format or no text at all.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    records = _read_jsonl(path) if path.is_file() else _read_folder(path, chunk_size, chunk_overlap)
    if not records:
        raise ValueError(f"{path} holds no text to index (empty corpus)")
    return records


def _read_folder(path: Path, size: int, overlap: int) -> list[Record]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"{path} has no .txt or .md files")
    out = []
    for file in files:
        rel = file.relative_to(path).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{file} is not UTF-8 text: {e}") from e
        for i, chunk in enumerate(chunk_text(text, size, overlap)):
            out.append(Record(f"{rel}#{i}", chunk, {"source": rel, "chunk": i}))
    return out


def _read_jsonl(path: Path) -> list[Record]:
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a folder of .txt/.md files or a .jsonl file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: each line needs a 'text' string")
            doc_id = row.pop("_id", None) or row.pop("id", None) or f"line-{n}"
            text = row.pop("text")
            title = row.get("title")
            out.append(Record(str(doc_id), f"{title}\n{text}" if title else text, row))
    return out


def demo_corpus() -> list[Record]:
    """The embedded multilingual demo corpus (106 short passages, 8 languages)."""
    data = resources.files("m3_rag").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    return [Record(r.pop("id"), r.pop("text"), r) for r in rows]

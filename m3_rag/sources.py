"""Reading what ``m3-rag index`` indexes: folders of text files (chunked) or JSONL records.

Everything is streamed: a folder file is read ``_BLOCK`` characters at a time and chunked as
it is read, a JSONL file one line at a time, so memory is bounded by a block (or a line),
never by a file or the corpus. Every record is checked with the validators
:meth:`~m3_rag.HybridRetriever.add_documents` applies (ids, text, metadata), so a source
that reads without an error here is accepted by the index; a refusal names the file and line.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from m3_rag._inputs import check_metadata, check_unicode
from m3_rag.backends.validate import check_ids

__all__ = [
    "ENCODING_ERRORS",
    "TEXT_GLOBS",
    "Record",
    "check_chunking",
    "chunk_text",
    "demo_corpus",
    "iter_chunks",
    "iter_source",
    "read_source",
]

TEXT_GLOBS = ("*.txt", "*.md")
ENCODING_ERRORS = ("skip", "strict", "replace")
# cut points, best first: paragraph break, sentence end, any whitespace
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?。！？])\s*"), re.compile(r"\s+"))
_NONSPACE = re.compile(r"\S")  # re's \s is str.isspace, what str.strip removes
_BLOCK = 1 << 20  # characters (or bytes) read at a time from a folder file
MAX_LINE = 1 << 26  # bytes in one JSONL line (a passage is far shorter)


@dataclass(frozen=True)
class Record:
    """One passage to index."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def check_chunking(size: int, overlap: int) -> None:
    """Refuse chunking parameters :func:`chunk_text` cannot use.

    Raises:
        ValueError: ``size <= 0`` or ``overlap`` not in ``[0, size)``.
    """
    if (
        isinstance(size, bool)
        or isinstance(overlap, bool)
        or not isinstance(size, int)
        or not isinstance(overlap, int)
        or size <= 0
        or not 0 <= overlap < size
    ):
        raise ValueError(
            f"need chunk size > 0 and 0 <= overlap < size, got size={size!r}, overlap={overlap!r}"
        )


def chunk_text(text: str, size: int = 1000, overlap: int = 150) -> list[str]:
    """Split ``text`` into chunks of at most ``size`` characters, overlapping by ~``overlap``.

    Cuts fall on the last paragraph break, else sentence end, else whitespace inside the
    window (a hard cut only for a long run without any). Empty text gives no chunk.

    Raises:
        ValueError: ``size <= 0`` or ``overlap`` not in ``[0, size)``.
    """
    return list(iter_chunks([text], size, overlap))


def iter_chunks(pieces: Iterable[str], size: int = 1000, overlap: int = 150) -> Iterator[str]:
    """:func:`chunk_text` of the concatenation of ``pieces``, read as it goes (memory bounded
    by a piece plus a window, whatever the text's length); the chunks are the same.

    Raises:
        ValueError: ``size <= 0`` or ``overlap`` not in ``[0, size)``.
    """
    check_chunking(size, overlap)
    return _chunks(iter(pieces), size, overlap)


def _chunks(pieces: Iterator[str], size: int, overlap: int) -> Iterator[str]:
    # T is the text without its surrounding whitespace; buf holds T[base:] as read so far
    # (plus trailing whitespace not known yet to be T's end)
    buf = ""
    for piece in pieces:
        buf = piece.lstrip()
        if buf:
            break
    if not buf:
        return
    base = start = scanned = 0
    eof = False
    while True:
        limit = start + size  # is there text (not only whitespace) from `limit` on?
        while True:
            if base + len(buf) > limit:
                pos = max(limit, scanned) - base
                if _NONSPACE.search(buf, pos) is not None:
                    last = False
                    break
                scanned = base + len(buf)
            if eof:
                last = True
                break
            more = next(pieces, None)
            if more is None:
                eof = True
            else:
                buf += more
        s = start - base
        if last:  # the window reaches T's end
            tail = buf[s:].strip()
            if tail:
                yield tail
            return
        end = limit
        window = buf[s : s + size]
        for pattern in _BREAKS:
            cuts = [m.end() for m in pattern.finditer(window) if m.end() > size // 2]
            if cuts:
                end = start + cuts[-1]
                break
        chunk = buf[s : end - base].strip()
        if chunk:
            yield chunk
        nxt = max(end - overlap, start + 1)
        space = buf.find(" ", nxt - base, end - base)  # start the overlap on a word boundary
        start = space + base + 1 if overlap and space != -1 else nxt
        if start - base > _BLOCK:  # drop what no later window reads
            buf, base = buf[start - base :], start


def read_source(
    source: str | os.PathLike[str],
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
        source: A folder, or a JSONL file (``.jsonl`` or ``.json``; any path that is not a
            folder is read as one, a named pipe included).
        chunk_size, chunk_overlap: Folder chunking (characters).
        globs: File-name patterns a folder's files must match (any of them; ``*.txt``,
            ``docs/**/*.rst``...), relative to the folder.
        encoding_errors: A folder file that is not text (not UTF-8, or binary: it holds a
            NUL byte), or whose name is not valid UTF-8: ``"skip"`` it (``on_skip`` is told
            why), stop (``"strict"``, ValueError), or decode a non-UTF-8 file with U+FFFD
            (``"replace"``; binary files and bad names are still skipped).
        on_skip: Called with a one-line reason for each skipped file.

    Raises:
        FileNotFoundError: missing source. ValueError: wrong format, duplicate ids, a
            record the index would refuse (NaN or infinity in metadata, a lone surrogate,
            the reserved ``m3_rag_scores`` key...; the message names the file and line), or
            no text at all.
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
    source: str | os.PathLike[str],
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    *,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[Record]:
    """:func:`read_source` as a stream: one block of a file (or one JSONL line) read at a
    time, so a corpus of any size is indexed in bounded memory. Errors are raised when
    reached (a bad line after good ones: the good ones were yielded already); the source is
    checked (exists, format, matching files) before the first record."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(
            f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}"
        )
    check_chunking(chunk_size, chunk_overlap)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.is_dir():
        records = _read_folder(path, chunk_size, chunk_overlap, globs, encoding_errors, on_skip)
    else:
        records = _read_jsonl(path)
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
        why = _not_text(file, rel, check_utf8=encoding_errors != "replace")
        if why is not None:
            if encoding_errors == "strict":
                raise ValueError(f"{why}; pass --encoding-errors skip to skip such files")
            if on_skip is not None:
                on_skip(f"skipped {why}")
            continue
        pieces = _read_blocks(file, _ERRORS[encoding_errors])
        for i, chunk in enumerate(_chunks(pieces, size, overlap)):
            yield Record(f"{rel}#{i}", chunk, {"source": rel, "chunk": i})


_ERRORS = {"skip": "strict", "strict": "strict", "replace": "replace"}


def _not_text(file: Path, rel: str, check_utf8: bool) -> str | None:
    """Why ``file`` cannot be indexed as text (``None`` when it can): a name that is not
    valid UTF-8 (the ids and metadata hold it), a NUL byte (a binary or sparse file), or
    bytes that are not UTF-8. Reads ``_BLOCK`` bytes at a time and stops at the first
    problem."""
    try:
        check_unicode(rel, "its name")
    except ValueError:
        return f"{rel!r}: its name is not valid UTF-8 (rename the file)"
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(file, "rb") as f:
        while block := f.read(_BLOCK):
            nul = block.find(b"\0")
            if nul != -1:
                return f"{file}: binary, not text (a NUL byte at byte {offset + nul})"
            if check_utf8:
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    return f"{file}: not UTF-8 text ({e.reason} at byte {at})"
            offset += len(block)
    if check_utf8:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return f"{file}: not UTF-8 text ({e.reason} at byte {offset - len(e.object) + e.start})"
    return None


def _read_blocks(file: Path, errors: str) -> Iterator[str]:
    with open(file, encoding="utf-8", errors=errors) as f:
        while block := f.read(_BLOCK):
            yield block


def _read_jsonl(path: Path) -> Iterator[Record]:
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a folder of text files or a .jsonl file")
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[Record]:
    seen: dict[str, int] = {}
    with open(path, "rb") as f:  # one line at a time, decoded alone: errors name their line
        n = 0
        while raw := f.readline(MAX_LINE + 1):
            n += 1
            if len(raw) > MAX_LINE:
                raise ValueError(
                    f"{path}:{n} is longer than {MAX_LINE} bytes; one line is one passage "
                    "(split long texts)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{n} is not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                ) from None
            record = _jsonl_record(path, n, line, seen)
            if record is not None:
                yield record


def _jsonl_record(path: Path, n: int, line: str, seen: dict[str, int]) -> Record | None:
    """The record of JSONL line ``n`` (``None`` for a blank line), checked as the index
    checks what it adds; ``seen`` maps the ids read so far to their line."""
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
    text = row.pop("text")
    title = row.get("title")
    text = f"{title}\n{text}" if title else text
    try:  # what add_documents would refuse, refused here with the line
        check_unicode(doc_id, "the id")
        check_ids([doc_id])
        check_unicode(text, "the text")
        metadata = check_metadata(row, "the metadata")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}:{n}: {e}") from None
    seen[doc_id] = n
    return Record(doc_id, text, metadata)


def demo_corpus() -> list[Record]:
    """The embedded multilingual demo corpus (106 short passages, 8 languages)."""
    data = resources.files("m3_rag").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    return [Record(r.pop("id"), r.pop("text"), r) for r in rows]

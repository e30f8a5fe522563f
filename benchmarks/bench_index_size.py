"""Index size on disk: ``m3-rag index`` of the first 500 beir-mini msmarco passages with a
1024-dimensional checkpoint (BGE-M3's output shape), per ColBERT setting.

The checkpoint is a tiny random model in BGE-M3's layout (2 layers, hidden 1024, dense,
lexical and ColBERT heads; ``m3_rag.testing.build_m3_checkpoint``), with two tokenizers:

* ``test``: the test tokenizer (1,000 pieces trained on the test sentences). It cuts a
  msmarco passage into ~269 tokens, ~1.4 characters a token.
* ``msmarco-16k``: 16,000 pieces trained on the 5,000 beir-mini msmarco passages. It cuts a
  passage into ~81 tokens, as BGE-M3's own tokenizer does (~82, issue 23). The texts it is
  trained on are the texts indexed, so this is the cut of a good tokenizer, not a
  measurement of BGE-M3's.

Each setting is one ``m3-rag index`` run (the command's own ``main``); the size is what the
command prints, the bytes of every file under ``--out``. Prints a table and writes
``benchmarks/results/index_size.json``.

    python benchmarks/bench_index_size.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from m3_rag.cli import main as cli_main
from m3_rag.codecs import DEFAULT_CODEC, DEFAULT_POOL_FACTOR
from m3_rag.testing import build_m3_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "beir-mini" / "msmarco" / "corpus.jsonl"
OUT = ROOT / "benchmarks" / "results" / "index_size.json"
SETTINGS: list[tuple[str, list[str]]] = [
    ("float16 x1", ["--colbert", "float16", "--pool-factor", "1"]),
    ("int8 x1", ["--colbert", "int8", "--pool-factor", "1"]),
    ("rotated-binary x1", ["--colbert", "rotated-binary", "--pool-factor", "1"]),
    ("defaults", []),
]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _by_kind(path: Path) -> dict[str, int]:
    """Bytes per file name (without suffix), summed over segments, largest first."""
    out: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            kind = f.name.split(".")[0] or f.name  # a dot-file by its whole name
            out[kind] = out.get(kind, 0) + f.stat().st_size
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="passages (the first n)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lines = [x for x in CORPUS.read_text(encoding="utf-8").split("\n") if x.strip()]
    passages = [json.loads(x) for x in lines]
    all_texts = [(p.get("title", "") + " " + p["text"]).strip() for p in passages]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "msmarco.jsonl"
        source.write_text("\n".join(lines[: args.n]) + "\n", encoding="utf-8")
        tokenizers: dict[str, dict[str, Any]] = {
            "test": {},
            "msmarco-16k": {"tokenizer_texts": all_texts, "tokenizer_vocab": 16000},
        }
        for tok_name, kw in tokenizers.items():
            ckpt = work / f"ckpt-{tok_name}"
            build_m3_checkpoint(ckpt, hidden=1024, heads=16, intermediate=256, **kw)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(ckpt))
            tokens = [len(tok(t)["input_ids"]) for t in all_texts[: args.n]]
            for label, extra in SETTINGS:
                out = work / f"idx-{tok_name}-{label.replace(' ', '')}"
                t = time.perf_counter()
                rc = cli_main(
                    ["index", str(source), "--out", str(out), "--model", str(ckpt), *extra]
                )
                if rc != 0:
                    raise SystemExit(f"m3-rag index failed ({rc}) for {tok_name} {label}")
                current = json.loads((out / "CURRENT").read_text(encoding="utf-8"))["manifest"]
                spec = json.loads((out / current).read_text(encoding="utf-8"))["spec"]
                row = {
                    "tokenizer": tok_name,
                    "tokens_per_passage": float(np.mean(tokens)),
                    "settings": label,
                    "colbert": spec["colbert_dtype"],
                    "pool_factor": spec.get("colbert_pool_factor", 1),
                    "bytes": _size(out),
                    "bytes_by_file": _by_kind(out),
                    "seconds": round(time.perf_counter() - t, 1),
                }
                rows.append(row)
                print(
                    f"{tok_name:<12} {row['tokens_per_passage']:6.1f} tok  {label:<18}"
                    f" {row['colbert']:>15} x{row['pool_factor']}  {row['bytes'] / 1e6:8.1f} MB",
                    flush=True,
                )
    record = {
        "command": "python benchmarks/bench_index_size.py",
        "date": time.strftime("%Y-%m-%d"),
        "passages": args.n,
        "defaults": f"{DEFAULT_CODEC} x{DEFAULT_POOL_FACTOR}",
        "target_bytes": 17_350_000,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Encoder throughput: m3-rag ``M3Encoder.encode`` vs FlagEmbedding ``BGEM3FlagModel.encode``.

Same checkpoint, same texts, same process, fp32 on CPU, dense + sparse + ColBERT outputs.
The checkpoint is random with BGE-M3's exact backbone shape (24 layers, hidden 1024, 16
heads, intermediate 4096; a small vocabulary, which changes no per-token compute), so the
compute cost per token equals the real model's. Texts have mixed lengths, 16-512 tokens.

    python benchmarks/bench_encode.py                  # writes benchmarks/results/bench_encode.json
    python benchmarks/bench_encode.py --texts 16 --layers 4    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m3_rag import M3Encoder
from m3_rag import encoder as encoder_module
from m3_rag._postprocess import padding_waste, plan_batches
from m3_rag.testing import SAMPLE_TEXTS, build_m3_checkpoint


def gemm_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matrix-multiply GFLOP/s of this machine (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_texts(enc: M3Encoder, n: int, seed: int = 0) -> list[str]:
    """``n`` texts with token counts spread uniformly over 16..510."""
    rng = np.random.default_rng(seed)
    words = " ".join(SAMPLE_TEXTS).split()
    out = []
    for target in rng.integers(16, 511, size=n):
        text = ""
        while len(enc.tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text += " " + " ".join(rng.choice(words, size=16))
        ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"][:target]
        out.append(enc.tokenizer.decode(ids))
    return out


def model_flops(lengths: np.ndarray, layers: int, d: int, ff: int) -> float:
    """Useful forward FLOPs (no padding): linear layers + attention scores and mixing."""
    lengths = lengths.astype(np.float64)
    linear = 2 * layers * (4 * d * d + 2 * d * ff) * lengths.sum()
    attention = 4 * layers * d * (lengths**2).sum()
    return float(linear + attention)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/bench_encode.json")
    args = ap.parse_args()
    import FlagEmbedding

    torch.set_num_threads(os.cpu_count() or 1)
    d, ff = 1024, 4096
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_m3_checkpoint(
            Path(tmp) / "m3-full-shape",
            hidden=d,
            layers=args.layers,
            heads=16,
            intermediate=ff,
            max_positions=514,
            initializer_range=0.02,
        )
        ours = M3Encoder(ckpt, device="cpu", max_length=512, batch_size=args.batch_size)
        flag = FlagEmbedding.BGEM3FlagModel(
            str(ckpt), use_fp16=False, devices="cpu", passage_max_length=512
        )
        texts = make_texts(ours, args.texts)
        lengths = np.asarray(
            [len(ours.tokenizer(t, truncation=True, max_length=512)["input_ids"]) for t in texts]
        )
        ours.encode(texts[:2])  # warm-up
        flag.encode(texts[:2], batch_size=2, max_length=512, return_sparse=True)
        t = time.perf_counter()
        a = ours.encode(texts, return_sparse=True, return_colbert=True)
        ours_s = time.perf_counter() - t
        # the same encoder on FlagEmbedding's plan (batch_size consecutive sorted texts),
        # to separate the batching gain from the rest
        plan = encoder_module.plan_batches
        encoder_module.plan_batches = lambda lengths, bs, max_tokens, overhead: plan(lengths, bs)
        try:
            t = time.perf_counter()
            ours.encode(texts, return_sparse=True, return_colbert=True)
            fixed_s = time.perf_counter() - t
        finally:
            encoder_module.plan_batches = plan
        t = time.perf_counter()
        b = flag.encode(
            texts,
            batch_size=args.batch_size,
            max_length=512,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        flag_s = time.perf_counter() - t
    assert a.dense is not None and a.colbert is not None and a.sparse is not None
    dense_diff = float(np.abs(a.dense - np.asarray(b["dense_vecs"])).max())
    colbert_diff = max(
        float(np.abs(x - y).max()) for x, y in zip(a.colbert, b["colbert_vecs"], strict=True)
    )
    sparse_diff = max(
        max((abs(float(w) - float(y.get(str(t), y.get(t, 0.0)))) for t, w in x.items()), default=0)
        for x, y in zip(a.sparse, b["lexical_weights"], strict=True)
    )
    sparse_max = max((float(w) for y in b["lexical_weights"] for w in y.values()), default=1.0)
    tokens = int(lengths.sum())
    flops = model_flops(lengths, args.layers, d, ff)
    peak = gemm_peak()
    rows = [
        {"encoder": "m3-rag M3Encoder", "seconds": ours_s},
        {"encoder": "m3-rag, FlagEmbedding's batches", "seconds": fixed_s},
        {"encoder": "FlagEmbedding BGEM3FlagModel", "seconds": flag_s},
    ]
    waste = {
        "m3-rag": padding_waste(
            lengths,
            plan_batches(lengths, args.batch_size, None, encoder_module._CPU_PASS_OVERHEAD),
        ),
        "fixed_count": padding_waste(lengths, plan_batches(lengths, args.batch_size)),
    }
    for r in rows:
        r["tokens_per_s"] = tokens / r["seconds"]
        r["gflops"] = flops / r["seconds"] / 1e9
        r["of_gemm_peak"] = r["gflops"] / peak
    result = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "arch": platform.machine()},
        "shape": {"layers": args.layers, "hidden": d, "heads": 16, "intermediate": ff},
        "texts": args.texts,
        "tokens": tokens,
        "gemm_peak_gflops": peak,
        "speedup": flag_s / ours_s,
        "speedup_same_batches": flag_s / fixed_s,
        "padding_waste": waste,
        "max_abs_diff": {"dense": dense_diff, "sparse": sparse_diff, "colbert": colbert_diff},
        "sparse_max_weight": sparse_max,
        "results": rows,
    }
    print(
        f"\nEncode throughput, {args.texts} texts / {tokens} tokens (16-512 each), fp32, "
        f"{args.layers} layers x 1024 ({os.cpu_count()} cores, torch {torch.__version__})"
    )
    print(f"{'encoder':<32} {'s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        print(
            f"{r['encoder']:<32} {r['seconds']:>7.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['gflops']:>8.1f} {r['of_gemm_peak']:>8.0%}"
        )
    print(
        f"fp32 GEMM peak {peak:.0f} GFLOP/s; m3-rag / FlagEmbedding = {flag_s / ours_s:.2f}x "
        f"({flag_s / fixed_s:.2f}x on the same batches); padding waste "
        f"{waste['m3-rag']:.1%} (m3-rag) vs {waste['fixed_count']:.1%} (batches of "
        f"{args.batch_size})"
    )
    print(
        f"max |diff| dense {dense_diff:.1e}, sparse {sparse_diff:.1e} (largest weight "
        f"{sparse_max:.2f}), colbert {colbert_diff:.1e}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

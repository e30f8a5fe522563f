"""Runtimes that run a checkpoint's backbone: ``torch`` (default) and ``onnx`` (CPU, fp32 or
int8). See ``docs/runtime.md``."""

from __future__ import annotations

from m3_rag.runtime import onnx_runtime, torch_runtime  # noqa: F401  (registers them)
from m3_rag.runtime.base import (
    Backbone,
    LoadedBackbone,
    MissingExtraError,
    Runtime,
    RuntimeOptionError,
    RuntimeOptions,
    get_runtime,
    register_runtime,
    runtime_names,
)
from m3_rag.runtime.cache import ENV_VAR as CACHE_ENV_VAR
from m3_rag.runtime.loader import LoadedModel, load_model

__all__ = [
    "CACHE_ENV_VAR",
    "Backbone",
    "LoadedBackbone",
    "LoadedModel",
    "MissingExtraError",
    "Runtime",
    "RuntimeOptionError",
    "RuntimeOptions",
    "get_runtime",
    "load_model",
    "register_runtime",
    "runtime_names",
]

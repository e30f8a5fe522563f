"""Load a checkpoint's tokenizer and its backbone on a runtime: what the encoder and the
reranker share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3_rag.runtime.base import LoadedBackbone, RuntimeOptions, Task, get_runtime

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A checkpoint ready to run: where it is, its tokenizer and its backbone."""

    model_name: str
    path: Path
    tokenizer: Any
    backbone: LoadedBackbone


def load_model(
    model_name_or_path: str | os.PathLike[str],
    *,
    runtime: str,
    task: Task,
    options: RuntimeOptions,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Check the options, resolve the checkpoint (hub or local), load tokenizer and backbone.

    Args:
        model_name_or_path: Hub id or local directory in the official layout.
        runtime: A registered runtime name (``"torch"``, ``"onnx"``).
        task: ``"hidden"`` (encoder) or ``"logits"`` (reranker).
        options: Quantisation, device, dtype, export cache and threads.
        cache_dir, revision, local_files_only: Hugging Face Hub options.

    Raises:
        RuntimeOptionError: an unknown runtime or an option it cannot honour (checked
            before anything is read).
        MissingExtraError: the runtime's optional dependency is not installed.
        FileNotFoundError, CheckpointError, OSError: as :func:`m3_rag.loading.load_checkpoint`.
    """
    rt = get_runtime(runtime)
    rt.check(options)
    from m3_rag.loading import check_checkpoint, load_tokenizer, resolve_model_dir

    path = resolve_model_dir(
        model_name_or_path,
        cache_dir=cache_dir,
        revision=revision,
        local_files_only=local_files_only,
    )
    weights = check_checkpoint(path)
    tokenizer = load_tokenizer(path)
    backbone = rt.load(path, weights, task, options)
    return LoadedModel(os.fspath(model_name_or_path), path, tokenizer, backbone)

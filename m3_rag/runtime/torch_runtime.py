"""The default runtime: the ``transformers`` model in PyTorch (any device and dtype)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m3_rag.runtime.base import (
    LoadedBackbone,
    Runtime,
    RuntimeOptionError,
    RuntimeOptions,
    Task,
    register_runtime,
)


class TorchBackbone:
    """Calls the ``transformers`` model; returns its last hidden state or its logits."""

    def __init__(self, model: Any, task: Task) -> None:
        self.model, self.task = model, task

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return out.logits if self.task == "logits" else out.last_hidden_state


@register_runtime
class TorchRuntime(Runtime):
    """PyTorch, fp32 on CPU and fp16 on CUDA by default (no quantisation)."""

    name = "torch"

    def check(self, options: RuntimeOptions) -> None:
        super().check(options)
        if options.threads is not None:
            raise RuntimeOptionError(
                "threads= sets the ONNX runtime's threads; for runtime='torch' call "
                "torch.set_num_threads() instead"
            )
        if options.cache_dir is not None:
            raise RuntimeOptionError(
                "onnx_cache_dir= is for runtime='onnx' (torch exports nothing)"
            )
        from m3_rag._device import resolve_device

        resolve_device(options.device)  # a bad device raises before anything is read

    def load(
        self, path: Path, weights: Path, task: Task, options: RuntimeOptions
    ) -> LoadedBackbone:
        from m3_rag._device import resolve_device, resolve_dtype
        from m3_rag.loading import load_backbone

        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        model = load_backbone(path, weights, dtype, sequence_classification=task == "logits")
        model = model.to(device)
        return LoadedBackbone(
            TorchBackbone(model, task), model.config, device, dtype, model=model, describe="torch"
        )

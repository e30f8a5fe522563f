"""The ONNX Runtime path: export once (fp32, optionally int8), cache, run on CPU.

``pip install 'm3-rag[onnx]'`` (onnxruntime; onnx and onnxscript for the export). The
first start exports the backbone with ``torch.onnx.export`` and caches it (see
:mod:`m3_rag.runtime.cache`); later starts load the cached graph without loading the torch
weights.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch

from m3_rag.errors import CheckpointError
from m3_rag.loading import HEAD_FILES
from m3_rag.runtime.base import (
    LoadedBackbone,
    MissingExtraError,
    Runtime,
    RuntimeOptionError,
    RuntimeOptions,
    Task,
    register_runtime,
)
from m3_rag.runtime.cache import cache_roots, checkpoint_hash, get_or_build
from m3_rag.runtime.export import MODEL_FILE, export_backbone
from m3_rag.runtime.quantize import DEFAULT_RECIPE, Int8Recipe, quantize_int8

__all__ = ["OnnxBackbone", "OnnxRuntime", "require"]

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'm3-rag[onnx]'"


def require(module: str = "onnxruntime") -> Any:
    """Import an optional dependency of the ONNX runtime.

    Raises:
        MissingExtraError: it is not installed (the message names the extra to install).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"runtime='onnx' needs {module}, which is not installed: {EXTRA_HINT} "
            "(or use runtime='torch')",
            name=module,
        ) from e


class OnnxBackbone:
    """An ``onnxruntime.InferenceSession`` on CPU, called like the torch model.

    Args:
        model_file: The ``model.onnx`` to run.
        threads: Intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, model_file: Path, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.model_file, self.threads = model_file, opts.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(
                str(model_file), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # a cache entry whose checksums match but ORT cannot read
            raise CheckpointError(
                f"onnxruntime cannot load {model_file} ({type(e).__name__}: {e}); delete "
                f"{model_file.parent} to export it again"
            ) from e
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ids = input_ids.cpu().numpy()
        feeds = {"input_ids": ids, "attention_mask": attention_mask.cpu().numpy()}
        if "token_type_ids" in self.input_names:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            feeds["token_type_ids"] = types.cpu().numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __repr__(self) -> str:
        return f"OnnxBackbone({str(self.model_file)!r}, threads={self.threads})"


def _token_types(config: Any, task: Task) -> bool:
    """Whether the graph takes ``token_type_ids``: a classifier with more than one type
    (BERT pairs); with one type (XLM-R) they are always 0 and the graph's default."""
    return task == "logits" and int(getattr(config, "type_vocab_size", 1) or 1) > 1


@register_runtime
class OnnxRuntime(Runtime):
    """ONNX Runtime on CPU, fp32 or dynamic int8 (``quantize="int8"``)."""

    name = "onnx"
    quantizations = ("int8",)
    recipe: Int8Recipe = DEFAULT_RECIPE

    def check(self, options: RuntimeOptions) -> None:
        super().check(options)
        if options.device is not None:
            try:
                kind = torch.device(options.device).type
            except (RuntimeError, TypeError) as e:
                raise RuntimeOptionError(f"device={options.device!r}: {e}") from None
            if kind != "cpu":
                raise RuntimeOptionError(
                    f"runtime='onnx' runs on the CPU; pass device='cpu' (or None), or "
                    f"runtime='torch' for device={options.device!r}"
                )
        dt = options.dtype
        if dt is not None and not (
            dt == torch.float32
            or (isinstance(dt, str) and dt.lower().removeprefix("torch.") in ("float32", "fp32"))
        ):
            raise RuntimeOptionError(
                f"runtime='onnx' computes in float32 (int8 with quantize='int8'); pass "
                f"dtype=None or 'float32', not {options.dtype!r}"
            )

    def load(
        self, path: Path, weights: Path, task: Task, options: RuntimeOptions
    ) -> LoadedBackbone:
        require("onnxruntime")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise CheckpointError(f"could not read {path / 'config.json'}: {e}") from e
        files = [path / "config.json", weights] + [
            path / f for f in HEAD_FILES if (path / f).is_file()
        ]
        key = checkpoint_hash(files)[:32]
        roots = cache_roots(path, options.cache_dir)
        info = {"checkpoint": str(path), "checkpoint_sha256": key, "task": task}
        token_types = _token_types(config, task)

        def build_fp32(tmp: Path) -> None:
            require("onnx")
            require("onnxscript")
            from m3_rag.loading import load_backbone

            logger.info("exporting %s to ONNX (once; cached in %s)", path, roots[0])
            model = load_backbone(
                path, weights, torch.float32, sequence_classification=task == "logits"
            )
            export_backbone(model, tmp, task, token_types=token_types)

        fp32 = get_or_build(roots, f"{key}/{task}-fp32", build_fp32, {**info, "variant": "fp32"})
        entry = fp32
        if options.quantize == "int8":
            recipe = self.recipe

            def build_int8(tmp: Path) -> None:
                require("onnx")
                quantize_int8(fp32, tmp, recipe)

            entry = get_or_build(
                roots,
                f"{key}/{task}-int8-{recipe.name}",
                build_int8,
                {**info, "variant": f"int8-{recipe.name}"},
            )
        backbone = OnnxBackbone(entry / MODEL_FILE, options.threads)
        describe = "onnx int8" if options.quantize else "onnx"
        return LoadedBackbone(backbone, config, torch.device("cpu"), torch.float32, None, describe)

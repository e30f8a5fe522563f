"""Export a checkpoint's backbone to ONNX with PyTorch's own exporter (``dynamo=True``).

Dynamic batch and sequence axes; weights as external data (BGE-M3 in fp32 is over the
2 GB protobuf limit). Every export is checked against the torch model on inputs of another
shape than the tracing sample, so a graph specialised to one shape is refused, never cached.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3_rag.errors import CheckpointError
from m3_rag.runtime.base import Task

__all__ = ["MODEL_FILE", "export_backbone"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 18
_CHECK_ATOL = 1e-3


class _Hidden(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Logits(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _TypedLogits(_Logits):
    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return out.logits


def input_names(task: Task, token_types: bool) -> list[str]:
    """The graph's inputs, in order."""
    names = ["input_ids", "attention_mask"]
    return [*names, "token_type_ids"] if task == "logits" and token_types else names


def _sample(
    vocab: int, batch: int, seq: int, names: list[str], seed: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    low = min(5, vocab - 1)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0  # one right-padded row
    out = [ids, mask]
    if len(names) == 3:
        out.append(torch.zeros_like(ids))
    return tuple(out)


def export_backbone(model: Any, out_dir: Path, task: Task, *, token_types: bool = False) -> None:
    """Write ``out_dir/model.onnx`` (+ external data) for ``model`` and check it.

    Args:
        model: The ``transformers`` model in fp32 on CPU, in eval mode.
        out_dir: An empty directory.
        task: ``"hidden"`` (output ``hidden``: last hidden state) or ``"logits"``.
        token_types: (``logits`` only) the graph takes ``token_type_ids``.

    Raises:
        CheckpointError: the exporter failed, or the graph disagrees with the torch model.
    """
    names = input_names(task, token_types)
    wrapper: torch.nn.Module
    if task == "hidden":
        wrapper = _Hidden(model)
    else:
        wrapper = _TypedLogits(model) if token_types else _Logits(model)
    wrapper.eval()
    vocab = int(model.config.vocab_size)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch, 1: seq} for n in names}
    file = out_dir / MODEL_FILE
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping..."
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                _sample(vocab, 2, 9, names, 0),
                str(file),
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=OPSET,
                external_data=True,
                verbose=False,
            )
    except Exception as e:
        quiet.setLevel(level)
        raise CheckpointError(
            f"could not export {type(model).__name__} to ONNX ({type(e).__name__}: {e}); "
            "use runtime='torch' for this checkpoint"
        ) from e
    quiet.setLevel(level)
    _check(wrapper, file, names, vocab)


def _check(wrapper: torch.nn.Module, file: Path, names: list[str], vocab: int) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
    for batch, seq in ((3, 17), (1, 4)):
        feeds = _sample(vocab, batch, seq, names, seq)
        with torch.no_grad():
            ref = wrapper(*feeds).float().numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, feeds, strict=True)})[0]
        keep = feeds[1].numpy().astype(bool) if ref.ndim == 3 else np.ones(ref.shape[0], bool)
        diff = float(np.abs(ref[keep] - got[keep]).max()) if got.shape == ref.shape else np.inf
        scale = max(1.0, float(np.abs(ref).max()))
        if not diff <= _CHECK_ATOL * scale:
            raise CheckpointError(
                f"the ONNX export disagrees with the torch model at shape ({batch}, {seq}) "
                f"(max abs diff {diff:.3g}); use runtime='torch' for this checkpoint"
            )
        logger.debug("ONNX export check (%d, %d): max abs diff %.3g", batch, seq, diff)

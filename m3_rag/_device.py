"""Device and dtype resolution shared by the encoder and the reranker."""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str like 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but this torch build has no usable CUDA GPU; "
            "use device='cpu' (or install a CUDA build of torch on a GPU machine)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means float16 on CUDA and float32 elsewhere.

    Half precision on CPU is allowed when asked for explicitly, with a warning:
    on most CPUs it is two orders of magnitude slower than float32.
    """
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(set(_DTYPES))}")
        dtype = _DTYPES[key]
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(
            f"{dtype} on CPU is usually far slower than float32; pass dtype=None for float32",
            stacklevel=3,
        )
    return dtype

"""What every runtime provides, and the registry that names them.

A runtime turns a checkpoint directory into a :class:`Backbone`: a callable from token ids
and an attention mask to the backbone's output (the last hidden state for an encoder, the
logits for a reranker), as a ``torch.Tensor`` on the encoder's device. Tokenisation, heads,
pooling and post-processing stay in :mod:`m3_rag.encoder` / :mod:`m3_rag.rerank`, so every
runtime returns the same ``EncodeOutput`` and scores. A new runtime is one subclass of
:class:`Runtime` decorated with :func:`register_runtime`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

__all__ = [
    "Backbone",
    "LoadedBackbone",
    "MissingExtraError",
    "Runtime",
    "RuntimeOptionError",
    "RuntimeOptions",
    "Task",
    "get_runtime",
    "register_runtime",
    "runtime_names",
]

Task = Literal["hidden", "logits"]
"""``hidden``: the backbone's last hidden state (encoder); ``logits``: a sequence classifier's
logits (reranker)."""


class RuntimeOptionError(ValueError):
    """A runtime option that cannot work (unknown runtime, int8 on torch, a GPU device for
    the CPU-only ONNX runtime...); the message says which option to change."""


class MissingExtraError(ImportError, RuntimeError):
    """An optional dependency is not installed; the message names the ``pip install`` line.

    An ``ImportError`` (what a caller of an optional feature expects) that is also a
    ``RuntimeError``, so the CLI reports it as one line like its other load errors.
    """


class Backbone(Protocol):
    """The model's forward pass: ``[b, L]`` int64 ids and mask -> a ``torch.Tensor``."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class RuntimeOptions:
    """What the caller asked of the runtime, checked by :meth:`Runtime.check`.

    Attributes:
        quantize: ``None`` (full precision) or ``"int8"``.
        device, dtype: As given to the encoder (``None``: the runtime's default).
        cache_dir: Where exported models are cached (``None``: the runtime's default).
        threads: Intra-op threads (``None``: the runtime's default).
    """

    quantize: str | None = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    cache_dir: str | os.PathLike[str] | None = None
    threads: int | None = None


@dataclass
class LoadedBackbone:
    """A runtime's answer: the forward pass and what the encoder reads about it.

    Attributes:
        forward: The :class:`Backbone`.
        config: The ``transformers`` config (hidden size, vocabulary, positions, labels).
        device, dtype: Where the outputs live and in which precision.
        model: The ``torch.nn.Module`` when the runtime runs one (``None`` otherwise).
        describe: A short description for ``repr`` (``"torch"``, ``"onnx int8"``...).
    """

    forward: Backbone
    config: Any
    device: torch.device
    dtype: torch.dtype
    model: Any = None
    describe: str = ""


class Runtime(ABC):
    """One way of running a checkpoint's backbone (subclass and :func:`register_runtime`)."""

    name: ClassVar[str]
    quantizations: ClassVar[tuple[str, ...]] = ()
    """Accepted ``quantize`` values besides ``None``."""

    def check(self, options: RuntimeOptions) -> None:
        """Refuse options this runtime cannot honour, before anything is loaded.

        Raises:
            RuntimeOptionError: naming the option and what to pass instead.
            TypeError: an option of the wrong type.
        """
        q = options.quantize
        if q is not None and not isinstance(q, str):
            raise TypeError(f"quantize must be None or a str, got {type(q).__name__}")
        if q is not None and q not in self.quantizations:
            if q == "int8" and self.name != "onnx":
                raise RuntimeOptionError(
                    f"quantize='int8' runs on the ONNX runtime, not runtime={self.name!r}: "
                    "pass runtime='onnx' (CLI: add --runtime onnx)"
                )
            accepted = ", ".join(repr(x) for x in self.quantizations) or "nothing else"
            raise RuntimeOptionError(
                f"quantize={q!r}: runtime={self.name!r} accepts None or {accepted}"
            )
        t = options.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise RuntimeOptionError(f"threads must be a positive int or None, got {t!r}")

    @abstractmethod
    def load(
        self, path: Path, weights: Path, task: Task, options: RuntimeOptions
    ) -> LoadedBackbone:
        """Load the backbone of the checkpoint at ``path`` (whose weights file is ``weights``)."""


_RUNTIMES: dict[str, type[Runtime]] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: make ``cls`` available as ``runtime=cls.name``."""
    _RUNTIMES[cls.name] = cls
    return cls


def runtime_names() -> list[str]:
    """The registered runtime names."""
    return sorted(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    """A new instance of the runtime called ``name``.

    Raises:
        TypeError: ``name`` is not a str.
        RuntimeOptionError: no runtime has that name (the message lists them).
    """
    if not isinstance(name, str):
        raise TypeError(f"runtime must be a str, got {type(name).__name__}")
    if name not in _RUNTIMES:
        raise RuntimeOptionError(f"unknown runtime {name!r}; choose one of {runtime_names()}")
    return _RUNTIMES[name]()

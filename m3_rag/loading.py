"""Locating and loading checkpoints: the official BAAI layout, the transformers-native one
written by ``m3-rag convert``, and plain sentence-transformers / transformers models.

An official BGE-M3 checkpoint directory holds::

    config.json                              XLM-RoBERTa config
    model.safetensors | pytorch_model.bin    backbone weights
    colbert_linear.pt                        ColBERT head  (Linear(hidden, d_colbert))
    sparse_linear.pt                         lexical head  (Linear(hidden, 1))
    tokenizer.json | sentencepiece.bpe.model tokenizer (+ tokenizer_config.json ...)
    1_Pooling/config.json                    optional sentence-transformers pooling

A transformers-native one holds ``config.json`` (with ``auto_map``), ``modeling_bge_m3.py``,
one ``model.safetensors`` with the backbone and both heads (``colbert_linear.weight``,
``colbert_linear.bias``, ``sparse_linear.weight``, ``sparse_linear.bias``) and the tokenizer.
m3-rag reads its config and weights and never runs its modeling file.

A dense-only model (BGE v1.5, all-MiniLM-L6-v2...) is the same without the two heads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3_rag.errors import CheckpointError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt")
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
HEAD_NAMES = ("colbert_linear", "sparse_linear")  # tensor prefixes in a native model.safetensors
OFFICIAL, NATIVE, PLAIN = "official", "native", "plain"
_HUB_PATTERNS = [
    "*.json",
    "model.safetensors",
    "pytorch_model.bin",
    "*.pt",
    "*.model",
    "*.txt",
    "1_Pooling/*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_OFFLINE_HINT = (
    "If this machine is offline, download the model on a connected machine "
    "(e.g. `huggingface-cli download {name} --local-dir DIR`) and pass DIR instead, "
    "or set HF_HUB_OFFLINE=1 if it is already in the Hugging Face cache."
)


def resolve_model_dir(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local directory for a hub id or a local path.

    Args:
        name_or_path: A local checkpoint directory, or a Hugging Face Hub id
            such as ``"BAAI/bge-m3"``.
        cache_dir: Hub cache directory (default: the Hugging Face default).
        revision: Hub revision (branch, tag or commit).
        local_files_only: Never touch the network; use the hub cache only.

    Raises:
        TypeError: ``name_or_path`` is not a string or path.
        FileNotFoundError: a local path that does not exist.
        OSError: the hub id could not be downloaded (message carries an offline hint).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"model must be a hub id or a local directory, got {type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory that holds it")
    if not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"model directory {path} does not exist "
            f"(and {name!r} is not a hub id like 'BAAI/bge-m3')"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1",
        )
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise OSError(
            f"could not load {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            + _OFFLINE_HINT.format(name=name)
        ) from e
    return Path(local)


def check_checkpoint(path: Path) -> Path:
    """Check the files every checkpoint needs; return the weights file found.

    Raises:
        FileNotFoundError: naming the missing file (config, weights or tokenizer).
    """
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing config.json")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"checkpoint {path} is missing its weights: expected {' or '.join(WEIGHT_FILES)}"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"checkpoint {path} is missing its tokenizer: "
            f"expected one of {', '.join(TOKENIZER_FILES)}"
        )
    return weights


def load_tokenizer(path: Path) -> Any:
    """Load the checkpoint's tokenizer (a fast tokenizer is required)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"could not load the tokenizer of {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{path}: a fast (tokenizers) tokenizer is required")
    return tok


def load_backbone(
    path: Path, weights: Path, dtype: torch.dtype, *, sequence_classification: bool = False
) -> Any:
    """Load the transformer from ``path``; refuse a checkpoint whose weights do not fit it.

    Raises:
        CheckpointError: unreadable weights, or weights missing tensors the
            architecture needs (names the weights file).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"could not read {path / 'config.json'}: {e}") from e
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "output_loading_info": True,
        "trust_remote_code": False,  # a native checkpoint's modeling file is never run
    }
    if not sequence_classification and config.model_type in ("xlm-roberta", "bert", "roberta"):
        kwargs["add_pooling_layer"] = False  # the pooler is never used
    cls = AutoModelForSequenceClassification if sequence_classification else AutoModel
    try:
        with _quiet_transformers():  # its load report is replaced by the checks below
            model, info = cls.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise CheckpointError(f"could not load weights from {weights}: {e}") from e
    missing = [k for k in info.get("missing_keys", []) if ".pooler." not in f".{k}"]
    if missing:
        raise CheckpointError(
            f"{weights} does not match {path / 'config.json'}: {len(missing)} tensors missing "
            f"(e.g. {missing[0]!r}); the file is corrupt or belongs to another model"
        )
    heads = tuple(f"{name}." for name in HEAD_NAMES)  # a native checkpoint's heads, read apart
    unexpected = [
        k
        for k in info.get("unexpected_keys", [])
        if ".pooler." not in f".{k}" and not k.startswith(heads)
    ]
    if unexpected:
        logger.warning("%s: %d unused tensors (e.g. %r)", weights, len(unexpected), unexpected[0])
    model.eval()
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_linear_head(
    file: Path, in_features: int, out_features: int | None = None
) -> torch.nn.Linear:
    """Load a ``torch.nn.Linear`` state dict saved by FlagEmbedding (``weights_only=True``).

    Args:
        file: ``colbert_linear.pt`` or ``sparse_linear.pt``.
        in_features: The backbone's hidden size.
        out_features: Expected output size, or ``None`` to take it from the file.

    Raises:
        CheckpointError: the file is unreadable or its shapes do not fit.
    """
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read {file}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds no Linear state dict (expected 'weight' and 'bias')")
    return linear_from_state(state, str(file), in_features, out_features)


def linear_from_state(
    state: dict[str, Any], where: str, in_features: int, out_features: int | None = None
) -> torch.nn.Linear:
    """Build a ``torch.nn.Linear`` from ``{"weight": [out, in], "bias": [out]}``.

    Args:
        state: The tensors (``bias`` may be absent).
        where: What to name in an error (a file, or a file and a tensor prefix).
        in_features: The backbone's hidden size.
        out_features: Expected output size, or ``None`` to take it from ``weight``.

    Raises:
        CheckpointError: ``weight`` is missing or the shapes do not fit.
    """
    weight, bias = state.get("weight"), state.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{where} holds no Linear state dict (expected 'weight' and 'bias')")
    out = int(weight.shape[0]) if out_features is None else out_features
    if tuple(weight.shape) != (out, in_features) or (
        bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,))
    ):
        raise CheckpointError(
            f"{where} has weight shape {tuple(weight.shape)}, expected ({out}, {in_features})"
        )
    linear = torch.nn.Linear(in_features, out, bias=bias is not None)
    linear.load_state_dict({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
    return linear.eval()


def native_head_keys(weights: Path) -> set[str]:
    """The head tensors (``colbert_linear.*``, ``sparse_linear.*``) in a ``model.safetensors``.

    Raises:
        CheckpointError: the file is not readable safetensors (names it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise CheckpointError(f"could not read {weights}: {e}") from e
    return {k for k in keys if k.split(".", 1)[0] in HEAD_NAMES}


def detect_layout(path: Path) -> str:
    """Which layout ``path`` holds: ``"official"`` (backbone + ``colbert_linear.pt`` +
    ``sparse_linear.pt``), ``"native"`` (heads inside ``model.safetensors``) or ``"plain"``
    (no M3 heads: a dense-only model or a cross-encoder).

    Raises:
        FileNotFoundError: config, weights or tokenizer missing, or one of the two ``.pt``
            heads without the other (names the missing file).
        CheckpointError: unreadable weights, or a ``model.safetensors`` holding only some
            of the four head tensors (names those missing).
    """
    weights = check_checkpoint(path)
    present = [(path / f).is_file() for f in HEAD_FILES]
    if all(present):
        return OFFICIAL
    if any(present):
        raise FileNotFoundError(
            f"checkpoint {path} has {HEAD_FILES[present.index(True)]} but is missing "
            f"{HEAD_FILES[present.index(False)]}; an M3 checkpoint needs both heads"
        )
    if weights.name != "model.safetensors":
        return PLAIN
    found = native_head_keys(weights)
    if not found:
        return PLAIN
    needed = {f"{name}.{t}" for name in HEAD_NAMES for t in ("weight", "bias")}
    if needed - found:
        raise CheckpointError(
            f"{weights} holds {', '.join(sorted(found))} but not "
            f"{', '.join(sorted(needed - found))}; a native M3 checkpoint holds both heads"
        )
    return NATIVE


def load_heads(
    path: Path, hidden: int, layout: str | None = None
) -> tuple[torch.nn.Linear | None, torch.nn.Linear | None]:
    """The ColBERT and lexical heads of a checkpoint in either layout, on the CPU in float32
    as stored; ``(None, None)`` for a model without them.

    Args:
        path: The checkpoint directory.
        hidden: The backbone's hidden size.
        layout: :func:`detect_layout`'s answer, when already known.

    Raises:
        FileNotFoundError: one ``.pt`` head without the other.
        CheckpointError: unreadable heads or shapes that do not fit ``hidden``.
    """
    layout = layout or detect_layout(path)
    if layout == OFFICIAL:
        colbert_file, sparse_file = (path / f for f in HEAD_FILES)
        return load_linear_head(colbert_file, hidden), load_linear_head(sparse_file, hidden, 1)
    if layout != NATIVE:
        return None, None
    from safetensors import safe_open

    weights = path / "model.safetensors"
    states: dict[str, dict[str, Any]] = {name: {} for name in HEAD_NAMES}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name, _, tensor = key.partition(".")
                if name in states:
                    states[name][tensor] = f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"could not read {weights}: {e}") from e
    colbert = linear_from_state(states["colbert_linear"], f"{weights} colbert_linear", hidden)
    sparse = linear_from_state(states["sparse_linear"], f"{weights} sparse_linear", hidden, 1)
    return colbert, sparse


@dataclass(frozen=True)
class PoolingConfig:
    """Sentence pooling read from sentence-transformers files (CLS by default)."""

    mode: str = "cls"  # "cls" | "mean" | "max"
    max_seq_length: int | None = None


def read_pooling(path: Path) -> PoolingConfig:
    """Read ``1_Pooling/config.json`` and ``sentence_bert_config.json`` when present."""
    mode = "cls"
    pooling_file = path / "1_Pooling" / "config.json"
    modules_file = path / "modules.json"
    if modules_file.is_file():
        try:
            for module in json.loads(modules_file.read_text()):
                if str(module.get("type", "")).endswith("Pooling"):
                    pooling_file = path / module.get("path", "1_Pooling") / "config.json"
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"could not parse {modules_file}: {e}") from e
    if pooling_file.is_file():
        try:
            cfg = json.loads(pooling_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"could not parse {pooling_file}: {e}") from e
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif cfg.get("pooling_mode_mean_tokens"):
            mode = "mean"
        elif cfg.get("pooling_mode_max_tokens"):
            mode = "max"
        else:
            raise CheckpointError(
                f"{pooling_file}: unsupported pooling (supported: cls, mean, max)"
            )
    max_seq: int | None = None
    st_file = path / "sentence_bert_config.json"
    if st_file.is_file():
        try:
            value = json.loads(st_file.read_text()).get("max_seq_length")
        except ValueError as e:
            raise CheckpointError(f"could not parse {st_file}: {e}") from e
        max_seq = int(value) if value else None
    return PoolingConfig(mode=mode, max_seq_length=max_seq)


def model_max_positions(config: Any) -> int | None:
    """Largest input length the position embeddings allow (RoBERTa reserves pad+1 slots)."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if config.model_type in ("xlm-roberta", "roberta", "camembert"):
        return int(n) - int(getattr(config, "pad_token_id", 1) or 1) - 1
    return int(n)


@dataclass
class LoadedCheckpoint:
    """What the encoder and the reranker both load: path, device, dtype, tokenizer, model."""

    model_name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    model: Any
    layout: str = PLAIN  # "official" | "native" | "plain" (no M3 heads), see detect_layout


def load_checkpoint(
    model_name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    sequence_classification: bool = False,
) -> LoadedCheckpoint:
    """Resolve (hub or local), check the files, detect the layout, load tokenizer and
    backbone onto the device (the heads: :func:`load_heads`)."""
    from m3_rag._device import resolve_device, resolve_dtype

    path = resolve_model_dir(
        model_name_or_path,
        cache_dir=cache_dir,
        revision=revision,
        local_files_only=local_files_only,
    )
    weights = check_checkpoint(path)
    layout = detect_layout(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(path)
    model = load_backbone(path, weights, dt, sequence_classification=sequence_classification)
    return LoadedCheckpoint(
        os.fspath(model_name_or_path), path, dev, dt, tokenizer, model.to(dev), layout
    )

"""Conversion between the official BGE-M3 layout and the transformers-native one.

official: ``config.json``, ``model.safetensors`` | ``pytorch_model.bin`` (backbone),
``colbert_linear.pt``, ``sparse_linear.pt``, tokenizer files.

native: ``config.json`` (``auto_map`` -> ``modeling_bge_m3.BGEM3Model``, ``colbert_dim``),
``modeling_bge_m3.py``, one ``model.safetensors`` (backbone tensors under their own names, and
``colbert_linear.{weight,bias}``, ``sparse_linear.{weight,bias}``), tokenizer files.

Tensors are copied as they are (same names, dtypes and values), so official -> native ->
official gives back the same weights. The output directory is written beside its final place
and renamed into it when complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from m3_rag.errors import CheckpointError
from m3_rag.loading import (
    HEAD_FILES,
    HEAD_NAMES,
    NATIVE,
    OFFICIAL,
    detect_layout,
    load_linear_head,
    model_max_positions,
)

__all__ = ["MODELING_FILE", "convert_checkpoint"]

MODELING_FILE = "modeling_bge_m3.py"
AUTO_MAP = {"AutoModel": "modeling_bge_m3.BGEM3Model"}
NATIVE_KEYS = ("auto_map", "colbert_dim", "m3_pooler")  # config keys only the native layout has
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_DIRS = ("1_Pooling", "2_Normalize")


def convert_checkpoint(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, sentence_transformers: bool = False
) -> str:
    """Convert an official checkpoint to the transformers-native layout, or back.

    Args:
        src: A checkpoint directory in either layout (the layout is detected).
        out: The output directory; it must not exist, or be empty.
        sentence_transformers: Also write the sentence-transformers files (CLS pooling,
            normalisation) so that ``SentenceTransformer(out)`` loads the dense model.

    Returns:
        The layout written: ``"native"`` or ``"official"``.

    Raises:
        FileNotFoundError: ``src`` is missing, or lacks config, weights or tokenizer.
        CheckpointError: ``src`` is neither layout (names what is missing), a file in it is
            unreadable, or its backbone is not XLM-RoBERTa.
        FileExistsError: ``out`` exists and is not an empty directory.
    """
    src_dir, out_dir = Path(src), Path(out)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {src_dir} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output {out_dir} exists and is not empty; pick a new directory")
    layout = detect_layout(src_dir)
    if layout not in (OFFICIAL, NATIVE):
        raise CheckpointError(
            f"{src_dir} is neither an official BGE-M3 checkpoint (it has no "
            f"{' or '.join(HEAD_FILES)}) nor a transformers-native one (its weights hold no "
            f"{' or '.join(f'{n}.*' for n in HEAD_NAMES)} tensors)"
        )
    config = _read_config(src_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # beside OUT (same filesystem, so the rename is atomic); os.mkdir honours the umask
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if layout == OFFICIAL:
            pooler = _to_native(src_dir, tmp, config)
            written = NATIVE
        else:
            pooler = _to_official(src_dir, tmp, config)
            written = OFFICIAL
        for name in TOKENIZER_FILES + (() if sentence_transformers else ST_FILES):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp / name)
        for name in () if sentence_transformers else ST_DIRS:
            if (src_dir / name).is_dir():
                shutil.copytree(src_dir / name, tmp / name)
        if sentence_transformers:
            _write_sentence_transformers(src_dir, tmp, config, pooler)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {file}: {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != "xlm-roberta":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{file}: model_type {kind!r}; BGE-M3 checkpoints are 'xlm-roberta' "
            "(the native modeling file extends XLMRobertaModel)"
        )
    return config


def _write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _load_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors as stored (``model.safetensors`` or ``pytorch_model.bin``)."""
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    try:
        if file.is_file():
            return dict(load_file(str(file)))
        file = path / "pytorch_model.bin"
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read {file}: {e}") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file} holds no state dict of named tensors")
    return dict(state)


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write ``tensors`` to ``file``; tensors sharing memory (possible in a ``.bin``) are
    copied apart first, since safetensors refuses shared storage."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    own: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.detach().clone().contiguous()
        seen.add(t.untyped_storage().data_ptr())
        own[key] = t
    save_file(own, str(file), metadata={"format": "pt"})


def _check_backbone(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse weights that an ``XLMRobertaModel`` of ``config`` would not load as they are."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    cfg = XLMRobertaConfig.from_dict({k: v for k, v in config.items() if k not in NATIVE_KEYS})
    pooler = any(k.startswith("pooler.") for k in tensors)
    with torch.device("meta"):
        expected = set(XLMRobertaModel(cfg, add_pooling_layer=pooler).state_dict())
    # position_ids: a buffer older transformers saved with the weights (it loads, unused)
    extra = sorted(k for k in set(tensors) - expected if not k.endswith("position_ids"))
    missing = sorted(expected - set(tensors))
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(
            f"{where} does not match its config.json as an XLMRobertaModel: {len(missing)} "
            f"tensors missing, {len(extra)} unexpected ({first})"
        )


def _to_native(src: Path, out: Path, config: dict[str, Any]) -> bool:
    """Write the native weights, config and modeling file; return whether there is a pooler."""
    tensors = _load_backbone(src)
    _check_backbone(config, tensors, src)
    hidden = int(config["hidden_size"])
    heads = [load_linear_head(src / f, hidden) for f in HEAD_FILES]
    if int(heads[1].out_features) != 1:
        raise CheckpointError(f"{src / HEAD_FILES[1]} has {heads[1].out_features} outputs, not 1")
    for name, head, file in zip(HEAD_NAMES, heads, HEAD_FILES, strict=True):
        if head.bias is None:
            raise CheckpointError(f"{src / file} has no bias; BGE-M3's heads have one")
        tensors[f"{name}.weight"] = head.weight.detach()
        tensors[f"{name}.bias"] = head.bias.detach()
    _save_safetensors(tensors, out / "model.safetensors")
    native = dict(config)
    native["architectures"] = ["BGEM3Model"]
    native["auto_map"] = dict(AUTO_MAP)
    native["colbert_dim"] = int(heads[0].out_features)
    pooler = any(k.startswith("pooler.") for k in tensors)
    if pooler:
        native["m3_pooler"] = True
    _write_json(out / "config.json", native)
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)
    return pooler


def _to_official(src: Path, out: Path, config: dict[str, Any]) -> bool:
    """Write the official weights, heads and config; return whether there is a pooler."""
    tensors = _load_backbone(src)
    for name, file in zip(HEAD_NAMES, HEAD_FILES, strict=True):
        state = {t: tensors.pop(f"{name}.{t}") for t in ("weight", "bias")}
        torch.save(state, out / file)
    _check_backbone(config, tensors, src)
    _save_safetensors(tensors, out / "model.safetensors")
    official = {k: v for k, v in config.items() if k not in NATIVE_KEYS}
    official["architectures"] = ["XLMRobertaModel"]
    _write_json(out / "config.json", official)
    return any(k.startswith("pooler.") for k in tensors)


def _write_sentence_transformers(
    src: Path, out: Path, config: dict[str, Any], pooler: bool
) -> None:
    """modules.json (Transformer, CLS Pooling, Normalize), 1_Pooling/config.json and
    sentence_bert_config.json: the dense model, as ``BGEM3FlagModel`` computes it."""
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    _write_json(
        out / "modules.json",
        [
            {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
            for i, (p, t) in enumerate(modules)
        ],
    )
    (out / "1_Pooling").mkdir()
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": int(config["hidden_size"]),
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    max_seq = None
    st_config = src / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            max_seq = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"could not read {st_config}: {e}") from e
    if not max_seq:
        from transformers import XLMRobertaConfig

        cfg = XLMRobertaConfig.from_dict({k: v for k, v in config.items() if k not in NATIVE_KEYS})
        max_seq = model_max_positions(cfg)
    st_config_out: dict[str, Any] = {"max_seq_length": max_seq, "do_lower_case": False}
    if not pooler:  # no pooler weights: load none (the pooler is not the sentence embedding)
        st_config_out["model_args"] = {"add_pooling_layer": False}
    _write_json(out / "sentence_bert_config.json", st_config_out)
    _write_json(
        out / "config_sentence_transformers.json",
        {"model_type": "SentenceTransformer", "prompts": {}, "similarity_fn_name": "cosine"},
    )

"""``m3-rag convert``: the transformers-native BGE-M3 layout (heads inside the checkpoint,
``AutoModel`` returns all three outputs), its sentence-transformers export, the way back to
the official layout, and m3-rag loading both layouts without running a checkpoint's code."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MULTILINGUAL, require
from safetensors.torch import load_file, save_file

from m3_rag import CheckpointError, M3Encoder, Reranker
from m3_rag.cli import main
from m3_rag.convert import convert_checkpoint
from m3_rag.loading import detect_layout, load_checkpoint
from m3_rag.testing import SAMPLE_TEXTS

MAX_LEN = 24  # the long texts are cut: truncation is part of the comparison
TEXTS = MULTILINGUAL + SAMPLE_TEXTS
HEAD_KEYS = {f"{h}.{t}" for h in ("colbert_linear", "sparse_linear") for t in ("weight", "bias")}


@pytest.fixture(scope="module")
def native_dir(tiny_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "native"
    assert convert_checkpoint(tiny_m3_dir, out) == "native"
    return out


@pytest.fixture(scope="module")
def official_enc(tiny_m3_dir: Path) -> M3Encoder:
    return M3Encoder(tiny_m3_dir, device="cpu", max_length=MAX_LEN)


def _native_outputs(path: Path, texts: list[str], batch_size: int = 8) -> dict[str, Any]:
    """Run ``AutoModel(path, trust_remote_code=True)`` and apply FlagEmbedding's conventions:
    dense as is; lexical weights = max per token id over the text's tokens, special tokens
    (cls/eos/pad/unk) and weights <= 0 dropped; ColBERT = the first ``n_tokens - 1`` rows."""
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(
        str(path), trust_remote_code=True, output_loading_info=True
    )
    assert type(model).__name__ == "BGEM3Model"
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    dense, sparse, colbert = [], [], []
    for start in range(0, len(texts), batch_size):
        batch = tok(
            texts[start : start + batch_size],
            truncation=True,
            max_length=MAX_LEN,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model(**batch)
        b, t = batch["input_ids"].shape
        assert out.dense_output.shape == (b, model.config.hidden_size)
        assert out.sparse_output.shape == (b, t)
        assert out.colbert_output.shape == (b, t - 1, model.config.colbert_dim)
        pad = batch["attention_mask"] == 0
        assert (out.sparse_output >= 0).all() and (out.sparse_output[pad] == 0).all()
        assert (out.colbert_output[pad[:, 1:]] == 0).all()
        dense.append(out.dense_output.numpy())
        for ids, mask, weights, vecs in zip(
            batch["input_ids"].tolist(),
            batch["attention_mask"].tolist(),
            out.sparse_output.numpy(),
            out.colbert_output.numpy(),
            strict=True,
        ):
            lex: dict[int, float] = defaultdict(float)
            for i, w in zip(ids, weights, strict=True):
                if i not in special and w > 0 and w > lex[i]:
                    lex[i] = float(w)
            sparse.append(dict(lex))
            colbert.append(vecs[: sum(mask) - 1])
    return {"dense": np.concatenate(dense), "sparse": sparse, "colbert": colbert}


def _assert_same(mine: dict[str, Any], dense: Any, sparse: Any, colbert: Any) -> None:
    np.testing.assert_allclose(mine["dense"], dense, atol=1e-5)
    for i, (a, b) in enumerate(zip(mine["sparse"], sparse, strict=True)):
        assert set(a) == {int(k) for k in b}, f"lexical keys differ for text {i}"
        for k, v in a.items():
            assert v == pytest.approx(float(b[k if k in b else str(k)]), abs=1e-5)
    for a, b in zip(mine["colbert"], colbert, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_native_layout_files(native_dir: Path, tiny_m3_dir: Path) -> None:
    names = {p.name for p in native_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_bge_m3.py", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))]  # no pickle
    config = json.loads((native_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_bge_m3.BGEM3Model"}
    assert config["model_type"] == "xlm-roberta" and config["colbert_dim"] == 32
    tensors = load_file(str(native_dir / "model.safetensors"))
    assert set(tensors) >= HEAD_KEYS
    assert detect_layout(native_dir) == "native" and detect_layout(tiny_m3_dir) == "official"


def test_automodel_outputs_equal_m3encoder_official(
    native_dir: Path, official_enc: M3Encoder
) -> None:
    mine = _native_outputs(native_dir, TEXTS)
    ref = official_enc.encode(TEXTS, batch_size=5)
    _assert_same(mine, ref.dense, ref.sparse, ref.colbert)


@pytest.mark.parity
def test_automodel_outputs_equal_bgem3flagmodel(native_dir: Path, tiny_m3_dir: Path) -> None:
    flag = require(
        "FlagEmbedding",
        "the parity oracle; install the reference environment: "
        'pip install -e ".[dev]" -c constraints.txt (transformers 4.57.6)',
    )
    oracle = flag.BGEM3FlagModel(
        str(tiny_m3_dir),
        use_fp16=False,
        devices="cpu",
        passage_max_length=MAX_LEN,
        query_max_length=MAX_LEN,
    )
    ref = oracle.encode(
        TEXTS,
        batch_size=3,
        max_length=MAX_LEN,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    mine = _native_outputs(native_dir, TEXTS)
    _assert_same(mine, ref["dense_vecs"], ref["lexical_weights"], ref["colbert_vecs"])


def test_m3encoder_loads_native_equal_to_official(
    native_dir: Path, official_enc: M3Encoder
) -> None:
    enc = M3Encoder(native_dir, device="cpu", max_length=MAX_LEN)
    assert enc.has_sparse and enc.has_colbert and enc.colbert_dim == 32
    a, b = enc.encode(TEXTS, batch_size=4), official_enc.encode(TEXTS, batch_size=4)
    assert a.dense is not None and b.dense is not None
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.sparse == b.sparse
    assert a.colbert is not None and b.colbert is not None
    for x, y in zip(a.colbert, b.colbert, strict=True):
        np.testing.assert_array_equal(x, y)


def test_no_checkpoint_code_runs_when_m3rag_loads(
    native_dir: Path, tiny_reranker_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint's modeling file is never imported: replaced by one that leaves a mark,
    the native M3 checkpoint and a cross-encoder whose config maps to it still load, unmarked.
    """
    mark = tmp_path / "code-ran"
    evil = f"open({str(mark)!r}, 'w').close()\nraise SystemExit('checkpoint code ran')\n"
    native = shutil.copytree(native_dir, tmp_path / "native")
    (native / "modeling_bge_m3.py").write_text(evil)
    reranker = shutil.copytree(tiny_reranker_dir, tmp_path / "reranker")
    config = json.loads((reranker / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Model"}
    (reranker / "config.json").write_text(json.dumps(config))
    (reranker / "modeling_evil.py").write_text(evil)
    enc = M3Encoder(native, device="cpu", max_length=MAX_LEN)
    assert enc.encode(["hello"]).sparse is not None
    pairs = [("capital of France", "Paris is the capital of France.")]
    assert Reranker(reranker, device="cpu").compute_score(pairs) == pytest.approx(
        Reranker(tiny_reranker_dir, device="cpu").compute_score(pairs), abs=1e-6
    )
    assert not mark.exists()


def test_reranker_native_layout_is_the_standard_checkpoint(tiny_reranker_dir: Path) -> None:
    """For a cross-encoder the transformers-native layout is a plain
    ``XLMRobertaForSequenceClassification`` checkpoint: its AutoModel logits are the scores."""
    from transformers import AutoModelForSequenceClassification

    ckpt = load_checkpoint(
        tiny_reranker_dir, device="cpu", dtype=None, sequence_classification=True
    )
    assert ckpt.layout == "plain"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_reranker_dir)).eval()
    rr = Reranker(tiny_reranker_dir, device="cpu")
    pair = ("capital of France", "Paris is the capital of France.")
    batch = rr.tokenizer(*pair, return_tensors="pt")
    with torch.no_grad():
        logit = float(model(**batch).logits[0, 0])
    assert rr.compute_score([pair])[0] == pytest.approx(logit, abs=1e-5)


def test_sentence_transformers_export_equals_dense(
    tiny_m3_dir: Path, official_enc: M3Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = require("sentence_transformers", 'pip install -e ".[dev]" -c constraints.txt')
    out = tmp_path / "native-st"
    assert main(["convert", str(tiny_m3_dir), str(out), "--sentence-transformers"]) == 0
    assert "native" in capsys.readouterr().out
    model = st.SentenceTransformer(str(out), device="cpu")
    got = model.encode(TEXTS[:8], batch_size=4)
    # sentence-transformers cuts at max_seq_length (512 here): compare untruncated texts
    ref = official_enc.encode(TEXTS[:8], max_length=512)
    np.testing.assert_allclose(got, ref.dense, atol=1e-5)
    assert M3Encoder(out, device="cpu").pooling.mode == "cls"


@pytest.mark.parametrize("fixture", ["tiny_m3_dir", "tiny_m3_bin_dir"])
def test_round_trip_is_identical_in_weights(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(fixture)
    native, back = tmp_path / "native", tmp_path / "official"
    assert convert_checkpoint(src, native) == "native"
    assert convert_checkpoint(native, back) == "official"
    assert detect_layout(back) == "official"
    if (src / "model.safetensors").is_file():
        original = load_file(str(src / "model.safetensors"))
    else:
        original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    returned = load_file(str(back / "model.safetensors"))
    assert set(returned) == set(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    for head in ("colbert_linear.pt", "sparse_linear.pt"):
        a = torch.load(src / head, map_location="cpu", weights_only=True)
        b = torch.load(back / head, map_location="cpu", weights_only=True)
        assert set(a) == set(b) == {"weight", "bias"}
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), head
    config = json.loads((back / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["XLMRobertaModel"]
    assert not (back / "modeling_bge_m3.py").exists()


def test_native_missing_a_head_tensor_is_named(native_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(native_dir, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["sparse_linear.bias"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not sparse_linear\.bias"):
        M3Encoder(broken, device="cpu")


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("m3-rag: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_input_is_one_line_exit_2(
    tiny_m3_dir: Path, tiny_dense_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "nope"), str(out)]) == 2
    assert "does not exist" in _one_line(capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_m3_dir), str(full)]) == 2
    assert "not empty" in _one_line(capsys)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert main(["convert", str(tiny_dense_dir), str(out)]) == 2
    err = _one_line(capsys)
    assert "neither" in err and "colbert_linear.pt" in err and "colbert_linear.*" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(tiny_m3_dir), str(empty)]) == 0  # an empty directory is fine
    assert detect_layout(empty) == "native"

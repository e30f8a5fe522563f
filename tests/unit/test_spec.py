"""The index specification: one serialisation, one check, old records still read."""

from __future__ import annotations

import json

import pytest

from m3_rag.bm25 import BM25Params
from m3_rag.errors import IndexFormatError, IndexMismatchError
from m3_rag.spec import IndexSpec


def _spec(**kw: object) -> IndexSpec:
    base: dict[str, object] = {
        "model": "m",
        "dense_dim": 8,
        "colbert_dim": 4,
        "lexical": "bm25",
        "vocab_size": 100,
        "analyzer": {"kind": "unicode"},
    }
    return IndexSpec(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lexical": "m3"},
        {"lexical": None, "colbert_dim": None},
        {"colbert_dtype": "int8", "dense_dtype": "float16"},
        {"colbert_dtype": "binary", "colbert_pool_factor": 2},
        {"bm25": BM25Params(k1=1.2, b=0.5)},
    ],
)
def test_json_round_trip(kw: dict[str, object]) -> None:
    spec = _spec(**kw)
    record = json.loads(json.dumps(spec.to_json()))  # JSON types only
    again = IndexSpec.from_json(record, "here")
    assert again.to_json() == spec.to_json()
    spec.check_stored(record, "here")  # its own record always matches


def test_absent_legs_serialise_as_none() -> None:
    rec = _spec(lexical=None, colbert_dim=None).to_json()
    assert rec["vocab_size"] is None and rec["bm25"] is None and rec["analyzer"] is None
    assert rec["colbert_dtype"] is None and rec["colbert_pool_factor"] is None
    m3 = _spec(lexical="m3").to_json()
    assert m3["bm25"] is None and m3["analyzer"] is None and m3["vocab_size"] == 100


def test_bm25_defaults_are_explicit() -> None:
    spec = _spec(bm25=None)
    assert spec.bm25 == BM25Params() and spec.to_json()["bm25"] == BM25Params().as_dict()


def test_earlier_records_read_as_the_same_spec() -> None:
    """The server engines stored vocab_size for every index and no analyzer before the BM25
    analyzer existed; the local engine stored bm25 for M3 indexes too."""
    server_m3 = {
        "format": 1,
        "model": "m",
        "dense_dim": 8,
        "colbert_dim": 4,
        "colbert_dtype": "float16",
        "lexical": "m3",
        "vocab_size": 100,
        "bm25": None,
    }
    _spec(lexical="m3").check_stored(server_m3, "collection c")
    local_m3 = server_m3 | {"dense_dtype": "float32", "bm25": BM25Params().as_dict()}
    _spec(lexical="m3").check_stored(local_m3, "index d")
    old_bm25 = server_m3 | {"lexical": "bm25", "bm25": BM25Params().as_dict()}
    assert IndexSpec.from_json(old_bm25, "c").analyzer == "model"
    _spec(analyzer="model").check_stored(old_bm25, "c")
    no_lexical = server_m3 | {"lexical": None}
    _spec(lexical=None).check_stored(no_lexical, "c")
    # no colbert_pool_factor before token pooling existed: no pooling
    assert IndexSpec.from_json(server_m3, "c").colbert_pool_factor == 1
    with pytest.raises(IndexMismatchError, match="colbert_pool_factor"):
        _spec(lexical="m3", colbert_pool_factor=2).check_stored(server_m3, "c")


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"dense_dim": 16}, "dense_dim"),
        ({"colbert_dim": None}, "colbert_dim"),
        ({"colbert_dtype": "int8"}, "colbert_dtype"),
        ({"colbert_dtype": "binary"}, "colbert_dtype"),
        ({"colbert_pool_factor": 2}, "colbert_pool_factor"),
        ({"dense_dtype": "float16"}, "dense_dtype"),
        ({"lexical": "m3"}, "lexical"),
        ({"vocab_size": 50}, "vocab_size"),
        ({"bm25": BM25Params(k1=2.0)}, "bm25"),
        ({"analyzer": "model"}, "analyzer"),
    ],
)
def test_a_different_setting_is_refused_by_name(kw: dict[str, object], key: str) -> None:
    stored = _spec().to_json()
    with pytest.raises(IndexMismatchError, match=key) as e:
        _spec(**kw).check_stored(stored, "index d")
    assert isinstance(e.value, ValueError) and "index d" in str(e.value)


def test_another_model_needs_allow_model_mismatch() -> None:
    stored = _spec(model="other").to_json()
    with pytest.raises(IndexMismatchError, match="allow_model_mismatch=True"):
        _spec().check_stored(stored, "index d")
    assert _spec().check_stored(stored, "index d", allow_model_mismatch=True).model == "other"


@pytest.mark.parametrize(
    "record",
    [
        None,
        [],
        {"dense_dim": 8},
        {"model": "m", "dense_dim": "8", "lexical": None},
        {"model": "m", "dense_dim": 8, "lexical": "tfidf"},
        {"model": "m", "dense_dim": 8, "lexical": None, "dense_dtype": "int4"},
        {"model": "m", "dense_dim": 8, "lexical": "bm25", "vocab_size": 9, "bm25": {"k": 1}},
        {"model": "m", "dense_dim": 8, "lexical": "bm25", "vocab_size": 9, "bm25": {"k1": "x"}},
        {"model": "m", "dense_dim": True, "lexical": None},
        {"model": 3, "dense_dim": 8, "lexical": None},
    ],
)
def test_bad_records_are_index_format_errors(record: object) -> None:
    with pytest.raises(IndexFormatError, match=r"^index d: "):
        IndexSpec.from_json(record, "index d")


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        ({"dense_dim": 0}, ValueError),
        ({"colbert_dim": 2.5}, ValueError),
        ({"lexical": "sparse"}, ValueError),
        ({"dense_dtype": "float64"}, ValueError),
        ({"colbert_dtype": "int4"}, ValueError),
        ({"colbert_pool_factor": 0}, ValueError),
        ({"colbert_pool_factor": 2.0}, ValueError),
        ({"colbert_pool_factor": True}, ValueError),
        ({"vocab_size": -1}, ValueError),
        ({"model": None}, TypeError),
        ({"bm25": {"k1": 1.0}}, TypeError),
    ],
)
def test_bad_specs_are_refused(kw: dict[str, object], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        _spec(**kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.5", True, None])
def test_bm25_params_must_be_finite_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="finite number"):
        BM25Params(k1=bad)  # type: ignore[arg-type]

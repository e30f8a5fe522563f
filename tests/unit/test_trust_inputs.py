"""Bad input is refused with a typed, clear error and nothing stored is lost; what the index
returns is a private copy; a filter compares values as JSON does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

from m3_rag import HybridRetriever, M3Encoder
from m3_rag.backends import LocalBackend
from m3_rag.filters import all_of, matches
from m3_rag.testing import SAMPLE_TEXTS


@pytest.fixture
def r(tiny_encoder: M3Encoder) -> HybridRetriever:
    out = HybridRetriever(tiny_encoder)
    out.add_texts(
        SAMPLE_TEXTS[:6], [{"i": i, "tags": ["x"]} for i in range(6)], [f"d{i}" for i in range(6)]
    )
    return out


BAD_ADDS = {
    "lone surrogate id": (dict(ids=["ok", "bad\udcff"]), ValueError, r"ids\[1\].*lone surrogate"),
    "lone surrogate text": (dict(texts=["ok", "bad\ud800"]), ValueError, r"texts\[1\].*surrogate"),
    "lone surrogate metadata": (
        dict(metadatas=[{}, {"k": "v\udc80"}]),
        ValueError,
        r"metadatas\[1\].*surrogate",
    ),
    "NaN metadata": (dict(metadatas=[{}, {"x": float("nan")}]), ValueError, "NaN or infinity"),
    "inf metadata": (dict(metadatas=[{"x": [float("inf")]}, {}]), ValueError, "NaN or infinity"),
    "reserved key": (dict(metadatas=[{"m3_rag_scores": 1}, {}]), ValueError, "reserved"),
    "object metadata": (dict(metadatas=[{"x": object()}, {}]), TypeError, "JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ADDS))
def test_bad_add_is_refused_and_keeps_the_index(
    r: HybridRetriever, tmp_path: Path, case: str
) -> None:
    change, error, message = BAD_ADDS[case]
    args = {"texts": ["one", "two"], "metadatas": None, "ids": ["n1", "n2"]} | change
    before = [(h.id, h.metadata) for h in r.search("Paris", k=10)]
    with pytest.raises(error, match=message):
        r.add_texts(args["texts"], args["metadatas"], args["ids"])
    assert len(r) == 6 and [(h.id, h.metadata) for h in r.search("Paris", k=10)] == before
    r.save(tmp_path / "idx")  # every later save still works
    assert len(HybridRetriever.load(tmp_path / "idx", r.encoder)) == 6


def test_queries_and_weights_are_checked(r: HybridRetriever) -> None:
    for q in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty or blank"):
            r.search(q)
    with pytest.raises(ValueError, match="lone surrogate"):
        r.search("caf\udce9")  # bytes decoded with surrogateescape
    for w in ((3e38, 3e38, 0), (-1, 1, 1), (np.inf, 1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="weights"):
            r.search("Paris", weights=w)
    # large but float32-summable weights: finite fused scores, same ranking as (1, 1, 0)
    big = r.search("Paris", k=6, weights=(1e38, 1e38, 0))
    ref = r.search("Paris", k=6, weights=(1, 1, 0))
    assert [h.id for h in big] == [h.id for h in ref]
    assert all(np.isfinite(h.score) for h in big)


@pytest.mark.parametrize("engine", ["ram", "disk"])
def test_filters_match_bools_as_bools_and_numbers_as_numbers(
    tiny_encoder: M3Encoder, tmp_path: Path, engine: str
) -> None:
    """JSON equality, not Python's: ``{"a": True}`` does not match ``a == 1`` (``True == 1``
    in Python), ``{"a": 1}`` does not match ``a == True``; ``1`` and ``1.0`` are one number.
    The server engines' translations are held to the same cases in their own tests."""
    metas: dict[str, dict[str, Any]] = {
        "T": {"a": True},
        "F": {"a": False},
        "i1": {"a": 1},
        "f1": {"a": 1.0},
        "i0": {"a": 0},
        "f0": {"a": 0.0},
        "s1": {"a": "1"},
        "list": {"a": [True, 1]},
        "none": {},
    }
    backend = LocalBackend() if engine == "ram" else LocalBackend(tmp_path / "idx")
    r = HybridRetriever(tiny_encoder, backend=backend)
    r.add_texts([f"passage {i}" for i in metas], list(metas.values()), list(metas))
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"a": True}, {"T"}),
        ({"a": False}, {"F"}),
        ({"a": 1}, {"i1", "f1"}),
        ({"a": 1.0}, {"i1", "f1"}),
        ({"a": 0}, {"i0", "f0"}),
        ({"a": "1"}, {"s1"}),
        ({"a": [True, 0]}, {"T", "i0", "f0"}),
        ({"a": (1, 2)}, {"i1", "f1"}),
        ({"a": [False, True]}, {"T", "F"}),
    ]
    for flt, want in cases:
        assert set(r.select(flt)) == want, flt
        assert {h.id for h in r.search("passage", k=20, filter=flt)} == want, flt
        assert {i for i, m in metas.items() if matches(m, flt)} == want, flt
    # the callable filter is the caller's own Python: True == 1 there
    assert set(r.select(lambda m: m.get("a") == 1)) == {"T", "i1", "f1"}
    both = all_of({"a": 1}, lambda m: True)
    assert {i for i, m in metas.items() if matches(m, both)} == {"i1", "f1"}


def test_metadata_is_never_aliased(r: HybridRetriever, tmp_path: Path) -> None:
    meta = {"tags": ["a"], "nested": {"k": 1}}
    r.add_texts(["a passage about Paris"], [meta], ["alias"])
    meta["tags"].append("changed")  # the caller's dict
    meta["nested"]["k"] = 2
    hit = next(h for h in r.search("Paris", k=10) if h.id == "alias")
    assert hit.metadata == {"tags": ["a"], "nested": {"k": 1}}
    hit.metadata["tags"].append("changed")  # a returned hit
    hit.metadata["nested"]["k"] = 3
    again = next(h for h in r.search("Paris", k=10) if h.id == "alias")
    assert again.metadata == {"tags": ["a"], "nested": {"k": 1}}
    r.save(tmp_path / "idx")
    loaded = HybridRetriever.load(tmp_path / "idx", r.encoder)
    assert next(h for h in loaded.search("Paris", k=10) if h.id == "alias").metadata == {
        "tags": ["a"],
        "nested": {"k": 1},
    }


# ------------------------------------------------------------------------------ adapters
def test_langchain_adapter_ids_and_metadata(r: HybridRetriever) -> None:
    require("langchain_core", "pip install -e '.[langchain]'")
    from langchain_core.documents import Document
    from langchain_m3rag import M3Retriever

    lc = M3Retriever(retriever=r, k=10)
    with pytest.raises(TypeError, match=r"list of ids.*\['d1'\]"):
        lc.delete("d1")
    with pytest.raises(TypeError, match="list of ids"):
        lc.delete("ab")  # was: deletes "a" and "b"
    assert len(r) == 6
    docs = [
        Document(page_content="kept id", id="mine", metadata={"score": "user", "scores": [1]}),
        Document(page_content="no id here"),
    ]
    ids = lc.add_documents(docs)
    assert ids[0] == "mine" and ids[1] != "mine" and len(ids[1]) == 32  # a UUID for the other
    out = {d.id: d for d in lc.invoke("kept id")}
    got = out["mine"]
    assert got.metadata["score"] == "user" and got.metadata["scores"] == [1]  # untouched
    assert set(got.metadata["m3_rag_scores"]) >= {"score", "dense", "fused"}
    got.metadata["score"] = "mutated"
    assert {d.id: d for d in lc.invoke("kept id")}["mine"].metadata["score"] == "user"


def test_llama_index_adapter_delete_and_eq_filter(r: HybridRetriever) -> None:
    require("llama_index.core", "pip install -e '.[llama-index]'")
    from llama_index.core.vector_stores.types import (
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
    )
    from llama_index_m3rag import M3Retriever, to_core_filter

    li = M3Retriever(r, similarity_top_k=10)
    with pytest.raises(TypeError, match="list of ids"):
        li.delete("d1")
    assert len(r) == 6
    r.add_texts(
        ["list valued", "scalar valued"], [{"tags": ["a", "b"]}, {"tags": "a"}], ["list", "scalar"]
    )
    eq = to_core_filter(
        MetadataFilters(
            filters=[MetadataFilter(key="tags", value=["a", "b"], operator=FilterOperator.EQ)]
        )
    )
    any_of = to_core_filter(
        MetadataFilters(
            filters=[MetadataFilter(key="tags", value=["a", "b"], operator=FilterOperator.IN)]
        )
    )
    assert {h.id for h in r.search("valued", k=20, filter=eq)} == {"list"}  # equality
    assert {h.id for h in r.search("valued", k=20, filter=any_of)} == {"scalar"}  # any-of
    li.filters = MetadataFilters(
        filters=[MetadataFilter(key="tags", value=["a", "b"], operator=FilterOperator.EQ)]
    )
    assert [n.node.node_id for n in li.retrieve("valued")] == ["list"]

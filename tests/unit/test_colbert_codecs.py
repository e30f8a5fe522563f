"""ColBERT codecs and token pooling (m3_rag.codecs): shapes, round trips, scoring on codes
equal to brute force on the decoded vectors, the registry, pooling's determinism."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3_rag import scoring
from m3_rag.codecs import (
    ColbertCodec,
    codec_names,
    get_codec,
    pool_tokens,
    register_codec,
    rotation,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_builtin_codecs_are_registered_with_their_sizes() -> None:
    builtin = ("float16", "float32", "int8", "binary", "rotated-binary")
    assert codec_names()[:5] == builtin
    sizes = {name: get_codec(name).bytes_per_vector(1024) for name in builtin}
    assert sizes == {
        "float16": 2048,
        "float32": 4096,
        "int8": 1028,
        "binary": 128,
        "rotated-binary": 128,
    }
    assert get_codec("binary").width(13) == get_codec("rotated-binary").width(13) == 2
    with pytest.raises(ValueError, match=r"unknown ColBERT codec 'int4'.*binary"):
        get_codec("int4")


@pytest.mark.parametrize("dim", [8, 13, 64])
def test_binary_codes_are_sign_bits(dim: int) -> None:
    rng = np.random.default_rng(dim)
    x = _unit(rng, 7, dim)
    codec = get_codec("binary")
    codes, scales = codec.encode(x)
    assert scales is None and codes.dtype == np.uint8 and codes.shape == (7, -(-dim // 8))
    decoded = codec.decode(codes, None, dim)
    np.testing.assert_array_equal(decoded > 0, x > 0)
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, rtol=1e-6)  # unit
    # coding the decoded vectors again gives the same codes (a copy between indexes)
    np.testing.assert_array_equal(codec.encode(decoded)[0], codes)


ALL = ["float32", "float16", "int8", "binary", "rotated-binary"]


@pytest.mark.parametrize("name", ALL)
def test_decode_is_close_to_the_vectors(name: str) -> None:
    rng = np.random.default_rng(1)
    x = _unit(rng, 50, 32)
    codec = get_codec(name)
    codes, scales = codec.encode(x)
    assert codes.dtype == codec.dtype and (scales is not None) == codec.scaled
    y = codec.decode(codes, scales, 32)
    cos = (x * y).sum(axis=1) / np.linalg.norm(y, axis=1)
    floor = {"float32": 0.9999, "float16": 0.999, "int8": 0.999}.get(name, 0.6)
    assert cos.min() > floor


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    q_len=st.integers(1, 6),
    dim=st.sampled_from([5, 8, 16, 24]),
    name=st.sampled_from(ALL),
    seed=st.integers(0, 1000),
)
def test_scores_on_codes_equal_brute_force_on_decoded(
    lengths: list[int], q_len: int, dim: int, name: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    codec = get_codec(name)
    q = _unit(rng, q_len, dim)
    docs = [_unit(rng, n, dim) for n in lengths]
    packed = np.concatenate(docs) if sum(lengths) else np.zeros((0, dim), np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes, scales = codec.encode(packed)
    decoded = codec.decode(codes, scales, dim)
    want = [
        float((q @ decoded[a:b].T).max(axis=1).mean()) if b > a else 0.0
        for a, b in itertools.pairwise(offsets.tolist())
    ]
    rows = rng.permutation(len(lengths))
    got = scoring.colbert_scores_rows(q, codes, offsets, rows, chunk=3, scales=scales, codec=codec)
    np.testing.assert_allclose(got, np.asarray(want)[rows], atol=1e-5)


@pytest.mark.parametrize("name", ["binary", "rotated-binary"])
def test_binary_similarities_match_a_matmul_at_1024_dims(name: str) -> None:
    rng = np.random.default_rng(3)
    codec = get_codec(name)
    codes, _ = codec.encode(rng.standard_normal((300, 1024)).astype(np.float32))
    q = _unit(rng, 32, 1024)
    out = torch.empty(300, 32)
    codec.similarities(codec.prepare(q, 1024), torch.from_numpy(codes), None, out)
    np.testing.assert_allclose(out.numpy(), codec.decode(codes, None, 1024) @ q.T, atol=1e-5)


def test_a_registered_codec_is_used_by_name() -> None:
    class Halves(ColbertCodec):
        """float16 codes of half the vector (a toy: scores are the decoded ones)."""

        name: ClassVar[str] = "test-halves"
        dtype: ClassVar[np.dtype[Any]] = np.dtype(np.float16)

        def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            return (np.asarray(x, np.float32) / 2).astype(np.float16), None

        def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
            return np.asarray(codes, np.float32) * 2

    register_codec(Halves())
    assert get_codec("test-halves").name == "test-halves"
    register_codec(Halves())  # the same codec again: no error
    with pytest.raises(ValueError, match="registered already"):
        register_codec(type("Other", (Halves,), {})())
    with pytest.raises(TypeError, match="ColbertCodec"):
        register_codec("binary")  # type: ignore[arg-type]


def test_pooling_keeps_t_over_f_vectors_deterministically() -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 81, 16)
    assert pool_tokens(x, 1) is not None and pool_tokens(x, 1).shape == (81, 16)
    two = pool_tokens(x, 2)
    assert two.shape == (40, 16) and two.dtype == np.float32
    np.testing.assert_array_equal(two, pool_tokens(x.copy(), 2))  # deterministic
    assert pool_tokens(x, 3).shape == (27, 16)
    assert pool_tokens(x, 100).shape == (1, 16)  # at least one vector
    np.testing.assert_allclose(pool_tokens(x, 100)[0], x.mean(axis=0), atol=1e-6)
    assert pool_tokens(x[:1], 2).shape == (1, 16) and pool_tokens(x[:0], 2).shape == (0, 16)
    unit = pool_tokens(x, 2, renormalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_pooling_averages_clusters_of_near_duplicates() -> None:
    """Two groups of nearly equal tokens pool into the two group means, in the order of
    their first token."""
    rng = np.random.default_rng(6)
    a, b = _unit(rng, 2, 8)
    x = np.stack([a, b, a + 1e-3, b + 1e-3]).astype(np.float32)
    got = pool_tokens(x, 2)
    np.testing.assert_allclose(got, [a + 5e-4, b + 5e-4], atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_a_bad_pool_factor_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="pool_factor must be an int >= 1"):
        pool_tokens(np.zeros((3, 4), np.float32), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [1, 5, 8, 13, 384, 1024])
def test_rotation_is_orthogonal_and_fixed(dim: int) -> None:
    """The rotated-binary codec's matrix is orthogonal at every dimension (a power of two or
    not), mixes every dimension, and is built again identically."""
    r = rotation(dim)
    assert r.shape == (dim, dim) and r.dtype == np.float32 and not r.flags.writeable
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-5)
    if dim >= 8:
        assert (np.abs(r) > 1e-6).mean() > 0.9  # dense: no dimension is left as it was
    rotation.cache_clear()  # built again from scratch
    np.testing.assert_array_equal(rotation(dim), r)
    with pytest.raises(ValueError, match="positive integer"):
        rotation(0)


PINNED_16 = [[226, 15], [224, 36]]
PINNED_1024 = [190, 164, 227, 203, 211, 220, 92, 60]


def test_rotated_binary_codes_are_pinned() -> None:
    """An index records the codec's name, not its matrix: the codes of a fixed vector must
    never change (a changed rotation would silently mis-score every stored index)."""
    x = np.cos(np.arange(2 * 16, dtype=np.float32) * 0.7).reshape(2, 16)
    codes, scales = get_codec("rotated-binary").encode(x)
    assert scales is None and codes.tolist() == PINNED_16
    big = np.cos(np.arange(1024, dtype=np.float32) * 0.3)[None]
    assert get_codec("rotated-binary").encode(big)[0][0, :8].tolist() == PINNED_1024


def test_rotated_binary_spreads_concentrated_energy() -> None:
    """Vectors whose energy sits in a few dimensions (anisotropic token vectors): plain sign
    bits give those dimensions one bit each, as much as the near-empty others; rotated codes
    spread it, and their scores follow the exact ones much more closely."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((400, 64)).astype(np.float32)
    x[:, :8] *= 6.0  # eight dimensions hold ~80% of the energy
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.02 * rng.standard_normal((40, 64)).astype(np.float32)
    exact = q @ x.T
    corr = {}
    for name in ("binary", "rotated-binary"):
        codec = get_codec(name)
        decoded = codec.decode(*codec.encode(x), 64)
        corr[name] = np.mean(
            [np.corrcoef(a, b)[0, 1] for a, b in zip(exact, q @ decoded.T, strict=True)]
        )
    assert corr["rotated-binary"] > 0.9 and corr["binary"] < 0.8, corr


@pytest.mark.parametrize("name", ALL)
def test_float_vectors_score_as_the_decoded_codes(name: str) -> None:
    """What a float-storing engine (Qdrant) keeps and the query it sends score as MaxSim on
    the decoded codes; a binary code's float values give back its own bits."""
    rng = np.random.default_rng(4)
    codec = get_codec(name)
    codes, scales = codec.encode(_unit(rng, 30, 24))
    q = _unit(rng, 5, 24)
    want = q @ codec.decode(codes, scales, 24).T
    got = codec.float_query(q, 24) @ codec.float_vectors(codes, scales, 24).T
    np.testing.assert_allclose(got, want, atol=1e-5)
    if codec.dtype == np.uint8:
        np.testing.assert_array_equal(
            np.packbits(codec.float_vectors(codes, None, 24) > 0, 1), codes
        )
    if name == "rotated-binary":
        with pytest.raises(ValueError, match=r"\[q, 24\]"):
            codec.float_query(q[:, :12], 24)


def test_a_codec_chosen_alone_is_unpooled() -> None:
    from m3_rag.codecs import DEFAULT_POOL_FACTOR, default_pool_factor

    assert default_pool_factor(None) == DEFAULT_POOL_FACTOR == 2
    assert default_pool_factor("int8") == default_pool_factor("rotated-binary") == 1

"""The ``rotated-binary`` codec: sign bits of the vector after a fixed orthogonal rotation.

Sign bits of a raw ColBERT vector waste bits: token vectors are anisotropic, so a few
dimensions carry most of the energy and others nearly always have the same sign. Rotating
every vector (documents and queries alike) by one fixed orthogonal matrix ``R`` spreads the
energy over all dimensions before the sign is taken (the rotation of RaBitQ and of
Qdrant-style binary quantisation). Dot products are unchanged by ``R``, so a code stands
for ``R^T (±1 / sqrt(dim))``, still a unit vector, and the float query is rotated once per
search.

``R`` is a function of ``dim`` alone, written out here so that every version and machine
builds the same one: four rounds of random sign flips followed by an orthonormal
Walsh-Hadamard transform, alternately on the first and on the last ``2^k`` dimensions
(``2^k`` the largest power of two not above ``dim``, so every dimension is mixed when
``dim`` is not a power of two). The signs come from an integer hash (splitmix64) of the
dimension's index and the round, not from a random number generator whose stream could
change. It is built once per ``dim`` in float64 (additions and one scale per stage) and
kept as a float32 matrix.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from m3_rag.codecs.base import register_codec
from m3_rag.codecs.builtin import BinaryCodec

if TYPE_CHECKING:
    import torch

__all__ = ["RotatedBinaryCodec", "rotation"]

_ROUNDS = 4
_MASK = (1 << 64) - 1


def _signs(dim: int, salt: int) -> np.ndarray:
    """``[dim]`` float64 of ±1: the low bit of splitmix64 of ``index + salt * golden``."""
    out = np.empty(dim, dtype=np.float64)
    for i in range(dim):
        z = (i + (salt + 1) * 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        out[i] = -1.0 if z & 1 else 1.0
    return out


def _hadamard(y: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of the rows of ``y [n, 2^k]`` (float64)."""
    n, width = y.shape
    h = 1
    while h < width:
        y = y.reshape(n, -1, 2, h)
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2)
        y = y.reshape(n, width) * np.sqrt(0.5)
        h *= 2
    return y


@functools.lru_cache(maxsize=8)
def rotation(dim: int) -> np.ndarray:
    """The ``[dim, dim]`` float32 orthogonal matrix ``R`` of ``rotated-binary`` codes
    (``codes = packbits(x @ R.T > 0)``).

    Raises:
        ValueError: ``dim`` is not a positive integer.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    k = 1 << (dim.bit_length() - 1)  # the largest power of two <= dim
    y = np.eye(dim, dtype=np.float64)  # row i: the image of e_i, built one round at a time
    for r in range(_ROUNDS):
        y = y * _signs(dim, r)
        part = slice(0, k) if r % 2 == 0 else slice(dim - k, dim)
        y[:, part] = _hadamard(np.ascontiguousarray(y[:, part]))
    # row i of y is R e_i, so y = R^T
    matrix = np.ascontiguousarray(y.T, dtype=np.float32)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=8)
def _rotation_t(dim: int) -> torch.Tensor:
    """``rotation(dim).T`` as a contiguous torch tensor. Products with it run on torch's
    threads: numpy's BLAS has a thread pool of its own, and the two pools contending made
    a search's ColBERT stage ~15x slower at the 95th percentile with 2 torch threads
    (82 vs 5.5 ms for 200 candidates, measured here)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rotation(dim).T).copy())


def _rotate(x: np.ndarray) -> np.ndarray:
    """``x @ R.T`` for ``[n, dim]`` float32 ``x`` (torch's matrix product)."""
    import torch

    return torch.mm(torch.from_numpy(np.ascontiguousarray(x)), _rotation_t(x.shape[1])).numpy()


def _rotated(query: np.ndarray, dim: int) -> np.ndarray:
    """``[q, dim]`` float32 query vectors rotated, ``q @ R.T``.

    Raises:
        ValueError: not ``[q, dim]``.
    """
    q = np.asarray(query, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"expected [q, {dim}] query vectors, got shape {q.shape}")
    return _rotate(q)


class RotatedBinaryCodec(BinaryCodec):
    """One sign bit per dimension of ``R x`` (:func:`rotation`), ``ceil(dim / 8)`` bytes.

    Scored as :class:`~m3_rag.codecs.BinaryCodec` scores, against the rotated query
    (``R q``): ``q . (R^T c) == (R q) . c``.
    """

    name: ClassVar[str] = "rotated-binary"

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected [T, dim] vectors, got shape {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.width(x.shape[1])), np.uint8), None
        return super().encode(_rotate(x))

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        return super().decode(codes, scales, dim) @ rotation(dim)

    def float_vectors(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        """The codes' own ``±1 / sqrt(dim)`` values (not rotated back): an engine's binary
        quantisation of them gives back exactly the stored bits."""
        return super().decode(codes, scales, dim)

    def float_query(self, query: np.ndarray, dim: int) -> np.ndarray:
        """The rotated query ``R q``."""
        return _rotated(query, dim)

    def prepare(self, query: np.ndarray, dim: int) -> Any:
        return super().prepare(_rotated(query, dim), dim)


register_codec(RotatedBinaryCodec())

"""The built-in ColBERT codecs: ``float32``, ``float16``, ``int8`` and ``binary``.

Bytes per vector at ``dim`` dimensions: float32 ``4 dim``, float16 ``2 dim``, int8
``dim + 4`` (codes and a float32 scale), binary ``ceil(dim / 8)`` (one sign bit per
dimension).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from m3_rag.codecs.base import ColbertCodec, register_codec

if TYPE_CHECKING:
    import torch

__all__ = ["BinaryCodec", "Float16Codec", "Float32Codec", "Int8Codec", "quantize_int8"]


class Float32Codec(ColbertCodec):
    """The vectors as float32 (no loss)."""

    name: ClassVar[str] = "float32"
    dtype: ClassVar[np.dtype[Any]] = np.dtype(np.float32)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return np.ascontiguousarray(x, dtype=self.dtype), None

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        return np.asarray(codes, dtype=np.float32)


class Float16Codec(Float32Codec):
    """The vectors rounded to float16."""

    name: ClassVar[str] = "float16"
    dtype: ClassVar[np.dtype[Any]] = np.dtype(np.float16)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8 quantisation.

    Args:
        x: ``[T, dim]`` float vectors.

    Returns:
        ``[T, dim]`` int8 codes and ``[T]`` float32 scales, ``x ~= codes * scales[:, None]``
        (absolute error at most ``scale / 2`` per component).
    """
    x = np.asarray(x, dtype=np.float32)
    scales = np.abs(x).max(axis=1) / 127 if len(x) else np.zeros(0, np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


class Int8Codec(ColbertCodec):
    """Symmetric per-vector int8 codes with a float32 scale (:func:`quantize_int8`)."""

    name: ClassVar[str] = "int8"
    dtype: ClassVar[np.dtype[Any]] = np.dtype(np.int8)
    scaled: ClassVar[bool] = True

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return quantize_int8(x)

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        if scales is None:
            raise ValueError("int8 ColBERT codes need their scales")
        return np.asarray(codes, np.float32) * np.asarray(scales, np.float32)[:, None]


# bit b (most significant first) of every byte value: [256, 8] float32
_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32)


class BinaryCodec(ColbertCodec):
    """One sign bit per dimension (``np.packbits(x > 0)``, ``ceil(dim / 8)`` bytes).

    A code stands for the vector ``±1 / sqrt(dim)`` per dimension (+ where the bit is set):
    a unit vector, so a MaxSim on codes is a cosine-like number comparable with the float
    codecs' scores. The query stays float. Scoring reads a lookup table of the query's
    partial sums, one entry per (byte position, byte value): ``2 * sum of the entries of a
    code's bytes - sum(q)``, divided by ``sqrt(dim)`` (``torch.embedding_bag``; no unpacking).
    """

    name: ClassVar[str] = "binary"
    dtype: ClassVar[np.dtype[Any]] = np.dtype(np.uint8)

    def width(self, dim: int) -> int:
        return -(-dim // 8)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected [T, dim] vectors, got shape {x.shape}")
        return np.packbits(x > 0, axis=1), None

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        bits = np.unpackbits(np.asarray(codes, np.uint8), axis=1, count=dim)
        return (bits.astype(np.float32) * 2 - 1) / np.float32(math.sqrt(dim))

    def prepare(self, query: np.ndarray, dim: int) -> Any:
        import torch

        q = np.ascontiguousarray(query, dtype=np.float32)
        width = self.width(dim)
        padded = np.zeros((len(q), width * 8), np.float32)  # padding bits are 0: no term
        padded[:, :dim] = q
        parts = torch.from_numpy(padded).reshape(len(q), width, 8).permute(1, 2, 0)  # [w,8,q]
        lut = (torch.from_numpy(_BITS) @ parts).reshape(width * 256, len(q))  # [w*256, q]
        base = torch.arange(width, dtype=torch.int32) * 256
        total = torch.from_numpy(q.sum(axis=1, dtype=np.float32))
        return lut, base, total, np.float32(1 / math.sqrt(dim))

    def similarities(
        self, prepared: Any, codes: torch.Tensor, scales: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        import torch

        lut, base, total, inv = prepared
        if len(codes) == 0:
            return
        index = codes.to(torch.int32)
        index += base
        sums = torch.nn.functional.embedding_bag(index, lut, mode="sum")  # [n, q]
        torch.mul(sums, 2, out=out)
        out -= total
        out *= float(inv)


for _codec in (Float16Codec(), Float32Codec(), Int8Codec(), BinaryCodec()):
    register_codec(_codec)

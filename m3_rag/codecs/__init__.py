"""ColBERT storage codecs (a registry: float32, float16, int8, binary, rotated-binary) and token
pooling."""

from __future__ import annotations

from m3_rag.codecs.base import (
    DEFAULT_CODEC,
    DEFAULT_POOL_FACTOR,
    ColbertCodec,
    codec_names,
    default_pool_factor,
    get_codec,
    register_codec,
)
from m3_rag.codecs.builtin import (
    BinaryCodec,
    Float16Codec,
    Float32Codec,
    Int8Codec,
    quantize_int8,
)
from m3_rag.codecs.pooling import check_pool_factor, pool_tokens
from m3_rag.codecs.rotated import RotatedBinaryCodec, rotation

__all__ = [
    "DEFAULT_CODEC",
    "DEFAULT_POOL_FACTOR",
    "BinaryCodec",
    "ColbertCodec",
    "Float16Codec",
    "Float32Codec",
    "Int8Codec",
    "RotatedBinaryCodec",
    "check_pool_factor",
    "codec_names",
    "default_pool_factor",
    "get_codec",
    "pool_tokens",
    "quantize_int8",
    "register_codec",
    "rotation",
]

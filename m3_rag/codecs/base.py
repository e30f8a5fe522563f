"""The ColBERT codec interface and its registry: one way to add a storage code.

A codec turns a document's ``[t, dim]`` float ColBERT vectors into stored codes (and back),
and scores a float query against stored codes. Engines store ``codes`` (and ``scales`` when
the codec has them) exactly as :meth:`ColbertCodec.encode` returns them; every search scores
them with :meth:`ColbertCodec.similarities`, so a score computed on codes equals the MaxSim of
the query against :meth:`ColbertCodec.decode` of the same codes (up to float rounding).

Adding a codec::

    class MyCodec(ColbertCodec):
        name = "my-code"
        ...

    register_codec(MyCodec())
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CODEC",
    "DEFAULT_POOL_FACTOR",
    "ColbertCodec",
    "codec_names",
    "default_pool_factor",
    "get_codec",
    "register_codec",
]

# what a new index of HybridRetriever stores when no codec is chosen (docs/colbert.md)
DEFAULT_CODEC = "rotated-binary"
DEFAULT_POOL_FACTOR = 2


def default_pool_factor(colbert_dtype: str | None) -> int:
    """The pool factor of a new index whose pool factor is not given: the default pair's
    (:data:`DEFAULT_POOL_FACTOR`) when the codec is not given either, else 1 (a codec chosen
    on its own, e.g. ``"int8"`` for exact scores, keeps every vector)."""
    return DEFAULT_POOL_FACTOR if colbert_dtype is None else 1


class ColbertCodec(ABC):
    """How ColBERT vectors are stored and scored (stateless; pure functions of the input).

    Attributes:
        name: The name an :class:`~m3_rag.spec.IndexSpec` records (``colbert_dtype``).
        dtype: The numpy dtype of the stored codes.
        scaled: Whether the codes come with one float32 scale per vector.
    """

    name: ClassVar[str]
    dtype: ClassVar[np.dtype[Any]]
    scaled: ClassVar[bool] = False

    def width(self, dim: int) -> int:
        """Stored columns per vector for ``dim``-dimensional vectors."""
        return dim

    def bytes_per_vector(self, dim: int) -> int:
        """Bytes stored per vector (codes and scale)."""
        return self.width(dim) * self.dtype.itemsize + (4 if self.scaled else 0)

    @abstractmethod
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Code ``[T, dim]`` float32 vectors -> ``([T, width] codes, [T] float32 scales or
        None)``."""

    @abstractmethod
    def decode(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        """The ``[T, dim]`` float32 vectors the codes stand for (what scores are computed
        against)."""

    def float_vectors(self, codes: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
        """``[T, dim]`` float32 vectors an engine that stores floats (Qdrant) keeps for these
        codes; it scores them by their dot product with :meth:`float_query` of the query,
        which equals the query's dot product with :meth:`decode` (default: the decoded
        vectors, and the query itself)."""
        return self.decode(codes, scales, dim)

    def float_query(self, query: np.ndarray, dim: int) -> np.ndarray:
        """``[q, dim]`` float32: the query vectors to score :meth:`float_vectors` with."""
        return np.asarray(query, dtype=np.float32)

    def prepare(self, query: np.ndarray, dim: int) -> Any:
        """Whatever :meth:`similarities` needs of one ``[q, dim]`` float32 query, computed
        once per search (default: the transposed query, a ``[dim, q]`` tensor)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).T

    def similarities(
        self, prepared: Any, codes: torch.Tensor, scales: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """Write the dot products of ``n`` decoded vectors with each query vector.

        Args:
            prepared: :meth:`prepare` of the query.
            codes: ``[n, width]`` stored codes.
            scales: ``[n]`` float32 scales (scaled codecs), else ``None``.
            out: ``[n, q]`` float32, written in place.
        """
        import torch

        torch.mm(codes.float(), prepared, out=out)
        if scales is not None:  # (scale * codes) . q == scale * (codes . q)
            out *= scales[:, None]


_CODECS: dict[str, ColbertCodec] = {}


def register_codec(codec: ColbertCodec) -> ColbertCodec:
    """Make ``codec`` available under ``codec.name`` (an index records that name).

    Raises:
        TypeError: not a :class:`ColbertCodec`.
        ValueError: the name is taken by another codec.
    """
    if not isinstance(codec, ColbertCodec):
        raise TypeError(f"codec must be a ColbertCodec, got {type(codec).__name__}")
    old = _CODECS.get(codec.name)
    if old is not None and type(old) is not type(codec):
        raise ValueError(f"a ColBERT codec named {codec.name!r} is registered already")
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> ColbertCodec:
    """The codec registered as ``name``.

    Raises:
        ValueError: no such codec (the message lists the registered ones).
    """
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown ColBERT codec {name!r}; choose one of {codec_names()}") from None


def codec_names() -> tuple[str, ...]:
    """The registered codecs' names, in registration order."""
    return tuple(_CODECS)

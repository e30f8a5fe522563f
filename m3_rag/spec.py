"""The index specification: what an index holds, serialised and checked in one place.

Every engine records :meth:`IndexSpec.to_json` beside its documents (the local engine in its
manifest, Milvus and Qdrant in the collection) and checks it on reopening with
:meth:`IndexSpec.check_stored`; :meth:`IndexSpec.from_json` reads a stored record back.
Records written by earlier versions (keys present for legs the index does not have, no
``analyzer`` for a BM25 index of the model's tokens) read as the same specification.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from m3_rag.bm25 import BM25Params
from m3_rag.codecs import check_pool_factor, codec_names
from m3_rag.errors import IndexFormatError, IndexMismatchError

__all__ = [
    "COLBERT_DTYPES",
    "DENSE_DTYPES",
    "LEXICAL_KINDS",
    "IndexSpec",
    "LexicalKind",
    "SettingMismatchError",
]

LexicalKind = Literal["m3", "bm25"]
LEXICAL_KINDS: tuple[str, ...] = get_args(LexicalKind)
DENSE_DTYPES = ("float32", "float16")
COLBERT_DTYPES = ("float16", "float32", "int8", "binary", "rotated-binary")  # the built-in codecs
# what must match for an index to be reopened (the model may differ on request)
_CHECKED = (
    "dense_dim",
    "dense_dtype",
    "colbert_dim",
    "colbert_dtype",
    "colbert_pool_factor",
    "lexical",
    "vocab_size",
    "bm25",
    "analyzer",
)


class SettingMismatchError(IndexMismatchError):
    """One setting of a stored index differs (:meth:`IndexSpec.check_stored`).

    Attributes:
        key: The setting (a key of :meth:`IndexSpec.to_json`).
        stored: The stored specification.
    """

    def __init__(self, message: str, key: str, stored: IndexSpec) -> None:
        super().__init__(message)
        self.key = key
        self.stored = stored


@dataclass(frozen=True)
class IndexSpec:
    """What a retriever needs an index to hold (fixed for the life of the index).

    Attributes:
        model: Encoder model name (an index refuses an encoder of another model).
        dense_dim: Dense vector size.
        colbert_dim: ColBERT vector size, ``None`` when the model has no ColBERT head.
        lexical: The lexical leg's kind, ``"m3"`` or ``"bm25"``, or ``None`` (no lexical leg).
        vocab_size: Term-id space of the lexical leg.
        dense_dtype: Dense storage dtype, one of :data:`DENSE_DTYPES`.
        colbert_dtype: ColBERT storage code, one of :data:`COLBERT_DTYPES` (or a codec
            registered with :func:`m3_rag.codecs.register_codec`).
        colbert_pool_factor: Token pooling of documents' ColBERT vectors at index time
            (1: none; ``f``: at most ``t // f`` vectors per document). Records without it
            read as 1.
        bm25: BM25 parameters (defaults when ``None`` and the leg is BM25).
        analyzer: The BM25 analyzer's configuration (``"model"``, a
            :meth:`~m3_rag.analysis.UnicodeAnalyzer.config` dict, ``"callable"``), or ``None``.
    """

    model: str
    dense_dim: int
    colbert_dim: int | None
    lexical: LexicalKind | None
    vocab_size: int
    dense_dtype: str = "float32"
    colbert_dtype: str = "float16"
    colbert_pool_factor: int = 1
    bm25: BM25Params | None = field(default=None)
    analyzer: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a str, got {type(self.model).__name__}")
        if not _is_int(self.dense_dim):
            raise ValueError(f"dense_dim must be an int >= 1, got {self.dense_dim!r}")
        if self.colbert_dim is not None and not _is_int(self.colbert_dim):
            raise ValueError(f"colbert_dim must be an int >= 1 or None, got {self.colbert_dim!r}")
        if self.lexical is not None and self.lexical not in LEXICAL_KINDS:
            raise ValueError(
                f"lexical must be one of {LEXICAL_KINDS} or None, got {self.lexical!r}"
            )
        if not _is_int(self.vocab_size, 0):
            raise ValueError(f"vocab_size must be an int >= 0, got {self.vocab_size!r}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"dense_dtype must be one of {DENSE_DTYPES}, got {self.dense_dtype!r}")
        if not isinstance(self.colbert_dtype, str) or self.colbert_dtype not in codec_names():
            raise ValueError(
                f"colbert_dtype must be one of {codec_names()}, got {self.colbert_dtype!r}"
            )
        check_pool_factor(self.colbert_pool_factor)
        if self.bm25 is not None and not isinstance(self.bm25, BM25Params):
            raise TypeError(f"bm25 must be a BM25Params, got {type(self.bm25).__name__}")
        if self.lexical == "bm25" and self.bm25 is None:
            object.__setattr__(self, "bm25", BM25Params())
        if self.lexical == "bm25" and self.analyzer is None:
            object.__setattr__(self, "analyzer", "model")  # the model's own tokens

    @property
    def bm25_params(self) -> BM25Params:
        """The BM25 parameters in force (the defaults when none were given)."""
        return self.bm25 or BM25Params()

    def to_json(self) -> dict[str, Any]:
        """The record an engine stores (JSON types only; ``None`` for absent legs)."""
        bm25 = self.lexical == "bm25"
        return {
            "model": self.model,
            "dense_dim": self.dense_dim,
            "dense_dtype": self.dense_dtype,
            "colbert_dim": self.colbert_dim,
            "colbert_dtype": self.colbert_dtype if self.colbert_dim else None,
            "colbert_pool_factor": self.colbert_pool_factor if self.colbert_dim else None,
            "lexical": self.lexical,
            "vocab_size": self.vocab_size if self.lexical else None,
            "bm25": self.bm25_params.as_dict() if bm25 else None,
            "analyzer": self.analyzer if bm25 else None,
        }

    @classmethod
    def from_json(cls, record: Any, where: str) -> IndexSpec:
        """Read a stored record (this version's or an earlier one's).

        Args:
            record: The stored mapping.
            where: What holds it, for messages (a file, a collection).

        Raises:
            IndexFormatError: a missing key or a value of the wrong type or range, named.
        """
        if not isinstance(record, Mapping):
            raise IndexFormatError(f"{where}: the index specification is not a JSON object")
        rec = dict(record)
        rec.setdefault("dense_dtype", "float32")
        lexical = rec.get("lexical")
        if lexical == "bm25" and rec.get("analyzer") is None:
            rec["analyzer"] = "model"  # indexes from before the analyzer: the model's tokens
        bm25 = rec.get("bm25") if lexical == "bm25" else None
        try:
            if bm25 is not None and not (
                isinstance(bm25, dict) and set(bm25) <= {"k1", "b", "epsilon"}
            ):
                raise ValueError(f"bad bm25 {bm25!r}")
            return cls(
                model=rec["model"],
                dense_dim=rec["dense_dim"],
                colbert_dim=rec.get("colbert_dim"),
                lexical=lexical,
                vocab_size=(rec.get("vocab_size") or 0) if lexical else 0,
                dense_dtype=rec["dense_dtype"],
                colbert_dtype=(rec.get("colbert_dtype") or "float16"),
                colbert_pool_factor=(rec.get("colbert_pool_factor") or 1),
                bm25=BM25Params(**bm25) if bm25 is not None else None,
                analyzer=rec.get("analyzer") if lexical == "bm25" else None,
            )
        except KeyError as e:
            raise IndexFormatError(
                f"{where}: the index specification has no {e.args[0]!r}"
            ) from None
        except (TypeError, ValueError) as e:
            raise IndexFormatError(f"{where}: bad index specification: {e}") from None

    def check_stored(
        self, stored: Any, where: str, *, allow_model_mismatch: bool = False
    ) -> IndexSpec:
        """Refuse to open the index recorded as ``stored`` with this specification.

        Args:
            stored: The record the index holds.
            where: The index (directory or collection), for messages.
            allow_model_mismatch: Accept another model name (the same model from another
                path); every shape must still match.

        Returns:
            The stored specification.

        Raises:
            IndexFormatError: ``stored`` is not a valid record.
            IndexMismatchError: another model (unless allowed); a
                :class:`SettingMismatchError` for another setting, named.
        """
        other = IndexSpec.from_json(stored, where)
        if other.model != self.model and not allow_model_mismatch:
            raise IndexMismatchError(
                f"{where} was built with model {other.model!r}, the encoder is {self.model!r}; "
                "pass allow_model_mismatch=True if they are the same model"
            )
        mine, theirs = self.to_json(), other.to_json()
        for key in _CHECKED:
            if mine[key] != theirs[key]:
                raise SettingMismatchError(
                    f"{where} has {key}={theirs[key]!r}, this retriever needs {mine[key]!r}: "
                    "open it with the settings it was built with",
                    key,
                    other,
                )
        return other


def _is_int(x: Any, minimum: int = 1) -> bool:
    return type(x) is int and x >= minimum

"""What the server engines (Milvus, Qdrant) share: the check of a collection's record on
reopening, the int64 check of metadata, and the methods that only read the retriever's
spec or a search's fetched documents.

The configuration a collection records is :meth:`~m3_rag.spec.IndexSpec.to_json` plus the
engine's own keys; reopening checks it with :meth:`~m3_rag.spec.IndexSpec.check_stored`."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from m3_rag.backends.protocol import Candidates, IndexSpec
from m3_rag.errors import IndexFormatError

__all__ = ["ServerEngine", "check_int64", "check_record"]

_INT64 = (-(2**63), 2**63 - 1)


def check_record(
    stored: Any,
    spec: IndexSpec,
    name: str,
    formats: tuple[int, ...],
    *,
    allow_model_mismatch: bool,
) -> IndexSpec:
    """Refuse to reopen collection ``name``, recording ``stored`` (``spec.to_json()`` and
    the engine's ``format``), for ``spec``.

    Returns:
        The stored specification.

    Raises:
        IndexFormatError: a format not in ``formats``, or an unreadable record.
        IndexMismatchError: another model (unless allowed) or another setting, named.
    """
    where = f"collection {name!r}"
    fmt = stored.get("format") if isinstance(stored, dict) else None
    if fmt not in formats:
        raise IndexFormatError(
            f"{where} has format {fmt!r}; this version reads formats {list(formats)}: "
            "use the m3-rag version that wrote it, or another collection"
        )
    return spec.check_stored(stored, where, allow_model_mismatch=allow_model_mismatch)


def check_int64(value: Any, name: str, engine: str) -> None:
    """Refuse JSON ``value`` holding an integer outside int64 (what both engines store).

    Raises:
        ValueError: naming ``name`` and ``engine``.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise ValueError(
                f"{name} holds the integer {v}, outside {engine}'s 64-bit range; store it as a str"
            )


class ServerEngine:
    """The parts of a server engine's :class:`~m3_rag.backends.protocol.Backend` that only
    read ``spec`` or the documents a search fetched into ``Candidates.payload`` as
    ``(id, text, metadata)``."""

    spec: IndexSpec | None
    collection: str

    def _check_rebind(self, spec: IndexSpec) -> None:
        """Refuse to open an engine already open for another spec."""
        if self.spec is not None and self.spec != spec:
            raise ValueError(f"{self!r} is already open for another index")

    def _foreign(self) -> IndexFormatError:
        """The error for a collection of this name that m3-rag did not create."""
        return IndexFormatError(
            f"collection {self.collection!r} exists but was not created by m3-rag; "
            "pick another collection name"
        )

    def _spec(self) -> IndexSpec:
        if self.spec is None:
            raise ValueError(f"{self!r} is not open: pass it to HybridRetriever(backend=...)")
        return self.spec

    def known_empty(self) -> bool:
        """Never claims emptiness (counting would cost a round trip)."""
        return False

    def documents(
        self, cands: Candidates, order: np.ndarray
    ) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (cands.payload[i][0], cands.payload[i][1], copy.deepcopy(cands.payload[i][2]))
            for i in order.tolist()
        ]

"""Metadata filters as Milvus boolean expressions (the Milvus engine's own translation)."""

from __future__ import annotations

import json
import math

from m3_rag.filters import Filter, check_filter

__all__ = ["milvus_expr", "milvus_literal"]


def milvus_literal(value: str | int | float | bool) -> str:
    """A Milvus boolean-expression literal for a str, int, float or bool.

    Raises:
        ValueError: a control character in a string or a non-finite float (Milvus
            expressions cannot hold them).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the Milvus backend cannot filter on {value!r}")
        return repr(value)
    if any(ord(ch) < 0x20 for ch in value):
        raise ValueError(
            f"the Milvus backend cannot match strings with control characters: {value!r}"
        )
    return json.dumps(value, ensure_ascii=False)


def milvus_expr(flt: Filter, field: str = "metadata") -> str:
    """Translate a dict filter to a Milvus boolean expression on a JSON ``field``.

    ``{"lang": "en", "year": [2023, 2024]}`` becomes
    ``(metadata["lang"] == "en") and (metadata["year"] == 2023 or metadata["year"] == 2024)``.

    The expression selects a superset of what the filter passes: a Milvus server compares
    a JSON value with a literal of its type (``== true`` reads a JSON bool, ``== 1`` an int
    or a float), but Milvus Lite 3 evaluates it in Python, where ``True == 1 == 1.0``, so
    there ``{"a": True}`` also selects a stored ``1`` or ``1.0``, and no expression tells
    them apart. The engine therefore checks every returned row's metadata with
    :func:`m3_rag.filters.filter_mask` (JSON's equality, as the local engine and Qdrant
    compare), in searches (:mod:`~m3_rag.backends.milvus.search`) and in ``select``.

    Raises:
        TypeError: a callable filter (a server cannot run Python; use a dict filter, or the
            local engine).
        ValueError: a ``None`` value (JSON null matching differs between Milvus versions).
    """
    flt = check_filter(flt)
    if flt is None:
        return ""
    if callable(flt):
        raise TypeError(
            "the Milvus backend needs a dict filter ({'key': value or [any, of]}); a callable "
            "filter runs in Python and works with the local engine (LocalBackend) only"
        )
    clauses = []
    for key, wanted in flt.items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        path = f"{field}[{milvus_literal(key)}]"
        terms = []
        for v in values:
            if v is None:
                raise ValueError(
                    f"filter[{key!r}] is None: the Milvus backend cannot match null values"
                )
            terms.append(f"{path} == {milvus_literal(v)}")
        clauses.append("(" + " or ".join(terms) + ")")
    return " and ".join(clauses)

"""Metadata filters as Qdrant filter objects (the Qdrant engine's own translation).

A filter is built from typed conditions, never from strings, so a value cannot change the
query; keys are quoted into Qdrant's JSON path so a key such as ``"a.b"`` or ``"x[]"``
addresses that one top-level metadata key, not a nested field or an array.
"""

from __future__ import annotations

import math
import re
from typing import Any

from m3_rag.filters import Filter, check_filter

__all__ = ["metadata_path", "qdrant_filter"]

_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")
_INT64 = (-(2**63), 2**63 - 1)
_EXACT_IN_DOUBLE = 2**53  # every int below it in magnitude is exact as a double


def metadata_path(key: str) -> str:
    """The Qdrant JSON path of top-level metadata key ``key``.

    Raises:
        ValueError: a key holding ``"`` (Qdrant's JSON path has no escape for it).
    """
    if _PLAIN.match(key):
        return f"metadata.{key}"
    if '"' in key:
        raise ValueError(f"the Qdrant backend cannot filter on a key holding '\"': {key!r}")
    return f'metadata."{key}"'


def qdrant_filter(flt: Filter) -> Any:
    """Translate a dict filter to a ``qdrant_client.models.Filter`` (``None`` for no filter).

    ``{"lang": "en", "year": [2023, 2024]}`` becomes ``must=[lang == "en", year == 2023 or
    year == 2024]``. The matches are the local engine's (:func:`m3_rag.filters.filter_mask`):
    strings and bools match by value and type (``MatchValue``/``MatchAny``: Qdrant keeps
    bools apart from numbers, so ``True`` never matches ``1``); a number matches any number
    equal to it, int or float (``Range(gte=v, lte=v)``, which no bool passes), except an int
    of magnitude ``2**53`` or more: it matches ints exactly (``MatchValue``; a double cannot
    tell it from its neighbours). One difference remains: Qdrant matches a scalar against
    every element of a list (``{"tag": "a"}`` passes ``tag == ["a", "b"]``), the local
    engine does not.

    Raises:
        TypeError: a callable filter (a server cannot run Python; use a dict filter, or the
            local engine).
        ValueError: a ``None`` value, an integer outside int64, a non-finite float, or a key
            holding ``"``.
    """
    from qdrant_client import models

    flt = check_filter(flt)
    if flt is None:
        return None
    if callable(flt):
        raise TypeError(
            "the Qdrant backend needs a dict filter ({'key': value or [any, of]}); a callable "
            "filter runs in Python and works with the local engine only"
        )
    must: list[Any] = []
    for key, wanted in flt.items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        path = metadata_path(key)
        for v in values:
            _check_value(key, v)
        if len(values) > 1 and {type(v) for v in values} == {str}:  # MatchAny: keywords
            must.append(models.FieldCondition(key=path, match=models.MatchAny(any=values)))
        elif len(values) == 1:
            must.append(_condition(models, path, values[0]))
        else:
            must.append(models.Filter(should=[_condition(models, path, v) for v in values]))
    return models.Filter(must=must)


def _check_value(key: str, v: Any) -> None:
    if v is None:
        raise ValueError(f"filter[{key!r}] is None: the Qdrant backend cannot match null values")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"filter[{key!r}] is {v!r}: the Qdrant backend cannot match it")
    if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
        raise ValueError(f"filter[{key!r}] = {v} is outside Qdrant's 64-bit integers")


def _condition(models: Any, path: str, v: str | int | float | bool) -> Any:
    if isinstance(v, (str, bool)) or abs(v) >= _EXACT_IN_DOUBLE:
        return models.FieldCondition(key=path, match=models.MatchValue(value=v))
    # a number: ints and floats equal to it (Qdrant's MatchValue(1) misses a stored 1.0)
    return models.FieldCondition(key=path, range=models.Range(gte=float(v), lte=float(v)))

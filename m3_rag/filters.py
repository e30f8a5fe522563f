"""Metadata filters: a dict of equality / any-of matches, or a callable ``metadata -> bool``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Filter", "all_of", "check_filter", "filter_mask", "matches"]

Filter = Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None

_MISSING = object()


def check_filter(flt: Any) -> Filter:
    """Validate a filter; return it unchanged.

    A dict maps metadata keys to a value (equality) or to a list/tuple/set of values (any-of).

    Raises:
        TypeError: not a dict, a callable or ``None``; or a non-str key.
        ValueError: an empty any-of list.
    """
    if flt is None or callable(flt):
        return flt
    if not isinstance(flt, Mapping):
        raise TypeError(
            f"filter must be a dict of metadata matches or a callable(metadata) -> bool, "
            f"got {type(flt).__name__}"
        )
    for key, value in flt.items():
        if not isinstance(key, str):
            raise TypeError(f"filter keys must be str, got {key!r}")
        values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if not values:
            raise ValueError(f"filter[{key!r}] is an empty list: nothing could match")
        for v in values:
            if not isinstance(v, (str, int, float, bool, type(None))):
                raise TypeError(
                    f"filter[{key!r}] values must be str, int, float, bool or None "
                    f"(a list means any-of), got {type(v).__name__}"
                )
    return flt


def filter_mask(metadatas: Sequence[Mapping[str, Any]], flt: Filter) -> np.ndarray | None:
    """``[n]`` bool mask of the documents that pass ``flt`` (``None`` when there is no filter).

    A dict filter compares whole metadata columns at once (numpy object arrays); a callable
    is called once per document with a copy-free read-only view of its metadata.

    Equality is JSON's, not Python's: a bool matches only a bool (``{"a": True}`` does not
    match ``a == 1`` nor ``a == 1.0``, and ``{"a": 1}`` does not match ``a == True``),
    numbers match numerically (``{"a": 1}`` matches ``a == 1.0``), and a list in the
    metadata matches no scalar (a filter list means any-of, not membership).
    """
    if flt is None:
        return None
    n = len(metadatas)
    if callable(flt):
        return np.fromiter((bool(flt(dict(m))) for m in metadatas), dtype=bool, count=n)
    mask = np.ones(n, dtype=bool)
    for key, wanted in flt.items():
        column = np.empty(n, dtype=object)
        column[:] = [m.get(key, _MISSING) for m in metadatas]
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        is_bool: np.ndarray | None = None  # computed once, when a number or bool is wanted
        hit = np.zeros(n, dtype=bool)
        for v in values:
            same = column == v  # elementwise on the object column; _MISSING equals nothing
            if isinstance(v, (bool, int, float)):  # Python's True == 1 == 1.0: split bools
                if is_bool is None:
                    is_bool = np.fromiter(
                        (isinstance(x, (bool, np.bool_)) for x in column), dtype=bool, count=n
                    )
                same &= is_bool if isinstance(v, bool) else ~is_bool
            hit |= same
        mask &= hit
        if not mask.any():
            break
    return mask


def matches(metadata: Mapping[str, Any], flt: Filter) -> bool:
    """Whether one document's metadata passes ``flt`` (every document passes ``None``)."""
    mask = filter_mask([metadata], flt)
    return True if mask is None else bool(mask[0])


def all_of(a: Filter, b: Filter) -> Filter:
    """The filter passing what both ``a`` and ``b`` pass: one dict when both are dicts on
    different keys (compared column-wise), else a callable."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, Mapping) and isinstance(b, Mapping) and not set(a) & set(b):
        return {**a, **b}

    def check(metadata: dict[str, Any]) -> bool:
        return matches(metadata, a) and matches(metadata, b)

    return check

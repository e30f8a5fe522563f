"""Validation of user input shared by the encoder, the reranker and the retriever."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """Return ``texts`` as a list of ``str`` or raise a ``TypeError`` naming the bad item.

    A single ``str`` is accepted and treated as a list of one text.

    Args:
        texts: A string, or an iterable of strings (list, tuple, generator...).
        name: The argument name used in error messages.

    Returns:
        A new list of strings, in input order.

    Raises:
        TypeError: ``texts`` is ``None``, bytes, a mapping, or holds a non-str item
            (``None``, a number, a nested list...); the message names the index.
    """
    if isinstance(texts, str):
        return [texts]
    if (
        texts is None
        or isinstance(texts, (bytes, bytearray, dict))
        or not isinstance(texts, Iterable)
    ):
        raise TypeError(
            f"{name} must be a list of str, got {type(texts).__name__}; "
            f"wrap a single text as [text]"
        )
    out = list(texts)
    if not all(type(t) is str for t in out):
        for i, t in enumerate(out):
            if not isinstance(t, str):
                raise TypeError(
                    f"{name}[{i}] is {type(t).__name__}, expected str; "
                    f"pass a flat list of strings (convert or drop that item)"
                )
    return out


def check_pairs(pairs: Any, name: str = "pairs") -> list[tuple[str, str]]:
    """Return ``pairs`` as a list of ``(query, passage)`` string tuples.

    A single pair ``(query, passage)`` is accepted as a list of one pair.

    Raises:
        TypeError: ``pairs`` is not a sequence of 2-item sequences of str; the
            message names the index.
    """
    if (
        isinstance(pairs, Sequence)
        and len(pairs) == 2
        and isinstance(pairs[0], str)
        and isinstance(pairs[1], str)
    ):
        return [(pairs[0], pairs[1])]
    if pairs is None or isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Iterable):
        raise TypeError(
            f"{name} must be a list of (query, passage) pairs, got {type(pairs).__name__}"
        )
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if (
            isinstance(pair, (str, bytes))
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise TypeError(
                f"{name}[{i}] must be a (query, passage) pair of two str, got {pair!r:.80}"
            )
        out.append((pair[0], pair[1]))
    return out

"""Validation of user input shared by the encoder, the reranker and the retriever."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCORES_KEY = "m3_rag_scores"
"""The metadata key under which the LangChain and LlamaIndex adapters return a hit's scores
(``{"score": final, "dense": ..., "fused": ...}``); reserved, so user metadata cannot hold it."""


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
    for i, t in enumerate(out):
        check_unicode(t, f"{name}[{i}]")
    return out


def check_unicode(text: str, name: str) -> str:
    """Refuse a string that cannot be written as UTF-8 (a lone surrogate, e.g. from bytes
    decoded with ``surrogateescape``): it would break every later save.

    Raises:
        ValueError: naming ``name`` and the position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} holds a lone surrogate at position {e.start} ({text[e.start]!r}), which "
            "is not valid Unicode text; decode the input as UTF-8 (errors='replace')"
        ) from None
    return text


def check_query(query: Any) -> str:
    """A non-blank ``str`` query.

    Raises:
        TypeError: not a str. ValueError: empty or blank, or not valid Unicode.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty or blank; pass the text to search for")
    return check_unicode(query, "query")


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


def check_weights(weights: Any) -> tuple[float, float, float]:
    """``(dense, lexical/sparse, colbert)`` weights: three finite numbers >= 0, positive sum."""
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"weights must be three numbers (dense, sparse, colbert), got {weights!r}"
        ) from e
    if (
        len(w) != 3
        or any(not np.isfinite(x) or x < 0 for x in w)
        or sum(w) <= 0
        or sum(w) > float(np.finfo(np.float32).max)
    ):
        raise ValueError(
            f"weights must be three finite numbers >= 0 with a positive sum that fits float32 "
            f"(e.g. 0.4,0.2,0.4), got {weights!r}"
        )
    return (w[0], w[1], w[2])


FUSIONS = ("weighted", "rrf")


def check_fusion(fusion: Any) -> str:
    """One of :data:`FUSIONS`.

    Raises:
        ValueError: anything else.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return str(fusion)


def check_count(value: Any, name: str, minimum: int) -> int:
    """An int ``>= minimum`` (a bool is not a count).

    Raises:
        TypeError: not an int. ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """``True`` or ``False`` itself: ``"no"``, ``0`` or ``None`` are not read as a switch.

    Raises:
        TypeError: anything but a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r:.80}")
    return bool(value)


def check_positive(value: Any, name: str) -> float:
    """A finite number ``> 0`` (an int stays an int; a bool or a numeric string is not one).

    Raises:
        TypeError: not an int or float. ValueError: not finite, or ``<= 0``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r:.80}")
    finite = isinstance(value, (int, np.integer)) or bool(np.isfinite(value))
    if not finite or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value if isinstance(value, int) else float(value)


def check_metadatas(metadatas: Any, n: int) -> list[dict[str, Any]]:
    if metadatas is None:
        return [{} for _ in range(n)]
    if isinstance(metadatas, (str, bytes, Mapping)) or not isinstance(metadatas, Sequence):
        raise TypeError(f"metadatas must be a list of dicts, got {type(metadatas).__name__}")
    if len(metadatas) != n:
        raise ValueError(f"got {len(metadatas)} metadatas for {n} texts")
    out = []
    for i, m in enumerate(metadatas):
        if m is None:
            m = {}
        out.append(check_metadata(m, f"metadatas[{i}]"))
    return out


def check_metadata(m: Any, name: str = "metadata") -> dict[str, Any]:
    """A private JSON copy of one metadata dict: what is stored is what :func:`json.loads`
    gives back after a save, and later changes to ``m`` do not reach the index.

    Raises:
        TypeError: not a dict with str keys, or a value JSON cannot hold.
        ValueError: NaN or infinity, or a string with a lone surrogate.
    """
    if not isinstance(m, Mapping) or not all(isinstance(key, str) for key in m):
        raise TypeError(f"{name} must be a dict with str keys, got {type(m).__name__}")
    if SCORES_KEY in m:
        raise ValueError(
            f"{name} uses the key {SCORES_KEY!r}, reserved for search scores; rename it"
        )
    try:
        text = json.dumps(m, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        if "Circular" in str(e):
            raise TypeError(f"{name} is not JSON-serialisable ({e})") from None
        raise ValueError(
            f"{name} holds NaN or infinity, which JSON cannot store; use None or a string"
        ) from None
    except (TypeError, RecursionError) as e:
        raise TypeError(
            f"{name} is not JSON-serialisable ({str(e)[:120]}); store plain values"
        ) from None
    check_unicode(text, name)
    copied: dict[str, Any] = json.loads(text)
    return copied

"""What every store shares: the id <-> row table, id validation, top-k selection.

Rows are kept compact: a delete removes the rows (no tombstones), so a deleted document can
never come back in results.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from m3_rag._inputs import check_unicode
from m3_rag.persist import read_index, write_index

__all__ = ["IdRows", "check_ids", "id_list", "top_k"]


def id_list(ids: Any) -> list[Any]:
    """``ids`` as a new list, its entries unchecked.

    Raises:
        TypeError: a bare ``str`` or ``bytes`` (it would be read as one id per character:
            ``delete("ab")`` must not delete ``"a"`` and ``"b"``), or not an iterable.
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"ids must be a list of ids, got a single {type(ids).__name__}; pass [{ids!r}]"
        )
    if not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list of str, got {type(ids).__name__}")
    return list(ids)


def check_ids(ids: Any, n: int | None = None) -> list[str]:
    """Validate document ids: a list of unique ``str``, ``n`` of them when given.

    Raises:
        TypeError: not a list of str (the message names the index).
        ValueError: duplicates within the call, or a count that does not match ``n``.
    """
    out = id_list(ids)
    for i, x in enumerate(out):
        if not isinstance(x, str):
            raise TypeError(f"ids[{i}] is {type(x).__name__}, expected str")
        if not x:
            raise ValueError(f"ids[{i}] is empty; ids must be non-empty strings")
        check_unicode(x, f"ids[{i}]")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(x for x in out if x in seen or seen.add(x))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate id {dup!r} in one call; ids must be unique")
    if n is not None and len(out) != n:
        raise ValueError(f"got {len(out)} ids for {n} items")
    return out


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``k`` highest scores, best first (ties by row), restricted to ``mask``.

    Args:
        scores: ``[n]`` scores.
        k: how many (all when ``k >= number of allowed rows``).
        mask: optional ``[n]`` bool, True for allowed rows.

    Returns:
        ``[min(k, allowed)]`` int64 row indices.
    """
    if mask is not None:
        allowed = np.flatnonzero(mask)
        sub = scores[allowed]
    else:
        allowed = None
        sub = scores
    k = min(int(k), len(sub))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(sub):  # all rows above the k-th score, then the lowest rows tied with it
        kth = np.partition(sub, len(sub) - k)[len(sub) - k]
        above = np.flatnonzero(sub > kth)
        part = np.concatenate([above, np.flatnonzero(sub == kth)[: k - len(above)]])
    else:
        part = np.arange(len(sub))
    part = part[np.lexsort((part, -sub[part]))]
    return (part if allowed is None else allowed[part]).astype(np.int64)


class IdRows:
    """The id <-> row table of a store (rows ``0..n-1``, in insertion order)."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._pos

    @property
    def ids(self) -> list[str]:
        """Document ids in row order (a copy)."""
        return list(self._ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id.

        Raises:
            KeyError: naming the first unknown id.
        """
        try:
            return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise KeyError(f"unknown id {e.args[0]!r}") from None

    def _existing_rows(self, ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._pos[i] for i in ids if i in self._pos), dtype=np.int64)

    def _append_ids(self, ids: Sequence[str]) -> None:
        start = len(self._ids)
        self._ids.extend(ids)
        self._pos.update(zip(ids, range(start, start + len(ids)), strict=True))

    def _keep_mask(self, rows: np.ndarray) -> np.ndarray:
        keep = np.ones(len(self._ids), dtype=bool)
        keep[rows] = False
        return keep

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """Constructor arguments that :meth:`load` needs (overridden by each store)."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist (overridden by each store)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this store alone to a directory (JSON manifest + ``.npy``, atomic, no pickle)."""
        manifest = {"store": type(self).__name__, "count": len(self), "config": self.config()}
        write_index(path, manifest, self.state(), ({"id": i} for i in self._ids))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Any:
        """Read a store written by :meth:`save`.

        Raises:
            FileNotFoundError: nothing saved at ``path``.
            ValueError: the directory holds another kind of store, or inconsistent arrays.
        """
        manifest, arrays, docs = read_index(path)
        if manifest.get("store") != cls.__name__:
            raise ValueError(f"{path} holds a {manifest.get('store')!r}, not a {cls.__name__}")
        # each store defines from_state(ids, arrays, **config) with its own config keys
        return cls.from_state([d["id"] for d in docs], arrays, **manifest["config"])  # type: ignore[attr-defined]

    def _drop_ids(self, keep: np.ndarray) -> None:
        self._ids = [i for i, k in zip(self._ids, keep.tolist(), strict=True) if k]
        self._pos = {i: r for r, i in enumerate(self._ids)}

"""Approximate dense search for large segments: a faiss IVF index with 8-bit scalar codes.

The index only proposes candidates; their dense scores are then computed exactly from the
stored vectors, so ``SearchHit.scores["dense"]`` is the same with or without it. faiss is
imported lazily (``pip install "m3-rag[ann]"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["DenseANN", "faiss_module"]


def faiss_module() -> Any:
    """Import faiss, or say which extra to install."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            'the approximate dense index needs faiss-cpu: pip install "m3-rag[ann]"'
        ) from e
    return faiss


class DenseANN:
    """IVF + SQ8 inner-product index over one segment's dense vectors (ids = segment rows).

    Args:
        index: A trained, filled ``faiss.IndexIVFScalarQuantizer``.
        nprobe: Inverted lists visited per query.
    """

    def __init__(self, index: Any, nprobe: int) -> None:
        self.index = index
        self.nprobe = int(nprobe)

    @classmethod
    def build(
        cls,
        read_rows: Any,
        n: int,
        dim: int,
        *,
        nprobe: int,
        nlist: int | None = None,
        train_size: int = 65536,
        chunk: int = 16384,
        seed: int = 0,
    ) -> DenseANN:
        """Train on a sample and add every row.

        Args:
            read_rows: ``read_rows(rows [m] int64) -> [m, dim]`` vectors (any float dtype).
            n: Number of rows.
            dim: Vector size.
            nprobe: Lists visited per query.
            nlist: Inverted lists (default ``4 * sqrt(n)``, the faiss guideline's low end,
                at most ``n / 39``).
            train_size: Rows sampled to train the coarse quantiser and the codes.
            chunk: Rows added at a time.
            seed: Sampling seed (the index is reproducible).
        """
        faiss = faiss_module()
        # faiss wants >= 39 training points per list
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.niter = 12  # k-means rounds (faiss: 25); recall is measured, not assumed
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, max(train_size, nlist * 39)), replace=False))
        index.train(np.ascontiguousarray(read_rows(sample), dtype=np.float32))
        for s in range(0, n, chunk):
            rows = np.arange(s, min(n, s + chunk), dtype=np.int64)
            index.add(np.ascontiguousarray(read_rows(rows), dtype=np.float32))
        return cls(index, nprobe)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
        """Rows of the approximate top-``k`` (at most ``k``), restricted to ``allowed``.

        Args:
            query: ``[dim]`` query vector.
            k: Rows wanted.
            allowed: ``[n]`` bool mask (live and passing the filter), or ``None`` for all.

        Returns:
            ``[<= k]`` int64 rows.
        """
        faiss = faiss_module()
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        bitmap = None
        if allowed is not None:
            bitmap = np.packbits(allowed, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        _, rows = self.index.search(q, int(k), params=params)
        del bitmap  # the selector read it during search
        out: np.ndarray = rows[0]
        return out[out >= 0].astype(np.int64)

    def write_to(self, write: Callable[[bytes], Any]) -> None:
        """Serialise the index through ``write(bytes)`` in pieces (never the whole of it in
        RAM a second time); :meth:`read_from` reads it back."""
        faiss = faiss_module()
        writer = faiss.PyCallbackIOWriter(lambda b: write(bytes(b)))
        faiss.write_index(self.index, writer)
        del writer  # flushes

    def nbytes(self) -> int:
        """Size of the serialised index (one counting pass, nothing kept)."""
        total = 0

        def count(b: bytes) -> int:
            nonlocal total
            total += len(b)
            return len(b)

        self.write_to(count)
        return total

    @classmethod
    def read_from(cls, read: Callable[[int], bytes], nprobe: int) -> DenseANN:
        """Deserialise an index written by :meth:`write_to`, reading it through
        ``read(n) -> at most n bytes`` in pieces: the serialised bytes are never in RAM
        beside the index (at 1M rows that copy was 1 GB, and faiss made another).

        Raises:
            ValueError: the bytes are not a faiss index (faiss's message).
        """
        faiss = faiss_module()
        reader = faiss.PyCallbackIOReader(read)
        try:
            index = faiss.read_index(reader)
        except RuntimeError as e:  # faiss reports a bad stream as RuntimeError
            raise ValueError(str(e).strip().splitlines()[-1]) from None
        finally:
            del reader
        return cls(index, nprobe)

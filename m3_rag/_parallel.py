"""Row-split parallelism for the memory-bound dense scan of a search.

A matrix-vector product over 100k x 1024 float32 rows is memory-bound. On 2 cores torch's own
threading of ``mv`` took 28 ms there, numpy's OpenBLAS 20 ms (the bandwidth), but OpenBLAS's
threads keep spinning after each call and made the torch ColBERT rescoring that follows 3x
slower. Splitting the rows over a few Python threads, each running torch with one thread,
takes 20 ms without a second thread pool fighting torch's.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["run_split", "split_ranges"]

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but not its threads


def _one_thread() -> None:
    # torch initialises a thread's OpenMP setting from its process-wide default at the
    # thread's first call: trigger that first, or it would later override the 1 set here
    torch.get_num_threads()
    torch.set_num_threads(1)  # this OS thread's OpenMP/MKL setting


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool is None or _pool_size < size or _pool_pid != os.getpid():
            threads = torch.get_num_threads()
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(size, "m3-rag-scan", initializer=_one_thread)
            barrier = threading.Barrier(size)  # start every worker now ...
            for f in [pool.submit(barrier.wait) for _ in range(size)]:
                f.result()
            # ... then undo the side effect of their set_num_threads(1) on torch's
            # process-wide default (read by threads that have not used torch yet)
            torch.set_num_threads(threads)
            _pool, _pool_size, _pool_pid = pool, size, os.getpid()
        return _pool


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)``, sizes within 1."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def run_split(fn: Callable[[int, int], None], n: int, min_rows: int) -> None:
    """Call ``fn(start, stop)`` over ``range(n)`` split in up to ``torch.get_num_threads()``
    ranges of at least ``min_rows`` rows, in parallel on worker threads that run torch with
    one thread each.

    ``fn`` must write disjoint outputs per range. With one range it runs inline, with the
    caller's torch threads. Exceptions of ``fn`` are re-raised here.
    """
    parts = min(torch.get_num_threads(), n // max(min_rows, 1))
    if parts <= 1:
        fn(0, n)
        return
    pool = _get_pool(parts)
    futures: list[Future[None]] = [pool.submit(fn, a, b) for a, b in split_ranges(n, parts)]
    for f in futures:
        f.result()

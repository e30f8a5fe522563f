"""Dynamic batching: every model call of the server runs in one worker thread, which merges
the requests waiting for it into one call of the encoder's batch plan.

Admission (:meth:`Batcher.admit`) bounds the requests in progress; a request hands its texts
in as a job (:meth:`Batcher.encode`, :meth:`Batcher.rerank`) and awaits a future. The worker
takes the oldest job and every waiting job with the same options, up to
``max_batch_tokens``; while admitted requests have not handed their texts in yet it waits for
them, at most ``max_wait_ms``. A merged call that fails is run again job by job, so that one
request's bad input fails that request alone.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3_rag.encoder import EncodeOutput, M3Encoder
from m3_rag.rerank import Reranker
from m3_rag.server.config import ServerConfig
from m3_rag.server.metrics import Metrics

__all__ = ["Batcher", "Busy", "Ticket"]

EncodeKey = tuple[str, str, int | None, bool, bool, bool]


class Busy(RuntimeError):
    """The server has as many requests in progress as it admits: retry later (503)."""


@dataclass
class Ticket:
    """One admitted request; ``arriving`` until it hands in its first job."""

    arriving: bool = True


_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "m3_rag_ticket", default=None
)


@dataclass
class _Job:
    key: tuple[Any, ...]
    items: list[Any]
    cost: int
    future: Future[Any] = field(default_factory=Future)


class Batcher:
    """The model worker.

    Args:
        encoder: The served encoder.
        reranker: The served reranker, if any.
        config: Limits and batching knobs.
        metrics: Where batch sizes are recorded.
    """

    def __init__(
        self,
        encoder: M3Encoder,
        reranker: Reranker | None,
        config: ServerConfig,
        metrics: Metrics,
    ) -> None:
        self.encoder, self.reranker, self.config, self.metrics = encoder, reranker, config, metrics
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._admitted = 0
        self._arriving = 0
        self._running = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="m3-rag-model", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; jobs still queued fail with :class:`Busy`."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ admission
    def admit(self) -> Ticket | None:
        """Admit one request to the model routes, or ``None`` when ``max_queue`` are in
        progress. The ticket is current in this context (and the threads it starts)."""
        with self._cond:
            if self._admitted >= self.config.max_queue:
                return None
            self._admitted += 1
            self._arriving += 1
        ticket = Ticket()
        _TICKET.set(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The admitted request finished (answered, failed or its client went away)."""
        with self._cond:
            self._admitted -= 1
            if ticket.arriving:
                ticket.arriving = False
                self._arriving -= 1
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Requests admitted and not finished."""
        return self._admitted

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return len(self._queue)

    # ------------------------------------------------------------ jobs
    def encode(
        self,
        texts: list[str],
        role: str,
        max_length: int | None,
        dense: bool,
        sparse: bool,
        colbert: bool,
        *,
        wake: bool = True,
    ) -> Future[EncodeOutput]:
        """Queue texts to encode (``role``: ``"query"`` or ``"document"``); with
        ``wake=False`` the worker is woken by a later :meth:`wake` (see :meth:`wake`)."""
        enc = self.encoder
        limit = max_length or (enc.query_max_length if role == "query" else enc.max_length)
        cost = sum(min(limit, len(t) + 2) for t in texts)
        key: EncodeKey = ("encode", role, max_length, dense, sparse, colbert)
        return self._submit(_Job(key, texts, cost), wake)

    def rerank(self, pairs: list[tuple[str, str]], *, wake: bool = True) -> Future[np.ndarray]:
        """Queue ``(query, passage)`` pairs to score (raw logits, float64)."""
        if self.reranker is None:
            raise ValueError("this server has no reranker: start it with --reranker")
        limit = self.reranker.max_length
        cost = sum(min(limit, len(q) + len(p) + 4) for q, p in pairs)
        return self._submit(_Job(("rerank",), pairs, cost), wake)

    def wake(self) -> None:
        """Wake the worker. A route on the event loop queues its job without waking it and
        schedules this with ``loop.call_soon``: the requests that arrived together run up to
        their own jobs first, so the worker finds them all queued (a burst of 16 one-text
        requests is one batch, not one alone and then 15)."""
        with self._cond:
            self._cond.notify_all()

    def _submit(self, job: _Job, wake: bool = True) -> Future[Any]:
        ticket = _TICKET.get()
        with self._cond:
            if self._stopped:
                raise Busy("the server is shutting down")
            if len(self._queue) >= 2 * self.config.max_queue:
                raise Busy("the model queue is full")
            if ticket is not None and ticket.arriving:
                ticket.arriving = False
                self._arriving -= 1
            self._queue.append(job)
            if wake:
                self._cond.notify_all()
        return job.future

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for job in self._queue:
                        job.future.cancel()
                    self._queue.clear()
                    return
                batch = self._take()
            if batch:
                try:
                    self._execute(batch)
                except BaseException as e:  # never a request left waiting, nor a dead worker
                    err = e if isinstance(e, Exception) else RuntimeError(repr(e))
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(err)

    def _take(self) -> list[_Job]:
        """The next batch (called holding the condition)."""
        first = self._pop_live()
        if first is None:
            return []
        batch, cost = [first], first.cost
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        limit = self.config.max_batch_tokens
        while True:
            for job in list(self._queue):
                if job.key == first.key and cost + job.cost <= limit:
                    self._queue.remove(job)
                    if job.future.set_running_or_notify_cancel():
                        batch.append(job)
                        cost += job.cost
            left = deadline - time.monotonic()
            if self._arriving <= 0 or cost >= limit or left <= 0 or self._stopped:
                return batch
            self._cond.wait(left)

    def _pop_live(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                return job
        return None

    def _execute(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = self._call(batch[0].key, [x for job in batch for x in job.items])
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # one request's input failed the merged call: run each on its own
                for job in batch:
                    try:
                        job.future.set_result(self._call(job.key, job.items))
                    except Exception as err:
                        job.future.set_exception(err)
            return
        finally:
            n_items = sum(len(job.items) for job in batch)
            kind = str(batch[0].key[0])
            self.metrics.observe_batch(kind, len(batch), n_items, time.perf_counter() - start)
        offset = 0
        for job in batch:
            end = offset + len(job.items)
            job.future.set_result(_slice(results, offset, end))
            offset = end

    def _call(self, key: tuple[Any, ...], items: list[Any]) -> Any:
        if key[0] == "rerank":
            assert self.reranker is not None
            scores = self.reranker.compute_score(items, show_progress=False)
            return np.asarray(scores, dtype=np.float64)
        _, role, max_length, dense, sparse, colbert = key
        enc = self.encoder
        fn = enc.encode_queries if role == "query" else enc.encode_documents
        kwargs: dict[str, Any] = {} if max_length is None else {"max_length": max_length}
        return fn(
            items,
            return_dense=dense,
            return_sparse=sparse,
            return_colbert=colbert,
            show_progress=False,
            **kwargs,
        )


def _slice(result: Any, a: int, b: int) -> Any:
    if isinstance(result, EncodeOutput):
        return EncodeOutput(
            dense=None if result.dense is None else result.dense[a:b],
            sparse=None if result.sparse is None else result.sparse[a:b],
            colbert=None if result.colbert is None else result.colbert[a:b],
            lengths=result.lengths[a:b],
        )
    return result[a:b]

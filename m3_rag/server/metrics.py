"""Prometheus text exposition (format 0.0.4), written by hand: request counts and latencies
per route, batch sizes, queue depth."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence

__all__ = ["Histogram", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Histogram:
    """Cumulative buckets, sum and count of observed values (not thread-safe by itself)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            acc += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {self.total!r}")
        out.append(f"{name}_count{braces} {self.n}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters and histograms (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, Histogram] = {}
        self._batch_texts: dict[str, Histogram] = {}
        self._batch_requests: dict[str, Histogram] = {}
        self._batch_seconds: dict[str, Histogram] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished request (``status`` 499: the client went away first)."""
        with self._lock:
            key = (route, method, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, kind: str, requests: int, texts: int, seconds: float) -> None:
        """One model call of the worker: how many requests and texts it merged."""
        with self._lock:
            self._batch_texts.setdefault(kind, Histogram(SIZE_BUCKETS)).observe(texts)
            self._batch_requests.setdefault(kind, Histogram(SIZE_BUCKETS)).observe(requests)
            self._batch_seconds.setdefault(kind, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def request_count(self, status_at_least: int = 0) -> int:
        """Requests finished with a status >= ``status_at_least``."""
        with self._lock:
            return sum(n for (_, _, s), n in self._requests.items() if s >= status_at_least)

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to ``(help, value)``."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP m3rag_requests_total HTTP requests by route, method and status.",
                "# TYPE m3rag_requests_total counter",
            ]
            for (route, method, status), n in sorted(self._requests.items()):
                out.append(
                    f'm3rag_requests_total{{route="{_label(route)}",method="{method}",'
                    f'status="{status}"}} {n}'
                )
            self._family(
                out,
                "m3rag_request_duration_seconds",
                "Request latency by route.",
                self._latency,
                "route",
            )
            self._family(
                out,
                "m3rag_batch_texts",
                "Texts (or pairs) per model call.",
                self._batch_texts,
                "kind",
            )
            self._family(
                out,
                "m3rag_batch_requests",
                "Requests merged into one model call.",
                self._batch_requests,
                "kind",
            )
            self._family(
                out,
                "m3rag_batch_duration_seconds",
                "Seconds per model call.",
                self._batch_seconds,
                "kind",
            )
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value!r}"]
        return "\n".join(out) + "\n"

    @staticmethod
    def _family(
        out: list[str], name: str, help_text: str, hists: dict[str, Histogram], label: str
    ) -> None:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for key, hist in sorted(hists.items()):
            out += hist.lines(name, f'{label}="{_label(key)}"')

"""Prometheus metrics of one server, in its own registry (several servers can share a process).

Worker processes (``serve --workers N``, :mod:`latentsearch.server.supervisor`) use
prometheus-client's multiprocess mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a
directory before it starts them, every worker's values live in memory-mapped files there, and the
supervisor alone serves ``/metrics`` (:func:`serve_multiprocess`): counters and histograms summed
over workers (dead ones included, so totals never go back), and gauges per live worker (a ``pid``
label: queue depth, calls in flight, the version served as ``latentsearch_index_version``). Info
metrics do not exist in that mode; ``latentsearch_index_info`` is left out of it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from latentsearch.server.ports import bind_error

__all__ = ["MULTIPROC_ENV", "MetricsHttp", "ServerMetrics", "serve_multiprocess"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The environment variable prometheus-client reads at import to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Gauges in multiprocess mode: one sample per live worker process (a pid label).
_PER_WORKER: Final = "liveall"


class ServerMetrics:
    """Requests by method and code, latencies, batch sizes, queue depth and the served index."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "latentsearch_requests",
            "RPCs answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "latentsearch_request_seconds",
            "RPC latency in seconds, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "latentsearch_batch_size",
            "Nearest calls answered by one search_batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_search = Histogram(
            "latentsearch_batch_search_seconds",
            "Wall-clock seconds of one batched Nearest round on a search thread (search and replies)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "latentsearch_queue_depth",
            "Nearest calls waiting to be batched",
            registry=r,
            multiprocess_mode=_PER_WORKER,
        )
        self.inflight = Gauge(
            "latentsearch_inflight",
            "Calls queued for or running on the search threads outside the batcher",
            registry=r,
            multiprocess_mode=_PER_WORKER,
        )
        self.malformed = Counter(
            "latentsearch_malformed_requests",
            "Requests whose bytes did not parse as the method's request message (answered "
            "INVALID_ARGUMENT), by method",
            ["method"],
            registry=r,
        )
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.index: Info | None = None
        if not self.multiprocess:  # Info does not exist in multiprocess mode
            self.index = Info("latentsearch_index", "The index version being served", registry=r)
        self.version = Gauge(
            "latentsearch_index_version",
            "1 for the index version being served (0 for versions served before it)",
            ["version"],
            registry=r,
            multiprocess_mode=_PER_WORKER,
        )
        self._version: str | None = None
        self.items = Gauge(
            "latentsearch_index_items", "Items in the served index", registry=r, multiprocess_mode=_PER_WORKER
        )
        self.reloads = Counter(
            "latentsearch_index_reloads", "Index reload attempts, by result", ["result"], registry=r
        )
        self.fallback = Gauge(
            "latentsearch_index_fallback",
            "1 while the served index version is not the one CURRENT names (that one failed to load "
            "or verify), else 0",
            registry=r,
            multiprocess_mode=_PER_WORKER,
        )
        # The bound inc / observe of the label children by (method, code): labels() takes a lock
        # and builds a key on every call.
        self._children: dict[tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one answered RPC and its latency."""
        children = self._children.get((method, code))
        if children is None:
            children = (self.requests.labels(method, code).inc, self.latency.labels(method).observe)
            self._children[(method, code)] = children
        count, observe = children
        count()
        observe(seconds)

    def count_malformed(self, method: str) -> None:
        """Count one request that did not parse (also in the requests counter, as INVALID_ARGUMENT)."""
        self.malformed.labels(method).inc()
        self.requests.labels(method, "INVALID_ARGUMENT").inc()

    def set_index(self, version: str, items: int) -> None:
        if self.index is not None:
            self.index.info({"version": version})
        if self._version is not None and self._version != version:
            self.version.labels(self._version).set(0)
        self.version.labels(version).set(1)
        self._version = version
        self.items.set(items)

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (0: any free port); returns the port.

        Raises:
            UnavailableError: the port cannot be bound ("metrics port P is in use", field
                ``metrics_port``).
        """
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise bind_error("metrics port", host, port, exc.errno, field="metrics_port") from exc
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        _close_http(self._http, self._thread)
        self._http, self._thread = None, None


class MetricsHttp:
    """A running ``/metrics`` HTTP server (:func:`serve_multiprocess`); :meth:`close` stops it."""

    def __init__(self, http: Any, thread: threading.Thread, port: int) -> None:
        self._http, self._thread, self.port = http, thread, port

    def close(self) -> None:
        _close_http(self._http, self._thread)
        self._http = None


def serve_multiprocess(path: str, host: str, port: int) -> MetricsHttp:
    """Serve ``/metrics`` aggregated over every process writing to ``path`` (the directory
    ``PROMETHEUS_MULTIPROC_DIR`` names in the workers) on ``host:port`` (0: any free port).

    Raises:
        UnavailableError: the port cannot be bound (field ``metrics_port``).
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    try:
        http, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise bind_error("metrics port", host, port, exc.errno, field="metrics_port") from exc
    bound = int(http.server_port)
    log.info("metrics of every worker on http://%s:%d/metrics", host, bound)
    return MetricsHttp(http, thread, bound)


def _close_http(http: Any, thread: threading.Thread | None) -> None:
    if http is not None:
        http.shutdown()
        http.server_close()
    if thread is not None:
        thread.join(timeout=5)

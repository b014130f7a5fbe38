"""Prometheus metrics of one server, in its own registry (several servers can share a process)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from latentsearch.server.ports import bind_error

__all__ = ["ServerMetrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
            "latentsearch_queue_depth", "Nearest calls waiting to be batched", registry=r
        )
        self.inflight = Gauge(
            "latentsearch_inflight",
            "Calls queued for or running on the search threads outside the batcher",
            registry=r,
        )
        self.malformed = Counter(
            "latentsearch_malformed_requests",
            "Requests whose bytes did not parse as the method's request message (answered "
            "INVALID_ARGUMENT), by method",
            ["method"],
            registry=r,
        )
        self.index = Info("latentsearch_index", "The index version being served", registry=r)
        self.items = Gauge("latentsearch_index_items", "Items in the served index", registry=r)
        self.reloads = Counter(
            "latentsearch_index_reloads", "Index reload attempts, by result", ["result"], registry=r
        )
        self.fallback = Gauge(
            "latentsearch_index_fallback",
            "1 while the served index version is not the one CURRENT names (that one failed to load "
            "or verify), else 0",
            registry=r,
        )
        # Label children by (method, code): labels() takes a lock and builds a key on every call.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one answered RPC and its latency."""
        children = self._children.get((method, code))
        if children is None:
            children = (self.requests.labels(method, code), self.latency.labels(method))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_malformed(self, method: str) -> None:
        """Count one request that did not parse (also in the requests counter, as INVALID_ARGUMENT)."""
        self.malformed.labels(method).inc()
        self.requests.labels(method, "INVALID_ARGUMENT").inc()

    def set_index(self, version: str, items: int) -> None:
        self.index.info({"version": version})
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
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

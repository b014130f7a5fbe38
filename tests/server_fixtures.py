"""Shared helpers of the server tests: small indexes, a tiny model, servers on background loops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentsearch.engine.engine import SearchEngine
from latentsearch.indexer import IndexRoot
from latentsearch.server import LatentSearchServer, ServerConfig

DIM = 4


def make_engine(n: int = 300, *, seed: int = 0, prefix: str = "item", labels: int = 4) -> SearchEngine:
    """A small bank of d=4 posteriors with string ids ``<prefix><i>`` and ``labels`` label values."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, DIM))
    log_sigma = rng.uniform(-1.5, 0.5, size=(n, DIM))
    return SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        ids=[f"{prefix}{i}" for i in range(n)],
        labels=rng.integers(0, labels, size=n),
    )


def publish(root: Path, engine: SearchEngine, **metadata: Any) -> str:
    return IndexRoot(root, create=True).publish_engine(engine, metadata or None, keep=None)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class RunningServer:
    """A :class:`LatentSearchServer` on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server = LatentSearchServer(config, **kwargs)
        self.port = self.run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        self._closed = False

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def health_status(self, service: str = "") -> int:
        """The health servicer's status, read in-process (works while the server refuses RPCs)."""
        req = health_pb2.HealthCheckRequest(service=service)
        return self.run(self.server.health.Check(req, None)).status

    def close(self, grace: float = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def health_rpc(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """``start_server(index=..., **config)`` -> a running server on 127.0.0.1:0, closed at teardown."""
    servers: list[RunningServer] = []

    def factory(*, model: Any = None, **config: Any) -> RunningServer:
        config.setdefault("port", 0)
        config.setdefault("reload_interval", 0)
        # gc.freeze is process-wide: keep the test process's heap as it is (tested on its own).
        config.setdefault("gc_freeze", False)
        srv = RunningServer(ServerConfig(**config), model=model)
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.close()

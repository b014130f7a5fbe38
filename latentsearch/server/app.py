"""The grpc.aio server: configuration, start/stop, health, reflection, hot reload, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from latentsearch.errors import InvalidArgumentError, LatentSearchError, UnavailableError
from latentsearch.indexer.root import IndexRoot
from latentsearch.model.loader import LoadedModel, load_model
from latentsearch.server.admission import AdmissionControl
from latentsearch.server.auth import BearerTokenInterceptor
from latentsearch.server.batcher import MicroBatcher
from latentsearch.server.engine_service import EngineService, load_snapshot
from latentsearch.server.metrics import ServerMetrics
from latentsearch.server.servicer import LatentSearchServicer, run_nearest_group
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAME", "LatentSearchServer", "ServerConfig", "grpc_options", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LatentSearch"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Every knob of :class:`LatentSearchServer`, with its default."""

    # Index root to serve (see indexer.root.IndexRoot); it may be empty or absent at start.
    index: str | os.PathLike[str]
    # Model directory / TorchScript file / factory for Encode and Decode (None: those fail).
    model: str | os.PathLike[str] | None = None
    # Address to bind; port 0 picks a free port (LatentSearchServer.port tells which).
    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics HTTP port (None: off; 0: any free port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Micro-batch concurrent Nearest calls (False: each call searched alone).
    batching: bool = True
    # Most Nearest calls answered by one search round, and how long a round waits to fill.
    max_batch: int = 64
    max_wait_ms: float = 2.0
    # Most Nearest calls waiting for a round (and, apart, most other calls queued for or running on
    # the search threads, Nearest too when batching is off); beyond it RESOURCE_EXHAUSTED at once.
    queue_size: int = 1024
    # Threads running blocking work: batched Nearest rounds and every other search, Encode and
    # Decode (FAISS and numpy release the GIL).
    search_threads: int = 2
    # Batched Nearest rounds computing at once (at most search_threads). One round at a time makes
    # the queue, and so each batch, grow while it runs: on 2 cores shared with the load generator,
    # 1 answered 15-20% more Nearest calls than 2 (bench/bench_server.py), and leaves a thread free
    # for the other RPCs.
    batch_concurrency: int = 1
    # FAISS/OpenMP threads per search (None: 1). Under concurrent load OpenMP's fork/join and
    # spinning cost more than they save (a second FAISS thread made batched searches slower per
    # query in the server benchmark); raise it for a server that answers few, large NearestBatch calls.
    faiss_threads: int | None = None
    # Seconds between polls of the index root's CURRENT (<= 0: no hot reload).
    reload_interval: float = 2.0
    # Re-hash every file of a version before serving it.
    verify: bool = False
    # Largest k (served engines' config.max_k is capped at it), and most queries in one NearestBatch call.
    max_k: int = 1000
    max_batch_queries: int = 1024
    # TLS certificate chain and private key (PEM files); both or neither.
    tls_cert: str | os.PathLike[str] | None = None
    tls_key: str | os.PathLike[str] | None = None
    # Required bearer token (metadata "authorization: Bearer <token>"); None: no auth.
    token: str | None = None
    # Seconds in-flight calls get to finish at shutdown.
    grace: float = 5.0
    # Largest request/response message in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    # Move every object alive after start and after each reload (modules, torch, the index) out of
    # the cyclic garbage collector's reach (gc.freeze), so a full collection scans only what
    # requests allocate. Unfrozen, the ~190,000 objects torch and grpc bring made each full
    # collection stall the event loop ~80 ms, which set the p99 latency under load.
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError("give both tls_cert and tls_key, or neither", field="tls_cert")
        if self.max_batch < 1 or self.queue_size < 1 or self.search_threads < 1:
            raise InvalidArgumentError(
                "max_batch, queue_size and search_threads must be >= 1", field="max_batch"
            )
        if not 1 <= self.batch_concurrency <= self.search_threads:
            raise InvalidArgumentError(
                f"batch_concurrency must be in [1, search_threads={self.search_threads}], "
                f"got {self.batch_concurrency}",
                field="batch_concurrency",
            )
        if self.faiss_threads is not None and self.faiss_threads < 1:
            raise InvalidArgumentError("faiss_threads must be >= 1", field="faiss_threads")
        if self.max_wait_ms < 0:
            raise InvalidArgumentError("max_wait_ms must be >= 0", field="max_wait_ms")
        for name in ("max_k", "max_batch_queries"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1", field=name)
        if self.token is not None and not self.token:
            raise InvalidArgumentError("token must be non-empty", field="token")


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The grpc.aio server options of ``config`` (shared with the benchmark's echo server)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


class LatentSearchServer:
    """One running service. ``await start()``, then ``await stop()`` (or :func:`serve` for the CLI).

    Args:
        config: see :class:`ServerConfig`.
        model: an already loaded model (overrides ``config.model``).
    """

    def __init__(self, config: ServerConfig, *, model: LoadedModel | None = None) -> None:
        self.config = config
        self._model = model
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.service: EngineService | None = None
        self._server: aio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher | None = None
        self._admission: AdmissionControl | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._failed_version: str | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def version(self) -> str | None:
        return None if self.service is None else self.service.version

    @property
    def faiss_threads(self) -> int:
        """FAISS threads per search: the configured value, else 1."""
        return self.config.faiss_threads or 1

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> int:
        """Load the model and the current index (if any), bind and start serving; returns the port."""
        cfg = self.config
        model = self._model
        if model is None and cfg.model is not None:
            model = await asyncio.to_thread(load_model, cfg.model, device="cpu")
        self.service = EngineService(model=model, max_batch_queries=cfg.max_batch_queries)
        self._executor = ThreadPoolExecutor(cfg.search_threads, thread_name_prefix="latentsearch-search")
        self._admission = AdmissionControl(
            executor=self._executor, limit=cfg.queue_size, on_inflight=self.metrics.inflight.set
        )
        servicer = LatentSearchServicer(
            self.service, executor=self._executor, metrics=self.metrics, admission=self._admission
        )
        if cfg.batching:
            self._batcher = MicroBatcher(
                run_nearest_group(self.service, on_search=self.metrics.batch_search.observe),
                executor=self._executor,
                max_batch=cfg.max_batch,
                max_wait_ms=cfg.max_wait_ms,
                queue_size=cfg.queue_size,
                max_concurrent=cfg.batch_concurrency,
                on_batch=self.metrics.batch_size.observe,
                on_depth=self.metrics.queue_depth.set,
            )
            self._batcher.start()
            servicer.batcher = self._batcher
        interceptors = [BearerTokenInterceptor(cfg.token, metrics=self.metrics)] if cfg.token else []
        self._server = aio.server(interceptors=interceptors, options=grpc_options(cfg))
        pb_grpc.add_LatentSearchServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        await self._set_health(_NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
            )
            port = self._server.add_secure_port(address, creds)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise UnavailableError(f"could not bind {address}", field="port")
        self.port = port
        if not await self.reload_now():  # a loaded version has frozen the heap already
            self._freeze_heap()
        await self._server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        if cfg.reload_interval > 0:
            self._reloader = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="index-reloader"
            )
        log.info(
            "serving %s on %s:%d (%s, version %s)",
            cfg.index,
            cfg.host,
            port,
            "TLS" if cfg.tls_cert else "plaintext",
            self.version,
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING, refuse new calls, let in-flight ones finish (``grace`` seconds)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self.health.enter_graceful_shutdown()
            if self._reloader is not None:
                self._reloader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reloader
            if self._server is not None:
                await self._server.stop(self.config.grace if grace is None else grace)
            if self._batcher is not None:
                await self._batcher.close()
            if self._admission is not None:
                self._admission.close()
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, wait=True)
            self.metrics.close()
            log.info("server on port %s stopped", self.port)
        finally:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- hot reload ---------------------------------------------------------------------------
    async def reload_now(self) -> bool:
        """Poll the index root once; load and swap in a new current version. True when swapped.

        A version that fails to load is logged and skipped (the old one keeps serving) until
        ``CURRENT`` names another version.
        """
        assert self.service is not None
        async with self._reload_lock:
            try:
                current = await asyncio.to_thread(self._current_version)
            except LatentSearchError as exc:
                log.warning("cannot read the current version of %s: %s", self.config.index, exc)
                return False
            if current is None or current in (self.service.version, self._failed_version):
                return False
            try:
                snapshot = await asyncio.to_thread(
                    load_snapshot,
                    IndexRoot(self.config.index),
                    verify=self.config.verify,
                    num_threads=self.faiss_threads,
                    max_k=self.config.max_k,
                )
            except Exception as exc:
                self._failed_version = current
                self.metrics.reloads.labels("failed").inc()
                log.error(
                    "failed to load index version %s (still serving %s): %s",
                    current,
                    self.service.version,
                    exc,
                )
                return False
            if snapshot.version == self.service.version:
                return False
            old = self.service.version
            self.service.set_snapshot(snapshot)
            self._failed_version = None
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_index(snapshot.version, len(snapshot.engine))
            log.info(
                "now serving index version %s (%d items; was %s)", snapshot.version, len(snapshot.engine), old
            )
            self._freeze_heap()
            await self._set_health(_SERVING)
            return True

    def _freeze_heap(self) -> None:
        """gc.freeze() what is alive now (see ServerConfig.gc_freeze).

        Frozen objects are still freed by reference counting; unfreezing first lets this full
        collection reclaim a replaced version's cyclic garbage too (one pause per start or reload).
        """
        if self.config.gc_freeze:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def _current_version(self) -> str | None:
        path = Path(self.config.index)
        if not path.is_dir():
            return None
        return IndexRoot(path).current()

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await self.reload_now()
            except Exception:  # keep polling whatever happens
                log.exception("index reload failed")

    async def _set_health(self, status: int) -> None:
        if self._stopping:
            return
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def serve(config: ServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully (the CLI's entry point)."""
    server = LatentSearchServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down (grace %.1f s)", config.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()

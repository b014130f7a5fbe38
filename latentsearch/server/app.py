"""The grpc.aio server: configuration, start/stop, health, reflection, hot reload, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, LatentSearchError
from latentsearch.indexer.root import IndexRoot
from latentsearch.model.loader import LoadedModel, load_model
from latentsearch.server.admission import AdmissionControl
from latentsearch.server.auth import BearerTokenInterceptor
from latentsearch.server.batcher import MicroBatcher
from latentsearch.server.engine_service import EngineService, Snapshot, check_model_hash, load_snapshot
from latentsearch.server.httpapi import HttpApi, server_ssl_context
from latentsearch.server.malformed import GuardedRegistry, MalformedRequests, add_guarded
from latentsearch.server.metrics import ServerMetrics
from latentsearch.server.ports import bind_errno, bind_error
from latentsearch.server.reflection import enable_reflection
from latentsearch.server.scheduler import SearchThreads
from latentsearch.server.servicer import LatentSearchServicer, run_nearest_group
from latentsearch.tls import read_pem
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

__all__ = [
    "SERVICE_NAME",
    "SIGBUS_NOTE",
    "LatentSearchServer",
    "ServerConfig",
    "check_model_fits",
    "grpc_options",
    "serve",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LatentSearch"].full_name
# Logged at start by serve(): what a crash on a damaged memory-mapped version prints, and why.
SIGBUS_NOTE = (
    "index files are memory-mapped: a 'Fatal Python error: Bus error' (SIGBUS) crash means a file of "
    "the served version was truncated or rewritten in place; versions are read-only by contract, "
    "publish a new one instead"
)
# A drain waits for the calls in flight at the signal to send their replies, then this many seconds
# more (within the grace) before grpc's stop: that stop sends GOAWAY and closes each connection as
# soon as its last call is written, and a socket closed with a reply still in its send queue (a
# client slow to read: the kernel's buffer holds what the client's window has not taken yet) is
# reset, the reply lost: a starved test client once got UNAVAILABLE "Connection reset by peer" for
# a call the server had finished. Meanwhile the connections stay open and new calls are served.
DRAIN_LINGER_S = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Every knob of :class:`LatentSearchServer`, with its default."""

    # Index root to serve (see indexer.root.IndexRoot); it may be empty or absent at start.
    index: str | os.PathLike[str]
    # Model directory / TorchScript file / factory for Encode and Decode of versions published without
    # a stored model (from posteriors, or before versions stored their model); None: those calls fail
    # there. A version that stores its model is served with it; a model whose hash differs from a
    # version's is refused (FailedPreconditionError at start; on reload that version is not served).
    # Loading a TorchScript file or a factory runs its code: trusted models only.
    model: str | os.PathLike[str] | None = None
    # One item's shape as a TorchScript / factory ``model`` takes it (model directories and stored
    # models know their own).
    input_shape: tuple[int, ...] | None = None
    # Address to bind; port 0 picks a free port (LatentSearchServer.port tells which).
    host: str = "127.0.0.1"
    port: int = 50051
    # Share the gRPC port with other processes (SO_REUSEPORT; the kernel splits new connections
    # between them): only for workers serving the same index on purpose. False: the port is bound
    # exclusively and a port in use fails start() with "port P is in use".
    reuse_port: bool = False
    # Prometheus /metrics HTTP port (None: off; 0: any free port). `latentsearch serve` defaults to
    # DEFAULT_METRICS_PORT (cli/serve.py), outside the 9100-9999 range Prometheus exporters use.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # HTTP/JSON API and the explorer page on ``host`` (None: off; 0: any free port;
    # LatentSearchServer.http_port tells which), with the same TLS files and bearer token as gRPC
    # (server/httpapi.py). `latentsearch serve --http-port` turns it on.
    http_port: int | None = None
    # Micro-batch concurrent Nearest calls (False: each call searched alone).
    batching: bool = True
    # Most Nearest calls answered by one search round, and how long a round waits to fill.
    max_batch: int = 64
    max_wait_ms: float = 2.0
    # Most Nearest calls waiting for a round (and, apart, most other calls queued for or running on
    # the search threads, Nearest too when batching is off); beyond it RESOURCE_EXHAUSTED at once.
    queue_size: int = 1024
    # Threads running blocking work: batched Nearest rounds and every other search, Encode and
    # Decode (FAISS and numpy release the GIL). Small work goes first; a NearestBatch runs as chunks
    # of at most max_batch queries on at most search_threads - 1 of them (server/scheduler.py).
    search_threads: int = 2
    # Batched Nearest rounds computing at once (at most search_threads). One round at a time makes
    # the queue, and so each batch, grow while it runs: on 2 cores shared with the load generator,
    # 1 answered 15-20% more Nearest calls than 2 (bench/bench_server.py), and leaves a thread free
    # for the other RPCs.
    batch_concurrency: int = 1
    # A plain Nearest (k <= 10, the engine's default mode, no label filter, no probabilities) is
    # answered on the event loop itself, without the batcher's wait and thread hop, when the served
    # version's single-query search measured at most this many microseconds at load
    # (Snapshot.nearest_cost_s, reply included). The hop costs the loop a future, a queue wake-up and
    # a callback from the thread; a search this cheap costs it less. 0: always batched. Today's
    # engine spends 150 us or more on a single query even over 300 items, so it batches.
    inline_search_us: float = 30.0
    # FAISS/OpenMP threads per search (None: 1). Under concurrent load OpenMP's fork/join and
    # spinning cost more than they save (a second FAISS thread made batched searches slower per
    # query in the server benchmark); raise it for a server that answers few, large NearestBatch calls.
    faiss_threads: int | None = None
    # Seconds between polls of the index root's CURRENT (<= 0: no hot reload).
    reload_interval: float = 2.0
    # Check every file of a version against its sha256 checksums before serving it, at start and on
    # every hot reload (a reload verifies in the background while the old version keeps serving);
    # a version that fails is refused. About 0.3 s per million items at d=10 (265 MiB) on one core.
    # False (`serve --no-verify`): only sizes, shapes and index value ranges are checked.
    verify: bool = True
    # Largest k (served engines' config.max_k is capped at it), and most queries in one NearestBatch call.
    max_k: int = 1000
    max_batch_queries: int = 1024
    # TLS certificate chain and private key (PEM files); both or neither. start() reads them first,
    # before binding or loading anything (latentsearch.tls.read_pem).
    tls_cert: str | os.PathLike[str] | None = None
    tls_key: str | os.PathLike[str] | None = None
    # Required bearer token (metadata "authorization: Bearer <token>"); None: no auth.
    token: str | None = None
    # Seconds in-flight calls get to finish at shutdown. The drain: health NOT_SERVING, the calls in
    # flight finish and send their replies (new ones still served), DRAIN_LINGER_S more, then GOAWAY
    # and grpc's stop for what is left of the grace.
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
        if not self.inline_search_us >= 0:  # NaN too
            raise InvalidArgumentError("inline_search_us must be >= 0", field="inline_search_us")
        for name in ("max_k", "max_batch_queries"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1", field=name)
        if self.input_shape is not None and self.model is None:
            raise InvalidArgumentError(
                "input_shape is the shape of a TorchScript or factory model: give model too",
                field="input_shape",
            )
        if self.token is not None and not self.token:
            raise InvalidArgumentError("token must be non-empty", field="token")


async def _finish_calls(calls: set[asyncio.Task[Any]], grace: float) -> float:
    """Wait at most ``grace`` seconds for ``calls`` (RPC tasks) to end, then :data:`DRAIN_LINGER_S`
    more (within ``grace``) when there were any; the seconds of grace left."""
    if not calls:
        return grace
    loop = asyncio.get_running_loop()
    end = loop.time() + max(0.0, grace)
    await asyncio.wait(calls, timeout=max(0.0, grace))
    await asyncio.sleep(max(0.0, min(DRAIN_LINGER_S, end - loop.time())))
    return max(0.0, end - loop.time())


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The grpc.aio server options of ``config`` (shared with the benchmark's echo server)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(config.reuse_port)),  # grpc's default is 1 (shared)
    ]


class LatentSearchServer:
    """One running service. ``await start()``, then ``await stop()`` (or :func:`serve` for the CLI).

    Args:
        config: see :class:`ServerConfig`.
        model: an already loaded model (overrides ``config.model``; the same rules).
    """

    def __init__(self, config: ServerConfig, *, model: LoadedModel | None = None) -> None:
        self.config = config
        self._model = model
        # Stored models loaded by store entry (indexer.models): a reload whose version has the same
        # model reuses it. Trimmed to the served one after each swap.
        self._models: dict[str, LoadedModel] = {}
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HttpApi | None = None
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.service: EngineService | None = None
        self._server: aio.Server | None = None
        self._executor: SearchThreads | None = None
        self._batcher: MicroBatcher | None = None
        self._servicer: LatentSearchServicer | None = None
        self._admission: AdmissionControl | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._failed_version: str | None = None
        self._fallback_reason = ""  # why the served version is not CURRENT's ("": it is)
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
        """Bind both ports, load the model and the current index (if any), start serving; returns the port.

        A port in use fails at once, before anything loads, with UnavailableError naming it and
        nothing left bound: the gRPC port (bound exclusively unless ``reuse_port``) is checked
        first, the metrics port bound next, and the gRPC port bound once the model is loaded
        (grpc releases a port only after its server has started). The TLS files are read before
        either port: a missing, unreadable or non-PEM one fails with InvalidArgumentError naming
        the option and the file (field ``tls_cert`` or ``tls_key``).
        """
        try:
            return await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> int:
        cfg = self.config
        credentials = self._credentials()  # a bad --tls-cert / --tls-key fails before anything binds
        http_tls = None
        if cfg.http_port is not None:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                http_tls = server_ssl_context(cfg.tls_cert, cfg.tls_key)
            if cfg.http_port != 0 and bind_errno(cfg.host, cfg.http_port) == errno.EADDRINUSE:
                raise bind_error("HTTP port", cfg.host, cfg.http_port, errno.EADDRINUSE, field="http_port")
        if cfg.port != 0 and not cfg.reuse_port and bind_errno(cfg.host, cfg.port) == errno.EADDRINUSE:
            # Refused before grpc tries: it would log its own multi-line error first.
            raise bind_error("port", cfg.host, cfg.port, errno.EADDRINUSE, field="port")
        interceptors = [BearerTokenInterceptor(cfg.token, metrics=self.metrics)] if cfg.token else []
        self._server = aio.server(interceptors=interceptors, options=grpc_options(cfg))
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        if self._model is None and cfg.model is not None:
            self._model = await asyncio.to_thread(
                load_model, cfg.model, input_shape=cfg.input_shape, device="cpu"
            )
        self.service = EngineService(
            max_batch_queries=cfg.max_batch_queries, max_reply_bytes=cfg.max_message_bytes
        )
        self._executor = SearchThreads(cfg.search_threads)
        self._admission = AdmissionControl(
            executor=self._executor, limit=cfg.queue_size, on_inflight=self.metrics.inflight.set
        )
        servicer = self._servicer = LatentSearchServicer(
            self.service,
            executor=self._executor,
            metrics=self.metrics,
            admission=self._admission,
            chunk_queries=cfg.max_batch,
            inline_cost_s=cfg.inline_search_us * 1e-6,
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
        # Every handler parses leniently: malformed bytes answer INVALID_ARGUMENT (server.malformed).
        reject = MalformedRequests(self.metrics).reject
        add_guarded(pb_grpc.add_LatentSearchServicer_to_server, servicer, self._server, reject)
        add_guarded(health_pb2_grpc.add_HealthServicer_to_server, self.health, self._server, reject)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), GuardedRegistry(self._server, reject))
        # Bound, not serving until _server.start().
        port = self.port = self._bind_grpc(self._server, credentials)
        if cfg.http_port is not None:
            self._http = HttpApi(
                servicer,
                token=cfg.token,
                serving=lambda: not self._stopping,
                max_body_bytes=cfg.max_message_bytes,
                grace=cfg.grace,
            )
            self.http_port = await self._http.start(cfg.host, cfg.http_port, ssl_context=http_tls)
        await self._set_health(_NOT_SERVING)
        if not await self.reload_now():  # a loaded version has frozen the heap already
            self._freeze_heap()
        await self._server.start()
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

    def _credentials(self) -> grpc.ServerCredentials | None:
        """The TLS credentials of ``tls_cert`` and ``tls_key`` (None: plaintext). Raises
        InvalidArgumentError (field ``tls_cert`` or ``tls_key``) for a missing, unreadable or
        non-PEM file (:func:`latentsearch.tls.read_pem`)."""
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        chain = read_pem(cfg.tls_cert, field="tls_cert")
        key = read_pem(cfg.tls_key, field="tls_key")
        return grpc.ssl_server_credentials([(key, chain)])

    def _bind_grpc(self, server: aio.Server, credentials: grpc.ServerCredentials | None) -> int:
        """Add the configured gRPC port to ``server`` (TLS with ``credentials``); the bound port.
        Raises UnavailableError ("port P is in use", field ``port``) when it cannot be bound."""
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        try:
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address ..." (the reason only in its own log)
            port = 0
        if port == 0:
            raise bind_error("port", cfg.host, cfg.port, bind_errno(cfg.host, cfg.port), field="port")
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
            if self._http is not None:
                await self._http.stop()
            if self._server is not None:
                left = self.config.grace if grace is None else grace
                if self._servicer is not None:  # replies of the calls in flight leave first
                    left = await _finish_calls(self._servicer.calls_in_flight(), left)
                await self._server.stop(left)
            if self._batcher is not None:
                await self._batcher.close()
            if self._admission is not None:
                self._admission.close()
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, wait=True)
            self.metrics.close()
            if self.port is not None:  # else start() failed before binding it
                log.info("server on port %s stopped", self.port)
        finally:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- hot reload ---------------------------------------------------------------------------
    async def reload_now(self) -> bool:
        """Poll the index root once; load and swap in a new current version. True when swapped.

        A version that fails to load (or, with ``verify``, its checksums) is logged at ERROR,
        counted (``latentsearch_index_reloads{result="failed"}``) and skipped until ``CURRENT``
        names another version: the version served before keeps serving. When nothing serves yet
        (at start), the newest intact version older than it serves instead. Either way the served
        version is a fallback while ``CURRENT`` names the failed one: gauge
        ``latentsearch_index_fallback`` is 1, Info's ``fallback_reason`` says why, and health stays
        SERVING. A version whose model does not fit the server's ``--model`` (hashes differ) fails
        to load like any other; at start, when it is the current version, the start fails with
        that FailedPreconditionError (naming both hashes) instead of falling back.
        """
        assert self.service is not None
        async with self._reload_lock:
            try:
                current = await asyncio.to_thread(self._current_version)
            except LatentSearchError as exc:
                log.warning("cannot read the current version of %s: %s", self.config.index, exc)
                return False
            serving = self.service.version
            if current is None or current == self._failed_version:
                return False
            if current == serving:
                self._set_status(current, "")  # e.g. `index rollback` to the fallback version
                return False
            root = IndexRoot(self.config.index)
            reason = ""
            try:
                snapshot = await asyncio.to_thread(self._load_snapshot, root, None)
            except Exception as exc:
                if serving is None and isinstance(exc, FailedPreconditionError) and exc.field == "model":
                    raise  # --model is not this index's model: refuse to start
                self._failed_version = current
                self.metrics.reloads.labels("failed").inc()
                reason = f"version {current} (CURRENT) failed to load: {exc}"
                if serving is not None:
                    log.error("failed to load index version %s (still serving %s): %s", current, serving, exc)
                    self._set_status(current, reason)
                    return False
                found = await self._fallback(root, current, reason)
                if found is None:
                    log.error("%s; no older version is intact either: nothing to serve", reason)
                    self._set_status(current, "")
                    return False
                snapshot = found
            if snapshot.version == serving:
                return False
            self.service.set_snapshot(snapshot)  # index and model together
            self._models = {e: m for e, m in self._models.items() if e == snapshot.model_entry}
            if not reason:
                self._failed_version = None
            self._set_status(current if reason else snapshot.version, reason)
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_index(snapshot.version, len(snapshot.engine))
            log.info(
                "now serving index version %s (%d items; was %s)",
                snapshot.version,
                len(snapshot.engine),
                serving,
            )
            self._freeze_heap()
            await self._set_health(_SERVING)
            return True

    def _load_snapshot(self, root: IndexRoot, version: str | None) -> Snapshot:
        """``version`` of ``root`` (``None``: the current one) as this server serves it (blocking)."""
        t0 = time.perf_counter()
        snapshot = load_snapshot(
            root,
            version=version,
            verify=self.config.verify,
            num_threads=self.faiss_threads,
            max_k=self.config.max_k,
            model=self._model,
            models=self._models,
        )
        log.info(
            "loaded index version %s in %.2f s (%s)",
            snapshot.version,
            time.perf_counter() - t0,
            "checksums verified" if self.config.verify else "checksums not verified: --no-verify",
        )
        return snapshot

    async def _fallback(self, root: IndexRoot, failed: str, reason: str) -> Snapshot | None:
        """The newest version older than ``failed`` that loads (and verifies), or ``None``."""
        for version in reversed(await asyncio.to_thread(root.older, failed)):
            try:
                snapshot = await asyncio.to_thread(self._load_snapshot, root, version)
            except Exception as exc:
                log.error("fallback: index version %s failed to load too: %s", version, exc)
                continue
            log.error("%s; serving the newest intact older version %s instead (fallback)", reason, version)
            return snapshot
        return None

    def _set_status(self, current: str, reason: str) -> None:
        """Record (Info, gauge, log) whether the served version is ``CURRENT``'s, and why not."""
        assert self.service is not None
        if self._fallback_reason and not reason:
            log.warning(
                "fallback over: CURRENT of %s names the served version %s", self.config.index, current
            )
        self._fallback_reason = reason
        self.service.set_status(current, reason)
        self.metrics.fallback.set(1 if reason and self.service.version is not None else 0)

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


def check_model_fits(config: ServerConfig) -> LoadedModel | None:
    """Load ``config.model`` and refuse it when the index's current version was built with another
    model (FailedPreconditionError naming both hashes; blocking). ``latentsearch serve`` calls it
    once before starting anything, so a wrong ``--model`` ends it with one error line. Returns the
    model (``None``: no ``model`` configured)."""
    if config.model is None:
        return None
    model = load_model(config.model, input_shape=config.input_shape, device="cpu")
    if Path(config.index).is_dir():
        root = IndexRoot(config.index)
        version = root.current()
        if version is not None:
            check_model_hash(root.manifest(version), model)
    return model


async def serve(config: ServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully (the CLI's entry point).

    faulthandler is enabled: index arrays are memory-mapped, and a served version's file truncated
    or rewritten in place makes the kernel kill the process with SIGBUS, which Python cannot catch;
    faulthandler prints "Fatal Python error: Bus error" and every thread's stack to stderr first,
    and the startup log says what that means (:data:`SIGBUS_NOTE`).
    """
    faulthandler.enable()
    log.info("%s", SIGBUS_NOTE)
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

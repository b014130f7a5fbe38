"""Worker processes: ``serve --workers N`` runs N servers on one port, under one supervisor.

Each worker is a whole :class:`~latentsearch.server.app.LatentSearchServer` in its own process
(spawned, not forked: grpc, torch and OpenMP are not fork-safe once started): its own event loop,
micro-batcher, search threads and hot reload, memory-mapping the same index version as the others
(the page cache holds one copy). They listen on the same port with ``SO_REUSEPORT``, as in grpc's
multiprocessing example, and the kernel spreads new connections over them; a connection stays on
the worker that accepted it.

The supervisor (this module, the parent process):

* checks what would fail every worker the same way before starting any (the port in use, the TLS
  files), then holds the port: a socket bound with ``SO_REUSEPORT`` but not listening, so no other
  program binds it while workers restart, and port 0 picks one free port for all of them;
* restarts a worker that dies (after 0.5 s, doubling up to 30 s while it keeps dying within 10 s of
  its start); a worker that fails its very first start stops the whole server (a bad ``--model``
  fails every worker alike);
* forwards SIGTERM/SIGINT to every worker, which drains like a single server (health NOT_SERVING,
  in-flight calls get ``grace`` seconds), and waits for them;
* serves ``/metrics`` for all workers (prometheus-client multiprocess mode, see server/metrics.py).

Health: each worker answers health checks itself, for itself (SERVING once it serves a version):
a check lands on one worker like any call, and a connection that reached a worker is answered by
it. While no worker serves (at start, or every one died), the supervisor itself listens on the
port with a health service answering NOT_SERVING (and UNAVAILABLE to every other call), so a
health checker sees NOT_SERVING rather than a refused connection; it stops listening, closing its
connections, as soon as a worker is ready.

``--http-port`` (the HTTP API) is served by worker 0 alone, bound exclusively, since the kernel
only spreads connections over sockets that all asked for SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import multiprocess

from latentsearch.errors import InvalidArgumentError, LatentSearchError, UnavailableError
from latentsearch.server.app import ServerConfig, grpc_options, serve
from latentsearch.server.metrics import MULTIPROC_ENV, MetricsHttp, serve_multiprocess
from latentsearch.server.ports import bind_errno, bind_error
from latentsearch.tls import read_pem

__all__ = ["Supervisor", "default_workers", "hold_port", "serve_workers"]

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
_FIRST_DELAY = 0.5  # seconds before restarting a dead worker; doubles while it keeps dying fast
_MAX_DELAY = 30.0
_QUICK_DEATH = 10.0  # a worker dying within this many seconds of its start counts as crashing
_POLL = 0.1  # seconds between checks of the workers
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[worker %(worker)s]: %(message)s"


def default_workers() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    ready: ProcessEvent
    started: float  # time.monotonic()
    ever_ready: bool = False
    crashes: int = 0  # quick deaths in a row
    restart_at: float | None = None  # when to restart a dead worker (monotonic)


class Supervisor:
    """Runs ``workers`` server processes for ``config`` (see the module docstring).

    ``await start()`` returns the port once every worker is ready; ``await stop()`` drains them.

    Args:
        config: every worker's configuration (its ``port``, ``reuse_port``, ``metrics_port`` and
            ``http_port`` are set per worker by the supervisor).
        workers: server processes, at least 2 (one worker: run the server itself, see serve_workers).
        log_level: the workers' logging level.
    """

    def __init__(self, config: ServerConfig, workers: int, *, log_level: int = logging.INFO) -> None:
        if workers < 2:
            raise InvalidArgumentError(f"a supervisor runs 2 workers or more, got {workers}", field="workers")
        self.config = config
        self.workers = workers
        self.log_level = log_level
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.restarts = 0
        self._held: socket.socket | None = None
        self._metrics_dir: str | None = None
        self._metrics: MetricsHttp | None = None
        self._env_before: str | None = None
        self._slots: list[_Worker] = []
        self._standby: aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.failed: asyncio.Event | None = None  # set when a worker's first start fails

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, timeout: float = 300.0) -> int:
        """Check and hold the port, serve metrics, start every worker; returns the port once all
        are ready. Raises what a single server's start would for the port and TLS files, and
        UnavailableError when a worker fails its first start."""
        try:
            return await self._start(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, timeout: float) -> int:
        cfg = self.config
        self.failed = asyncio.Event()
        if cfg.tls_cert is not None and cfg.tls_key is not None:  # fail before binding anything
            read_pem(cfg.tls_cert, field="tls_cert")
            read_pem(cfg.tls_key, field="tls_key")
        self._held = hold_port(cfg.host, cfg.port)
        self.port = int(self._held.getsockname()[1])
        if cfg.metrics_port is not None:
            self._metrics_dir = tempfile.mkdtemp(prefix="latentsearch-metrics-")
            self._metrics = serve_multiprocess(self._metrics_dir, cfg.metrics_host, cfg.metrics_port)
            self.metrics_port = self._metrics.port
            # Read by prometheus-client when a worker imports it (spawned workers inherit os.environ).
            self._env_before = os.environ.get(MULTIPROC_ENV)
            os.environ[MULTIPROC_ENV] = self._metrics_dir
        await self._set_standby(True)
        now = time.monotonic()
        self._slots = [self._spawn(slot, now) for slot in range(self.workers)]
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="worker-supervisor")
        end = now + timeout
        while not all(w.ever_ready for w in self._slots):
            if self.failed.is_set():
                raise UnavailableError(
                    "a worker failed to start (its error is logged above); nothing serves", field="workers"
                )
            if time.monotonic() > end:
                raise UnavailableError(f"the workers did not start within {timeout:.0f} s", field="workers")
            await asyncio.sleep(_POLL)
        log.info(
            "serving %s on %s:%d with %d worker processes (pids %s)",
            cfg.index,
            cfg.host,
            self.port,
            self.workers,
            ", ".join(str(w.process.pid) for w in self._slots),
        )
        return self.port

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every worker (each drains for ``config.grace`` seconds) and wait for them; a worker
        still running ``timeout`` seconds later (default: grace + 30 s) is killed."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        alive = [w.process for w in self._slots if w.process.is_alive()]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid or 0, signal.SIGTERM)
        end = time.monotonic() + (self.config.grace + 30.0 if timeout is None else timeout)
        for p in alive:
            await asyncio.to_thread(p.join, max(0.0, end - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %s did not stop in time; killing it", p.pid)
                p.kill()
                await asyncio.to_thread(p.join, 5)
        await self._set_standby(False)
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._metrics_dir is not None:
            if self._env_before is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = self._env_before
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None
        if self._held is not None:
            self._held.close()
            self._held = None
        if alive:
            log.info("all %d workers stopped", len(alive))

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids, by slot."""
        return [w.process.pid or 0 for w in self._slots if w.process.is_alive()]

    @property
    def serving(self) -> int:
        """Workers alive and ready."""
        return sum(1 for w in self._slots if w.process.is_alive() and w.ready.is_set())

    # -- workers ------------------------------------------------------------------------------
    def _worker_config(self, slot: int) -> ServerConfig:
        cfg = self.config
        assert self.port is not None
        return dataclasses.replace(
            cfg,
            port=self.port,
            reuse_port=True,
            metrics_port=None,  # the supervisor serves every worker's metrics
            http_port=cfg.http_port if slot == 0 else None,
        )

    def _spawn(self, slot: int, now: float, crashes: int = 0) -> _Worker:
        ready = _SPAWN.Event()
        process = _SPAWN.Process(
            target=_worker_main,
            args=(self._worker_config(slot), slot, ready, self.log_level, _logger_levels()),
            name=f"latentsearch-worker-{slot}",
        )
        process.start()
        log.debug("worker %d started (pid %s)", slot, process.pid)
        return _Worker(slot, process, ready, now, crashes=crashes)

    async def _watch(self) -> None:
        assert self.failed is not None
        while not self._stopping:
            now = time.monotonic()
            for i, w in enumerate(self._slots):
                if w.ready.is_set() and not w.ever_ready:
                    w.ever_ready = True
                if w.process.is_alive():
                    continue
                if w.restart_at is None:  # just died
                    self._reap(w)
                    if not w.ever_ready and w.crashes == 0 and self.restarts == 0:
                        self.failed.set()  # its first start failed: every worker would
                        return
                    quick = now - w.started < _QUICK_DEATH
                    w.crashes = w.crashes + 1 if quick else 0
                    delay = min(_MAX_DELAY, _FIRST_DELAY * 2 ** max(0, w.crashes - 1))
                    w.restart_at = now + delay
                    log.error(
                        "worker %d (pid %s) died (exit code %s); restarting it in %.1f s",
                        w.slot,
                        w.process.pid,
                        w.process.exitcode,
                        delay,
                    )
                elif now >= w.restart_at:
                    self._slots[i] = self._spawn(w.slot, now, w.crashes)
                    self._slots[i].ever_ready = w.ever_ready
                    self.restarts += 1
            await self._set_standby(self.serving == 0)
            await asyncio.sleep(_POLL)

    def _reap(self, w: _Worker) -> None:
        """Forget a dead worker's live gauges (its counters keep counting in the totals)."""
        w.process.join(0)
        if self._metrics_dir is not None and w.process.pid is not None:
            multiprocess.mark_process_dead(w.process.pid, self._metrics_dir)

    # -- NOT_SERVING while no worker serves -----------------------------------------------------
    async def _set_standby(self, on: bool) -> None:
        """Listen on the port answering NOT_SERVING (``on``) or stop doing so."""
        if on and self._standby is None and not self._stopping:
            self._standby = await _standby_server(self.config, self.port or 0)
            log.info("no worker is serving: health answers NOT_SERVING")
        elif not on and self._standby is not None:
            standby, self._standby = self._standby, None
            await standby.stop(0)


class _Unavailable(grpc.GenericRpcHandler):
    """Answers every method UNAVAILABLE (no worker is serving)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        async def unavailable(request: bytes, context: aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is serving yet; retry shortly")
            return b""  # unreachable

        return grpc.unary_unary_rpc_method_handler(unavailable)


async def _standby_server(config: ServerConfig, port: int) -> aio.Server:
    options = grpc_options(dataclasses.replace(config, reuse_port=True))
    server = aio.server(options=options)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_Unavailable(),))
    address = f"{config.host}:{port}"
    if config.tls_cert is not None and config.tls_key is not None:
        chain, key = read_pem(config.tls_cert, field="tls_cert"), read_pem(config.tls_key, field="tls_key")
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    else:
        server.add_insecure_port(address)
    for name in ("", "latentsearch.v1.LatentSearch"):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    return server


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening: workers join the port, no
    other program takes it while they restart. Port 0: a free port (the socket's name tells which).

    Raises:
        UnavailableError: the port is in use (also by another SO_REUSEPORT program), field ``port``.
    """
    if port != 0 and bind_errno(host, port) == errno.EADDRINUSE:  # a plain bind: anyone holding it
        raise bind_error("port", host, port, errno.EADDRINUSE, field="port")
    name = host.strip("[]") or None
    family, kind, proto, _, address = socket.getaddrinfo(
        name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise bind_error("port", host, port, exc.errno, field="port") from exc
    return sock


# -- in the worker process -----------------------------------------------------------------------
def _logger_levels() -> dict[str, int]:
    """The levels set on named loggers in this process (the CLI quiets some libraries)."""
    return {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }


def _worker_main(
    config: ServerConfig, slot: int, ready: ProcessEvent, log_level: int, levels: dict[str, int]
) -> None:
    """A worker process: one server until SIGTERM/SIGINT (exit 0), or exit 2 on a failed start.
    Logs to stderr at ``log_level`` like the supervisor, ``levels`` set on the loggers they name."""
    _die_with_parent()
    logging.basicConfig(level=log_level, format=_LOG_FORMAT, stream=sys.stderr)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    old_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        record.worker = slot
        return record

    logging.setLogRecordFactory(factory)
    try:
        asyncio.run(_worker(config, ready))
    except LatentSearchError as exc:
        log.error("worker %d failed to start: %s", slot, exc)
        sys.exit(2)


async def _worker(config: ServerConfig, ready: ProcessEvent) -> None:
    started = asyncio.Event()
    task = asyncio.get_running_loop().create_task(serve(config, ready=started))
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if started.is_set():
        ready.set()
    else:
        waiter.cancel()
    await task


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the supervisor dies (no orphaned workers)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the parent died before the call
                os.kill(os.getpid(), signal.SIGTERM)


# -- the CLI's entry point -------------------------------------------------------------------------
async def serve_workers(config: ServerConfig, workers: int, *, log_level: int = logging.INFO) -> None:
    """``latentsearch serve --workers N``: with N > 1 a :class:`Supervisor` until SIGTERM/SIGINT;
    with 1 the server itself in this process, its port bound exclusively (``reuse_port`` off)."""
    if workers < 1:
        raise InvalidArgumentError(f"workers must be >= 1, got {workers}", field="workers")
    if workers == 1:
        await serve(dataclasses.replace(config, reuse_port=False))
        return
    supervisor = Supervisor(config, workers, log_level=log_level)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = loop.create_task(supervisor.start())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during start
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # raises a failed start
        assert supervisor.failed is not None
        failed = loop.create_task(supervisor.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        stopped.cancel()
        log.info("shutting down %d workers (grace %.1f s)", workers, config.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await supervisor.stop()

"""Server benchmark: Nearest throughput, latency and server CPU per call against a no-search echo.

Servers run as their own processes (``latentsearch serve --workers W``; the echo with the same W
processes sharing one port), and the load comes from **goload**, the compiled grpc-go client of
``../shared/tools/goload`` (build it with ``bash ../shared/tools/goload/build.sh``; found at
``$LATENTSEARCH_GOLOAD`` or ``~/.cache/latentsearch-goload/goload``), over 16 connections so that
the kernel spreads them over the workers. Without goload the run falls back to the Python generator
(:mod:`latentsearch.loadgen`, one connection, so with W > 1 it reaches one worker only) and the
report says so in its first line: a Python client takes CPU from both servers alike and overstates
the ratio to echo.

Scenarios (names carry the item counts run, :func:`scenario_name`):

Indexes are built as ``latentsearch index`` builds them (``SearchEngine.build`` defaults: the
partitions and the compiled kernel from 50,000 items, so ``exact_70k`` runs the exact strategy the
cost model picks per batch; until 2026-12-01 late it was built without partitions, the flat scan
only), and ``approx_*`` with the approximate index forced.

* ``echo``: a grpc.aio LatentSearch service whose Nearest returns a fixed 10-neighbour response
  without searching (same request/response messages, same server options): the ceiling;
* ``exact_2k``, ``exact_70k``, ``approx_70k``, ``approx_1m_batched`` / ``approx_1m_unbatched``
  (micro-batching on and off), ``exact_1m`` (the 1M index, every call asking for ``mode=exact``);
  ``--only`` picks some of them, ``--n-large 0`` leaves 1M out;
* ``mixed_<n>`` (``--mixed``): ``exact_<n_small>`` while 4 clients of this process send maximal
  NearestBatch calls (1024 queries, k = 1000): Nearest's p50 against its unloaded p50 tells whether
  big calls starve small ones (issue 14's target: within 5x).

Each is run for every worker count of ``--workers`` (default 1,2), in ``--rounds`` rounds, echo first
in each round and alternating with the servers, every ratio taken against the echo with the same
worker count in the same round. Server CPU per call comes from the OS's accounting of the server's
processes (``/proc``, all workers and their threads), fair even when the client shares the machine.

Usage::

    python -m bench.bench_server [--duration 8] [--concurrency 64] [--rounds 3] [--workers 1,2]

Writes ``bench/results/server-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import numpy as np
import psutil
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from bench.results_io import write_results
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import SearchEngine, SearchMode
from latentsearch.indexer.root import IndexRoot
from latentsearch.loadgen import LoadConfig, run_load_sync
from latentsearch.progress import format_count
from latentsearch.server.app import LatentSearchServer, ServerConfig, grpc_options
from latentsearch.server.supervisor import hold_port
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

K = 10
REPO = Path(__file__).resolve().parents[1]
GOLOAD_BUILD = "bash ../shared/tools/goload/build.sh"
CONNECTIONS = 16  # goload connections: the kernel spreads connections, not calls, over workers
MIXED_CLIENTS, MIXED_QUERIES, MIXED_K = 4, 1024, 1000  # the maximal NearestBatch of the mixed load


def goload_path() -> Path | None:
    """The goload binary, or ``None`` when it is not built."""
    path = Path(os.environ.get("LATENTSEARCH_GOLOAD", "~/.cache/latentsearch-goload/goload")).expanduser()
    return path if path.is_file() and os.access(path, os.X_OK) else None


# -- the echo server ------------------------------------------------------------------------------
class EchoServicer(pb_grpc.LatentSearchServicer):
    """Nearest answers a fixed 10-neighbour response without searching; Info tells the dim.

    The other RPCs are not served (UNIMPLEMENTED, as the generated base class answers them).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.response = pb.NearestResponse(
            neighbors=[
                pb.Neighbor(id=f"item{i}", log_likelihood=-1.5 * i, label=i % 10, rank=i) for i in range(K)
            ],
            index_version="echo",
            mode=pb.MODE_EXACT,
            certified=True,
        )

    async def Nearest(self, request: pb.NearestRequest, context: aio.ServicerContext) -> pb.NearestResponse:
        return self.response

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(index_version="echo", item_count=0, latent_dim=self.dim)

    @staticmethod
    async def _not_served(context: aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server answers Nearest and Info only")

    async def NearestBatch(
        self, request: pb.NearestBatchRequest, context: aio.ServicerContext
    ) -> pb.NearestBatchResponse:
        await self._not_served(context)

    async def NearestToDistribution(
        self, request: pb.NearestToDistributionRequest, context: aio.ServicerContext
    ) -> pb.NearestToDistributionResponse:
        await self._not_served(context)

    async def Encode(self, request: pb.EncodeRequest, context: aio.ServicerContext) -> pb.EncodeResponse:
        await self._not_served(context)

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> pb.DecodeResponse:
        await self._not_served(context)

    async def GetItem(self, request: pb.GetItemRequest, context: aio.ServicerContext) -> pb.GetItemResponse:
        await self._not_served(context)


async def start_echo(dim: int) -> tuple[aio.Server, int]:
    server = aio.server(options=grpc_options(ServerConfig(index="unused")))
    pb_grpc.add_LatentSearchServicer_to_server(EchoServicer(dim), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _echo_worker(port: int, dim: int, workers: int, ready: ProcessEvent) -> None:
    """One echo process on ``port`` (shared with SO_REUSEPORT when ``workers`` > 1) until SIGTERM."""

    async def main() -> None:
        config = ServerConfig(index="unused", reuse_port=workers > 1)
        server = aio.server(options=grpc_options(config))
        pb_grpc.add_LatentSearchServicer_to_server(EchoServicer(dim), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await server.stop(1.0)

    asyncio.run(main())


def echo_main(dim: int, workers: int) -> None:
    """``--echo-server``: ``workers`` echo processes on one port; prints it; SIGTERM stops them."""
    ctx = multiprocessing.get_context("spawn")
    held = hold_port("127.0.0.1", 0)  # picks the port (and, with one worker, is closed before binding)
    port = int(held.getsockname()[1])
    if workers == 1:
        held.close()
    procs, events = [], []
    for _ in range(workers):
        ready = ctx.Event()
        proc = ctx.Process(target=_echo_worker, args=(port, dim, workers, ready))
        proc.start()
        procs.append(proc)
        events.append(ready)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for ready in events:
        ready.wait(120)
    print(f"echo on 127.0.0.1:{port} with {workers} processes", file=sys.stderr, flush=True)
    stop.wait()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(10)
    held.close()


# -- server processes -----------------------------------------------------------------------------
class ServerProcess:
    """A server command run as a process tree; ready once its stderr names the port."""

    def __init__(self, cmd: list[str], ready: str, *, timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()
        self.port = 0

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(ready, line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        end = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{cmd[:6]} did not start:\n" + "".join(self.lines[-20:]))

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and every live descendant (from /proc)."""
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def echo_server(dim: int, workers: int) -> Iterator[ServerProcess]:
    cmd = [sys.executable, "-m", "bench.bench_server", "--echo-server", "--d", str(dim)]
    cmd += ["--workers", str(workers)]
    server = ServerProcess(cmd, r"echo on 127\.0\.0\.1:(\d+) with")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def latentsearch_server(root: Path, workers: int, *, batching: bool) -> Iterator[tuple[ServerProcess, int]]:
    """``latentsearch serve`` on ``root`` with ``workers`` processes; (process, its metrics port)."""
    metrics_port = _free_port()
    cmd = [sys.executable, "-m", "latentsearch", "serve", "--index", str(root), "--port", "0"]
    cmd += ["--metrics-port", str(metrics_port), "--workers", str(workers), "--reload-interval", "0"]
    if not batching:
        cmd.append("--no-batching")
    # the supervisor's line once every worker is ready, else the server's own
    ready = r"serving \S+ on 127\.0\.0\.1:(\d+) \("
    if workers > 1:
        ready = r"on 127\.0\.0\.1:(\d+) with \d+ worker"
    server = ServerProcess(cmd, ready)
    try:
        yield server, metrics_port
    finally:
        server.stop()


def batch_stats(metrics_port: int) -> dict[str, float]:
    """Batch counters from the server's /metrics (summed over its workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    wanted = {
        "latentsearch_batch_size_count": "batches",
        "latentsearch_batch_size_sum": "batched",
        "latentsearch_batch_search_seconds_count": "rounds",
        "latentsearch_batch_search_seconds_sum": "round_s",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += float(sample.value)
    return out


# -- load -----------------------------------------------------------------------------------------
def _load_in_child(config: LoadConfig) -> dict[str, Any]:
    """Runs in the Python load process: the ghz-shaped report."""
    return run_load_sync(config).to_ghz_json()


class Load:
    """Runs one load against a port: goload when built, else the Python generator (say which)."""

    def __init__(self, *, concurrency: int, dim: int, force_python: bool = False) -> None:
        self.concurrency, self.dim = concurrency, dim
        self.goload = None if force_python else goload_path()
        self._pool: ProcessPoolExecutor | None = None
        if self.goload is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(1, mp_context=ctx)
            self._pool.submit(time.sleep, 0).result()  # start it before timing anything
            log.warning(
                "goload not found (build it: %s): FALLING BACK to the Python load generator, which "
                "shares the CPU with the server and uses one connection (one worker only)",
                GOLOAD_BUILD,
            )

    @property
    def client(self) -> str:
        if self.goload is not None:
            return f"goload (grpc-go, {CONNECTIONS} connections): {self.goload}"
        return "FALLBACK: latentsearch.loadgen (Python grpc.aio, 1 connection)"

    def run(self, port: int, seconds: float, *, mode: str | None, echo: bool, seed: int) -> dict[str, Any]:
        if self.goload is None:
            assert self._pool is not None
            config = LoadConfig(
                target=f"127.0.0.1:{port}", concurrency=self.concurrency, dim=self.dim, mode=mode, k=K,
                duration=seconds, seed=seed,
            )  # fmt: skip
            return self._pool.submit(_load_in_child, config).result()
        cmd = [str(self.goload), "-target", f"127.0.0.1:{port}", "-c", str(self.concurrency)]
        cmd += ["-n", "10000000", "-duration", str(seconds), "-conns", str(CONNECTIONS), "-z", str(self.dim)]
        cmd += ["-k", str(K), "-method", "echo" if echo else "nearest", "-mode", mode or "auto"]
        cmd += ["-seed", str(seed + 1)]  # 0 would be time-based
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=False)
        if done.returncode not in (0, 1):  # 1: some calls failed (counted in the report)
            raise RuntimeError(f"goload failed ({done.returncode}): {done.stderr[-2000:]}")
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _big_batches(port: int, dim: int, stop: threading.Event, counts: list[int]) -> None:
    """One mixed-load client: maximal NearestBatch calls back to back until ``stop``."""
    rng = np.random.default_rng(len(counts))
    request = pb.NearestBatchRequest(
        queries=[pb.NearestRequest(z=z.tolist(), k=MIXED_K) for z in rng.uniform(-5, 5, (MIXED_QUERIES, dim))]
    )
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        while not stop.is_set():
            try:
                stub.NearestBatch(request, timeout=120)
                counts.append(1)
            except grpc.RpcError as exc:
                log.warning("mixed-load NearestBatch failed: %s", exc.code())
                counts.append(0)


def measure(
    load: Load,
    server: ServerProcess,
    *,
    name: str,
    workers: int,
    duration: float,
    warmup: float,
    mode: str | None = None,
    echo: bool = False,
    seed: int = 0,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """Warm up, then one measured load run; rps, latencies, errors and the server's CPU per call."""
    if warmup > 0:
        load.run(server.port, warmup, mode=mode, echo=echo, seed=99)
    before = batch_stats(metrics_port) if metrics_port else {}
    cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
    doc = load.run(server.port, duration, mode=mode, echo=echo, seed=seed)
    cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - wall0
    after = batch_stats(metrics_port) if metrics_port else {}
    lat = {d["percentage"]: d["latency"] / 1e6 for d in doc["latencyDistribution"]}
    ok = doc["statusCodeDistribution"].get("OK", 0)
    row: dict[str, Any] = {
        "name": name,
        "workers": workers,
        "count": doc["count"],
        "ok": ok,
        "errors": doc["count"] - ok,
        "error_distribution": doc["errorDistribution"],
        "rps": doc["rps"],
        "p50_ms": lat.get(50, float("nan")),
        "p99_ms": lat.get(99, float("nan")),
        "average_ms": doc["average"] / 1e6,
        "slowest_ms": doc["slowest"] / 1e6,
        "server_cpu_cores": cpu / wall,
        "server_cpu_ms_per_call": 1e3 * cpu / max(1, ok),
    }
    if before and after:
        batches = after["batches"] - before["batches"]
        row["mean_batch_size"] = (after["batched"] - before["batched"]) / batches if batches else None
    log.info(
        "%s (workers %d): %.0f rps, p50 %.2f ms, p99 %.2f ms, %d errors, server CPU %.3f ms/call",
        name, workers, row["rps"], row["p50_ms"], row["p99_ms"], row["errors"], row["server_cpu_ms_per_call"],
    )  # fmt: skip
    return row


def search_cost(
    engine: SearchEngine, queries: np.ndarray, mode: SearchMode, repeats: int = 3
) -> dict[str, float]:
    """In-process ``search_batch`` cost per query (ms), batch of 1 (median) and of 64 (best).

    FAISS threads are set as the server sets them (``LatentSearchServer.faiss_threads``).
    """
    threads = LatentSearchServer(ServerConfig(index="unused")).faiss_threads
    engine.config = dataclasses.replace(engine.config, num_threads=threads)
    singles = []
    for z in queries[:40]:
        t = time.perf_counter()
        engine.search_batch(z[None], K, mode=mode)
        singles.append(time.perf_counter() - t)
    batched = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.search_batch(queries[:64], K, mode=mode)
        batched.append((time.perf_counter() - t) / 64)
    return {"single_ms": 1e3 * float(np.median(singles)), "batch64_ms_per_query": 1e3 * min(batched)}


def build_root(root: Path, n: int, d: int, *, approx: bool | None, seed: int) -> tuple[SearchEngine, float]:
    bank = vae_like_posteriors(n, d, seed=seed)
    t = time.perf_counter()
    engine = SearchEngine.build(bank.mu, log_sigma=bank.log_sigma, labels=bank.labels, build_approx=approx)
    build_s = time.perf_counter() - t
    IndexRoot(root, create=True).publish_engine(engine, {"bench": "server"}, keep=None)
    return engine, build_s


def mixed(
    load: Load, server: ServerProcess, *, workers: int, duration: float, warmup: float, seed: int, dim: int,
    concurrency: int,
) -> dict[str, Any]:  # fmt: skip
    """Nearest at ``concurrency`` alone, then beside MIXED_CLIENTS clients sending maximal NearestBatch
    calls: p50 and p99 of both, and the loaded p50 over the unloaded one."""
    small = Load(concurrency=concurrency, dim=dim, force_python=load.goload is None)
    try:
        alone = measure(small, server, name="nearest_alone", workers=workers, duration=duration,
                        warmup=warmup, seed=seed)  # fmt: skip
        stop, counts = threading.Event(), list[int]()
        clients = [
            threading.Thread(target=_big_batches, args=(server.port, dim, stop, counts), daemon=True)
            for _ in range(MIXED_CLIENTS)
        ]
        for c in clients:
            c.start()
        time.sleep(2.0)  # the big calls are running
        loaded = measure(small, server, name="nearest_beside_batches", workers=workers, duration=duration,
                         warmup=0, seed=seed)  # fmt: skip
        stop.set()
        for c in clients:
            c.join(180)
    finally:
        small.close()
    return {
        "name": "mixed",
        "workers": workers,
        "nearest_concurrency": concurrency,
        "alone": alone,
        "loaded": loaded,
        "batch_calls_ok": sum(counts),
        "batch_calls_failed": len(counts) - sum(counts),
        "p50_ratio": loaded["p50_ms"] / alone["p50_ms"],
    }


# -- the run ------------------------------------------------------------------------------------
# (kind, size setting, variant, index, batching, Nearest mode); indexes are built once per run. The
# scenario's name is derived from the size run (scenario_name): exact_70k at the default n_small.
SCENARIOS: tuple[tuple[str, str, str, str, bool, str | None], ...] = (
    ("exact", "n_tiny", "", "tiny", True, None),
    ("exact", "n_small", "", "small", True, None),
    ("approx", "n_small", "", "small_approx", True, "approx"),
    ("approx", "n_large", "_batched", "large", True, "approx"),
    ("approx", "n_large", "_unbatched", "large", False, "approx"),
    ("exact", "n_large", "", "large", True, "exact"),  # the 1M index asked for exact answers
)


def scenario_name(kind: str, items: int, variant: str = "") -> str:
    """``exact_70k``, ``approx_1m_batched``: the search, the index's item count, the variant."""
    return f"{kind}_{format_count(items).lower()}{variant}"


def scenarios(settings: dict[str, Any]) -> dict[str, tuple[str, bool, str | None]]:
    """Scenario name -> (index, batching, Nearest mode) at the sizes of ``settings`` (n_tiny, n_small,
    n_large: the parsed arguments or a report's settings)."""
    named = {
        scenario_name(kind, settings[size], variant): (index, batching, mode)
        for kind, size, variant, index, batching, mode in SCENARIOS
    }
    if len(named) < len(SCENARIOS):
        raise ValueError(
            f"--n-tiny {settings['n_tiny']}, --n-small {settings['n_small']} and --n-large "
            f"{settings['n_large']} give scenarios the same name; choose sizes further apart"
        )
    return named


def _batched_names(settings: dict[str, Any]) -> tuple[str, str]:
    """The names of the batched and unbatched scenarios at ``settings['n_large']``."""
    large = settings["n_large"]
    return scenario_name("approx", large, "_batched"), scenario_name("approx", large, "_unbatched")


def _median(values: list[float]) -> float:
    return float(np.median(values))


def selected(args: argparse.Namespace) -> dict[str, tuple[str, bool, str | None]]:
    """The scenarios this run measures: ``--only`` (default all), none over 0 items."""
    named = scenarios(vars(args))
    only = set(args.only.split(",")) if args.only else set(named)
    unknown = only - set(named)
    if unknown:
        raise ValueError(f"--only names unknown scenarios {sorted(unknown)}; known: {sorted(named)}")
    sizes = {"tiny": args.n_tiny, "small": args.n_small, "small_approx": args.n_small, "large": args.n_large}
    return {k: v for k, v in named.items() if k in only and sizes[v[0]] > 0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    d = args.d
    named = selected(args)
    workers = [int(w) for w in str(args.workers).split(",")]
    common = {"duration": args.duration, "warmup": args.warmup}
    load = Load(concurrency=args.concurrency, dim=d, force_python=args.python_load)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client": load.client,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {
            **common,
            "concurrency": args.concurrency,
            "dim": d,
            "k": K,
            "rounds": args.rounds,
            "workers": workers,
            "n_tiny": args.n_tiny,
            "n_small": args.n_small,
            "n_large": args.n_large,
            "scenarios": {
                name: {"index": index, "batching": batching, "mode": mode or "default"}
                for name, (index, batching, mode) in named.items()
            },
            "mixed": args.mixed,
            "mixed_concurrency": args.mixed_concurrency,
            "server_config": dataclasses.asdict(ServerConfig(index="unused")),
        },
    }
    tmp = tempfile.mkdtemp(prefix="bench-server-")
    try:
        queries = np.concatenate(list(query_families(vae_like_posteriors(1000, d), 64, seed=7).values())[:2])
        roots: dict[str, Path] = {}
        indexes: dict[str, Any] = {}
        # name, items, approximate index (None: as `latentsearch index` builds it, partitions from
        # EngineConfig.partition_min_items), seed, mode of the in-process search cost
        builds: tuple[tuple[str, int, bool | None, int, SearchMode], ...] = (
            ("tiny", args.n_tiny, None, 3, "exact"),
            ("small", args.n_small, None, 1, "exact"),
            ("small_approx", args.n_small, True, 1, "approx"),
            ("large", args.n_large, True, 2, "approx"),
        )
        needed = {index for index, _, _ in named.values()} | ({"small"} if args.mixed else set())
        for name, n, with_approx, seed, search_mode in builds:
            if name not in needed:
                continue
            roots[name] = Path(tmp) / name
            engine, build_s = build_root(roots[name], n, d, approx=with_approx, seed=seed)
            # the index's own mode, then any other mode a scenario asks of it (1M: exact)
            asked = {m for i, _, m in named.values() if i == name and m is not None}
            modes = [search_mode, *sorted(asked - {search_mode})]
            for m in modes:
                cost = search_cost(engine, queries, cast(SearchMode, m))
                label = name if m == search_mode else f"{name} ({m})"
                indexes[label] = {"items": n, "build_s": build_s, "mode": m, **cost}
            del engine
        report["indexes"] = indexes
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for w in workers:
                log.info("round %d of %d, %d worker(s)", r + 1, args.rounds, w)
                rows: dict[str, Any] = {}
                with echo_server(d, w) as echo:
                    rows["echo"] = measure(load, echo, name="echo", workers=w, echo=True, seed=r, **common)
                for name, (index, batching, mode) in named.items():
                    with latentsearch_server(roots[index], w, batching=batching) as (server, mport):
                        rows[name] = measure(
                            load, server, name=name, workers=w, mode=mode, seed=r, metrics_port=mport,
                            **common,
                        )  # fmt: skip
                    rows[name]["vs_echo"] = rows[name]["rps"] / rows["echo"]["rps"]
                    rows[name]["cpu_vs_echo"] = (
                        rows[name]["server_cpu_ms_per_call"] / rows["echo"]["server_cpu_ms_per_call"]
                    )
                if args.mixed:
                    with latentsearch_server(roots["small"], w, batching=True) as (server, _):
                        rows["mixed"] = mixed(
                            load, server, workers=w, seed=r, dim=d, concurrency=args.mixed_concurrency,
                            **common,
                        )  # fmt: skip
                rounds.append({"round": r + 1, "workers": w, "rows": rows})
    finally:
        load.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report["rounds"] = rounds
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["median"] = _medians(rounds, workers, [*named, "echo"])
    if args.mixed:
        report["mixed_p50_ratio"] = {
            str(w): _median([x["rows"]["mixed"]["p50_ratio"] for x in rounds if x["workers"] == w])
            for w in workers
        }
    if len(workers) > 1:
        one, two = workers[0], workers[1]
        report["workers_ratio"] = {
            name: report["median"][str(two)][name]["rps"] / report["median"][str(one)][name]["rps"]
            for name in ["echo", *named]
        }
    report["targets"] = _targets(report, args, named)
    return report


_MEDIAN_KEYS = ("rps", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_call", "vs_echo", "cpu_vs_echo")


def _medians(rounds: list[dict[str, Any]], workers: list[int], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workers:
        out[str(w)] = {}
        for name in names:
            per = [x["rows"][name] for x in rounds if x["workers"] == w]
            out[str(w)][name] = {
                key: _median([p[key] for p in per if p.get(key) is not None])
                for key in _MEDIAN_KEYS
                if any(p.get(key) is not None for p in per)
            }
    return out


def _targets(report: dict[str, Any], args: argparse.Namespace, named: dict[str, Any]) -> dict[str, bool]:
    """Issue 14's targets that this run measured, per worker count."""
    targets: dict[str, bool] = {}
    exact = scenario_name("exact", args.n_small)
    approx = scenario_name("approx", args.n_large, "_batched")
    for w, med in report["median"].items():
        if exact in med:
            targets[f"{exact} >= 0.80 of echo (workers {w})"] = bool(med[exact]["vs_echo"] >= 0.8)
            targets[f"{exact} p99 < 50 ms (workers {w})"] = bool(med[exact]["p99_ms"] < 50)
            targets[f"{exact} zero errors (workers {w})"] = bool(med[exact]["errors"] == 0)
            cpu = med[exact]["cpu_vs_echo"]
            targets[f"{exact} server CPU/call <= 1.25x echo (workers {w})"] = bool(cpu <= 1.25)
        if approx in med:
            targets[f"{approx} >= 0.60 of echo (workers {w})"] = bool(med[approx]["vs_echo"] >= 0.6)
    for w, ratio in report.get("mixed_p50_ratio", {}).items():
        targets[f"mixed: Nearest p50 within 5x of unloaded (workers {w})"] = bool(ratio <= 5)
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    la0 = ", ".join(f"{v:.2f}" for v in m["load_average_at_start"])
    la1 = ", ".join(f"{v:.2f}" for v in m["load_average_at_end"])
    lines = [
        f"# Server benchmark, {report['date'][:10]}",
        "",
        f"Client: **{report['client']}**.",
        "",
        f"{report['date']} on {m['platform']}, {m['cpus']} CPUs shared by server and client (load average "
        f"{la0} at start, {la1} at end), grpcio {m['grpcio']}. Concurrency {s['concurrency']}, "
        f"{s['duration']} s "
        f"per scenario after a {s['warmup']} s warm-up, Nearest k = {s['k']}, d = {s['dim']}; {s['rounds']} "
        f"rounds, worker counts {s['workers']} alternated within each round, echo first with the same "
        "worker count. Server CPU: user + system seconds of every server process (/proc) per OK call.",
        "",
        "Medians over the rounds (ratios against the echo with the same worker count, same round):",
        "",
        "| workers | scenario | rps | vs echo | p50 ms | p99 ms | errors | server CPU ms/call "
        "| CPU vs echo |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w, rows in report["median"].items():
        for name, row in rows.items():
            lines.append(
                f"| {w} | {name} | {row['rps']:.0f} | {_fmt(row.get('vs_echo'), '.2f') or '1.00'} | "
                f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']:.0f} | "
                f"{row['server_cpu_ms_per_call']:.3f} | {_fmt(row.get('cpu_vs_echo'), '.2f') or '1.00'} |"
            )
    if "workers_ratio" in report:
        w = s["workers"]
        lines += ["", f"Requests/s with {w[1]} workers over {w[0]}: " + ", ".join(
            f"{name} {ratio:.2f}x" for name, ratio in report["workers_ratio"].items()
        )]  # fmt: skip
    if "mixed_p50_ratio" in report:
        lines += [
            "",
            f"Mixed load (Nearest at concurrency {s['mixed_concurrency']} beside {MIXED_CLIENTS} clients "
            f"sending NearestBatch of {MIXED_QUERIES} queries at k = {MIXED_K}):",
            "",
            "| round | workers | p50 alone ms | p50 loaded ms | ratio | p99 loaded ms | batch calls ok |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for x in report["rounds"]:
            mx = x["rows"]["mixed"]
            lines.append(
                f"| {x['round']} | {x['workers']} | {mx['alone']['p50_ms']:.2f} | "
                f"{mx['loaded']['p50_ms']:.2f} | {mx['p50_ratio']:.2f} | {mx['loaded']['p99_ms']:.2f} | "
                f"{mx['batch_calls_ok']} |"
            )
    columns = list(report["median"][str(s["workers"][0])])
    lines += ["", "Each round:", "", "| round | workers | " + " | ".join(columns) + " |"]
    lines.append("| ---: | ---: |" + " ---: |" * len(columns))
    for x in report["rounds"]:
        names = list(report["median"][str(x["workers"])])
        cells = [
            f"{x['rows'][n]['rps']:.0f}" + ("" if n == "echo" else f" ({x['rows'][n]['vs_echo']:.2f})")
            for n in names
        ]
        lines.append(f"| {x['round']} | {x['workers']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Search cost alone (in-process `search_batch`, per query, FAISS threads as the server sets them):",
        "",
        "| index | items | mode | single query ms | in a batch of 64, ms/query | build s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, idx in report["indexes"].items():
        lines.append(
            f"| {name} | {idx['items']} | {idx['mode']} | {idx['single_ms']:.3f} | "
            f"{idx['batch64_ms_per_query']:.3f} | {idx['build_s']:.1f} |"
        )
    lines += [
        "",
        "Targets (issue 14): "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario (default 8)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent calls (default 64)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per scenario (default 1)")
    parser.add_argument("--d", type=int, default=10, help="latent dimension (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of every scenario (default 3)")
    parser.add_argument(
        "--n-tiny", type=int, default=2_000, help="serving-overhead index size (default 2,000)"
    )
    parser.add_argument("--n-small", type=int, default=70_000, help="exact index size (default 70,000)")
    parser.add_argument(
        "--n-large", type=int, default=1_000_000, help="approx index size (default 1,000,000; 0: none)"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2 (default 1,2)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument(
        "--mixed", action="store_true", help="also measure Nearest beside 4 clients of maximal NearestBatch"
    )
    parser.add_argument(
        "--mixed-concurrency", type=int, default=4, help="Nearest concurrency of the mixed load (default 4)"
    )
    parser.add_argument(
        "--python-load", action="store_true", help="use the Python generator even where goload is built"
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # the echo's process
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.echo_server:
        echo_main(args.d, int(args.workers))
        return 0
    try:
        selected(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    write_results(args.out, f"server-{time.strftime('%Y-%m-%d')}", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

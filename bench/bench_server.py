"""Server benchmark: Nearest throughput and latency over gRPC against a no-search echo ceiling.

Scenarios, in one run, each measured with :mod:`latentsearch.loadgen` from a separate (spawned)
process so client and server do not share a GIL; the servers run in this process:

* ``echo``: a grpc.aio LatentSearch service whose Nearest returns a fixed 10-neighbour response
  without searching (same request/response messages, same server options): the ceiling;
* ``exact_70k``: Nearest over a 70,000-item d=10 index (exact engine), micro-batching on;
* ``approx_1m_batched`` / ``approx_1m_unbatched``: Nearest over 1,000,000 items in approximate
  mode, micro-batching on and off.

Queries mix the ``box`` (z uniform in [-5, 5]^d) and ``prior`` (z ~ N(0, I)) families, k = 10.
Each scenario gets a short warm-up run first. CPU seconds used by the server process and by the load
process are recorded (the machine's cores are shared by both), and so is the search cost alone
(``search_batch`` in-process, batch of 1 and of 64), to show where the time goes.

Usage::

    python -m bench.bench_server [--duration 8] [--concurrency 64]

Writes ``bench/results/server-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from api.latentsearch.v1 import latentsearch_pb2 as pb
from api.latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc
from bench.results_io import write_results
from indexer.root import IndexRoot
from latentsearch.engine import SearchEngine
from latentsearch.loadgen import LoadConfig, run_load_sync
from latentsearch.synthetic import query_families, vae_like_posteriors
from server.app import LatentSearchServer, ServerConfig, grpc_options

log = logging.getLogger(__name__)

K = 10


# -- servers on a background event loop ---------------------------------------------------------
class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`run` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 300.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EchoServicer(pb_grpc.LatentSearchServicer):
    """Nearest answers a fixed 10-neighbour response without searching; Info tells the dim."""

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


async def start_echo(dim: int) -> tuple[aio.Server, int]:
    server = aio.server(options=grpc_options(ServerConfig(index="unused")))
    pb_grpc.add_LatentSearchServicer_to_server(EchoServicer(dim), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# -- one scenario -------------------------------------------------------------------------------
def _load_in_child(config: LoadConfig) -> dict[str, Any]:
    """Runs in the load process: the ghz-shaped report plus that process's CPU seconds."""
    cpu = time.process_time()
    report = run_load_sync(config)
    doc = report.to_ghz_json()
    doc["client_cpu_s"] = time.process_time() - cpu
    return doc


def measure(
    pool: ProcessPoolExecutor,
    port: int,
    *,
    name: str,
    duration: float,
    concurrency: int,
    warmup: float,
    dim: int,
    mode: str | None = None,
    server_stats: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Warm up, then one measured load run; returns rps, latencies, errors and CPU use."""
    target = f"127.0.0.1:{port}"
    common = {"target": target, "concurrency": concurrency, "dim": dim, "mode": mode, "k": K}
    if warmup > 0:
        pool.submit(_load_in_child, LoadConfig(duration=warmup, seed=99, **common)).result()
    before = server_stats() if server_stats else {}
    cpu0, wall0 = os.times(), time.perf_counter()
    doc = pool.submit(_load_in_child, LoadConfig(duration=duration, **common)).result()
    cpu1, wall = os.times(), time.perf_counter() - wall0
    after = server_stats() if server_stats else {}
    lat = {d["percentage"]: d["latency"] / 1e6 for d in doc["latencyDistribution"]}
    ok = doc["statusCodeDistribution"].get("OK", 0)
    row = {
        "name": name,
        "count": doc["count"],
        "ok": ok,
        "errors": doc["count"] - ok,
        "error_distribution": doc["errorDistribution"],
        "rps": doc["rps"],
        "p50_ms": lat[50],
        "p90_ms": lat[90],
        "p99_ms": lat[99],
        "average_ms": doc["average"] / 1e6,
        "slowest_ms": doc["slowest"] / 1e6,
        "server_cpu_cores": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall,
        "server_cpu_ms_per_call": 1e3 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / max(1, ok),
        "client_cpu_cores": doc["client_cpu_s"] / (doc["total"] / 1e9),
        "ghz": {k: v for k, v in doc.items() if k != "client_cpu_s"},
    }
    if before and after:
        batches = after["batches"] - before["batches"]
        row["mean_batch_size"] = (after["batched"] - before["batched"]) / batches if batches else None
    log.info(
        "%s: %.0f rps, p50 %.2f ms, p99 %.2f ms, %d errors", name, row["rps"], lat[50], lat[99], row["errors"]
    )
    return row


def _batch_stats(server: LatentSearchServer) -> Callable[[], dict[str, Any]]:
    def stats() -> dict[str, Any]:
        reg = server.metrics.registry
        return {
            "batches": reg.get_sample_value("latentsearch_batch_size_count") or 0.0,
            "batched": reg.get_sample_value("latentsearch_batch_size_sum") or 0.0,
        }

    return stats


def run_server_scenario(
    loop: LoopThread,
    pool: ProcessPoolExecutor,
    root: Path,
    *,
    batching: bool,
    server_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Start a server on ``root`` (default config plus ``server_options``), measure, stop it."""
    config = ServerConfig(index=root, port=0, reload_interval=0, batching=batching, **(server_options or {}))
    server = LatentSearchServer(config)
    port = loop.run(server.start())
    try:
        return measure(pool, port, server_stats=_batch_stats(server), **kwargs)
    finally:
        loop.run(server.stop(1.0))


def search_cost(engine: SearchEngine, queries: np.ndarray, mode: str, repeats: int = 3) -> dict[str, float]:
    """In-process ``search_batch`` cost per query (ms), batch of 1 (median) and of 64 (best).

    FAISS threads are capped as the server caps them (cores // its 2 search threads).
    """
    threads = LatentSearchServer(ServerConfig(index="unused")).faiss_threads
    engine.config = dataclasses.replace(engine.config, num_threads=threads)
    singles = []
    for z in queries[:40]:
        t = time.perf_counter()
        engine.search_batch(z[None], K, mode=mode)  # type: ignore[arg-type]
        singles.append(time.perf_counter() - t)
    batched = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.search_batch(queries[:64], K, mode=mode)  # type: ignore[arg-type]
        batched.append((time.perf_counter() - t) / 64)
    return {"single_ms": 1e3 * float(np.median(singles)), "batch64_ms_per_query": 1e3 * min(batched)}


def build_root(root: Path, n: int, d: int, *, approx: bool, seed: int) -> tuple[SearchEngine, float]:
    bank = vae_like_posteriors(n, d, seed=seed)
    t = time.perf_counter()
    engine = SearchEngine.build(bank.mu, log_sigma=bank.log_sigma, labels=bank.labels, build_approx=approx)
    build_s = time.perf_counter() - t
    IndexRoot(root, create=True).publish_engine(engine, {"bench": "server"}, keep=None)
    return engine, build_s


# -- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    d = args.d
    common = {"duration": args.duration, "concurrency": args.concurrency, "warmup": args.warmup, "dim": d}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {
            **common,
            "k": K,
            "families": ["box", "prior"],
            "n_small": args.n_small,
            "n_large": args.n_large,
        },
    }
    loop = LoopThread()
    ctx = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bench-server-") as tmp,
        ProcessPoolExecutor(1, mp_context=ctx) as pool,
    ):
        pool.submit(time.sleep, 0).result()  # start the load process before timing anything
        scenarios: list[dict[str, Any]] = []
        echo, port = loop.run(start_echo(d))
        try:
            scenarios.append(measure(pool, port, name="echo", **common))
        finally:
            loop.run(echo.stop(1.0))

        queries = np.concatenate(list(query_families(vae_like_posteriors(1000, d), 64, seed=7).values())[:2])
        small_root = Path(tmp) / "small"
        engine, build_s = build_root(small_root, args.n_small, d, approx=False, seed=1)
        report["small_index"] = {
            "items": args.n_small,
            "build_s": build_s,
            "has_approx": engine.approx is not None,
        }
        report["small_index"]["search_cost_exact"] = search_cost(engine, queries, "exact")
        del engine
        scenarios.append(
            run_server_scenario(loop, pool, small_root, batching=True, name="exact_70k_batched", **common)
        )

        large_root = Path(tmp) / "large"
        engine, build_s = build_root(large_root, args.n_large, d, approx=True, seed=2)
        report["large_index"] = {"items": args.n_large, "build_s": build_s}
        report["large_index"]["search_cost_approx"] = search_cost(engine, queries, "approx")
        del engine
        for batching in (True, False):
            name = f"approx_1m_{'batched' if batching else 'unbatched'}"
            scenarios.append(
                run_server_scenario(
                    loop, pool, large_root, batching=batching, name=name, mode="approx", **common
                )
            )
    loop.close()
    report["scenarios"] = scenarios
    report["machine"]["load_average_at_end"] = os.getloadavg()
    by = {s["name"]: s for s in scenarios}
    echo_rps = by["echo"]["rps"]
    small, on, off = by["exact_70k_batched"], by["approx_1m_batched"], by["approx_1m_unbatched"]
    report["ratios"] = {
        "exact_70k_vs_echo": small["rps"] / echo_rps,
        "approx_1m_batched_vs_echo": on["rps"] / echo_rps,
        "approx_1m_unbatched_vs_echo": off["rps"] / echo_rps,
        "approx_1m_batched_vs_unbatched": on["rps"] / off["rps"] if off["rps"] else float("inf"),
    }
    r = report["ratios"]
    report["targets"] = {
        "exact_70k >= 80% of echo": r["exact_70k_vs_echo"] >= 0.8,
        "exact_70k p99 < 50 ms": small["p99_ms"] < 50,
        "exact_70k zero errors": small["errors"] == 0,
        "approx_1m batched >= 50% of echo": r["approx_1m_batched_vs_echo"] >= 0.5,
        "approx_1m batching on >= 3x off": r["approx_1m_batched_vs_unbatched"] >= 3.0,
    }
    return report


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    la0 = ", ".join(f"{v:.2f}" for v in m["load_average_at_start"])
    la1 = ", ".join(f"{v:.2f}" for v in m["load_average_at_end"])
    lines = [
        f"# Server benchmark, {report['date'][:10]}",
        "",
        f"{report['date']} on {m['platform']}, {m['cpus']} CPUs shared by server and load generator "
        f"(load average {la0} at start, {la1} at end), grpcio {m['grpcio']}. Load: "
        f"`latentsearch.loadgen` in a separate process, concurrency {s['concurrency']}, {s['duration']} s "
        f"per scenario after a {s['warmup']} s warm-up, Nearest k = {s['k']}, queries from the box and "
        f"prior families, d = {s['dim']}. Servers: default config (2 search threads; batching: max_batch "
        "64, max_wait 2 ms).",
        "",
        "| scenario | rps | vs echo | p50 ms | p90 ms | p99 ms | errors | mean batch | server cores "
        "| server CPU ms/call | load cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    echo = report["scenarios"][0]["rps"]
    for sc in report["scenarios"]:
        mb = sc.get("mean_batch_size")
        lines.append(
            f"| {sc['name']} | {sc['rps']:.0f} | {sc['rps'] / echo:.2f} | {sc['p50_ms']:.2f} | "
            f"{sc['p90_ms']:.2f} | {sc['p99_ms']:.2f} | {sc['errors']} | "
            f"{'' if mb is None else f'{mb:.1f}'} | {sc['server_cpu_cores']:.2f} | "
            f"{sc['server_cpu_ms_per_call']:.2f} | {sc['client_cpu_cores']:.2f} |"
        )
    small, large = report["small_index"], report["large_index"]
    ce, ca = small["search_cost_exact"], large["search_cost_approx"]
    r = report["ratios"]
    lines += [
        "",
        f"Ratios: exact 70k / echo {r['exact_70k_vs_echo']:.2f}; approx 1M batched / echo "
        f"{r['approx_1m_batched_vs_echo']:.2f}; approx 1M batching on / off "
        f"{r['approx_1m_batched_vs_unbatched']:.2f}x.",
        "",
        f"Search cost alone (in-process `search_batch`, per query): exact 70k {ce['single_ms']:.2f} ms "
        f"single, {ce['batch64_ms_per_query']:.3f} ms in a batch of 64; approx 1M {ca['single_ms']:.2f} ms "
        f"single, {ca['batch64_ms_per_query']:.3f} ms in a batch of 64. Index builds: 70k "
        f"{small['build_s']:.1f} s, 1M {large['build_s']:.1f} s.",
        "",
        "Server / load cores: CPU seconds per wall second of the server process (all its threads) and "
        "of the load process. By Little's law the mean latency at concurrency C is C / rps, so a "
        "p99 bound at C = 64 also bounds the rps (p99 < 50 ms needs well over 1,280 rps).",
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario (default 8)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent calls (default 64)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per scenario (default 1)")
    parser.add_argument("--d", type=int, default=10, help="latent dimension (default 10)")
    parser.add_argument("--n-small", type=int, default=70_000, help="exact index size (default 70,000)")
    parser.add_argument(
        "--n-large", type=int, default=1_000_000, help="approx index size (default 1,000,000)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    write_results(args.out, f"server-{time.strftime('%Y-%m-%d')}", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

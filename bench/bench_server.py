"""Server benchmark: Nearest throughput and latency over gRPC against a no-search echo ceiling.

Scenarios, each measured with :mod:`latentsearch.loadgen` from a separate (spawned) process so client
and server do not share a GIL; the servers run in this process, one at a time, with the default
:class:`~server.app.ServerConfig`:

* ``echo``: a grpc.aio LatentSearch service whose Nearest returns a fixed 10-neighbour response
  without searching (same request/response messages, same server options): the ceiling;
* ``exact_2k``: Nearest over 2,000 items (exact): the serving path with almost no search cost;
* ``exact_70k``: Nearest over a 70,000-item d=10 index in its default mode (exact below 100,000);
* ``approx_70k``: the same items with an approximate index, Nearest in approximate mode;
* ``approx_1m_batched`` / ``approx_1m_unbatched``: Nearest over 1,000,000 items in approximate
  mode, micro-batching on and off.

Those are the names at the default sizes; each name carries the item count actually run
(:func:`scenario_name`), so a quick run's (``--n-small 5000 --n-large 50000``) are ``exact_5k``,
``approx_5k``, ``approx_50k_batched``, ...

Two cores are shared by the server and the load generator, and a shared machine drifts by 10-20%
between runs, so the whole set is measured ``--rounds`` times (echo first in each round) and every
ratio to echo is taken within its round; the report gives each round and the medians. Queries mix the
``box`` (z uniform in [-5, 5]^d) and ``prior`` (z ~ N(0, I)) families, k = 10. Each scenario gets a
short warm-up run first. Recorded beside throughput and latency: CPU seconds of the server process and
of the load process, the mean batch, and the wall time of each batched search round (search plus
replies, on the search thread), and the search cost alone (``search_batch`` in-process).

Usage::

    python -m bench.bench_server [--duration 8] [--concurrency 64] [--rounds 3]

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
from typing import Any, NoReturn

import grpc
import numpy as np
from grpc import aio

from bench.results_io import write_results
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import SearchEngine, SearchMode
from latentsearch.indexer.root import IndexRoot
from latentsearch.loadgen import LoadConfig, run_load_sync
from latentsearch.progress import format_count
from latentsearch.server.app import LatentSearchServer, ServerConfig, grpc_options
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

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
    seed: int = 0,
    server_stats: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Warm up, then one measured load run; returns rps, latencies, errors and CPU use.

    ``seed`` picks the load's query pool (each round of the benchmark uses its own).
    """
    def load(seconds: float, load_seed: int) -> LoadConfig:
        return LoadConfig(
            target=f"127.0.0.1:{port}", concurrency=concurrency, dim=dim, mode=mode, k=K,
            duration=seconds, seed=load_seed,
        )

    if warmup > 0:
        pool.submit(_load_in_child, load(warmup, 99)).result()
    before = server_stats() if server_stats else {}
    cpu0, wall0 = os.times(), time.perf_counter()
    doc = pool.submit(_load_in_child, load(duration, seed)).result()
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
        rounds = after["rounds"] - before["rounds"]
        round_s = after["round_s"] - before["round_s"]
        row["search_round_ms"] = 1e3 * round_s / rounds if rounds else None
        row["search_busy"] = round_s / wall  # share of the time a batched round was computing
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
            "rounds": reg.get_sample_value("latentsearch_batch_search_seconds_count") or 0.0,
            "round_s": reg.get_sample_value("latentsearch_batch_search_seconds_sum") or 0.0,
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


def build_root(root: Path, n: int, d: int, *, approx: bool, seed: int) -> tuple[SearchEngine, float]:
    bank = vae_like_posteriors(n, d, seed=seed)
    t = time.perf_counter()
    engine = SearchEngine.build(bank.mu, log_sigma=bank.log_sigma, labels=bank.labels, build_approx=approx)
    build_s = time.perf_counter() - t
    IndexRoot(root, create=True).publish_engine(engine, {"bench": "server"}, keep=None)
    return engine, build_s


# -- the run ------------------------------------------------------------------------------------
# (kind, size setting, variant, index, batching, Nearest mode); indexes are built once per run. The
# scenario's name is derived from the size run (scenario_name): exact_70k at the default n_small.
SCENARIOS: tuple[tuple[str, str, str, str, bool, str | None], ...] = (
    ("exact", "n_tiny", "", "tiny", True, None),
    ("exact", "n_small", "", "small", True, None),
    ("approx", "n_small", "", "small_approx", True, "approx"),
    ("approx", "n_large", "_batched", "large", True, "approx"),
    ("approx", "n_large", "_unbatched", "large", False, "approx"),
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


def _recorded(medians: dict[str, float | None], key: str) -> float:
    """A median the scenario recorded in every round (vs_echo and vs_unbatched where the run sets them)."""
    value = medians[key]
    assert value is not None, f"no {key} recorded"
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    d = args.d
    named = scenarios(vars(args))
    batched, unbatched = _batched_names(vars(args))
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
            "rounds": args.rounds,
            "families": ["box", "prior"],
            "n_tiny": args.n_tiny,
            "n_small": args.n_small,
            "n_large": args.n_large,
            # name -> what it runs; the names carry the item counts run
            "scenarios": {
                name: {"index": index, "batching": batching, "mode": mode or "default"}
                for name, (index, batching, mode) in named.items()
            },
            "server_config": dataclasses.asdict(ServerConfig(index="unused")),
        },
    }
    loop = LoopThread()
    ctx = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bench-server-") as tmp,
        ProcessPoolExecutor(1, mp_context=ctx) as pool,
    ):
        pool.submit(time.sleep, 0).result()  # start the load process before timing anything
        queries = np.concatenate(list(query_families(vae_like_posteriors(1000, d), 64, seed=7).values())[:2])
        roots: dict[str, Path] = {}
        indexes: dict[str, Any] = {}
        # name, items, approximate index, seed, mode of the in-process search cost
        builds: tuple[tuple[str, int, bool, int, SearchMode], ...] = (
            ("tiny", args.n_tiny, False, 3, "exact"),
            ("small", args.n_small, False, 1, "exact"),
            ("small_approx", args.n_small, True, 1, "approx"),
            ("large", args.n_large, True, 2, "approx"),
        )
        for name, n, with_approx, seed, search_mode in builds:
            roots[name] = Path(tmp) / name
            engine, build_s = build_root(roots[name], n, d, approx=with_approx, seed=seed)
            cost = search_cost(engine, queries, search_mode)
            indexes[name] = {"items": n, "build_s": build_s, "mode": search_mode, **cost}
            del engine
        report["indexes"] = indexes
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            log.info("round %d of %d", r + 1, args.rounds)
            rows: dict[str, dict[str, Any]] = {}
            echo, port = loop.run(start_echo(d))
            try:
                rows["echo"] = measure(pool, port, name="echo", seed=r, **common)
            finally:
                loop.run(echo.stop(1.0))
            for name, (index, batching, mode) in named.items():
                rows[name] = run_server_scenario(
                    loop, pool, roots[index], batching=batching, name=name, mode=mode, seed=r, **common
                )
                rows[name]["vs_echo"] = rows[name]["rps"] / rows["echo"]["rps"]
            on, off = rows[batched], rows[unbatched]
            on["vs_unbatched"] = on["rps"] / off["rps"] if off["rps"] else float("inf")
            rounds.append(rows)
    loop.close()
    report["rounds"] = rounds
    report["machine"]["load_average_at_end"] = os.getloadavg()
    median: dict[str, dict[str, float | None]] = {}
    for name in ("echo", *named):
        per = [rows[name] for rows in rounds]
        median[name] = {
            key: _median([p[key] for p in per])
            for key in ("rps", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_call", "client_cpu_cores")
        }
        for key in ("vs_echo", "vs_unbatched", "mean_batch_size", "search_round_ms", "search_busy"):
            values = [p[key] for p in per if p.get(key) is not None]
            median[name][key] = _median(values) if values else None
    report["median"] = median
    exact = scenario_name("exact", args.n_small)
    approx = scenario_name("approx", args.n_large)
    small, on = median[exact], median[batched]
    report["targets"] = {
        f"{exact} >= 80% of echo": bool(_recorded(small, "vs_echo") >= 0.8),
        f"{exact} p99 < 50 ms": bool(_recorded(small, "p99_ms") < 50),
        f"{exact} zero errors": all(rows[exact]["errors"] == 0 for rows in rounds),
        f"{approx} batched >= 50% of echo": bool(_recorded(on, "vs_echo") >= 0.5),
        f"{approx} batching on >= 3x off": bool(_recorded(on, "vs_unbatched") >= 3.0),
    }
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    la0 = ", ".join(f"{v:.2f}" for v in m["load_average_at_start"])
    la1 = ", ".join(f"{v:.2f}" for v in m["load_average_at_end"])
    cfg = s["server_config"]
    lines = [
        f"# Server benchmark, {report['date'][:10]}",
        "",
        f"{report['date']} on {m['platform']}, {m['cpus']} CPUs shared by server and load generator "
        f"(load average {la0} at start, {la1} at end), grpcio {m['grpcio']}. Load: "
        f"`latentsearch.loadgen` in a separate process, concurrency {s['concurrency']}, {s['duration']} s "
        f"per scenario after a {s['warmup']} s warm-up, Nearest k = {s['k']}, queries from the box and "
        f"prior families, d = {s['dim']}; {s['rounds']} rounds, each starting with echo. Servers: default "
        f"config ({cfg['search_threads']} search threads, {cfg['batch_concurrency']} batched round at a "
        f"time, max_batch {cfg['max_batch']}, max_wait {cfg['max_wait_ms']} ms, FAISS threads 1).",
        "",
        "Medians over the rounds (each ratio taken against the echo of its own round):",
        "",
        "| scenario | rps | vs echo | p50 ms | p99 ms | errors | mean batch | round ms | search busy "
        "| server CPU ms/call | load cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["median"].items():
        lines.append(
            f"| {name} | {row['rps']:.0f} | {_fmt(row['vs_echo'], '.2f') or '1.00'} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['errors']:.0f} | {_fmt(row['mean_batch_size'], '.1f')} | "
            f"{_fmt(row['search_round_ms'], '.2f')} | {_fmt(row['search_busy'], '.2f')} | "
            f"{row['server_cpu_ms_per_call']:.3f} | {row['client_cpu_cores']:.2f} |"
        )
    lines += ["", "Each round (rps, ratio to that round's echo):", ""]
    names = list(report["median"])
    lines.append("| round | " + " | ".join(names) + " |")
    lines.append("| --- |" + " ---: |" * len(names))
    for r, rows in enumerate(report["rounds"], 1):
        cells = [
            f"{rows[n]['rps']:.0f}" + ("" if n == "echo" else f" ({rows[n]['vs_echo']:.2f})") for n in names
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    on = report["median"][_batched_names(s)[0]]
    lines += [
        "",
        f"Micro-batching on / off at {format_count(s['n_large'])} items (median of per-round ratios): "
        f"{on['vs_unbatched']:.2f}x.",
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
        "Round ms: wall time of one batched Nearest round on the search thread (search and replies); "
        "search busy: the share of the scenario's time such a round was running. Server / load cores: "
        "CPU seconds per wall second of the server process (all its threads) and of the load process. "
        "By Little's law the mean latency at concurrency C is C / rps.",
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
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
        "--n-large", type=int, default=1_000_000, help="approx index size (default 1,000,000)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scenarios(vars(args))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    write_results(args.out, f"server-{time.strftime('%Y-%m-%d')}", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

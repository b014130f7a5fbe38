"""Cost of exact search with match probabilities (certified log q(z)) vs without.

    python -m bench.bench_probability [--n 70000] [--batches 1,64] [--repeats 7] [--out DIR]

For a VAE-like bank (``latentsearch.data.banks.vae_like_posteriors``) and the box / prior /
posterior query families, times ``search_batch_arrays(..., mode="exact")`` with and without
``with_probability=True`` (best of ``--repeats``, interleaved; B = 1 averaged over 16 queries), and
the build of the typicality reference. Reports the ratio, the items rescored in float64 per query and
the certified relative width of the normaliser interval. The issue's target is <= 2x at 1M items
for prior and posterior queries (``--n 1000000 --partitions``). Run with ``OPENBLAS_NUM_THREADS=1``
on a shared machine: multi-threaded BLAS made single timings swing 5x under load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_io import write_results
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine.lifting import lift_points
from latentsearch.engine.probability import normalise

REPO = Path(__file__).resolve().parents[1]


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(n: int, batches: list[int], repeats: int, samples: int, partitions: bool) -> dict[str, Any]:
    bank = vae_like_posteriors(n)
    config = EngineConfig(typicality_samples=0, num_threads=1)
    engine = SearchEngine.from_bank(bank, config, build_approx=partitions)
    t = time.perf_counter()
    engine.typicality = engine.build_typicality(samples)
    build_s = time.perf_counter() - t
    rows: list[dict[str, Any]] = []
    for family, z in query_families(bank, max(64, *batches)).items():
        plain_run = engine.search_batch_arrays(z, 10, mode="exact")
        rescore = engine._rescorer(z, None)
        norm = normalise(engine.exact, lift_points(z), plain_run.scores[:, 0], rescore, None)
        for b in batches:
            queries = [z[i : i + 1] for i in range(16)] if b == 1 else [z[:b]]
            plain = with_p = 0.0
            for q in queries:
                plain += _best(partial(engine.search_batch_arrays, q, 10, mode="exact"), repeats)
                with_p += _best(
                    partial(engine.search_batch_arrays, q, 10, mode="exact", with_probability=True), repeats
                )
            plain, with_p = plain / len(queries), with_p / len(queries)
            rows.append(
                {
                    "family": family,
                    "batch": b,
                    "plain_ms": 1e3 * plain,
                    "with_probability_ms": 1e3 * with_p,
                    "ratio": with_p / plain,
                    "rescored_median": float(np.median(norm.rescored)),
                    "rescored_max": int(norm.rescored.max()),
                    "rel_width_max": float(norm.rel_error.max()),
                }
            )
            print(rows[-1], flush=True)
    strategy = "partitions (branch and bound)" if partitions else "flat"
    return {
        "items": n,
        "exact_strategy": strategy,
        "typicality_samples": samples,
        "typicality_build_s": build_s,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=70_000)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--partitions", action="store_true", help="build the approximate index: exact mode "
                    "then finds the top-k by branch and bound over partitions (the 1M configuration)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    report = bench(args.n, batches, args.repeats, args.samples, args.partitions)
    report["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["host"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()}
    lines = [
        f"# Probability benchmark ({report['date']}, {args.n} items, exact mode, "
        f"{report['exact_strategy']}, one thread)",
        "",
        f"Typicality reference ({args.samples} samples) built in {report['typicality_build_s']:.2f} s; "
        f"load average {report['host']['load'][0]:.1f} on {report['host']['cpus']} CPUs.",
        "",
        "| family | B | plain ms | with p ms | ratio | rescored (median / max) | max rel width |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['family']} | {r['batch']} | {r['plain_ms']:.3f} | {r['with_probability_ms']:.3f} | "
            f"{r['ratio']:.2f} | {r['rescored_median']:.0f} / {r['rescored_max']} | "
            f"{r['rel_width_max']:.1e} |"
        )
    write_results(args.out, f"probability-{dt.date.today().isoformat()}", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

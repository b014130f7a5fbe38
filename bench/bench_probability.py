"""Cost of exact search with match probabilities (certified log q(z)) vs without, in the same run.

    python -m bench.bench_probability [--posteriors BANK.npz | --model MODEL_DIR] \
        [--sizes 70000,1000000] [--batches 1] [--queries 12] [--rounds 5] [--out DIR]

Banks: the first n posteriors of ``--posteriors`` (an ``.npz`` from ``bench/model_bank.py``: real
VAE posteriors), or ``--model`` sampled the same way, or else the synthetic VAE-like bank
(``latentsearch.data.banks.vae_like_posteriors``). Each size is built with the engine's defaults
(below ``approx_min_items`` = 100k exact mode screens flat scale groups; from 100k up it finds the
top-k by branch and bound over the partitions, and the normaliser bounds whole partitions).

For the box / prior / posterior query families, times ``search_batch_arrays(..., mode="exact")``
without and with ``with_probability=True``: per round, every query of a family once each way,
interleaved; the figure is the median over rounds of the mean per call (B = 1: ``--queries`` one-query
calls; larger B: one call). With partitions it also times the normaliser forced onto the flat
screens (``PARTITION_MAX_QUERIES = 0``), the cost before partition bounds were used. Reports the
ratios, the largest certified relative width of the normaliser interval, and the build of the
typicality reference. Timings on a shared machine swing with its load: compare the ratios,
taken in the same run. Run with ``OPENBLAS_NUM_THREADS=1`` (the engine answers small calls on one
thread). The issue's target: <= 2x at 1M items for prior and posterior queries.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_io import write_results
from latentsearch.bank import PosteriorBank
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine import probability as probability_module
from latentsearch.engine.approx import ApproxQuery
from latentsearch.engine.lifting import lift_points
from latentsearch.engine.probability import SearchWork, normalise

REPO = Path(__file__).resolve().parents[1]
K = 10


def load_bank(args: argparse.Namespace, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``mu, log_sigma (n, d)`` float64 and a description of where they came from."""
    if args.posteriors:
        data = np.load(args.posteriors, mmap_mode="r")
        mu = np.asarray(data["mu"][:n], dtype=np.float64)
        log_sigma = 0.5 * np.asarray(data["logvar"][:n], dtype=np.float64)
        source = f"first {n} posteriors of {args.posteriors}"
        sidecar = Path(str(args.posteriors) + ".json")
        if sidecar.exists():  # written by bench/model_bank.py
            meta = json.loads(sidecar.read_text())
            source += f" ({meta['method']}; model hash {str(meta['model_hash'])[:12]})"
    elif args.model:
        from bench.model_bank import model_bank  # torch only when a model is asked for

        sampled = model_bank(args.model, n, seed=args.seed)
        mu = sampled["mu"].astype(np.float64)
        log_sigma = 0.5 * sampled["logvar"].astype(np.float64)
        source = f"{n} posteriors sampled from the VAE in {args.model} (bench/model_bank.py)"
    else:
        bank = vae_like_posteriors(n, seed=args.seed)
        mu, log_sigma = bank.mu, bank.log_sigma
        source = "synthetic VAE-like posteriors (latentsearch.data.banks.vae_like_posteriors)"
    if mu.shape[0] < n:
        raise SystemExit(f"the bank holds {mu.shape[0]} posteriors, fewer than --sizes asks ({n})")
    return mu, log_sigma, source


def _mean_call_s(engine: SearchEngine, calls: list[np.ndarray], with_probability: bool) -> float:
    t = time.perf_counter()
    for z in calls:
        engine.search_batch_arrays(z, K, mode="exact", with_probability=with_probability)
    return (time.perf_counter() - t) / len(calls)


def _flat_normaliser(engine: SearchEngine, calls: list[np.ndarray]) -> float:
    """Mean call time with probabilities computed by flat screens only (no partition bounds)."""
    before = probability_module.PARTITION_MAX_QUERIES
    probability_module.PARTITION_MAX_QUERIES = 0
    try:
        return _mean_call_s(engine, calls, True)
    finally:
        probability_module.PARTITION_MAX_QUERIES = before


def _normaliser_stats(engine: SearchEngine, calls: list[np.ndarray]) -> dict[str, float]:
    """Median items rescored in float64 and partitions read per query, from the normaliser itself."""
    rescored, read = [], []
    for z in calls:
        top = engine.search_batch_arrays(z, K, mode="exact")
        lifted, rescore = lift_points(z), engine._rescorer(z, None)
        work = None
        if engine.approx is not None:
            query = ApproxQuery(points=z, std=None, lifted=lifted, rescore=rescore)
            work = SearchWork(partitions=engine.approx.partition_bounds(query))
        norm = normalise(engine.exact, lifted, top.rows, top.scores, rescore, None, work=work)
        rescored += norm.rescored.tolist()
        read += norm.partitions_read.tolist()
    return {"rescored_median": float(np.median(rescored)), "partitions_read_median": float(np.median(read))}


def bench_size(args: argparse.Namespace, n: int, batches: list[int]) -> dict[str, Any]:
    mu, log_sigma, source = load_bank(args, n)
    print(f"bank: {n} x d={mu.shape[1]} ({source})", flush=True)
    bank = PosteriorBank(mu, log_sigma)
    t = time.perf_counter()
    engine = SearchEngine.from_bank(bank, EngineConfig(typicality_samples=0, num_threads=1))
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.typicality = engine.build_typicality(args.samples)
    typicality_s = time.perf_counter() - t
    partitions = engine.approx is not None
    print(f"built in {build_s:.1f} s (partitions: {partitions}); typicality {typicality_s:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for family, z in query_families((mu, log_sigma), max(args.queries, *batches), seed=args.seed + 1).items():
        for b in batches:
            calls = [z[i : i + 1] for i in range(args.queries)] if b == 1 else [z[:b]]
            for warm in (False, True):  # warm: builds the flat FAISS indexes the screens read
                _mean_call_s(engine, calls[:1], warm)
            plain, with_p, flat = [], [], []
            for _ in range(args.rounds):
                plain.append(_mean_call_s(engine, calls, False))
                with_p.append(_mean_call_s(engine, calls, True))
                if partitions:
                    flat.append(_flat_normaliser(engine, calls))
            plain_a, with_a, flat_a = np.array(plain), np.array(with_p), np.array(flat)
            res = [engine.search_batch_arrays(c, K, mode="exact", with_probability=True) for c in calls]
            row = {
                "family": family,
                "batch": b,
                "rounds": args.rounds,
                "calls_per_round": len(calls),
                "plain_ms": 1e3 * float(np.median(plain)),
                "with_probability_ms": 1e3 * float(np.median(with_p)),
                "ratio": float(np.median(with_a / plain_a)),  # median of the per-round ratios
                "rel_width_max": float(
                    max(np.expm1(r.log_qz_upper - r.log_qz_lower).max() for r in res)  # type: ignore[operator]
                ),
                **_normaliser_stats(engine, calls),
            }
            if partitions:
                row["flat_normaliser_ms"] = 1e3 * float(np.median(flat))
                row["flat_ratio"] = float(np.median(flat_a / plain_a))
            rows.append(row)
            print(row, flush=True)
    return {
        "items": n,
        "source": source,
        "exact_strategy": "partitions (branch and bound)" if partitions else "flat scale groups",
        "build_s": build_s,
        "typicality_samples": args.samples,
        "typicality_build_s": typicality_s,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--posteriors", type=Path, help="an .npz of mu and logvar (bench/model_bank.py)")
    src.add_argument("--model", help="a model directory: sample the posteriors from it (bench/model_bank.py)")
    ap.add_argument("--sizes", default="70000,1000000", help="bank sizes, comma-separated")
    ap.add_argument("--batches", default="1", help="queries per call, comma-separated")
    ap.add_argument("--queries", type=int, default=12, help="one-query calls per round (B = 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1024, help="typicality reference samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    reports = [bench_size(args, n, batches) for n in sizes]
    report: dict[str, Any] = {
        "date": date,
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_at_start": load_start,
            "load_at_end": os.getloadavg(),
        },
        "command": " ".join(["python -m bench.bench_probability", *(sys.argv[1:] if argv is None else argv)]),
        "k": K,
        "sizes": reports,
    }
    lines = [
        f"# Probability benchmark ({date}, exact mode, k = {K}, one thread)",
        "",
        f"Load average {load_start[0]:.1f} at start, {report['host']['load_at_end'][0]:.1f} at end, on "
        f"{report['host']['cpus']} CPUs shared with other work: absolute times are noisy, the ratios "
        "(plain and with-probability calls interleaved in the same rounds) are the figures to compare. "
        "Times are the median over rounds of the mean per call; ratios the median of the per-round ratios.",
        "",
        f"Command: `OPENBLAS_NUM_THREADS=1 {report['command']}`",
        "",
    ]
    for r in reports:
        lines += [
            f"## {r['items']:,} items: {r['exact_strategy']}",
            "",
            f"{r['source']}. Built in {r['build_s']:.1f} s; typicality reference ({r['typicality_samples']} "
            f"samples) in {r['typicality_build_s']:.1f} s.",
            "",
            "| family | B | plain ms | with p ms | ratio | flat-screen normaliser ms (ratio) | rounds "
            "| max rel width | rescored (median) | partitions read (median) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in r["runs"]:
            flat = "-"
            if "flat_ratio" in row:
                flat = f"{row['flat_normaliser_ms']:.2f} ({row['flat_ratio']:.2f})"
            lines.append(
                f"| {row['family']} | {row['batch']} | {row['plain_ms']:.2f} | "
                f"{row['with_probability_ms']:.2f} | {row['ratio']:.2f} | {flat} | {row['rounds']} | "
                f"{row['rel_width_max']:.1e} | {row['rescored_median']:.0f} | "
                f"{row['partitions_read_median']:.0f} |"
            )
        lines.append("")
    stem = f"probability-{dt.date.today().isoformat()}"
    write_results(args.out, stem, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

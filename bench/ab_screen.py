"""In-process A/B of the exact flat path's batch screen: the fused block-maximum kernel against FAISS.

One engine (``exact_strategy="flat"``, no partitions) answers the same batches with
``exact.BATCH_SCREEN`` on (``latentsearch.engine.screen``) and off (FAISS's flat search of every
scale group, the path before it), beside FAISS ``IndexFlatIP`` top-10 on the lifted float32 vectors
(the baseline of bench_engine: no proof, no rescoring). The three are timed batch by batch in a new
random order each round; reported per family and batch size: ms per query (median over rounds),
the ratios, and whether both engine paths returned the same rows and scores (they must: the screen
changes the candidates' route, not the answer) and the float64 brute force's rows.

    python -m bench.ab_screen --posteriors bank.npz --n 200000
    python -m bench.ab_screen --n 70000 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.bench_engine import load_bank, machine
from bench.results_io import write_results
from latentsearch.data.banks import query_families
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine import exact as exact_mod
from latentsearch.engine.lifting import lift_items, lift_points

K = 10
PATHS = ("screen", "faiss_path", "IndexFlatIP")


def _truth(mu: np.ndarray, log_sigma: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``(B, K)`` rows of the float64 numpy brute force (score descending, ties by row)."""
    inv = np.exp(-log_sigma)
    norm = log_sigma.sum(1)
    rows = []
    for point in z:
        u = (point - mu) * inv
        score = -0.5 * (u * u).sum(1) - norm  # log q up to the constant -d/2 log 2 pi
        rows.append(np.lexsort((np.arange(score.size), -score))[:K])
    return np.stack(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    mu, log_sigma, source = load_bank(args)
    n, d = mu.shape
    config = EngineConfig(num_threads=args.threads, exact_strategy="flat")
    t = time.perf_counter()
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=False)
    build_s = time.perf_counter() - t
    xb = np.ascontiguousarray(lift_items(mu, log_sigma), dtype=np.float32)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    batches = [int(b) for b in args.batches.split(",")]
    families = query_families((mu, log_sigma), max(batches) * args.calls, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed)
    cases: list[dict[str, Any]] = []
    for family, zs in families.items():
        for nq in batches:
            calls = [zs[i * nq : (i + 1) * nq] for i in range(args.calls)]
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            answers: dict[str, list[Any]] = {}
            for _ in range(args.rounds):
                for path in rng.permutation(PATHS).tolist():
                    exact_mod.BATCH_SCREEN = path == "screen"
                    got = []
                    t = time.perf_counter()
                    for z in calls:
                        if path == "IndexFlatIP":
                            with_threads(
                                args.threads, lambda z=z: flat.search(lift_points(z).astype(np.float32), K)
                            )
                        else:
                            got.append(engine.search_batch_arrays(z, K, mode="exact"))
                    times[path].append((time.perf_counter() - t) / (nq * args.calls))
                    answers.setdefault(path, got)
            exact_mod.BATCH_SCREEN = True
            same = all(
                np.array_equal(a.rows, b.rows) and np.array_equal(a.scores, b.scores)
                for a, b in zip(answers["screen"], answers["faiss_path"], strict=True)
            )
            truth = _truth(mu, log_sigma, calls[0])
            exact = bool(np.array_equal(answers["screen"][0].rows, truth))
            ms = {p: 1e3 * float(np.median(v)) for p, v in times.items()}
            case = {"family": family, "B": nq, "ms_per_query": ms, "same": same, "brute_force_rows": exact}
            case["speedup_vs_faiss_path"] = ms["faiss_path"] / ms["screen"]
            case["vs_IndexFlatIP"] = ms["IndexFlatIP"] / ms["screen"]
            cases.append(case)
            print(f"{family} B={nq}: " + ", ".join(f"{p} {v:.3f}" for p, v in ms.items()), "ms/q", flush=True)
    return {
        "benchmark": "ab_screen",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.ab_screen", *sys.argv[1:]]),
        "note": args.note,
        "machine": machine(),
        "bank": {"items": n, "d": d, "source": source, "groups": [len(g) for g in engine.exact.groups]},
        "build_s": build_s,
        "threads": args.threads,
        "rounds": args.rounds,
        "calls_per_case": args.calls,
        "cases": cases,
    }


def with_threads(threads: int, fn: Any) -> Any:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(before)


def markdown(report: dict[str, Any]) -> str:
    bank = report["bank"]
    lines = [
        f"# Batch screen A/B, {report['date'][:10]}",
        "",
        f"_{report['note']}_" if report["note"] else "",
        "",
        f"Command: `{report['command']}`. {bank['items']:,} items, d = {bank['d']} ({bank['source']}); "
        f"scale groups {bank['groups']}; {report['threads']} thread(s); {report['rounds']} rounds of "
        f"{report['calls_per_case']} calls per case, the three paths in a new random order each round; "
        f"machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in report['machine']['load_average_at_start'])} at start.",
        "",
        "ms per query (median over rounds). `screen`: the exact flat path with the fused batch screen "
        "(latentsearch.engine.screen); `faiss_path`: the same engine with `exact.BATCH_SCREEN = False` "
        "(FAISS's flat search per scale group); `IndexFlatIP`: FAISS top-10 on the lifted float32 "
        "vectors (no certification, no float64 rescoring).",
        "",
        "| family | B | screen | faiss_path | IndexFlatIP | speed-up | vs IndexFlatIP | same | brute force |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in report["cases"]:
        ms = c["ms_per_query"]
        times = " | ".join(f"{ms[p]:.3f}" for p in PATHS)
        ratios = f"{c['speedup_vs_faiss_path']:.2f}x | {c['vs_IndexFlatIP']:.2f}x"
        lines.append(
            f"| {c['family']} | {c['B']} | {times} | {ratios} | {c['same']} | {c['brute_force_rows']} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="bank size (with --posteriors: the first N)")
    parser.add_argument("--d", type=int, default=10, help="latent dimension for synthetic posteriors")
    parser.add_argument("--posteriors", help="npz with mu and logvar (or log_sigma) instead of synthetic")
    parser.add_argument("--model", help="model directory: sample --n posteriors from it (model_bank.py)")
    parser.add_argument("--batches", default="8,16,64", help="batch sizes B")
    parser.add_argument("--calls", type=int, default=4, help="calls of B queries per case and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="engine and FAISS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a sentence for the results file")
    parser.add_argument("--quick", action="store_true", help="20,000 items, 2 rounds (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.calls = min(args.n, 20_000), 2, 2
    report = run(args)
    bank = report["bank"]
    stem = f"ab-screen-{report['date'][:10]}-n{bank['items']}-d{bank['d']}"
    write_results(args.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""In-process A/B of the compiled kernel: another version of ``engine/kernels.py`` against this one.

On a shared or throttled host the speed of a whole process drifts (20-40% between two runs of the
same code were seen on the 2-core machines), so two benchmark runs cannot tell a 10% change from
noise. This benchmark loads the other version of the kernel module beside the working tree's in
one process (``--base REV``: ``git show REV:latentsearch/engine/kernels.py``; ``--base-file``: any
file), builds one engine, gives each version its own :class:`~latentsearch.engine.kernels.KernelIndex`
over the same partitions, and times them query batch by query batch in a new random order each
round, with a copy of the base as a third contender (its ratio to the base is the noise floor).

Cases, for box, prior and posterior queries: exact and approximate (the engine's default ``first``
and ``approx_kernel_budget``) at B = 1 and B = ``--batch``. Reported: ms per query of the base
(median over rounds), each contender's median ratio to it, and whether every contender returned
the base's rows (an A/B of a change meant to keep the answers should say "same").

    python -m bench.ab_kernel --posteriors bank.npz --n 200000 --base HEAD~1
    python -m bench.ab_kernel --n 50000 --base-file /tmp/kernels_variant.py --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np

import latentsearch.engine.kernels as current
from bench.bench_engine import load_bank, machine
from bench.results_io import write_results
from latentsearch.data.banks import query_families
from latentsearch.engine import EngineConfig, SearchEngine

K = 10
ROOT = Path(__file__).resolve().parents[1]
KERNELS = "latentsearch/engine/kernels.py"


def load_version(path: Path, name: str) -> ModuleType:
    """The kernel module at ``path``, imported under ``name`` (its numba cache beside the file)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_source(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The base version's file (copied into ``tmp``) and a phrase naming it."""
    if args.base_file:
        text, what = Path(args.base_file).read_text(), args.base_file
    else:
        shown = subprocess.run(
            ["git", "show", f"{args.base}:{KERNELS}"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        if shown.returncode != 0:
            raise SystemExit(f"--base {args.base}: {shown.stderr.strip()}")
        rev = subprocess.run(
            ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        text, what = shown.stdout, f"{KERNELS} at {args.base} ({rev})"
    path = tmp / "kernels_base.py"
    path.write_text(text)
    return path, what


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path, what = base_source(args, Path(tmp))  # a bad --base fails before the build
        mu, log_sigma, source = load_bank(args)
        faiss.omp_set_num_threads(args.threads)
        config = EngineConfig(typicality_samples=0, num_threads=args.threads, approx_min_items=1)
        engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=True)
        approx = engine.approx
        assert approx is not None
        # the base twice (its A/A ratio is the noise floor), then the working tree's
        base, again = load_version(path, "_ab_kernel_base"), load_version(path, "_ab_kernel_base_again")
        versions: dict[str, Any] = {"base": base, "base (copy)": again, "working tree": current}
        indexes = {}
        for name, module in versions.items():
            module.warm()
            indexes[name] = module.KernelIndex.of_approx(mu, log_sigma, approx)
        first = approx.nprobe
        visits = max(first, math.ceil(config.approx_kernel_budget * approx.nlist))
        cases: dict[str, tuple[dict[str, int], int]] = {
            "exact B=1": ({}, 1),
            "approx B=1": ({"max_visits": visits, "first": first}, 1),
            f"exact B={args.batch}": ({}, args.batch),
            f"approx B={args.batch}": ({"max_visits": visits, "first": first}, args.batch),
        }
        families = query_families((mu, log_sigma), args.queries, seed=args.seed + 1)
        same: dict[str, dict[str, bool]] = {}
        for case, (kw, _) in cases.items():
            for fam, zs in families.items():
                want = indexes["base"].search(zs, K, threads=args.threads, **kw).rows
                for name in ("base (copy)", "working tree"):
                    got = indexes[name].search(zs, K, threads=args.threads, **kw).rows
                    same.setdefault(name, {})[f"{fam} {case}"] = bool(np.array_equal(got, want))
        times: dict[tuple[str, str, str], list[float]] = {}
        rng = np.random.default_rng(args.seed + 2)
        names = list(indexes)
        for r in range(args.rounds):
            for case, (kw, b) in cases.items():
                for fam, zs in families.items():
                    calls = [zs[i : i + b] for i in range(0, len(zs) - b + 1, b)]
                    spent = dict.fromkeys(names, 0.0)
                    for q in calls:
                        for name in rng.permutation(names):
                            t = time.perf_counter()
                            indexes[name].search(q, K, threads=args.threads, **kw)
                            spent[name] += time.perf_counter() - t
                    for name in names:
                        times.setdefault((case, fam, name), []).append(spent[name] / (len(calls) * b))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for case in cases:
        for fam in families:
            base_ms = 1e3 * float(np.median(times[(case, fam, "base")]))
            ratios = {}
            for name in ("base (copy)", "working tree"):
                per_round = np.array(times[(case, fam, name)]) / np.array(times[(case, fam, "base")])
                ratios[name] = float(np.median(per_round))
            rows.append({"case": case, "family": fam, "base_ms": base_ms, "ratio_to_base": ratios})
    return {
        "benchmark": "ab_kernel",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "bank": {"items": len(mu), "latent_dim": mu.shape[1], "source": source},
        "base": what,
        "partitions": approx.nlist,
        "approx_first": first,
        "approx_max_visits": visits,
        "queries_per_family": args.queries,
        "rounds": args.rounds,
        "threads": args.threads,
        "rows": rows,
        "same_rows_as_base": same,
    }


def markdown(report: dict[str, Any]) -> str:
    bank = report["bank"]
    lines = [
        f"# Kernel A/B, {bank['items']:,} items, d = {bank['latent_dim']}",
        "",
        f"{report['date']} on {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"{report['threads']} thread(s). Bank: {bank['source']}. Base: {report['base']}; against it the "
        f"working tree's `{KERNELS}` and a second copy of the base (the noise floor), in one process, "
        f"{report['queries_per_family']} queries per family, {report['rounds']} rounds, every call timed "
        f"for each version in a new random order. Approximate: the first {report['approx_first']} of "
        f"{report['partitions']} partitions by centroid, at most {report['approx_max_visits']}. Ratios: "
        "median over rounds of the round's time over the base's (below 1: faster).",
        "",
        "| case | family | base ms/query | base (copy) / base | working tree / base | same rows |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        key = f"{r['family']} {r['case']}"
        same = report["same_rows_as_base"]["working tree"][key]
        lines.append(
            f"| {r['case']} | {r['family']} | {r['base_ms']:.3f} | {r['ratio_to_base']['base (copy)']:.3f} | "
            f"{r['ratio_to_base']['working tree']:.3f} | {'same' if same else 'DIFFERENT'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", default="HEAD", help="git revision of the base kernels.py (default HEAD)")
    which.add_argument("--base-file", help="a kernels.py file as the base instead of a git revision")
    parser.add_argument("--posteriors", help="npz with mu and logvar (bench/model_bank.py)")
    parser.add_argument("--model", help="VAE model directory to sample the posteriors from")
    parser.add_argument("--n", type=int, default=200_000, help="bank size (with --posteriors: the first N)")
    parser.add_argument("--d", type=int, default=10, help="latent dimension for synthetic posteriors")
    parser.add_argument("--queries", type=int, default=128, help="queries per family")
    parser.add_argument("--batch", type=int, default=64, help="the batched size B")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="5,000 items, 16 queries, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.batch, args.rounds = min(args.n, 5_000), 16, 8, 1
    report = run(args)
    stem = f"ab-kernel-{time.strftime('%Y-%m-%d', time.gmtime())}-n{report['bank']['items']}"
    out = Path(args.out) / ("quick" if args.quick else "")
    write_results(out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

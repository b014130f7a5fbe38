"""Engine benchmark: recall@10 and latency of four search methods on three query families.

Methods, all in one process on the same bank and queries:

* ``numpy``: vectorised float64 numpy brute force (the reference ranking and the speed baseline);
* ``mu_l2``: FAISS flat L2 on mu alone, then an exact float64 rerank of 1000 candidates;
* ``exact``: the engine's exact mode (branch and bound over the partitions, certified);
* ``exact_flat``: exact mode screening every item (certified float32 flat scan + float64 rerank);
* ``approx``: the engine's approximate mode (default nprobe, plus a sweep).

Query families: ``box`` (z uniform in [-5, 5]^d), ``prior`` (z ~ N(0, I)) and ``posterior``
(z ~ q(z|x) of random items). Latency is reported per query, single (one call per query, median
over queries) and batched (one call for all queries, total / B, median of repeats). Resident memory
after load is measured in a fresh subprocess that loads the saved engine and answers queries.

Usage::

    python -m bench.bench_engine --model MODEL_DIR --n 1000000  # posteriors sampled from a trained VAE
    python -m bench.bench_engine --posteriors bank.npz          # your posteriors (mu + logvar)
    python -m bench.bench_engine --n 1000000 --d 32             # synthetic VAE-like stress bank

Writes ``bench/results/engine-<date>-n<N>-d<d>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from bench.results_io import write_results
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine, SearchMode
from latentsearch.posterior import LOG_2PI

K = 10


class Method(Protocol):
    """A search method under test: row indices of the top ``k``, for one query or a batch."""

    def search(self, z: np.ndarray, k: int) -> np.ndarray: ...  # (d,) -> (k,)

    def search_batch(self, zs: np.ndarray, k: int) -> list[np.ndarray]: ...  # (B, d) -> B x (k,)


class NumpyBruteForce:
    """The baseline: vectorised float64 numpy over the whole bank, one query at a time."""

    def __init__(self, mu: np.ndarray, log_sigma: np.ndarray) -> None:
        self.mu = mu
        self.inv_sigma = np.exp(-log_sigma)
        self.penalty = log_sigma.sum(1) + 0.5 * mu.shape[1] * LOG_2PI

    def scores(self, z: np.ndarray) -> np.ndarray:
        u = (z - self.mu) * self.inv_sigma
        return -0.5 * np.einsum("ij,ij->i", u, u) - self.penalty

    def search(self, z: np.ndarray, k: int) -> np.ndarray:
        s = self.scores(z)
        top = np.argpartition(-s, k)[:k]
        return top[np.lexsort((top, -s[top]))]

    def search_batch(self, zs: np.ndarray, k: int) -> list[np.ndarray]:
        return [self.search(z, k) for z in zs]


class MuL2Rerank:
    """Nearest mu (FAISS flat L2) then an exact float64 rerank of ``rerank`` candidates."""

    def __init__(self, engine: SearchEngine, rerank: int = 1000) -> None:
        self.engine = engine
        self.rerank = rerank
        self.index = faiss.IndexFlatL2(engine.dim)
        self.index.add(np.ascontiguousarray(engine.bank.mu, dtype=np.float32))

    def search_batch(self, zs: np.ndarray, k: int) -> list[np.ndarray]:
        _, cand = self.index.search(np.ascontiguousarray(zs, dtype=np.float32), self.rerank)
        s = self.engine.bank.log_prob_rows(zs, cand)
        order = np.lexsort((cand, -s), axis=-1)[:, :k]
        return list(np.take_along_axis(cand, order, 1))

    def search(self, z: np.ndarray, k: int) -> np.ndarray:
        return self.search_batch(z[None, :], k)[0]


class EngineMethod:
    def __init__(self, engine: SearchEngine, mode: SearchMode, nprobe: int | None = None) -> None:
        self.engine, self.mode, self.nprobe = engine, mode, nprobe

    def search(self, z: np.ndarray, k: int) -> np.ndarray:
        return self.engine.search(z, k, mode=self.mode, nprobe=self.nprobe).rows

    def search_batch(self, zs: np.ndarray, k: int) -> list[np.ndarray]:
        return [r.rows for r in self.engine.search_batch(zs, k, mode=self.mode, nprobe=self.nprobe)]


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def time_single(method: Method, zs: np.ndarray, n: int) -> float:
    """Median seconds of one-query calls over the first ``n`` queries."""
    times = []
    for z in zs[:n]:
        t = time.perf_counter()
        method.search(z, K)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_batch(method: Method, zs: np.ndarray, repeats: int) -> tuple[float, list[np.ndarray]]:
    """Median over repeats of (one batched call) / B, and the last call's results."""
    times, out = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = method.search_batch(zs, K)
        times.append((time.perf_counter() - t) / len(zs))
    return float(np.median(times)), out


def measure_loaded(path: Path, queries: np.ndarray) -> dict[str, Any]:
    """Load the saved engine in a fresh process; report load seconds and RSS after load and queries."""
    qfile = path.parent / "queries.npy"
    np.save(qfile, queries)
    code = (
        "import json,time,numpy as np,psutil;"
        "from latentsearch.engine import SearchEngine;"
        f"t=time.perf_counter();e=SearchEngine.load({str(path)!r});lt=time.perf_counter()-t;"
        "r0=psutil.Process().memory_info().rss;"
        f"q=np.load({str(qfile)!r});e.search_batch(q,10,mode='exact');e.search_batch(q,10,mode='approx');"
        "r1=psutil.Process().memory_info().rss;"
        "print(json.dumps({'load_s':lt,'rss_after_load_mib':r0/2**20,'rss_after_queries_mib':r1/2**20}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average_at_start": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model:
        from bench.model_bank import model_bank

        t = time.perf_counter()
        sampled = model_bank(args.model, args.n, seed=args.seed)
        mu = sampled["mu"].astype(np.float64)
        log_sigma = 0.5 * sampled["logvar"].astype(np.float64)
        source = (
            f"posteriors of {args.n} items sampled from the VAE in {args.model} "
            f"(decode z ~ N(0, I), binarise, encode; {time.perf_counter() - t:.0f} s)"
        )
    elif args.posteriors:
        data = np.load(args.posteriors)
        mu = data["mu"].astype(np.float64)
        log_sigma = 0.5 * data["logvar"] if "logvar" in data else data["log_sigma"]
        source = f"posteriors from {args.posteriors}"
        sidecar = Path(args.posteriors + ".json")
        if sidecar.exists():  # written by bench/model_bank.py
            meta = json.loads(sidecar.read_text())
            source += f" ({meta['items']:,} items: {meta['method']}; model hash {meta['model_hash'][:12]})"
    else:
        bank = vae_like_posteriors(args.n, args.d, seed=args.seed)
        mu, log_sigma = bank.mu, bank.log_sigma
        source = "synthetic VAE-like posteriors (latentsearch.data.banks.vae_like_posteriors)"
    n, d = mu.shape
    print(f"bank: {n} x d={d} ({source})", flush=True)
    t = time.perf_counter()
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(), build_approx=True)
    build_s = time.perf_counter() - t
    print(f"built in {build_s:.1f}s: {engine.info()['approx']}", flush=True)
    families = query_families((mu, log_sigma), args.queries, seed=args.seed + 1)

    brute = NumpyBruteForce(mu, log_sigma)
    methods: dict[str, Method] = {
        "numpy": brute,
        "mu_l2": MuL2Rerank(engine),
        "exact": EngineMethod(engine, "exact"),
        "exact_flat": EngineMethod(
            SearchEngine(
                engine.bank,
                dataclasses.replace(engine.config, exact_strategy="flat"),
                exact=engine.exact,
                approx=engine.approx,
            ),
            "exact",
        ),
        "approx": EngineMethod(engine, "approx"),
    }
    sweep = [int(x) for x in args.nprobe_sweep.split(",") if x]
    for p in sweep:
        methods[f"approx_nprobe{p}"] = EngineMethod(engine, "approx", p)

    results: dict[str, Any] = {}
    for fam, zs in families.items():
        print(f"[{fam}] brute force reference ...", flush=True)
        numpy_batch, truth = time_batch(brute, zs, 1)
        row: dict[str, Any] = {}
        for name, method in methods.items():
            if name == "numpy":
                batch_s, found = numpy_batch, truth
            else:
                batch_s, found = time_batch(method, zs, args.repeats)
            single_s = time_single(method, zs, args.single)
            row[name] = {
                "recall@10": recall(found, truth),
                "single_ms": single_s * 1e3,
                "batch_ms": batch_s * 1e3,
            }
            print(
                f"  {name:18s} recall@10 {row[name]['recall@10']:.4f}  single {single_s * 1e3:8.3f} ms"
                f"  batched {batch_s * 1e3:8.3f} ms",
                flush=True,
            )
        results[fam] = row

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine"
        t = time.perf_counter()
        engine.save(path)
        save_s = time.perf_counter() - t
        memory = measure_loaded(path, families["box"][: min(64, args.queries)])
        memory["save_s"] = save_s
        memory["disk_mib"] = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    print(f"memory: {memory}", flush=True)

    ratios = {}
    for fam, row in results.items():
        ratios[fam] = {
            "exact_vs_numpy_batched": row["numpy"]["batch_ms"] / row["exact"]["batch_ms"],
            "exact_vs_numpy_single": row["numpy"]["single_ms"] / row["exact"]["single_ms"],
            "approx_vs_exact_batched": row["exact"]["batch_ms"] / row["approx"]["batch_ms"],
            "approx_vs_exact_single": row["exact"]["single_ms"] / row["approx"]["single_ms"],
            "exact_flat_vs_numpy_batched": row["numpy"]["batch_ms"] / row["exact_flat"]["batch_ms"],
            "approx_vs_exact_flat_batched": row["exact_flat"]["batch_ms"] / row["approx"]["batch_ms"],
        }
    return {
        "benchmark": "engine",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "bank": {"items": n, "latent_dim": d, "source": source},
        "queries_per_family": args.queries,
        "build_s": build_s,
        "engine": engine.info(),
        "results": results,
        "ratios": ratios,
        "memory": memory,
        "targets": {
            "exact >= 15x numpy (batched)": all(r["exact_vs_numpy_batched"] >= 15 for r in ratios.values()),
            "approx recall@10 >= 0.99 every family": all(
                results[f]["approx"]["recall@10"] >= 0.99 for f in results
            ),
            "approx >= 10x exact (batched)": all(r["approx_vs_exact_batched"] >= 10 for r in ratios.values()),
            "rss after load < 1 GiB": memory["rss_after_load_mib"] < 1024,
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Engine benchmark, {report['bank']['items']:,} items, d = {report['bank']['latent_dim']}",
        "",
        f"{report['date']} on {report['machine']['platform']}, {report['machine']['cpus']} CPUs "
        f"(load average {report['machine']['load_average_at_start'][0]:.1f} at start), "
        f"faiss {report['machine']['faiss']}. Bank: {report['bank']['source']}. "
        f"{report['queries_per_family']} queries per family; k = {K}; recall@10 against the float64 "
        f"numpy brute force. Latency per query: single = median of one-query calls, batched = one "
        f"call for all queries / B (median of repeats). Build {report['build_s']:.1f} s.",
        "",
        "| family | method | recall@10 | single ms | batched ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for fam, row in report["results"].items():
        for name, r in row.items():
            lines.append(
                f"| {fam} | {name} | {r['recall@10']:.4f} | {r['single_ms']:.3f} | {r['batch_ms']:.3f} |"
            )
    lines += [
        "",
        "| family | exact vs numpy (batched) | exact vs numpy (single) | approx vs exact (batched) "
        "| approx vs exact (single) | exact_flat vs numpy (batched) | approx vs exact_flat (batched) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fam, r in report["ratios"].items():
        lines.append(
            f"| {fam} | {r['exact_vs_numpy_batched']:.1f}x | {r['exact_vs_numpy_single']:.1f}x "
            f"| {r['approx_vs_exact_batched']:.1f}x | {r['approx_vs_exact_single']:.1f}x "
            f"| {r['exact_flat_vs_numpy_batched']:.1f}x | {r['approx_vs_exact_flat_batched']:.1f}x |"
        )
    m = report["memory"]
    lines += [
        "",
        f"Memory: RSS {m['rss_after_load_mib']:.0f} MiB after load ({m['load_s']:.2f} s), "
        f"{m['rss_after_queries_mib']:.0f} MiB after queries; {m['disk_mib']:.0f} MiB on disk.",
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="bank size for synthetic posteriors")
    parser.add_argument("--d", type=int, default=10, help="latent dimension for synthetic posteriors")
    parser.add_argument("--posteriors", help="npz with mu and logvar (or log_sigma) instead of synthetic")
    parser.add_argument("--model", help="model directory: sample --n posteriors from it (model_bank.py)")
    parser.add_argument("--queries", type=int, default=200, help="queries per family")
    parser.add_argument("--single", type=int, default=30, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the batched timing")
    parser.add_argument("--nprobe-sweep", default="32,128", help="extra approx nprobe values to report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    report = run(args)
    write_results(
        args.out,
        f"engine-{time.strftime('%Y-%m-%d')}-n{report['bank']['items']}-d{report['bank']['latent_dim']}",
        report,
        markdown(report),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

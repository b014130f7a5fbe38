"""Engine benchmark: latentsearch's exact and approximate modes beside FAISS peers, in one run.

Systems, all in one process on the same bank and the same queries:

* ``numpy``: vectorised float64 numpy brute force (the reference ranking and a speed baseline);
* ``faiss_flat_ip``: FAISS ``IndexFlatIP`` on the lifted vectors (engine/lifting.py: the inner
  product is log q(z|x)), float32, every item: the peer to beat (exact here only by luck). FAISS
  peers run on the engine's thread rule (one thread below 8 queries, all from 8 up);
* ``faiss_ivf``: FAISS ``IndexIVFFlat`` (inner product, lifted vectors), a small nlist / nprobe
  sweep; reported is the cheapest configuration (at B = 64) whose recall@10 reaches 0.99 on every
  family, else the best-recall one;
* ``mu_l2``: FAISS flat L2 on mu alone, then an exact float64 rerank of 1000 candidates;
* ``exact``: the engine's exact mode, default settings (``exact_strategy="auto"``: the cost model
  measured at build time picks partitions or the flat screen per call);
* ``exact_flat`` / ``exact_partitions`` / ``exact_kernel``: exact mode forced onto the flat certified
  screen / onto branch and bound over the partitions / onto the compiled branch and bound
  (engine/kernels.py);
* ``approx``: the engine's approximate mode (default settings, plus an nprobe sweep);
  ``approx_kernel`` / ``approx_scan``: forced onto the compiled kernel (``approx_strategy="kernel"``)
  / onto FAISS probes of the best centroid posteriors, reranked (``"scan"``).

Query families: ``box`` (z uniform in [-5, 5]^d), ``prior`` (z ~ N(0, I)) and ``posterior``
(z ~ q(z|x) of random items). Latency per query at B = 1 (one call per query over ``--single``
queries of each family) and at B = ``--batch`` (one call of that many queries / B), each taken in
every one of ``--rounds`` rounds, every query or batch answered by all systems in a new random
order (so a loaded machine, or caches warmed by the previous system, favour none), and reported as
the median over rounds. Recall@10 is over all ``--queries`` queries of a
family against the float64 numpy brute force, answered in calls of 1 and in calls of B (reported
for each: the approximate default's path depends on the call's size, see
``SearchEngine.approx_choice``); ``exact_match`` is the fraction of queries whose top-10 rows
equal it exactly, the worse of the two call sizes. Resident memory after load is measured in a
fresh subprocess.

Usage::

    python -m bench.bench_engine --model MODEL_DIR --n 1000000  # posteriors sampled from a trained VAE
    python -m bench.bench_engine --posteriors bank.npz --n 200000  # the first N of your posteriors
    python -m bench.bench_engine --n 1000000 --d 32             # synthetic VAE-like stress bank

Writes ``bench/results/engine-<date>-n<N>-d<d>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np

from bench.results_io import write_results
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine, SearchMode, lift_items, lift_points
from latentsearch.engine.strategy import ExactPath
from latentsearch.posterior import LOG_2PI

K = 10
# The recall a FAISS IVF configuration must reach on every family to count as a peer.
IVF_RECALL = 0.99
# The rule of issue 13: the default exact mode within this factor of the better forced strategy.
STRATEGY_SLACK = 1.10
EXACT_NAMES = ("exact", "exact_flat", "exact_partitions", "exact_kernel")


class Method(Protocol):
    """A search method under test: row indices of the top ``k`` for a batch ``(B, d)`` -> ``(B, k)``."""

    def search_batch(self, zs: np.ndarray, k: int) -> np.ndarray: ...


@contextmanager
def engine_threads(nq: int) -> Iterator[None]:
    """FAISS threads for a peer's call of ``nq`` queries, by the engine's own rule: one thread below
    8 queries (OpenMP's fork/join and spinning threads cost more than a small call's work, and slow
    whatever runs next on a loaded machine), the library default from 8 up."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if nq < 8 else before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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

    def search_batch(self, zs: np.ndarray, k: int) -> np.ndarray:
        return np.stack([self.search(z, k) for z in zs])


class FaissLifted:
    """A FAISS inner-product index over the lifted float32 vectors (score = log q(z|x) - const)."""

    def __init__(self, index: faiss.Index, nprobe: int | None = None) -> None:
        self.index = index
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe
        self.nprobe = nprobe

    def search_batch(self, zs: np.ndarray, k: int) -> np.ndarray:
        if self.nprobe is not None:  # several configurations share one IVF index
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        with engine_threads(len(zs)):
            _, rows = self.index.search(np.ascontiguousarray(lift_points(zs), dtype=np.float32), k)
        return rows


class MuL2Rerank:
    """Nearest mu (FAISS flat L2) then an exact float64 rerank of ``rerank`` candidates."""

    def __init__(self, engine: SearchEngine, rerank: int = 1000) -> None:
        self.engine = engine
        self.rerank = rerank
        self.index = faiss.IndexFlatL2(engine.dim)
        self.index.add(np.ascontiguousarray(engine.bank.mu, dtype=np.float32))

    def search_batch(self, zs: np.ndarray, k: int) -> np.ndarray:
        with engine_threads(len(zs)):
            _, cand = self.index.search(np.ascontiguousarray(zs, dtype=np.float32), self.rerank)
        s = self.engine.bank.log_prob_rows(zs, cand)
        order = np.lexsort((cand, -s), axis=-1)[:, :k]
        return np.take_along_axis(cand, order, 1)


class EngineMethod:
    def __init__(self, engine: SearchEngine, mode: SearchMode, nprobe: int | None = None) -> None:
        self.engine, self.mode, self.nprobe = engine, mode, nprobe

    def search_batch(self, zs: np.ndarray, k: int) -> np.ndarray:
        if len(zs) == 1:  # the single-query entry point, as a caller with one query uses it
            return self.engine.search(zs[0], k, mode=self.mode, nprobe=self.nprobe).rows[None, :]
        return self.engine.search_batch_arrays(zs, k, mode=self.mode, nprobe=self.nprobe).rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in pairs]))


def exact_match(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.array_equal(f, t) for f, t in zip(found, truth, strict=True)]))


def answer_all(method: Method, zs: np.ndarray, batch: int) -> np.ndarray:
    """``(Q, K)`` rows for all queries, in calls of ``batch``."""
    return np.concatenate([method.search_batch(zs[i : i + batch], K) for i in range(0, len(zs), batch)])


def per_query_s(method: Method, zs: np.ndarray, b: int) -> float:
    """Seconds per query of calls of ``b`` queries over ``zs`` (all of it, in calls of b)."""
    calls = [zs[i : i + b] for i in range(0, len(zs) - b + 1, b)]
    t = time.perf_counter()
    for q in calls:
        method.search_batch(q, K)
    return (time.perf_counter() - t) / (len(calls) * b)


def measure_loaded(path: Path, queries: np.ndarray) -> dict[str, Any]:
    """Load the saved engine in a fresh process; report load seconds and RSS after load and queries."""
    qfile = path.parent / "queries.npy"
    np.save(qfile, queries)
    code = (
        "import json,time,numpy as np,psutil;"
        "from latentsearch.engine import SearchEngine;"
        f"t=time.perf_counter();e=SearchEngine.load({str(path)!r});lt=time.perf_counter()-t;"
        "r0=psutil.Process().memory_info().rss;"
        f"q=np.load({str(qfile)!r});t=time.perf_counter();e.search(q[0],10,mode='exact');"
        "fq=time.perf_counter()-t;e.search_batch(q,10,mode='exact');e.search_batch(q,10,mode='approx');"
        "r1=psutil.Process().memory_info().rss;"
        "print(json.dumps({'load_s':lt,'first_query_s':fq,'rss_after_load_mib':r0/2**20,"
        "'rss_after_queries_mib':r1/2**20}))"
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
        # numpy's BLAS threads (the engine's dense screens and rescoring): set before the start.
        "blas_threads_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
    }


def load_bank(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """``mu, log_sigma (N, d)`` float64 and a sentence saying where they come from."""
    if args.model:
        from bench.model_bank import model_bank

        t = time.perf_counter()
        sampled = model_bank(args.model, args.n, seed=args.seed)
        mu = sampled["mu"].astype(np.float64)
        log_sigma = 0.5 * sampled["logvar"].astype(np.float64)
        return mu, log_sigma, (
            f"posteriors of {args.n} items sampled from the VAE in {args.model} "
            f"(decode z ~ N(0, I), binarise, encode; {time.perf_counter() - t:.0f} s)"
        )
    if args.posteriors:
        data = np.load(args.posteriors)
        n = args.n
        mu = data["mu"][:n].astype(np.float64)
        log_sigma = 0.5 * data["logvar"][:n] if "logvar" in data else data["log_sigma"][:n]
        log_sigma = log_sigma.astype(np.float64)
        source = f"the first {len(mu):,} posteriors of {args.posteriors}"
        sidecar = Path(args.posteriors + ".json")
        if sidecar.exists():  # written by bench/model_bank.py
            meta = json.loads(sidecar.read_text())
            source += f" ({meta['items']:,} items: {meta['method']}; model hash {meta['model_hash'][:12]})"
        return mu, log_sigma, source
    bank = vae_like_posteriors(args.n, args.d, seed=args.seed)
    source = "synthetic VAE-like posteriors (latentsearch.data.banks.vae_like_posteriors)"
    return bank.mu, bank.log_sigma, source


def ivf_sweep(
    lifted: np.ndarray,
    families: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> tuple[dict[str, FaissLifted], dict[str, Any]]:
    """Build one IVFFlat per nlist, measure recall and B-batch latency per nprobe; the candidates."""
    n = len(lifted)
    out: dict[str, FaissLifted] = {}
    sweep: dict[str, Any] = {}
    for mult in [float(x) for x in args.ivf_nlist.split(",") if x]:
        nlist = max(1, round(mult * math.sqrt(n)))
        t = time.perf_counter()
        quantizer = faiss.IndexFlatIP(lifted.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, lifted.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        train = lifted[np.random.default_rng(args.seed).choice(n, min(n, 64 * nlist), replace=False)]
        ivf.train(train)
        ivf.add(lifted)
        build_s = time.perf_counter() - t
        print(f"  IVFFlat nlist {nlist}: built in {build_s:.1f} s", flush=True)
        # An nprobe above nlist probes every list: clamped, so the sweep is never empty.
        for nprobe in sorted({min(int(x), nlist) for x in args.ivf_nprobe.split(",") if x}):
            name = f"ivf{nlist}_p{nprobe}"
            m = FaissLifted(ivf, nprobe)
            rec = {f: recall(answer_all(m, zs, args.batch), truth[f]) for f, zs in families.items()}
            b = min(args.batch, args.queries)
            b_ms = 1e3 * min(per_query_s(m, zs[:b], b) for zs in families.values())
            sweep[name] = {"nlist": nlist, "nprobe": nprobe, "build_s": build_s, "recall": rec}
            sweep[name]["batch_ms"] = b_ms
            out[name] = m
            print(f"    nprobe {nprobe}: recall {rec}  B={args.batch} {b_ms:.3f} ms", flush=True)
    return out, sweep


def pick_ivf(sweep: dict[str, Any]) -> str:
    """The cheapest configuration at B = batch with recall >= IVF_RECALL on every family, else the
    one with the best worst-family recall."""
    ok = [k for k, v in sweep.items() if min(v["recall"].values()) >= IVF_RECALL]
    if ok:
        return min(ok, key=lambda k: sweep[k]["batch_ms"])
    return max(sweep, key=lambda k: min(sweep[k]["recall"].values()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    mu, log_sigma, source = load_bank(args)
    n, d = mu.shape
    print(f"bank: {n} x d={d} ({source})", flush=True)
    t = time.perf_counter()
    if args.threads:  # every system: FAISS peers, numpy's BLAS-free scans, the engine (its config)
        faiss.omp_set_num_threads(args.threads)
    config = EngineConfig(num_threads=args.threads or None)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=True)
    build_s = time.perf_counter() - t
    assert engine.costs is not None
    print(f"built in {build_s:.1f}s: {engine.info()['approx']}; exact costs {engine.costs}", flush=True)
    families = query_families((mu, log_sigma), args.queries, seed=args.seed + 1)
    brute = NumpyBruteForce(mu, log_sigma)
    truth = {f: brute.search_batch(zs, K) for f, zs in families.items()}

    def forced(
        strategy: ExactPath | Literal["auto"], mode: SearchMode = "exact", **changes: Any
    ) -> EngineMethod:
        return EngineMethod(engine.reconfigured(engine.costs, exact_strategy=strategy, **changes), mode)

    t = time.perf_counter()
    lifted = np.ascontiguousarray(lift_items(mu, log_sigma), dtype=np.float32)
    flat_ip = faiss.IndexFlatIP(lifted.shape[1])
    flat_ip.add(lifted)
    peers_build_s = {"faiss_flat_ip": time.perf_counter() - t}
    ivfs, sweep = ivf_sweep(lifted, families, truth, args)
    ivf_name = pick_ivf(sweep)
    print(f"  FAISS IVF peer: {ivf_name} {sweep[ivf_name]}", flush=True)

    methods: dict[str, Method] = {
        "numpy": brute,
        "faiss_flat_ip": FaissLifted(flat_ip),
        "faiss_ivf": ivfs[ivf_name],
        "mu_l2": MuL2Rerank(engine),
        "exact": EngineMethod(engine, "exact"),
        "exact_flat": forced("flat"),
        "exact_partitions": forced("partitions"),
        "exact_kernel": forced("kernel"),
        "approx": EngineMethod(engine, "approx"),
        "approx_kernel": forced("auto", "approx", approx_strategy="kernel"),
        "approx_scan": forced("auto", "approx", approx_strategy="scan"),
    }
    for p in [int(x) for x in args.nprobe_sweep.split(",") if x]:
        methods[f"approx_nprobe{p}"] = EngineMethod(engine, "approx", p)

    sizes = (1, min(args.batch, args.queries))
    # Quality in calls of 1 and of B queries: the approximate default's path (approximate kernel,
    # FAISS scan or an exact path) depends on the call's size, so may its recall.
    quality: dict[str, dict[str, dict[str, Any]]] = {}
    for fam, zs in families.items():
        quality[fam] = {}
        for name, m in methods.items():
            by_b = {}
            for b in sizes:
                found, want = answer_all(m, zs, b), truth[fam]
                by_b[str(b)] = {"recall@10": recall(found, want), "exact_match": exact_match(found, want)}
            quality[fam][name] = {
                "recall@10": min(v["recall@10"] for v in by_b.values()),  # the worse of the two sizes
                "exact_match": min(v["exact_match"] for v in by_b.values()),
                "by_batch": by_b,
            }
    times: dict[str, dict[str, dict[int, list[float]]]] = {
        fam: {name: {b: [] for b in sizes} for name in methods} for fam in families
    }
    # Each query (B = 1) or batch (B = 64) is answered by every system in a new random order, so
    # none always runs after the one that just read the same index into the caches.
    rng = np.random.default_rng(args.seed + 2)
    names = list(methods)
    for r in range(args.rounds):
        for fam, zs in families.items():
            for b in sizes:
                probe = zs[: args.single] if b == 1 else zs[(r * b) % (len(zs) - b + 1) :][:b]
                calls = [probe[i : i + b] for i in range(0, len(probe) - b + 1, b)]
                spent = dict.fromkeys(names, 0.0)
                for q in calls:
                    for name in rng.permutation(names):
                        spent[name] += per_query_s(methods[name], q, b)
                for name in names:
                    times[fam][name][b].append(spent[name] / len(calls))
        print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", flush=True)
    results: dict[str, Any] = {}
    for fam in families:
        results[fam] = {}
        for name in methods:
            ms = {b: 1e3 * float(np.median(times[fam][name][b])) for b in sizes}
            results[fam][name] = {**quality[fam][name], "ms": {str(b): ms[b] for b in sizes}}
        for b in sizes:
            row = results[fam]
            base = row["faiss_flat_ip"]["ms"][str(b)]
            for name in methods:
                row[name].setdefault("vs_flat_ip", {})[str(b)] = base / row[name]["ms"][str(b)]
            print(
                f"[{fam}] B={b}: "
                + "  ".join(f"{name} {row[name]['ms'][str(b)]:.3f}" for name in methods)
                + " ms/query",
                flush=True,
            )
    rule: dict[str, dict[str, bool]] = {}  # the default's own timing within 10% of the better forced one
    choice: dict[str, dict[str, bool]] = {}  # the path it takes, timed forced, within 10% of the better
    for fam in families:
        rule[fam], choice[fam] = {}, {}
        for b in sizes:
            ms = {name: results[fam][name]["ms"][str(b)] for name in EXACT_NAMES}
            better = min(ms[name] for name in EXACT_NAMES[1:])
            rule[fam][str(b)] = ms["exact"] <= STRATEGY_SLACK * better
            choice[fam][str(b)] = ms[f"exact_{engine.exact_path(b)}"] <= STRATEGY_SLACK * better

    memory: dict[str, Any] = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "engine"
            t = time.perf_counter()
            engine.save(path)
            save_s = time.perf_counter() - t
            memory = measure_loaded(path, families["box"][: min(64, args.queries)])
            memory["save_s"] = save_s
            memory["disk_mib"] = sum(p.stat().st_size for p in path.iterdir()) / 2**20
        print(f"memory: {memory}", flush=True)

    return {
        "benchmark": "engine",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_average_at_end": os.getloadavg(),
        "bank": {"items": n, "latent_dim": d, "source": source},
        "queries_per_family": args.queries,
        "single_queries_per_round": args.single,
        "batch_sizes": list(sizes),
        "rounds": args.rounds,
        "threads": args.threads or faiss.omp_get_max_threads(),
        "build_s": build_s,
        "peers_build_s": peers_build_s,
        "engine": engine.info(),
        "exact_costs": engine.costs.to_dict(),
        "exact_path_chosen": {str(b): engine.exact_path(b) for b in sizes},
        "approx_path_chosen": {str(b): " ".join(engine.approx_choice(b)) for b in sizes},
        "ivf_sweep": sweep,
        "ivf_peer": ivf_name,
        "results": results,
        "default_exact_within_10pct_of_better_strategy": rule,
        "chosen_path_within_10pct_of_better_strategy": choice,
        "memory": memory,
        "targets": {
            "exact identical to the float64 brute force (every query, every exact variant)": all(
                results[f][m]["exact_match"] == 1.0 for f in results for m in EXACT_NAMES
            ),
            "default exact within 10% of the better strategy (every family, B)": all(
                v for r in rule.values() for v in r.values()
            ),
            "the path the default takes within 10% of the better strategy (every family, B)": all(
                v for r in choice.values() for v in r.values()
            ),
            "approx recall@10 >= 0.99 every family, in calls of 1 and of B": all(
                results[f]["approx"]["recall@10"] >= 0.99 for f in results
            ),
        },
    }


def _approx_sentence(report: dict[str, Any]) -> str:
    """What the approximate default takes per call size, and the recall measured at build."""
    chosen, costs = report.get("approx_path_chosen"), report["exact_costs"]
    if not chosen:
        return ""
    recall = costs.get("approx_recall") or {}
    return (
        "The approximate default takes "
        + ", ".join(f"{v} at B = {b}" for b, v in chosen.items())
        + " (recall@10 of the approximate paths on the build's probes: "
        + ", ".join(f"{p} {r:.4f}" for p, r in recall.items())
        + ")."
    )


def markdown(report: dict[str, Any]) -> str:
    sizes = report["batch_sizes"]
    m = report["machine"]
    lines = [
        f"# Engine benchmark, {report['bank']['items']:,} items, d = {report['bank']['latent_dim']}",
        "",
        f"{report['date']} on {m['platform']}, {m['cpus']} CPUs (load average "
        f"{m['load_average_at_start'][0]:.1f} at start, {report['load_average_at_end'][0]:.1f} at end: "
        f"other work shared the cores, so compare ratios within this run), faiss {m['faiss']} with "
        f"{report['threads']} thread(s) for every system (BLAS environment {m['blas_threads_env']}). "
        f"Bank: {report['bank']['source']}. "
        f"{report['queries_per_family']} queries per family for recall; k = {K}; recall@10 (in calls "
        f"of 1 and of {sizes[-1]}) and exact match (the worse of the two) against the float64 numpy "
        f"brute force. ms per query at B = 1 "
        f"({report['single_queries_per_round']} one-query calls per family) and B = {sizes[-1]} "
        f"(one call), median over {report['rounds']} rounds, all systems answering each query or "
        f"batch in turn, in a random order. "
        f"Engine build {report['build_s']:.1f} s. The exact default (`auto`) takes "
        + ", ".join(f"{v} at B = {b}" for b, v in report["exact_path_chosen"].items())
        + " (costs measured at build: "
        + "; ".join(
            f"{p} " + ", ".join(f"{1e3 * s:.2f}" for s in secs) + " ms"
            for p, secs in report["exact_costs"]["seconds"].items()
        )
        + f" per call at B = {report['exact_costs']['batch_sizes']}). "
        + _approx_sentence(report)
        + f" FAISS IVF peer: {report['ivf_peer']}.",
        "",
        "| family | system | "
        + " | ".join(f"recall@10 B={b}" for b in sizes)
        + " | exact match | "
        + " | ".join(f"ms B={b} | vs IndexFlatIP B={b}" for b in sizes)
        + " |",
        "| --- | --- | "
        + " | ".join("---:" for _ in sizes)
        + " | ---: | "
        + " | ".join("---: | ---:" for _ in sizes)
        + " |",
    ]
    for fam, row in report["results"].items():
        for name, r in row.items():
            lines.append(
                f"| {fam} | {name} | "
                + " | ".join(f"{r['by_batch'][str(b)]['recall@10']:.4f}" for b in sizes)
                + f" | {r['exact_match']:.3f} | "
                + " | ".join(f"{r['ms'][str(b)]:.3f} | {r['vs_flat_ip'][str(b)]:.2f}x" for b in sizes)
                + " |"
            )
    lines += ["", "| IVF config | build s | " + " | ".join(report["results"]) + f" | ms B={sizes[-1]} |"]
    lines += ["| --- | ---: | " + " | ".join("---:" for _ in report["results"]) + " | ---: |"]
    for name, v in report["ivf_sweep"].items():
        lines.append(
            f"| {name} | {v['build_s']:.1f} | "
            + " | ".join(f"{x:.4f}" for x in v["recall"].values())
            + f" | {v['batch_ms']:.3f} |"
        )
    for key, what in (
        ("default_exact_within_10pct_of_better_strategy", "Default exact (its own timing)"),
        ("chosen_path_within_10pct_of_better_strategy", "The path the default takes (timed forced)"),
    ):
        rule = report[key]
        lines += [
            "",
            f"{what} within 10% of the better forced strategy: "
            + "; ".join(f"{f} B={b}: {'yes' if ok else 'NO'}" for f, r in rule.items() for b, ok in r.items())
        ]
    if report["memory"]:
        mem = report["memory"]
        lines += [
            "",
            f"Memory: RSS {mem['rss_after_load_mib']:.0f} MiB after load ({mem['load_s']:.2f} s; first exact "
            f"B = 1 query {mem.get('first_query_s', float('nan')):.3f} s), "
            f"{mem['rss_after_queries_mib']:.0f} MiB after queries; {mem['disk_mib']:.0f} MiB on disk.",
        ]
    lines += [
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="bank size (with --posteriors: the first N)")
    parser.add_argument("--d", type=int, default=10, help="latent dimension for synthetic posteriors")
    parser.add_argument("--posteriors", help="npz with mu and logvar (or log_sigma) instead of synthetic")
    parser.add_argument("--model", help="model directory: sample --n posteriors from it (model_bank.py)")
    parser.add_argument("--queries", type=int, default=192, help="queries per family (recall, batches)")
    parser.add_argument("--single", type=int, default=20, help="one-query calls per family per round")
    parser.add_argument("--batch", type=int, default=64, help="the batched size B")
    parser.add_argument("--rounds", "--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--nprobe-sweep", default="32,128", help="extra approx nprobe values to report")
    parser.add_argument("--ivf-nlist", default="2,4", help="FAISS IVF nlist values, as multiples of sqrt(N)")
    parser.add_argument("--ivf-nprobe", default="16,32,64,128,256,512,1024", help="FAISS IVF nprobe values")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="FAISS threads for every system, engine included (0: the library default, all cores); "
        "on a loaded machine 1 avoids OpenMP teams stalling on descheduled threads (set "
        "OPENBLAS_NUM_THREADS=1 too: numpy's BLAS threads stall the same way)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the save / load / RSS subprocess")
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

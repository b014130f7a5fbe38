"""Scale benchmark: build, save, load and search one large bank (default 10M items, d = 10).

Measured in one run, on posteriors of a real VAE (``--posteriors`` from ``bench/model_bank.py``, or
``--model`` to sample them here):

* build time per step (exact index, approximate index split into k-means partitioning and the rest:
  lifting, inverted lists and the per-partition bounds; the exact-strategy calibration; the
  typicality reference) and the peak resident memory of each step and of the whole process;
* save time and size on disk; load time and resident memory after load (in a fresh process, before
  and after a few queries);
* latency per query at B = 1 (one call per query, ``--single`` queries per family, median of
  ``--rounds`` rounds) and B = ``--batch`` (one call) for the engine's exact and approximate modes
  and FAISS ``IndexFlatIP`` on the lifted float32 vectors (the baseline, ratios against it), all on
  the loaded engine's process with the same FAISS threads;
* recall@10 and exact match of each over ``--batch`` queries per family (box, prior, posterior as
  in bench_engine), against a float64 reference: a float64 matrix product of the lifted vectors
  keeps 64 candidates per query, rescored by the direct float64 formula (ties by row).

Usage::

    python -m bench.bench_scale --posteriors bank10m.npz              # 10M items
    python -m bench.bench_scale --posteriors bank1m.npz --n 1000000
    python -m bench.bench_scale --posteriors bank1m.npz --quick       # 100k items, few queries

Writes ``bench/results/scale-<date>-n<N>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

import latentsearch.engine.approx as approx_module
from bench.bench_engine import EngineMethod, FaissLifted, Method, exact_match, machine, recall
from bench.results_io import write_results
from latentsearch.data.banks import query_families
from latentsearch.engine import EngineConfig, PosteriorBank, SearchEngine, lift_items, lift_points
from latentsearch.engine.approx import ApproxIndex

K = 10
# Candidates per query the float64 reference keeps from its matrix product before rescoring.
REFERENCE_CANDIDATES = 64
_CHUNK = 1 << 20


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field of this process (``VmRSS``, ``VmHWM``), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """Peak resident memory since the last :func:`reset_peak` (or the start), MiB."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not permitted here: peaks are then since the start
        pass


@contextmanager
def step(steps: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Record the seconds, peak and final RSS (MiB) of the block under ``steps[name]``."""
    gc.collect()
    reset_peak()
    before, inner = rss_mib(), set(steps)
    t = time.perf_counter()
    yield
    # steps recorded inside this one reset the peak mark: their peaks count as this one's too
    peak = max([peak_mib()] + [v["peak_mib"] for k, v in steps.items() if k not in inner])
    steps[name] = {
        "s": round(time.perf_counter() - t, 2),
        "rss_before_mib": round(before),
        "peak_mib": round(peak),
        "rss_after_mib": round(rss_mib()),
    }
    print(f"  {name}: {steps[name]}", flush=True)


def timed(steps: dict[str, dict[str, float]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped so each call is recorded as step ``name`` (the last call wins)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with step(steps, name):
            return fn(*args, **kwargs)

    return run


@contextmanager
def build_steps(steps: dict[str, dict[str, float]]) -> Iterator[None]:
    """Record every build step as :meth:`SearchEngine.from_bank` runs it (the partitioning inside the
    approximate index's build too), by wrapping the functions it calls while the block runs."""
    targets = [
        (approx_module, "partition_items", "build_kmeans_partition"),
        (ApproxIndex, "build", "build_approx_total"),
        (SearchEngine, "calibrate_exact", "build_calibrate_exact"),
        (SearchEngine, "build_typicality", "build_typicality"),
    ]
    saved = [(obj, attr, vars(obj)[attr]) for obj, attr, _ in targets]
    for obj, attr, name in targets:
        setattr(obj, attr, timed(steps, name, getattr(obj, attr)))
    try:
        yield
    finally:
        for obj, attr, original in saved:
            setattr(obj, attr, original)


def load_posteriors(args: argparse.Namespace) -> tuple[PosteriorBank, str]:
    """The bank (float64, converted chunk by chunk) and a sentence saying where it comes from."""
    if args.model:
        from bench.model_bank import model_bank

        sampled = model_bank(args.model, args.n, seed=args.seed)
        mu32, logvar32 = sampled["mu"], sampled["logvar"]
        source = f"{args.n:,} posteriors sampled from the VAE in {args.model} (bench/model_bank.py)"
    else:
        data = np.load(args.posteriors)
        mu32, logvar32 = data["mu"][: args.n], data["logvar"][: args.n]
        source = f"the first {len(mu32):,} posteriors of {args.posteriors}"
        sidecar = Path(args.posteriors + ".json")
        if sidecar.exists():  # written by bench/model_bank.py
            meta = json.loads(sidecar.read_text())
            source += f" ({meta['items']:,} items: {meta['method']}; model hash {meta['model_hash'][:12]})"
    n, d = mu32.shape
    mu, log_sigma = np.empty((n, d)), np.empty((n, d))
    for s in range(0, n, _CHUNK):  # no whole-bank float64 temporaries beside the two arrays
        mu[s : s + _CHUNK] = mu32[s : s + _CHUNK]
        log_sigma[s : s + _CHUNK] = 0.5 * logvar32[s : s + _CHUNK].astype(np.float64)
    return PosteriorBank(mu, log_sigma), source


def reference_topk(mu: np.ndarray, log_sigma: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """``(Q, K)`` float64 top-k rows of ``zs (Q, d)``, best first, ties by row (see the docstring)."""
    q = lift_points(zs)  # (Q, 2d + 1) float64
    best_s = np.full((len(zs), 0), -np.inf)
    best_r = np.zeros((len(zs), 0), dtype=np.int64)
    for s in range(0, len(mu), _CHUNK):
        scores = q @ lift_items(mu[s : s + _CHUNK], log_sigma[s : s + _CHUNK]).T  # (Q, C)
        c = min(REFERENCE_CANDIDATES, scores.shape[1])
        part = np.argpartition(-scores, c - 1, axis=1)[:, :c]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        best_r = np.concatenate([best_r, part + s], axis=1)
        keep = np.argpartition(-best_s, min(REFERENCE_CANDIDATES, best_s.shape[1]) - 1, axis=1)
        keep = keep[:, :REFERENCE_CANDIDATES]
        best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    u = (zs[:, None, :] - mu[best_r]) * np.exp(-log_sigma[best_r])  # (Q, C, d) direct formula
    exact = -0.5 * (u * u).sum(-1) - log_sigma[best_r].sum(-1)
    order = np.lexsort((best_r, -exact), axis=-1)[:, :K]
    return np.take_along_axis(best_r, order, 1)


def flat_ip(mu: np.ndarray, log_sigma: np.ndarray) -> faiss.IndexFlatIP:
    """FAISS ``IndexFlatIP`` over the lifted float32 vectors, added chunk by chunk."""
    index = faiss.IndexFlatIP(2 * mu.shape[1] + 1)
    for s in range(0, len(mu), _CHUNK):
        index.add(np.ascontiguousarray(lift_items(mu[s : s + _CHUNK], log_sigma[s : s + _CHUNK]), np.float32))
    return index


def measure_load(path: Path, queries: np.ndarray) -> dict[str, Any]:
    """Load the saved engine in a fresh process: load seconds, RSS after load and after queries."""
    qfile = path.parent / "queries.npy"
    np.save(qfile, queries)
    code = (
        "import json,time,numpy as np;"
        "from bench.bench_scale import rss_mib;"
        "from latentsearch.engine import SearchEngine;"
        f"t=time.perf_counter();e=SearchEngine.load({str(path)!r});lt=time.perf_counter()-t;r0=rss_mib();"
        f"q=np.load({str(qfile)!r});t=time.perf_counter();e.search_batch_arrays(q[:1],10,mode='approx');"
        "t1=time.perf_counter()-t;e.search_batch_arrays(q,10,mode='approx');r1=rss_mib();"
        "e.search_batch_arrays(q,10,mode='exact');r2=rss_mib();"
        "print(json.dumps({'load_s':lt,'first_query_s':t1,'rss_after_load_mib':r0,"
        "'rss_after_approx_queries_mib':r1,'rss_after_exact_queries_mib':r2}))"
    )
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root)
    return {k: round(v, 3) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def latency(method: Method, zs: np.ndarray, single: int, rounds: int) -> tuple[np.ndarray, float, float]:
    """The ``(Q, K)`` rows found for ``zs`` in one call, and the median over rounds of ms per query at
    B = 1 (``single`` calls) and B = len(zs) (that one call)."""
    b1, bb = [], []
    found = np.zeros((0, K), dtype=np.int64)
    for _ in range(rounds):
        t = time.perf_counter()
        for z in zs[:single]:
            method.search_batch(z[None, :], K)
        b1.append((time.perf_counter() - t) / single)
        t = time.perf_counter()
        found = method.search_batch(zs, K)
        bb.append((time.perf_counter() - t) / len(zs))
    return found, 1000 * float(np.median(b1)), 1000 * float(np.median(bb))


def partition_quality(approx: ApproxIndex) -> dict[str, Any]:
    """Items per list and the item-weighted mean log volume of the lists' mu and log-sigma boxes."""
    sizes = approx.list_sizes
    w = sizes / max(1, sizes.sum())
    log_mu = np.log(np.maximum(approx.hi - approx.lo, 1e-300)).sum(1)
    log_ls = np.log(np.maximum(np.log(approx.shi) - np.log(approx.slo), 1e-300)).sum(1)
    return {
        "nlist": approx.nlist,
        "empty_lists": int((sizes == 0).sum()),
        "items_per_list_min_median_p99_max": [
            int(sizes.min()),
            float(np.median(sizes)),
            float(np.percentile(sizes, 99)),
            int(sizes.max()),
        ],
        "mean_log_box_volume_mu": round(float((w * log_mu).sum()), 3),
        "mean_log_box_volume_log_sigma": round(float((w * log_ls).sum()), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "command": args.command}
    steps: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        if args.engine:
            path = Path(args.engine)
            report["source"] = f"the engine saved at {path} by an earlier run (no build here)"
        else:
            path = build(args, report, steps, stack)
        measure(path, args, report, steps)
    report["steps"] = steps
    # getrusage's maxrss follows the reset peak mark too, so the process peak is the steps' largest
    peaks = [s["peak_mib"] for s in steps.values()]
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["peak_rss_mib_process"] = round(max(maxrss, *peaks))
    report["load_average_at_end"] = os.getloadavg()
    return report


def build(
    args: argparse.Namespace, report: dict[str, Any], steps: dict[str, dict[str, float]], stack: ExitStack
) -> Path:
    """Load the posteriors, build the engine and save it (to ``--keep``, else a temporary directory
    removed at the end of ``stack``); returns the saved engine's path."""
    print(f"loading {args.n:,} posteriors", flush=True)
    with step(steps, "load_posteriors"):
        bank, source = load_posteriors(args)
    report["source"] = source
    print("building", flush=True)
    with build_steps(steps), step(steps, "build_total"):
        engine = SearchEngine.from_bank(bank, EngineConfig(num_threads=args.threads))
    tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp))
    path = Path(tmp) / "engine"
    with step(steps, "save"):
        engine.save(path)
    del engine, bank
    gc.collect()
    return path


def measure(
    path: Path, args: argparse.Namespace, report: dict[str, Any], steps: dict[str, dict[str, float]]
) -> None:
    """Load the saved engine (in a fresh process, then here) and measure its searches."""
    report["saved_bytes"] = sum(p.stat().st_size for p in path.iterdir())
    with step(steps, "load_here"):
        engine = SearchEngine.load(path)
    assert engine.approx is not None
    mu, log_sigma = engine.bank.mu, engine.bank.log_sigma
    report["dim"], report["items"] = engine.dim, len(engine)
    report["partitions"] = partition_quality(engine.approx)
    report["exact_costs"] = None if engine.costs is None else engine.costs.to_dict()
    report["paths"] = {
        "exact_b1": engine.exact_path(1),
        "exact_batch": engine.exact_path(args.batch),
        "approx_b1": "/".join(engine.approx_choice(1)),
        "approx_batch": "/".join(engine.approx_choice(args.batch)),
        "approx_kernel_scale": round(engine.kernel_scale, 4),
        "approx_probe_recall": None if engine.costs is None else engine.costs.approx_recall,
    }
    families = query_families((mu, log_sigma), args.batch, seed=args.seed + 1)
    print("loading in a fresh process", flush=True)
    probes = np.concatenate(list(families.values()))[:: max(1, args.batch // 8)]
    report["load"] = measure_load(path, probes)
    print(f"  {report['load']}", flush=True)
    with step(steps, "reference_topk"):
        truth = {f: reference_topk(mu, log_sigma, zs) for f, zs in families.items()}
    with step(steps, "faiss_flat_ip_build"):
        baseline = FaissLifted(flat_ip(mu, log_sigma))
    methods: dict[str, Method] = {
        "faiss_flat_ip": baseline,
        "exact": EngineMethod(engine, "exact"),
        "approx": EngineMethod(engine, "approx"),
    }
    rows = []
    for fam, zs in families.items():
        base = None
        for name, method in methods.items():
            found, ms1, msb = latency(method, zs, args.single, args.rounds)
            base = (ms1, msb) if base is None else base
            row = {
                "family": fam,
                "system": name,
                "recall_at_10": round(recall(found, truth[fam]), 4),
                "exact_match": round(exact_match(found, truth[fam]), 4),
                "ms_b1": round(ms1, 3),
                "ms_batch": round(msb, 3),
                "speedup_vs_flat_ip_b1": round(base[0] / ms1, 2),
                "speedup_vs_flat_ip_batch": round(base[1] / msb, 2),
            }
            rows.append(row)
            print(f"  {row}", flush=True)
    report["search"] = rows


def markdown(report: dict[str, Any]) -> str:
    args, steps, load = report["args"], report["steps"], report["load"]
    m = report["machine"]
    lines = [
        f"# Scale benchmark, {report['items']:,} items, d = {report['dim']}",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} on {m['platform']}, {m['cpus']} CPUs "
        f"(load average {m['load_average_at_start'][0]:.1f} at start, {report['load_average_at_end'][0]:.1f} "
        f"at end: other work shared the cores, compare ratios within this run), faiss {m['faiss']} with "
        f"{args['threads']} thread(s) for every system. Bank: {report['source']}.",
        "",
        *([f"_{args['note']}_", ""] if args.get("note") else []),
        f"Command: `{report['command']}`.",
        "",
        "## Build, save, load",
        "",
        "| step | seconds | peak RSS MiB | RSS after MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['s']:.1f} | {s['peak_mib']:,} | {s['rss_after_mib']:,} |")
    part = report["partitions"]
    lines += [
        "",
        f"Peak RSS of the whole process: {max(s['peak_mib'] for s in steps.values()):,} MiB. Saved: "
        f"{report['saved_bytes'] / 2**30:.2f} GiB. Fresh-process load: {load['load_s']:.2f} s, "
        f"{load['rss_after_load_mib']:,.0f} MiB resident after load, "
        f"{load['rss_after_approx_queries_mib']:,.0f} after approx queries, "
        f"{load['rss_after_exact_queries_mib']:,.0f} after exact queries (first query "
        f"{1000 * load['first_query_s']:.1f} ms).",
        "",
        f"Partitions: {part['nlist']:,} lists ({part['empty_lists']} empty), items per list min / median / "
        f"p99 / max {part['items_per_list_min_median_p99_max']}, item-weighted mean log box volume "
        f"{part['mean_log_box_volume_mu']} (mu), {part['mean_log_box_volume_log_sigma']} (log sigma).",
        "",
        _paths_line(report["paths"], args["batch"]),
        "",
        f"## Search (ms per query; B = 1: {args['single']} one-query calls per family; B = {args['batch']}: "
        f"one call; median of {args['rounds']} rounds; recall@10 over {args['batch']} queries per family "
        "against the float64 reference)",
        "",
        f"| family | system | recall@10 | exact match | ms B=1 | vs IndexFlatIP | ms B={args['batch']} "
        "| vs IndexFlatIP |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["search"]:
        lines.append(
            f"| {r['family']} | {r['system']} | {r['recall_at_10']:.4f} | {r['exact_match']:.3f} | "
            f"{r['ms_b1']:.3f} | {r['speedup_vs_flat_ip_b1']:.2f}x | {r['ms_batch']:.3f} | "
            f"{r['speedup_vs_flat_ip_batch']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _paths_line(paths: dict[str, Any], batch: int) -> str:
    """What the defaults answer with, from the engine's measured costs."""
    recall = paths["approx_probe_recall"]
    probe = "not measured" if recall is None else ", ".join(f"{p} {r:.4f}" for p, r in recall.items())
    return (
        f"Paths the defaults take: exact B = 1 {paths['exact_b1']}, B = {batch} {paths['exact_batch']}; "
        f"approx B = 1 {paths['approx_b1']}, B = {batch} {paths['approx_batch']}; the approximate kernel "
        f"at {paths['approx_kernel_scale']:.3f} of its default work; approximate paths' recall@10 on the "
        f"build's probes: {probe}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--posteriors", help="npz with mu and logvar (bench/model_bank.py)")
    src.add_argument("--model", help="VAE model directory to sample the posteriors from")
    src.add_argument("--engine", help="measure an engine saved by an earlier run (--keep) without building")
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=64, help="queries per family (the B = batch call)")
    parser.add_argument("--single", type=int, default=10, help="one-query calls per family and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for every system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="directory for the saved engine (default: system tmp)")
    parser.add_argument("--keep", default=None, help="save the engine under this directory and keep it")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="100k items, 16 queries, 1 round")
    parser.add_argument("--note", default="", help="a line for the top of the Markdown summary")
    args = parser.parse_args(argv)
    args.command = shlex.join(
        ["python", "-m", "bench.bench_scale", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.quick:
        args.n, args.batch, args.single, args.rounds = min(args.n, 100_000), 16, 4, 1
    report = run(args)
    stem = f"scale-{time.strftime('%Y-%m-%d', time.gmtime())}-n{report['items']}"
    out = Path(args.out) / ("quick" if args.quick else "")
    write_results(out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark, then write one summary: ``<out>/<date>.json`` and ``<out>/<date>.md``.

    python -m bench.run_all [--quick] [--only engine,model] [--out DIR] \
        [--args engine="--n 200000 --d 16"] [--dry-run]

Each benchmark (``bench.bench_engine``, ``bench.bench_model``, ``bench.bench_indexer``,
``bench.bench_server``, ``bench.bench_probability``, ``bench.bench_ray``) runs in its own ``python -m``
subprocess with ``--out <out>`` and writes its own result files; the summary records the machine,
each benchmark's command, exit status and wall time, and links the files it wrote. A module that
does not exist (yet), or one whose optional packages are missing (``bench_ray`` needs the ``ray``
extra), is skipped with a note.
``--quick`` uses small sizes (minutes in all on a laptop; numbers not comparable with full runs)
and writes into ``bench/results/quick/`` unless ``--out`` says otherwise; the default is each
benchmark's own full defaults (can take an hour or more), written into ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BENCHMARKS", "RunAllConfig", "machine_description", "main", "plan", "run_all"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# Where a --quick run writes (its numbers stay apart from the full-size ones).
QUICK_RESULTS = RESULTS / "quick"


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    """One benchmark module and its extra arguments for a quick run (full runs: its defaults)."""

    name: str
    module: str
    quick_args: tuple[str, ...] = ()
    # Optional packages it needs (an extra); when one is missing it is skipped with a note.
    requires: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """Why it cannot run here (its module or a required package is absent), else None."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} does not exist (yet)"
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        return f"needs {', '.join(absent)} (not installed)" if absent else None


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        name="engine",
        module="bench.bench_engine",
        quick_args=(
            *("--n", "20000", "--d", "10", "--queries", "64", "--single", "5", "--rounds", "1"),
            *("--ivf-nprobe", "16,64,256"),
        ),
    ),
    Benchmark(name="model", module="bench.bench_model", quick_args=("--time-limit", "20", "--repeats", "1")),
    Benchmark(
        name="indexer",
        module="bench.bench_indexer",
        quick_args=("--items", "5000", "--publish-items", "20000", "--repeats", "1"),
    ),
    Benchmark(
        name="server",
        module="bench.bench_server",
        quick_args=(
            *("--duration", "2", "--warmup", "0.5", "--rounds", "1"),
            *("--n-small", "5000", "--n-large", "50000"),
        ),
    ),
    Benchmark(
        name="probability",
        module="bench.bench_probability",
        quick_args=("--sizes", "20000", "--queries", "4", "--rounds", "2", "--samples", "256"),
    ),
    # The encode step on Ray Data (1 and 2 actors, IDX and Parquet input) against the local encoder,
    # and Ray's start-up; needs the ray extra. Bounded: --items 50000 by default, minutes in all.
    Benchmark(
        name="ray",
        module="bench.bench_ray",
        quick_args=("--items", "4000", "--batch-size", "512", "--repeats", "1"),
        requires=("ray", "pyarrow"),
    ),
)


@dataclass(frozen=True, kw_only=True)
class RunAllConfig:
    """Every knob of :func:`run_all`, with its default."""

    # Where the benchmarks and the summary write their files (None: RESULTS, QUICK_RESULTS when quick).
    out: Path | None = None
    # Small sizes instead of each benchmark's full defaults.
    quick: bool = False
    # Benchmark names to run (None: all of BENCHMARKS).
    only: tuple[str, ...] | None = None
    # Replacement arguments per benchmark name (instead of the quick / full defaults).
    args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Per-benchmark wall-clock limit in seconds (None: none).
    timeout_s: float | None = None
    # Print the commands and write nothing.
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        known = {b.name for b in BENCHMARKS}
        unknown = sorted((set(self.only or ()) | set(self.args)) - known)
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    @property
    def out_dir(self) -> Path:
        """Where this run writes: ``out``, else QUICK_RESULTS for a quick run and RESULTS for a full one."""
        if self.out is not None:
            return self.out
        return QUICK_RESULTS if self.quick else RESULTS


def plan(config: RunAllConfig) -> list[tuple[Benchmark, list[str] | None]]:
    """(benchmark, command) in run order; command ``None`` when the module does not exist."""
    steps: list[tuple[Benchmark, list[str] | None]] = []
    for bench in BENCHMARKS:
        if config.only is not None and bench.name not in config.only:
            continue
        if bench.missing() is not None:
            steps.append((bench, None))
            continue
        if bench.name in config.args:
            extra = list(config.args[bench.name])
        else:
            extra = list(bench.quick_args) if config.quick else []
        steps.append((bench, [sys.executable, "-m", bench.module, *extra, "--out", str(config.out_dir)]))
    return steps


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and library versions, GPU (when torch sees one)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        pass
    for name in ("numpy", "faiss", "torch", "grpc"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _result_files(out: Path) -> dict[str, int]:
    """Result files (json/md) under ``out`` and their modification times (ns)."""
    if not out.is_dir():
        return {}
    files = (p for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".md"))
    return {p.name: p.stat().st_mtime_ns for p in files}


def _written(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Files created or rewritten between two :func:`_result_files` snapshots."""
    return sorted(name for name, mtime in after.items() if before.get(name) != mtime)


def run_all(config: RunAllConfig) -> dict[str, Any]:
    """Run the planned benchmarks one after another; write and return the summary."""
    date = dt.date.today().isoformat()
    steps = plan(config)
    report: dict[str, Any] = {
        "date": date,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if config.quick else "full",
        "machine": machine_description(),
        "benchmarks": [],
    }
    if not config.dry_run:
        config.out_dir.mkdir(parents=True, exist_ok=True)
    for bench, command in steps:
        entry: dict[str, Any] = {"name": bench.name, "module": bench.module}
        if command is None:
            entry.update(status="skipped", note=bench.missing())
            print(f"[{bench.name}] skipped: {entry['note']}")
        elif config.dry_run:
            entry.update(status="planned", command=shlex.join(command))
            print(f"[{bench.name}] {shlex.join(command)}")
        else:
            entry["command"] = shlex.join(command)
            print(f"[{bench.name}] {entry['command']}", flush=True)
            before = _result_files(config.out_dir)
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=REPO, timeout=config.timeout_s, check=False)
                entry["returncode"] = done.returncode
                entry["status"] = "ok" if done.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                entry.update(status="timeout", returncode=None)
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            written = _written(before, _result_files(config.out_dir))
            entry["files"] = [f for f in written if f not in _summary_names(date)]
            print(f"[{bench.name}] {entry['status']} in {entry['seconds']} s: {', '.join(entry['files'])}")
        report["benchmarks"].append(entry)
    if not config.dry_run:
        json_path, md_path = (config.out_dir / name for name in _summary_names(date))
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(markdown(report))
        print(f"wrote {json_path} and {md_path}")
    return report


def _summary_names(date: str) -> tuple[str, str]:
    return f"{date}.json", f"{date}.md"


def markdown(report: dict[str, Any]) -> str:
    """The summary table, linking each benchmark's own result files (relative links)."""
    m = report["machine"]
    lines = [
        f"# Benchmarks, {report['date']} ({report['mode']} run)",
        "",
        f"Machine: {m.get('cpu')}, {m.get('usable_cores')} of {m.get('logical_cores')} cores usable, "
        f"{m.get('memory_gib', '?')} GiB RAM, GPU: {m.get('gpu') or 'none'}; {m.get('os')}.",
        f"Python {m.get('python')}, numpy {m.get('numpy')}, faiss {m.get('faiss')}, torch {m.get('torch')}, "
        f"grpc {m.get('grpc')}.",
        "",
        "| benchmark | status | seconds | results |",
        "| --- | --- | ---: | --- |",
    ]
    for b in report["benchmarks"]:
        files = ", ".join(f"[{f}]({f})" for f in b.get("files", [])) or b.get("note", "-")
        lines.append(f"| {b['name']} | {b['status']} | {b.get('seconds', '-')} | {files} |")
    lines += ["", "Commands:", ""]
    lines += [f"* {b['name']}: `{b['command']}`" for b in report["benchmarks"] if "command" in b]
    return "\n".join(lines) + "\n"


def _parse_args_option(values: Sequence[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--args expects NAME=ARGS, got {value!r}")
        out[name.strip()] = tuple(shlex.split(rest))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes), not the full defaults")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    parser.add_argument(
        "--out",
        default=None,
        help="results directory (default bench/results; with --quick, bench/results/quick)",
    )
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='replace one benchmark\'s arguments, e.g. engine="--n 200000" (repeatable)',
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark at most")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> RunAllConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return RunAllConfig(
            out=None if args.out is None else Path(args.out),
            quick=args.quick,
            only=tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else None,
            args=_parse_args_option(args.args),
            timeout_s=args.timeout,
            dry_run=args.dry_run,
        )
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
        raise  # pragma: no cover - parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_all(config_from_args(argv))
    return 0 if all(b["status"] in ("ok", "skipped", "planned") for b in report["benchmarks"]) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

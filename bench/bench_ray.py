"""Ray benchmark: the encode step on Ray Data (1 and 2 actors) against the in-process encoder.

    python -m bench.bench_ray [--items 50000] [--batch-size 1024] [--repeats 2] [--out bench/results]

Data: generated garments (28x28x1 uint8) repeated to ``--items``, written as an uncompressed IDX file
the actors memory-map themselves. Model: ``build_vae()`` (conv (16, 32), hidden 256, d=10), seeded,
saved as a checkpoint. Three encoders over the same file, same machine, alternated, best of
``--repeats``:

* local: :func:`indexer.job.local_encode` (``encode_dataset``: prefetch thread, torch on all cores);
* Ray, 1 actor x 2 CPUs (2 torch threads); Ray, 2 actors x 1 CPU (1 thread each);
* the same images as a Parquet file of PNGs (row groups of 4096): local (``ParquetDataset``), and
  Ray with 2 actors x 1 CPU fed by ``ray.data.read_parquet`` (the PNGs decoded in the actors);

each from dataset to the assembled ``(N, d)`` memmaps. The Ray figures include the actors' start-up
(process, imports, model load) and the shard assembly, as a job pays them. Ray's own start-up
(``ray.init(num_cpus=2)``, a fresh local instance) is measured separately. The posteriors are checked
against the local ones (max abs difference). The machine's 2 cores are shared with other work, so
compare ratios within one run.

Writes ``<out>/ray-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from bench.results_io import write_results
from latentsearch.data.garments import garment_dataset
from latentsearch.data.images import png_bytes
from latentsearch.data.readers import open_dataset
from latentsearch.indexer.config import IndexJobConfig
from latentsearch.indexer.job import local_encode
from latentsearch.indexer.ray_encode import ray_encode
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.loader import load_model
from latentsearch.model.vae import build_vae

REPO = Path(__file__).resolve().parents[1]


def _write_parquet(path: Path, images: np.ndarray) -> Path:
    """``(N, H, W)`` uint8 as a Parquet file with one PNG per row (column ``image``)."""
    column = pa.array([png_bytes(img[..., None]) for img in images], pa.binary())
    pq.write_table(pa.table({"image": column}), path, row_group_size=4096)
    return path


def _write_idx(path: Path, images: np.ndarray) -> Path:
    """``(N, H, W)`` uint8 as an uncompressed IDX file (memory-mapped by the reader)."""
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in images.shape)
    path.write_bytes(header + np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return path


def _steady(items: int, seconds: float) -> float | None:
    """Items per second past the first chunk; None when the first chunk alone took longer than the
    best whole run (start-up varies more than the run: no steady rate can be read off)."""
    return round(items / seconds, 1) if seconds > 0 else None


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp_s:
        tmp = Path(tmp_s)
        base = garment_dataset(6000, seed=0).to_array()[..., 0]
        images = np.concatenate([base] * -(-args.items // len(base)))[: args.items]
        data = _write_idx(tmp / "train-images-idx3-ubyte", images)
        torch.manual_seed(0)
        save_checkpoint(build_vae(), tmp / "model")
        model = load_model(tmp / "model", device="cpu")
        dataset = open_dataset(data)
        base_config = IndexJobConfig(
            out=tmp / "root", model=str(tmp / "model"), data=str(data), device="cpu",
            batch_size=args.batch_size, progress=False,
        )
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup_s = time.perf_counter() - t0
        parquet = _write_parquet(tmp / "images.parquet", images)
        parquet_config = dataclasses.replace(base_config, data=str(parquet))
        # name -> (config, dataset, the same data cut to one batch)
        small_idx = _write_idx(tmp / "one-images-idx3-ubyte", images[: args.batch_size])
        small_pq = _write_parquet(tmp / "one.parquet", images[: args.batch_size])
        idx_sets = (dataset, open_dataset(small_idx), small_idx)
        pq_sets = (open_dataset(parquet), open_dataset(small_pq), small_pq)
        variants: dict[str, tuple[IndexJobConfig, Any]] = {
            "local (in-process, 2 threads)": (base_config, idx_sets),
            "ray, 1 actor x 2 CPUs": (
                dataclasses.replace(base_config, ray=True, ray_cpus_per_actor=2.0), idx_sets
            ),
            "ray, 2 actors x 1 CPU": (dataclasses.replace(base_config, ray=True, ray_actors=2), idx_sets),
            "local, Parquet PNGs": (parquet_config, pq_sets),
            "ray read_parquet, 2 actors x 1 CPU": (
                dataclasses.replace(parquet_config, ray=True, ray_actors=2), pq_sets
            ),
        }
        # Fixed cost of each encoder: one chunk (batch_size items); steady rate = the rest over the rest.
        fixed: dict[str, float] = {}
        for i, (name, (config, (_, small, small_path))) in enumerate(variants.items()):
            one = dataclasses.replace(config, data=str(small_path))
            t = time.perf_counter()
            (ray_encode if config.ray else local_encode)(model, small, tmp / f"one-{i}", one)
            fixed[name] = round(time.perf_counter() - t, 3)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        reference: np.ndarray | None = None
        max_diff: dict[str, float] = {}
        for r in range(args.repeats):
            for i, (name, (config, (data_set, _, _))) in enumerate(variants.items()):
                encode = ray_encode if config.ray else local_encode
                t = time.perf_counter()
                out = encode(model, data_set, tmp / f"enc-{r}-{i}", config)
                runs[name].append(round(time.perf_counter() - t, 3))
                mu = np.array(out.mu)
                if reference is None:
                    reference = mu
                max_diff[name] = float(np.max(np.abs(mu - reference)))
                del out, mu
        ray.shutdown()
    n = args.items
    rows = {
        name: {
            "runs_s": s,
            "best_s": min(s),
            "items_per_s": round(n / min(s), 1),
            "one_chunk_s": fixed[name],
            "steady_items_per_s": _steady(n - args.batch_size, min(s) - fixed[name]),
            "max_abs_diff_mu": diff,
        }
        for (name, s), diff in zip(runs.items(), max_diff.values(), strict=True)
    }
    local_rate = rows["local (in-process, 2 threads)"]["items_per_s"]
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                 "ray": ray.__version__},
        "items": n,
        "batch_size": args.batch_size,
        "model": "build_vae() default: conv (16, 32), hidden 256, d=10, 28x28x1",
        "ray_init_s": round(startup_s, 3),
        "variants": rows,
    }
    lines = [
        f"# Ray encode benchmark ({report['date']})",
        "",
        f"Host: {os.cpu_count()} CPUs, shared with other work (noisy: compare ratios), "
        f"{platform.platform()}, torch {torch.__version__}, ray {ray.__version__}.",
        "",
        f"{n:,} generated garments (28x28x1 uint8; IDX, and Parquet of PNGs), batch {args.batch_size}, "
        f"{report['model']}; "
        f"best of {args.repeats}, alternated. Dataset to assembled memmaps; Ray rows include actor start-up "
        "and shard assembly.",
        "",
        f"`ray.init(num_cpus=2)` (fresh local instance): {startup_s:.2f} s.",
        "",
        "One chunk: the same encoder on one batch (start-up, model load, one shard); steady items/s: "
        "(items - one batch) / (best s - one chunk s); '-' when the one chunk took longer than the best run.",
        "",
        "| encoder | best s | items/s | vs local | one chunk s | steady items/s | runs (s) | max diff mu |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['best_s']} | {row['items_per_s']:,.0f} | "
            f"{row['items_per_s'] / local_rate:.2f} | {row['one_chunk_s']} | "
            f"{_count(row['steady_items_per_s'])} | {row['runs_s']} | {row['max_abs_diff_mu']:.1e} |"
        )
    write_results(args.out, f"ray-{dt.date.today().isoformat()}", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

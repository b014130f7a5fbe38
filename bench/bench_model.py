"""Model benchmark: train with ``latentsearch train``'s defaults; quality per run, encode throughput.

    python -m bench.bench_model [--data NAME|PATH] [--out bench/results] [--seeds 0,1] [--with-old-defaults]
                                [--variant NAME:FIELD=VALUE,...]... [--time-limit S]

Each run trains on the Fashion-MNIST sample shipped with the package (``--data`` default) with the
defaults of :class:`TrainConfig` (what ``latentsearch train`` uses without flags); its seed also
chooses the held-out split. ``--variant`` adds runs of the defaults with some fields changed
(``TrainConfig`` fields, or ``vae.``-prefixed :class:`VAEConfig` fields), interleaved with the
default runs seed by seed so that they compare under the same machine load. Per run, on
the held-out images:

* validation -ELBO (one posterior sample, beta = 1, the true KL), split into recon + KL;
* the KL of each latent dimension (mean over held-out images) and the active dimensions, those
  whose mean KL is at least ``ACTIVE_KL`` nats (a collapsed dimension's slider changes nothing);
* top-1 and top-5 label agreement of Encode + Nearest: the query is the held-out image's posterior
  mean, the bank the training split's posteriors, ranked by exact log q(z|x)
  (:class:`latentsearch.engine.SearchEngine`, exact mode); top-k agreement is the share of the k
  nearest items that carry the query's label;
* the same agreement for the mu-L2 nearest neighbour of the same model (Euclidean distance between
  posterior means, no sigma) and for the raw-pixel nearest neighbour (Euclidean on pixels).

``--with-old-defaults`` adds, per seed, a run with the defaults before issue 18 (``OLD_DEFAULTS``)
in the same process, so training time and quality compare under the same machine load. Encode
throughput (median of several runs) vs a bare forward pass of the same network is measured on the
first run's model. Writes ``<out>/model-<date>.json`` and ``.md`` (:func:`bench.results_io.write_results`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.results_io import write_results
from latentsearch.data.builtin import DEFAULT_DATASET, load_data
from latentsearch.data.readers import Dataset
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.model.config import TrainConfig
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.loader import LoadedModel, encode_batch, load_model
from latentsearch.model.train import TrainResult, default_vae_config, split_indices, train

log = logging.getLogger("bench.bench_model")

# A latent dimension is active when its mean KL over held-out images is at least this (nats).
ACTIVE_KL = 0.1
# Neighbours per query for the top-k label agreement.
TOP_K = 5
# TrainConfig fields as they were before issue 18 (beta-1 ELBO, no free bits, batches of 64, 40 epochs), for
# --with-old-defaults.
OLD_DEFAULTS: dict[str, Any] = {"beta": 1.0, "free_bits": 0.0, "batch_size": 64, "epochs": 40}
# Issue 18's targets (Fashion-MNIST sample, held-out split, default flags); training time is
# compared with a run of OLD_DEFAULTS when --with-old-defaults gives one.
TARGETS: dict[str, Any] = {
    "active_dims_eq_latent_dim": True,
    "top1_logq_ge": 0.77,
    "top1_logq_gt_top1_mu_l2": True,
    "val_neg_elbo_le": 257.0,
    "train_seconds_le_x_old_defaults": 2.0,
    "encode_images_per_s_ge": 10000,
}


def l2_neighbours(query: np.ndarray, bank: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Rows of the ``k`` nearest ``bank`` items to each query by Euclidean distance, nearest first.

    ``query`` ``(B, ...)`` and ``bank`` ``(N, ...)`` are flattened per item and compared in float64;
    ties go to the lower row. Returns ``(B, k)`` int64.
    """
    q = query.reshape(len(query), -1).astype(np.float64)
    b = bank.reshape(len(bank), -1).astype(np.float64)
    bn = (b * b).sum(1)  # (N,)
    out = []
    for i in range(0, len(q), chunk):
        d2 = bn[None, :] - 2.0 * q[i : i + chunk] @ b.T  # (chunk, N); the query's own norm ranks nothing
        out.append(np.argsort(d2, axis=1, kind="stable")[:, :k])
    return np.concatenate(out).astype(np.int64)


def label_agreement(
    rows: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray
) -> tuple[float, float]:
    """``(top-1, top-k)`` agreement of ``(B, k)`` neighbour rows: the share of queries whose nearest
    item has the query's label, and the share of all ``B * k`` neighbours that have it."""
    same = bank_labels[rows] == query_labels[:, None]  # (B, k)
    return float(same[:, 0].mean()), float(same.mean())


def quality(
    model: LoadedModel, data: Dataset, train_rows: np.ndarray, val_rows: np.ndarray
) -> dict[str, Any]:
    """Per-dimension KL, active dimensions and label agreements of one model on its held-out rows."""
    x = data.to_array()
    mu, logvar = (a.astype(np.float64) for a in encode_batch(model, x))  # (n, d) each
    mu_v, lv_v = mu[val_rows], logvar[val_rows]
    kl_dims = (0.5 * (mu_v * mu_v + np.exp(lv_v) - 1.0 - lv_v)).mean(0)  # (d,)
    out: dict[str, Any] = {
        "kl_per_dim": [round(float(v), 4) for v in kl_dims],
        "kl_min": round(float(kl_dims.min()), 4),
        "active_dims": int((kl_dims >= ACTIVE_KL).sum()),
        "latent_dim": int(mu.shape[1]),
    }
    if data.labels is None:
        return out
    labels = np.asarray(data.labels)
    y_tr, y_va = labels[train_rows], labels[val_rows]
    engine = SearchEngine.build(
        mu[train_rows], logvar=logvar[train_rows], labels=y_tr, config=EngineConfig(mode="exact")
    )
    by_logq = engine.search_batch_arrays(mu_v, k=TOP_K, mode="exact").rows  # (B, k)
    for name, rows in (
        ("logq", by_logq),
        ("mu_l2", l2_neighbours(mu_v, mu[train_rows], TOP_K)),
        ("raw_pixels", l2_neighbours(x[val_rows], x[train_rows], TOP_K)),
    ):
        out[f"top1_{name}"], out[f"top{TOP_K}_{name}"] = label_agreement(rows, y_tr, y_va)
    return out


def parse_variant(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``NAME:field=value,field=value`` -> (name, TrainConfig changes, VAEConfig changes).

    Values are Python literals (``lr=0.003``, ``vae.channels=(32,64)``); a ``vae.`` prefix names a
    :class:`VAEConfig` field of the model :func:`default_vae_config` fits to the data.
    """
    name, _, body = spec.partition(":")
    train_changes: dict[str, Any] = {}
    vae_changes: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?![^()]*\))", body)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected field=value, got {item!r}")
        target = vae_changes if key.startswith("vae.") else train_changes
        target[key.removeprefix("vae.").strip()] = ast.literal_eval(value.strip())
    return name.strip(), train_changes, vae_changes


def train_run(
    data: Dataset, cfg: TrainConfig, vae_changes: dict[str, Any] | None = None
) -> tuple[TrainResult, LoadedModel, float]:
    """Train ``cfg`` on ``data`` into a temporary folder: the result, the loaded best model, seconds.

    ``vae_changes``: fields replaced in the model :func:`default_vae_config` fits to the data.
    """
    vae_config = None
    if vae_changes:
        tr, _ = split_indices(len(data), cfg.val_fraction, cfg.seed)
        vae_config = default_vae_config(data, train_rows=tr).replace(**vae_changes)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(data, Path(tmp) / "model", config=cfg, vae_config=vae_config)
        seconds = time.perf_counter() - t0
        return res, load_model(Path(tmp) / "model"), seconds


def run_report(
    name: str, data: Dataset, cfg: TrainConfig, vae_changes: dict[str, Any] | None = None
) -> tuple[dict[str, Any], LoadedModel]:
    """Train and evaluate one configuration: its report row and the model."""
    load_before = os.getloadavg()[0]
    res, model, seconds = train_run(data, cfg, vae_changes)
    tr, va = split_indices(len(data), cfg.val_fraction, cfg.seed)
    best = min(res.history, key=lambda h: h["val_neg_elbo"])
    row = {
        "config": name,
        "seed": cfg.seed,
        "train_seconds": round(seconds, 1),
        "load_average_1min_before": round(load_before, 2),
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "time_limited": res.time_limited,
        "val_neg_elbo": round(res.best_val_neg_elbo, 2),
        "val_recon": round(best["val_recon"], 2),
        "val_kl": round(best["val_kl"], 2),
        "n_train": len(tr),
        "n_val": len(va),
        **quality(model, data, tr, va),
        "model_hash": res.model_hash,
        "train_config": cfg.to_dict(),
        "vae_changes": {k: list(v) if isinstance(v, tuple) else v for k, v in (vae_changes or {}).items()},
    }
    log.info("%s seed %d: %s", name, cfg.seed, {k: v for k, v in row.items() if k != "train_config"})
    return row, model


def _throughput(
    fns: dict[str, Callable[[Any], Any]], xs: dict[str, Any], batch: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Images/s of each fn over its input, runs interleaved so all see the same machine load.

    Returns ``{name: {"median": ..., "best": ..., "runs": [...]}}``.
    """
    for name, fn in fns.items():
        fn(xs[name][:batch])  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            x = xs[name]
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                fn(x[i : i + batch])
            runs[name].append(len(x) / (time.perf_counter() - t))
    return {
        n: {"median": statistics.median(r), "best": max(r), "runs": [round(v) for v in r]}
        for n, r in runs.items()
    }


def encode_throughput(
    model: LoadedModel, x: np.ndarray, batch: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """``encode_batch`` vs a bare forward pass of the same encoder on ~16k images tiled from ``x``."""
    xt = np.ascontiguousarray(np.concatenate([x] * max(1, 16384 // len(x)))[:16384])
    vae: Any = model.module
    x_float = torch.from_numpy(xt.copy()).float() / 255.0

    def bare(b: torch.Tensor) -> None:  # the same network on ready float tensors: no convert/normalise/copy
        with torch.inference_mode():
            h = vae.enc_conv(b.permute(0, 3, 1, 2))
            vae.enc_head(vae.enc_fc(h))

    return _throughput(
        {"encode_batch": lambda b: encode_batch(model, b), "bare_forward": bare},
        {"encode_batch": xt, "bare_forward": x_float},
        batch,
        repeats,
    )


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: the mean over its seeds of each reported number."""
    keys = ("train_seconds", "val_neg_elbo", "kl_min", "active_dims", "top1_logq", f"top{TOP_K}_logq",
            "top1_mu_l2", f"top{TOP_K}_mu_l2", "top1_raw_pixels", f"top{TOP_K}_raw_pixels")  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        out[name] = {"runs": len(mine), **{k: _mean(mine, k) for k in keys}}
    return out


def check_targets(rows: Sequence[dict[str, Any]], old_seconds: float | None) -> dict[str, bool | None]:
    """Each of issue 18's targets for the default configuration, on the mean over its seeds."""
    mine = [r for r in rows if r["config"] == "default"]
    mean = summarize(mine)["default"]
    t1, mu = mean["top1_logq"], mean["top1_mu_l2"]
    return {
        "all_dims_active": all(r["active_dims"] == r["latent_dim"] for r in mine),
        "top1_logq_ge_0.77": None if t1 is None else t1 >= TARGETS["top1_logq_ge"],
        "top1_logq_gt_mu_l2": None if t1 is None or mu is None else t1 > mu,
        "val_neg_elbo_le_257": mean["val_neg_elbo"] <= TARGETS["val_neg_elbo_le"],
        "train_seconds_le_2x_old": None
        if old_seconds is None
        else mean["train_seconds"] <= TARGETS["train_seconds_le_x_old_defaults"] * old_seconds,
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "NOT met"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a report."""
    k = TOP_K
    lines = [
        f"# Model benchmark ({report['date']})",
        "",
        f"Data: `{report['data']}` ({report['n_items']} items; {report['n_train']} train / {report['n_val']} "
        f"held out, split by seed). CPU threads: {report['threads']}, torch {report['torch']}.",
        f"Default training: `latentsearch train` defaults ({report['default_train_summary']}).",
        *[f"Variant `{name}`: the defaults with {changes}." for name, changes in report["variants"].items()],
        f"Agreement: the share of the top-1 / top-{k} neighbours of each held-out image (query: its "
        "posterior mean) that carry its label; bank: the training split. log q: exact ranking by the "
        "engine; mu-L2: Euclidean on posterior means; pixels: Euclidean on raw pixels. Active: "
        f"dimensions with mean KL >= {ACTIVE_KL} nats over held-out images.",
        "",
        "| config | seed | -ELBO | KL min | active | top-1 log q | top-1 mu-L2 | top-1 pixels "
        f"| top-{k} log q | top-{k} mu-L2 | top-{k} pixels | best/run epochs | train s | load |",
        "|" + " --- |" * 14,
    ]
    for r in report["runs"]:
        cells = [r["config"], r["seed"], f"{r['val_neg_elbo']:.2f}", f"{r['kl_min']:.3f}"]
        cells.append(f"{r['active_dims']}/{r['latent_dim']}")
        cells += [_fmt(r.get(f"top{n}_{rule}")) for n in (1, k) for rule in ("logq", "mu_l2", "raw_pixels")]
        cut = " (time limit)" if r["time_limited"] else ""
        cells += [f"{r['best_epoch']}/{r['epochs_run']}{cut}", f"{r['train_seconds']:.0f}"]
        cells.append(f"{r['load_average_1min_before']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Per-dimension KL (nats, mean over held-out images):", ""]
    lines += [f"- {r['config']} seed {r['seed']}: {', '.join(f'{v:.2f}' for v in r['kl_per_dim'])}"
              for r in report["runs"]]  # fmt: skip
    lines += ["", "| config | runs | -ELBO | active | top-1 log q | top-1 mu-L2 | top-1 pixels | train s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, m in report["summary"].items():
        lines.append(
            f"| {name} (mean) | {m['runs']} | {m['val_neg_elbo']:.2f} | {m['active_dims']:.1f} | "
            f"{_fmt(m['top1_logq'])} | {_fmt(m['top1_mu_l2'])} | {_fmt(m['top1_raw_pixels'])} | "
            f"{m['train_seconds']:.0f} |"
        )
    tp = report["throughput_runs"]
    lines += [
        "",
        "Targets (issue 18; default configuration, mean over its seeds): "
        + ", ".join(f"{name} {_verdict(ok)}" for name, ok in report["targets_met"].items())
        + ".",
        "",
        f"Encode throughput (encode_batch, batch {report['encode_batch']}): "
        f"{report['encode_images_per_s']:,} images/s; bare forward pass of the encoder "
        f"{report['bare_forward_images_per_s']:,} images/s (median of {len(tp['encode_batch']['runs'])} "
        "interleaved runs; 1-min load average before measuring "
        f"{report['load_average_1min_before_throughput']:.2f} on a machine shared with other jobs, so "
        "times are noisy).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("LATENTSEARCH_FASHION_MNIST", DEFAULT_DATASET),
        help="a built-in dataset name or a path (default: the packaged Fashion-MNIST sample)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (one run each)")
    parser.add_argument(
        "--with-old-defaults", action="store_true", help="also train OLD_DEFAULTS per seed (for comparison)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE,...",
        help="also train this variant of the defaults per seed, e.g. 'e50:epochs=50' or "
        "'wide:vae.hidden=512' (repeatable; runs interleave by seed so all see the same load)",
    )
    parser.add_argument(
        "--skip-default",
        action="store_true",
        help="train only the variants (CPU training is bit-reproducible per seed and thread count, so a "
        "default run of an earlier report gives the same quality figures; only its time differs)",
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="training wall-clock cap per run (s)")
    parser.add_argument("--batch", type=int, default=1024, help="encode batch size")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = configure_cpu_threads()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    data = load_data(args.data)
    data_desc = f"{args.data} ({data.path})"
    base = TrainConfig(time_limit_s=args.time_limit, device="cpu", progress=False)
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if not args.skip_default:
        variants.append(("default", {}, {}))
    if args.with_old_defaults:
        variants.append(("old defaults", OLD_DEFAULTS, {}))
    variants += [parse_variant(v) for v in args.variant]
    plans = [(name, base.replace(seed=s, **tc), vc) for s in seeds for name, tc, vc in variants]
    rows: list[dict[str, Any]] = []
    first_model: LoadedModel | None = None
    for name, cfg, vae_changes in plans:
        row, model = run_report(name, data, cfg, vae_changes)
        rows.append(row)
        first_model = first_model or model

    assert first_model is not None
    load_before = os.getloadavg()[0]
    tp = encode_throughput(first_model, data.to_array(), args.batch, args.repeats)
    summary = summarize(rows)
    old = summary.get("old defaults")
    changed = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in ("epochs", "batch_size", "lr", "beta", "kl_warmup_epochs", "free_bits", "augment_shift")
    }
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "data": data_desc,
        "n_items": len(data),
        "n_train": rows[0]["n_train"],
        "n_val": rows[0]["n_val"],
        "default_train_summary": ", ".join(f"{k} {v}" for k, v in changed.items()),
        "variants": {name: {**tc, **{f"vae.{k}": v for k, v in vc.items()}} for name, tc, vc in variants
                     if name != "default"},
        "runs": rows,
        "summary": summary,
        "targets": TARGETS,
        "targets_met": {}
        if args.skip_default
        else check_targets(rows, None if old is None else old["train_seconds"]),
        "encode_batch": args.batch,
        "encode_images_per_s": round(tp["encode_batch"]["median"]),
        "bare_forward_images_per_s": round(tp["bare_forward"]["median"]),
        "throughput_runs": tp,
        "load_average_1min_before_throughput": round(load_before, 2),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    write_results(args.out, f"model-{dt.date.today().isoformat()}", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model benchmark: train with ``latentsearch train``'s defaults; quality per run, encode throughput.

    python -m bench.bench_model [--data NAME|PATH] [--out bench/results] [--seeds 0,1] [--with-old-defaults]
                                [--variant NAME:FIELD=VALUE,...]... [--time-limit S] [--folds K] [--stem S]
                                [--diagnose]

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

``--folds K`` cross-validates instead: per seed, the items are dealt into K folds by a seeded
permutation, each fold is held out once (its images are the queries and the validation split) and
each configuration trains on the other K - 1 folds, so every image is a query once per seed. The
summary pools the queries of all folds: per rule the mean top-1 / top-k agreement with its
standard error over queries, and the paired differences log q - mu-L2 and log q - pixels (the
same model and queries: per-query differences averaged over seeds, their mean and standard error,
and the McNemar counts of top-1 wins and losses), plus each variant's log q against the default's
on the same queries. Without ``--folds`` each seed holds out its seeded ``val_fraction`` split.

``--diagnose`` adds, per run, why log q ranks as it does against mu-L2 (:func:`diagnose`: the spread of
sigma per dimension, top-1 disagreements and which rule is right, hubness, the Mahalanobis part of
log q alone), as a section per run of the Markdown summary.

``--with-old-defaults`` adds, per seed, a run with the defaults before issue 18 (``OLD_DEFAULTS``)
in the same process (with ``--folds``: on the first fold only, as the training-time reference), so
training time and quality compare under the same machine load. Encode
throughput (median of several runs) vs a bare forward pass of the same network is measured on the
first run's model. Writes ``<out>/<stem>.json`` and ``.md`` (default stem ``model-<date>``;
:func:`bench.results_io.write_results`), with the command line and the load averages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
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
from latentsearch.posterior import LOG_2PI

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
    hit1, share = per_query_agreement(rows, bank_labels, query_labels)
    return float(hit1.mean()), float(share.mean())


def per_query_agreement(
    rows: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``(B,)``: 1.0 when the nearest of its ``(B, k)`` neighbour rows has its label (else 0.0),
    and the share of its k neighbours that have it."""
    same = bank_labels[rows] == query_labels[:, None]  # (B, k)
    return same[:, 0].astype(np.float64), same.mean(1)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean of ``values`` ``(n,)`` and its standard error ``sd / sqrt(n)`` (sample sd; 0 for n < 2)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def quality(
    model: LoadedModel, data: Dataset, train_rows: np.ndarray, val_rows: np.ndarray
) -> dict[str, Any]:
    """Per-dimension KL, active dimensions and label agreements of one model on its held-out rows.

    With labels, ``per_query`` holds each rule's per-query top-1 hits and top-k shares ``(n_val,)``
    (numpy arrays, in ``val_rows`` order) for the pooled statistics; the caller removes it before
    writing the row."""
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
    per_query: dict[str, np.ndarray] = {}
    for name, rows in (
        ("logq", by_logq),
        ("mu_l2", l2_neighbours(mu_v, mu[train_rows], TOP_K)),
        ("raw_pixels", l2_neighbours(x[val_rows], x[train_rows], TOP_K)),
    ):
        hit1, share = per_query_agreement(rows, y_tr, y_va)
        out[f"top1_{name}"], out[f"top{TOP_K}_{name}"] = float(hit1.mean()), float(share.mean())
        per_query[f"top1_{name}"], per_query[f"top{TOP_K}_{name}"] = hit1, share
    out["per_query"] = per_query
    return out


# --diagnose: neighbours per query for the k-occurrence (hubness) figures, and the share of the bank
# counted as its most frequent neighbours ("hubs").
HUB_K = 10
HUB_SHARE = 0.01
# --diagnose: the rankings compared, all from the same model's posteriors (the queries' posterior
# means against the bank's posteriors). "mahalanobis" and "mean_sigma" are diagnostics only.
DIAG_RULES = ("logq", "mahalanobis", "mean_sigma", "mu_l2")


def posterior_scores(
    query_mu: np.ndarray, bank_mu: np.ndarray, bank_logvar: np.ndarray, chunk: int = 64
) -> dict[str, np.ndarray]:
    """Scores (higher: nearer) of every bank item for every query, each ``(B, N)`` float64.

    ``query_mu`` ``(B, d)``; ``bank_mu``, ``bank_logvar`` ``(N, d)``. ``logq``: log N(z; mu_i,
    sigma_i^2), the engine's rule; ``mahalanobis``: its ``-1/2 sum(((z - mu_i) / sigma_i)^2)`` part
    alone (``logq`` without the ``-sum log sigma_i`` term and the constant); ``mean_sigma``: that part
    with every item's sigma replaced by the bank's per-dimension root-mean-square sigma (a fixed
    per-dimension scaling, no per-item width); ``mu_l2``: ``-|z - mu_i|^2``.
    """
    z = np.asarray(query_mu, dtype=np.float64)
    mu = np.asarray(bank_mu, dtype=np.float64)
    inv_sd = np.exp(-0.5 * np.asarray(bank_logvar, dtype=np.float64))  # (N, d)
    inv_sd_bar = 1.0 / np.sqrt(np.exp(np.asarray(bank_logvar, dtype=np.float64)).mean(0))  # (d,)
    normaliser = -0.5 * np.asarray(bank_logvar, dtype=np.float64).sum(1) - 0.5 * mu.shape[1] * LOG_2PI  # (N,)
    parts: dict[str, list[np.ndarray]] = {rule: [] for rule in DIAG_RULES}
    for i in range(0, len(z), chunk):
        diff = z[i : i + chunk, None, :] - mu[None, :, :]  # (c, N, d)
        maha = -0.5 * ((diff * inv_sd) ** 2).sum(-1)
        parts["mahalanobis"].append(maha)
        parts["logq"].append(maha + normaliser)
        parts["mean_sigma"].append(-0.5 * ((diff * inv_sd_bar) ** 2).sum(-1))
        parts["mu_l2"].append(-(diff * diff).sum(-1))
    return {rule: np.concatenate(p) for rule, p in parts.items()}


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest of ``scores`` ``(B, N)`` per query, highest first, ties to the lower row:
    ``(B, k)`` int64."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def skewness(values: np.ndarray) -> float:
    """The population skewness ``E[(x - m)^3] / sd^3`` of ``values`` ``(n,)`` (0 when they are all equal)."""
    x = np.asarray(values, dtype=np.float64)
    sd = x.std()
    return 0.0 if sd == 0 else float(((x - x.mean()) ** 3).mean() / sd**3)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` ``(n,)``, ties sharing the mean of their ranks."""
    x = np.asarray(values)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of ``a`` and ``b`` ``(n,)`` (average ranks for ties; 0 if either is
    constant)."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return 0.0 if den == 0 else float((ra * rb).sum() / den)


def hubness(rows: np.ndarray, n_bank: int) -> dict[str, Any]:
    """k-occurrence of ``(B, k)`` neighbour rows over a bank of ``n_bank`` items: per item, the number of
    queries whose top-k holds it ``(n_bank,)`` (``counts``), its skewness and maximum, the share of items
    in no query's top-k, and the share of the ``B * k`` slots taken by the ``HUB_SHARE`` most frequent
    items."""
    counts = np.bincount(rows.ravel(), minlength=n_bank)
    n_hubs = max(1, round(HUB_SHARE * n_bank))
    return {
        "counts": counts,
        "skew": round(skewness(counts), 3),
        "max": int(counts.max()),
        "never": round(float((counts == 0).mean()), 4),
        "hub_slots": round(float(np.sort(counts)[::-1][:n_hubs].sum() / rows.size), 4),
    }


def disagreement(
    a_top1: np.ndarray, b_top1: np.ndarray, bank_labels: np.ndarray, query_labels: np.ndarray
) -> dict[str, int]:
    """Queries ``(B,)`` whose top-1 bank rows under two rules differ, split by which rule's item carries the
    query's label: ``a_only``, ``b_only``, ``both`` (two items of the right label), ``neither``."""
    differ = a_top1 != b_top1
    a_ok, b_ok = bank_labels[a_top1] == query_labels, bank_labels[b_top1] == query_labels
    return {
        "queries": len(a_top1),
        "differ": int(differ.sum()),
        "a_only": int((differ & a_ok & ~b_ok).sum()),
        "b_only": int((differ & ~a_ok & b_ok).sum()),
        "both": int((differ & a_ok & b_ok).sum()),
        "neither": int((differ & ~a_ok & ~b_ok).sum()),
    }


def diagnose(
    model: LoadedModel, data: Dataset, train_rows: np.ndarray, val_rows: np.ndarray
) -> dict[str, Any]:
    """Why the log q ranking does (or does not) beat mu-L2 on one model: the held-out images' posterior
    means are the queries, the training split's posteriors the bank (as in :func:`quality`).

    * per dimension over the bank: the sd of mu, the geometric-mean sigma, the sd of log sigma and
      the ratio of the 90th to the 10th percentile of sigma (how much item widths differ);
    * the ``-sum log sigma`` term: its sd over the bank, against the median over queries of the spread
      of the Mahalanobis part over each query's top-``HUB_K`` log q items (nats); and how many of its
      own sigmas (RMS over dimensions) a query lies from its log q top-1 item (median over queries);
    * per rule of :data:`DIAG_RULES`: top-1 label agreement, the share of queries whose top-1 item is
      log q's, the hubness of its top-1 and top-``HUB_K`` lists, and the Spearman correlation of each
      item's top-``HUB_K`` occurrence with its ``sum log sigma`` (do hubs have wide posteriors?);
    * log q against mu-L2 and against its own Mahalanobis part: how often the top-1 items differ and
      which one carries the query's label when they do;
    * the share of queries where the numpy log q top-1 is the engine's (a check of the scores).
    """
    if data.labels is None:
        raise SystemExit("--diagnose needs labelled data")
    x = data.to_array()
    mu, logvar = (a.astype(np.float64) for a in encode_batch(model, x))  # (n, d) each
    labels = np.asarray(data.labels)
    y_tr, y_va = labels[train_rows], labels[val_rows]
    bank_mu, bank_lv, q_mu = mu[train_rows], logvar[train_rows], mu[val_rows]
    log_sigma = 0.5 * bank_lv  # (N, d)
    p10, p90 = np.percentile(log_sigma, [10, 90], axis=0)
    scores = posterior_scores(q_mu, bank_mu, bank_lv)
    tops = {rule: top_rows(s, HUB_K) for rule, s in scores.items()}  # (B, HUB_K) each
    sum_log_sigma = log_sigma.sum(1)  # (N,)
    maha_top = np.take_along_axis(scores["mahalanobis"], tops["logq"], axis=1)  # (B, HUB_K)
    engine = SearchEngine.build(bank_mu, logvar=bank_lv, config=EngineConfig(mode="exact"))
    engine_top1 = engine.search_batch_arrays(q_mu, k=1, mode="exact").rows[:, 0]
    rules: dict[str, Any] = {}
    for rule, rows in tops.items():
        h1, hk = hubness(rows[:, :1], len(bank_mu)), hubness(rows, len(bank_mu))
        rules[rule] = {
            "top1": round(float((y_tr[rows[:, 0]] == y_va).mean()), 4),
            "same_top1_as_logq": round(float((rows[:, 0] == tops["logq"][:, 0]).mean()), 4),
            "skew_top1": h1["skew"],
            f"skew_top{HUB_K}": hk["skew"],
            f"max_top{HUB_K}": hk["max"],
            f"never_top{HUB_K}": hk["never"],
            f"hub_slots_top{HUB_K}": hk["hub_slots"],
            "spearman_occurrence_sum_log_sigma": round(spearman(hk["counts"], sum_log_sigma), 3),
        }
    return {
        "n_bank": len(bank_mu),
        "n_queries": len(q_mu),
        "sd_mu": [round(float(v), 4) for v in bank_mu.std(0)],
        "geo_mean_sigma": [round(float(v), 4) for v in np.exp(log_sigma.mean(0))],
        "sd_log_sigma": [round(float(v), 4) for v in log_sigma.std(0)],
        "sigma_p90_over_p10": [round(float(v), 3) for v in np.exp(p90 - p10)],
        "sd_sum_log_sigma": round(float(sum_log_sigma.std()), 3),
        f"median_maha_spread_top{HUB_K}": round(float(np.median(maha_top.max(1) - maha_top.min(1))), 3),
        # How far a query lies from its log q top-1 item, in that item's sigmas (root mean square over
        # dimensions): ~1 would mean the query falls inside the posterior, >> 1 in its far tail.
        "median_top1_sigmas": round(float(np.median(np.sqrt(-2.0 * maha_top[:, 0] / mu.shape[1]))), 3),
        "rules": rules,
        "logq_vs_mu_l2": disagreement(tops["logq"][:, 0], tops["mu_l2"][:, 0], y_tr, y_va),
        "logq_vs_mahalanobis": disagreement(tops["logq"][:, 0], tops["mahalanobis"][:, 0], y_tr, y_va),
        "engine_top1_match": round(float((engine_top1 == tops["logq"][:, 0]).mean()), 4),
    }


def diagnosis_markdown(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The Markdown lines of the ``diagnosis`` of each run that has one (none: no lines)."""
    lines: list[str] = []
    for r in runs:
        g = r.get("diagnosis")
        if not g:
            continue
        where = "" if r.get("fold") is None else f" fold {r['fold']}"
        lines += [
            "",
            f"### Diagnosis: {r['config']} seed {r['seed']}{where} ({g['n_queries']} queries, bank "
            f"{g['n_bank']})",
            "",
            "| dim | KL | sd mu | geo-mean sigma | sd log sigma | sigma p90/p10 |",
            "|" + " --- |" * 6,
        ]
        for j, kl in enumerate(r.get("kl_per_dim") or [math.nan] * len(g["sd_mu"])):
            lines.append(f"| {j} | {kl:.2f} | {g['sd_mu'][j]:.3f} | {g['geo_mean_sigma'][j]:.3f} | "
                         f"{g['sd_log_sigma'][j]:.3f} | {g['sigma_p90_over_p10'][j]:.2f} |")  # fmt: skip
        lines += [
            "",
            f"-sum log sigma over the bank: sd {g['sd_sum_log_sigma']:.2f} nats; the Mahalanobis part "
            f"over each query's top-{HUB_K} log q items spans {g[f'median_maha_spread_top{HUB_K}']:.2f} "
            f"nats (median over queries); a query lies {g['median_top1_sigmas']:.2f} sigmas (RMS over "
            "dimensions, median over queries) from its log q top-1 item. numpy log q top-1 = engine "
            f"top-1 for {g['engine_top1_match']:.1%} of queries.",
            "",
            f"| rule | top-1 | same top-1 as log q | skew N1 | skew N{HUB_K} | max N{HUB_K} | never in a "
            f"top-{HUB_K} | top-{HUB_K} slots of the {HUB_SHARE:.0%} hubs | Spearman(N{HUB_K}, "
            "sum log sigma) |",
            "|" + " --- |" * 9,
        ]
        for rule, s in g["rules"].items():
            lines.append("| " + " | ".join(str(c) for c in [
                rule, f"{s['top1']:.3f}", f"{s['same_top1_as_logq']:.3f}", f"{s['skew_top1']:.2f}",
                f"{s[f'skew_top{HUB_K}']:.2f}", s[f"max_top{HUB_K}"], f"{s[f'never_top{HUB_K}']:.3f}",
                f"{s[f'hub_slots_top{HUB_K}']:.3f}", f"{s['spearman_occurrence_sum_log_sigma']:+.3f}",
            ]) + " |")  # fmt: skip
        lines.append("")
        for key, other in (("logq_vs_mu_l2", "mu-L2"), ("logq_vs_mahalanobis", "Mahalanobis part")):
            d = g[key]
            lines.append(
                f"- log q vs {other}: top-1 items differ on {d['differ']} of {d['queries']} queries; "
                f"there log q right only {d['a_only']}, {other} right only {d['b_only']}, both right "
                f"{d['both']}, neither {d['neither']}."
            )
    return lines


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
    data: Dataset,
    cfg: TrainConfig,
    vae_changes: dict[str, Any] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[TrainResult, LoadedModel, float]:
    """Train ``cfg`` on ``data`` into a temporary folder: the result, the loaded best model, seconds.

    ``vae_changes``: fields replaced in the model :func:`default_vae_config` fits to the data.
    ``split``: ``(train_rows, val_rows)`` (default: the seeded split of ``cfg``).
    """
    tr, va = split or split_indices(len(data), cfg.val_fraction, cfg.seed)
    vae_config = None
    if vae_changes:
        vae_config = default_vae_config(data, train_rows=tr).replace(**vae_changes)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(data, Path(tmp) / "model", config=cfg, vae_config=vae_config, val_rows=va)
        seconds = time.perf_counter() - t0
        return res, load_model(Path(tmp) / "model"), seconds


def run_report(
    name: str,
    data: Dataset,
    cfg: TrainConfig,
    vae_changes: dict[str, Any] | None = None,
    fold: tuple[int, np.ndarray, np.ndarray] | None = None,
    with_diagnosis: bool = False,
) -> tuple[dict[str, Any], LoadedModel, dict[str, np.ndarray]]:
    """Train and evaluate one configuration: its report row, the model, and the per-query outcomes
    (:func:`quality`'s ``per_query``, with ``rows``: the held-out rows they belong to).

    ``fold``: ``(index, train_rows, val_rows)`` of a cross-validation fold (default: the seeded split).
    ``with_diagnosis``: add :func:`diagnose`'s figures as the row's ``diagnosis``.
    """
    load_before = os.getloadavg()[0]
    if fold is None:
        fold_index = None
        tr, va = split_indices(len(data), cfg.val_fraction, cfg.seed)
    else:
        fold_index, tr, va = fold
    res, model, seconds = train_run(data, cfg, vae_changes, (tr, va))
    best = min(res.history, key=lambda h: h["val_neg_elbo"])
    q = quality(model, data, tr, va)
    per_query = {"rows": va, **q.pop("per_query", {})}
    row = {
        "config": name,
        "seed": cfg.seed,
        "fold": fold_index,
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
        **q,
        "model_hash": res.model_hash,
        "train_config": cfg.to_dict(),
        "vae_changes": {k: list(v) if isinstance(v, tuple) else v for k, v in (vae_changes or {}).items()},
    }
    if with_diagnosis:
        row["diagnosis"] = diagnose(model, data, tr, va)
    log.info("%s seed %d: %s", name, cfg.seed, {k: v for k, v in row.items() if k not in ("train_config",
             "diagnosis")})
    return row, model, per_query


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


def outcome_matrix(outcomes: Sequence[dict[str, Any]], key: str, seeds: Sequence[int], n: int) -> np.ndarray:
    """``(len(seeds), n)`` per-query values of ``key`` by seed and item row, NaN where a seed's runs
    held no query for that item. Each outcome is a :func:`run_report` ``per_query`` dict plus its ``seed``."""
    m = np.full((len(seeds), n), np.nan)
    for o in outcomes:
        if key in o:
            m[list(seeds).index(o["seed"]), o["rows"]] = o[key]
    return m


def seed_mean(m: np.ndarray) -> np.ndarray:
    """Per item, the mean over seeds of ``m`` ``(S, n)``, for the items some seed covered ``(n',)``."""
    cols = ~np.isnan(m).all(0)
    if not cols.any():
        return np.zeros(0)
    return np.nanmean(m[:, cols], axis=0)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Paired comparison of per-query outcomes ``a`` and ``b``, each ``(S, n)`` by seed and item (NaN:
    no query), on the pairs both have: the mean over items of the seed-averaged difference ``a - b``
    with its standard error over items, and the counts over all (seed, item) pairs of ``wins``
    (a > b; for 0/1 top-1 hits: a right, b wrong, McNemar's b) and ``losses`` (a < b)."""
    d = a - b  # NaN where either is missing
    diff, se = mean_se(seed_mean(d)) if (~np.isnan(d)).any() else (float("nan"), float("nan"))
    covered = ~np.isnan(d).all(0)
    return {
        "diff": round(diff, 5),
        "se": round(se, 5),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "n_queries": int(covered.sum()),
    }


def _time_ratio(
    mine: Sequence[dict[str, Any]], by_run: dict[tuple[Any, Any, Any], dict[str, Any]], ref: str
) -> float | None:
    """Mean over ``mine`` of train seconds / those of config ``ref``'s run on the same seed and fold."""
    ratios = [r["train_seconds"] / d["train_seconds"] for r in mine
              if (d := by_run.get((ref, r["seed"], r.get("fold")))) is not None]  # fmt: skip
    return float(np.mean(ratios)) if ratios else None


RULES = ("logq", "mu_l2", "raw_pixels")
# (name in the summary, per-query key of a, rule of a, rule of b): the paired comparisons within one model.
PAIRS = (("logq_minus_mu_l2", "logq", "mu_l2"), ("logq_minus_raw_pixels", "logq", "raw_pixels"))


def summarize(
    rows: Sequence[dict[str, Any]], outcomes: Sequence[dict[str, Any]] = (), n_items: int = 0
) -> dict[str, dict[str, Any]]:
    """Per configuration: the mean over its runs of each reported number and, from the per-query
    ``outcomes`` (each tagged with its ``config`` and ``seed``), the pooled agreements with standard
    errors and the paired differences (within the model, and its log q against the default's)."""
    keys = ("train_seconds", "val_neg_elbo", "kl_min", "active_dims", "top1_logq", f"top{TOP_K}_logq",
            "top1_mu_l2", f"top{TOP_K}_mu_l2", "top1_raw_pixels", f"top{TOP_K}_raw_pixels")  # fmt: skip
    seeds = sorted({int(r["seed"]) for r in rows})
    by_run = {(r["config"], r["seed"], r.get("fold")): r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        m = out[name] = {"runs": len(mine), **{k: _mean(mine, k) for k in keys}}
        m["kl_min"] = min(r["kl_min"] for r in mine)
        m["all_dims_active"] = all(r["active_dims"] == r["latent_dim"] for r in mine)
        m["folds"] = sorted({r["fold"] for r in mine if r.get("fold") is not None})
        # Training time against the default's and the old defaults' runs on the same seed and fold.
        m["train_seconds_x_default"] = _time_ratio(mine, by_run, "default")
        m["train_seconds_x_old_defaults"] = _time_ratio(mine, by_run, "old defaults")
        mats = {
            f"top{k}_{rule}": outcome_matrix([o for o in outcomes if o["config"] == name], f"top{k}_{rule}",
                                             seeds, n_items)
            for k in (1, TOP_K) for rule in RULES
        }  # fmt: skip
        if not outcomes or np.isnan(mats["top1_logq"]).all():
            continue
        m["n_queries"] = int((~np.isnan(mats["top1_logq"]).all(0)).sum())
        pooled: dict[str, Any] = {}
        for key, mat in mats.items():
            mean, se = mean_se(seed_mean(mat))
            pooled[key] = {"mean": round(mean, 5), "se": round(se, 5)}
        m["pooled"] = pooled
        m["paired"] = {
            f"top{k}_{pname}": paired(mats[f"top{k}_{a}"], mats[f"top{k}_{b}"])
            for k in (1, TOP_K) for pname, a, b in PAIRS
        }  # fmt: skip
        if name != "default" and any(o["config"] == "default" for o in outcomes):
            ref = [o for o in outcomes if o["config"] == "default"]
            m["paired"].update({
                f"top{k}_logq_minus_default": paired(
                    mats[f"top{k}_logq"], outcome_matrix(ref, f"top{k}_logq", seeds, n_items))
                for k in (1, TOP_K)
            })  # fmt: skip
    return out


def check_targets(summary: dict[str, dict[str, Any]], name: str = "default") -> dict[str, bool | None]:
    """Each of issue 18's targets for configuration ``name`` (pooled over its runs when there are
    per-query outcomes, else the mean over its runs); training time against the old defaults' runs
    on the same seeds and folds."""
    mean = summary[name]
    pooled = mean.get("pooled")
    t1 = pooled["top1_logq"]["mean"] if pooled else mean["top1_logq"]
    mu = pooled["top1_mu_l2"]["mean"] if pooled else mean["top1_mu_l2"]
    old = summary.get("old defaults")
    diff = mean.get("paired", {}).get("top1_logq_minus_mu_l2", {})
    return {
        "all_dims_active": mean["all_dims_active"],
        "top1_logq_ge_0.77": None if t1 is None else t1 >= TARGETS["top1_logq_ge"],
        "top1_logq_gt_mu_l2": None if t1 is None or mu is None else t1 > mu,
        "top1_logq_gt_mu_l2_by_2se": None if not pooled else diff["diff"] > 2 * diff["se"],
        "val_neg_elbo_le_257": mean["val_neg_elbo"] <= TARGETS["val_neg_elbo_le"],
        "train_seconds_le_2x_old": None
        if old is None or mean["train_seconds_x_old_defaults"] is None
        else mean["train_seconds_x_old_defaults"] <= TARGETS["train_seconds_le_x_old_defaults"],
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "NOT met"


def _pm(stat: dict[str, Any] | None, signed: bool = False) -> str:
    """``mean ± se`` of a pooled or paired statistic (``n/a`` when absent)."""
    if not stat:
        return "n/a"
    value = stat["diff"] if "diff" in stat else stat["mean"]
    return f"{value:{'+.3f' if signed else '.3f'}} ± {stat['se']:.3f}"


def _wl(stat: dict[str, Any] | None) -> str:
    return "n/a" if not stat else f"{stat['wins']}/{stat['losses']}"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a report."""
    k = TOP_K
    folds = report.get("folds") or 0
    split = (
        f"{folds}-fold cross-validation per seed (each image held out once per seed; each fold trains on "
        "the other folds and validates on its own)"
        if folds
        else f"{report['n_train']} train / {report['n_val']} held out, split by seed"
    )
    lines = [
        f"# Model benchmark ({report['date']})",
        "",
        *([report["note"], ""] if report.get("note") else []),
        f"Command: `{report['command']}`",
        "",
        *[f"Merged from `{m['file']}` ({m['runs']} runs): `{m['command']}`" for m in report["merged"]],
        *([""] if report.get("merged") else []),
        f"Data: `{report['data']}` ({report['n_items']} items; {split}). Seeds: "
        f"{', '.join(map(str, report['seeds']))}. CPU threads: {report['threads']}, torch {report['torch']}. "
        f"1-min load average before each run: {report['load_average_runs']['min']:.1f}-"
        f"{report['load_average_runs']['max']:.1f} (mean {report['load_average_runs']['mean']:.1f}); "
        f"{report['started']} to {report['date']}.",
        f"Default training: `latentsearch train` defaults ({report['default_train_summary']}).",
        *[f"Variant `{name}`: the defaults with {changes}." for name, changes in report["variants"].items()],
        f"Agreement: the share of the top-1 / top-{k} neighbours of each held-out image (query: its "
        "posterior mean) that carry its label; bank: the training split. log q: exact ranking by the "
        "engine; mu-L2: Euclidean on posterior means; pixels: Euclidean on raw pixels. Active: "
        f"dimensions with mean KL >= {ACTIVE_KL} nats over held-out images.",
        "",
        "| config | seed | fold | -ELBO | KL min | active | top-1 log q | top-1 mu-L2 | top-1 pixels "
        f"| top-{k} log q | top-{k} mu-L2 | top-{k} pixels | best/run epochs | train s | load |",
        "|" + " --- |" * 15,
    ]
    for r in report["runs"]:
        fold = "-" if r.get("fold") is None else r["fold"]
        cells = [r["config"], r["seed"], fold, f"{r['val_neg_elbo']:.2f}", f"{r['kl_min']:.3f}"]
        cells.append(f"{r['active_dims']}/{r['latent_dim']}")
        cells += [_fmt(r.get(f"top{n}_{rule}")) for n in (1, k) for rule in RULES]
        cut = " (time limit)" if r["time_limited"] else ""
        cells += [f"{r['best_epoch']}/{r['epochs_run']}{cut}", f"{r['train_seconds']:.0f}"]
        cells.append(f"{r['load_average_1min_before']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Per-dimension KL (nats, mean over held-out images):", ""]
    for r in report["runs"]:
        where = "" if r.get("fold") is None else f" fold {r['fold']}"
        kl = ", ".join(f"{v:.2f}" for v in r["kl_per_dim"])
        lines.append(f"- {r['config']} seed {r['seed']}{where}: {kl}")
    lines += [
        "",
        "Pooled over every held-out query of each configuration (mean ± standard error over queries; "
        "with several seeds each query's outcomes are averaged over seeds first). Paired differences "
        "compare two rankings on the same queries (log q and mu-L2 / pixels: the same model; vs default: "
        "the default's log q on the same queries and folds); W/L: top-1 wins/losses (McNemar counts, "
        "over every seed's queries).",
        "",
        "| config | runs | queries | -ELBO | all active | top-1 log q | top-1 mu-L2 | top-1 pixels "
        f"| top-{k} log q | top-1 log q - mu-L2 | W/L | top-1 log q - pixels | W/L | top-{k} log q - mu-L2 "
        "| top-1 log q - default | train s | x default | x old defaults |",
        "|" + " --- |" * 18,
    ]
    for name, m in report["summary"].items():
        pooled, pair = m.get("pooled") or {}, m.get("paired") or {}
        lines.append("| " + " | ".join(str(c) for c in [
            name, m["runs"], m.get("n_queries", "n/a"), f"{m['val_neg_elbo']:.2f}",
            "yes" if m["all_dims_active"] else "no", _pm(pooled.get("top1_logq")),
            _pm(pooled.get("top1_mu_l2")),
            _pm(pooled.get("top1_raw_pixels")), _pm(pooled.get(f"top{k}_logq")),
            _pm(pair.get("top1_logq_minus_mu_l2"), True), _wl(pair.get("top1_logq_minus_mu_l2")),
            _pm(pair.get("top1_logq_minus_raw_pixels"), True), _wl(pair.get("top1_logq_minus_raw_pixels")),
            _pm(pair.get(f"top{k}_logq_minus_mu_l2"), True), _pm(pair.get("top1_logq_minus_default"), True),
            f"{m['train_seconds']:.0f}", _fmt(m.get("train_seconds_x_default"), ".2f"),
            _fmt(m.get("train_seconds_x_old_defaults"), ".2f"),
        ]) + " |")  # fmt: skip
    tp = report["throughput_runs"]
    lines += [
        "",
        f"Targets (issue 18; configuration `{report.get('targets_for', 'default')}`"
        + (", pooled over its queries" if folds else ", mean over its seeds")
        + "): "
        + ", ".join(f"{name} {_verdict(ok)}" for name, ok in report["targets_met"].items())
        + ".",
        "",
        f"Encode throughput (encode_batch, batch {report['encode_batch']}): "
        f"{report['encode_images_per_s']:,} images/s; bare forward pass of the encoder "
        f"{report['bare_forward_images_per_s']:,} images/s (median of {len(tp['encode_batch']['runs'])} "
        "interleaved runs; 1-min load average before measuring "
        f"{report['load_average_1min_before_throughput']:.2f} on a machine shared with other jobs, so "
        "times are noisy).",
        *diagnosis_markdown(report["runs"]),
        "",
    ]
    return "\n".join(lines)


def encode_outcome(o: dict[str, Any]) -> dict[str, Any]:
    """A per-query outcome (config, seed, ``rows`` and per-rule arrays) in compact JSON form: rows
    as one space-separated string, top-1 hits as a string of 0/1, top-k shares as the digit
    ``k * share`` per query. :func:`decode_outcome` inverts it."""
    out: dict[str, Any] = {"config": o["config"], "seed": o["seed"], "rows": " ".join(map(str, o["rows"]))}
    for rule in RULES:
        if f"top1_{rule}" in o:
            out[f"top1_{rule}"] = "".join(str(int(v)) for v in o[f"top1_{rule}"])
            out[f"top{TOP_K}_{rule}"] = "".join(str(round(v * TOP_K)) for v in o[f"top{TOP_K}_{rule}"])
    return out


def decode_outcome(o: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_outcome`."""
    out: dict[str, Any] = {"config": o["config"], "seed": int(o["seed"])}
    out["rows"] = np.array([int(v) for v in o["rows"].split()], dtype=np.int64)
    for rule in RULES:
        if f"top1_{rule}" in o:
            out[f"top1_{rule}"] = np.array([int(c) for c in o[f"top1_{rule}"]], dtype=np.float64)
            out[f"top{TOP_K}_{rule}"] = np.array([int(c) for c in o[f"top{TOP_K}_{rule}"]]) / TOP_K
    return out


def cv_folds(n: int, folds: int, seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``folds`` folds of ``n`` items dealt by a permutation seeded by ``seed``: per fold ``(index,
    train_rows, val_rows)``, both sorted; every item is in exactly one ``val_rows``."""
    if not 2 <= folds <= n:
        raise SystemExit(f"--folds must be in [2, {n}], got {folds}")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    return [(i, np.setdiff1d(np.arange(n), p), np.sort(p)) for i, p in enumerate(parts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("LATENTSEARCH_FASHION_MNIST", DEFAULT_DATASET),
        help="a built-in dataset name or a path (default: the packaged Fashion-MNIST sample)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--stem", default=None, help="results file name, no extension (default model-DATE)")
    parser.add_argument("--note", default="", help="a line for the top of the Markdown summary")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (one run each)")
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation per seed (0: the seeded val_fraction split instead)",
    )
    parser.add_argument(
        "--only-folds",
        default="",
        help="with --folds: run only these comma-separated fold indices (merge the rest with --merge)",
    )
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="REPORT.json",
        help="include the runs and per-query outcomes of an earlier report of this bench (same data, "
        "folds and seeds; repeatable): runs of one configuration can come from several processes",
    )
    parser.add_argument(
        "--with-old-defaults",
        action="store_true",
        help="also train OLD_DEFAULTS per seed (with --folds: on the first fold only, for training time)",
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
    parser.add_argument(
        "--targets-for", default="default", help="the configuration whose targets are checked"
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="per run, also why log q ranks as it does against mu-L2: sigma spread per dimension, top-1 "
        "disagreements, hubness, the Mahalanobis part alone (see diagnose)",
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="training wall-clock cap per run (s)")
    parser.add_argument("--batch", type=int, default=1024, help="encode batch size")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = dt.datetime.now().isoformat(timespec="seconds")
    stem = args.stem or f"model-{dt.date.today().isoformat()}"
    env = " ".join(f"{k}={os.environ[k]}" for k in ("LATENTSEARCH_CPU_THREADS",) if k in os.environ)
    command = " ".join(filter(None, [env, "python -m bench.bench_model", shlex.join(sys.argv[1:])]))
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
    plans: list[tuple[str, TrainConfig, dict[str, Any], tuple[int, np.ndarray, np.ndarray] | None]] = []
    for s in seeds:
        splits = cv_folds(len(data), args.folds, s) if args.folds else [None]
        only = {int(f) for f in args.only_folds.split(",") if f.strip()}
        for fold in splits:
            if only and fold is not None and fold[0] not in only:
                continue
            for name, tc, vc in variants:
                if name == "old defaults" and fold is not None and fold[0] > 0:
                    continue  # the training-time reference: one fold per seed
                plans.append((name, base.replace(seed=s, **tc), vc, fold))
    rows: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    merged = []
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        rows += earlier["runs"]
        outcomes += [decode_outcome(o) for o in earlier["per_query"]]
        merged.append({"file": path, "command": earlier.get("command"), "runs": len(earlier["runs"])})
    n_merged = len(rows)
    first_model: LoadedModel | None = None
    for i, (name, cfg, vae_changes, fold) in enumerate(plans):
        log.info("run %d of %d: %s seed %d fold %s", i + 1, len(plans), name, cfg.seed, fold and fold[0])
        row, model, per_query = run_report(name, data, cfg, vae_changes, fold, args.diagnose)
        rows.append(row)
        outcomes.append({**per_query, "config": name, "seed": cfg.seed})
        first_model = first_model or model
        # What is done so far, for --merge should this process be stopped before the end.
        own = slice(n_merged, None)
        partial = {"command": command, "runs": rows[own]}
        partial["per_query"] = [encode_outcome(o) for o in outcomes[own]]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{stem}.partial.json").write_text(json.dumps(partial, default=str) + "\n")

    load_before = os.getloadavg()[0]
    if first_model is not None:
        tp = encode_throughput(first_model, data.to_array(), args.batch, args.repeats)
    elif args.merge:  # a merge of earlier reports only: their first one's throughput figures
        earlier = json.loads(Path(args.merge[0]).read_text())
        tp, load_before = earlier["throughput_runs"], earlier["load_average_1min_before_throughput"]
    else:
        raise SystemExit("nothing to run: give a configuration, or reports to --merge")
    summary = summarize(rows, outcomes, len(data))
    changed = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in ("epochs", "batch_size", "lr", "beta", "kl_warmup_epochs", "free_bits", "augment_shift",
                      "consistency_weight")
    }  # fmt: skip
    loads = [r["load_average_1min_before"] for r in rows]
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "started": started,
        "command": command,
        "note": args.note,
        "data": data_desc,
        "n_items": len(data),
        "n_train": rows[0]["n_train"],
        "n_val": rows[0]["n_val"],
        "folds": args.folds,
        "seeds": seeds,
        "default_train_summary": ", ".join(f"{k} {v}" for k, v in changed.items()),
        "variants": {name: {**tc, **{f"vae.{k}": v for k, v in vc.items()}} for name, tc, vc in variants
                     if name != "default"},
        "merged": merged,
        "runs": rows,
        "summary": summary,
        "targets": TARGETS,
        "targets_for": args.targets_for,
        "targets_met": check_targets(summary, args.targets_for) if args.targets_for in summary else {},
        "encode_batch": args.batch,
        "encode_images_per_s": round(tp["encode_batch"]["median"]),
        "bare_forward_images_per_s": round(tp["bare_forward"]["median"]),
        "throughput_runs": tp,
        "load_average_runs": {"min": min(loads), "max": max(loads), "mean": round(float(np.mean(loads)), 2)},
        "load_average_1min_before_throughput": round(load_before, 2),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "per_query": [encode_outcome(o) for o in outcomes],
    }
    write_results(args.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

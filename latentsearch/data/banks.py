"""Deterministic synthetic posterior banks shaped like a trained VAE's (for tests and benchmarks).

A VAE trained on a 10-class image set gives posteriors whose means cluster by class and whose
sigmas are heteroscedastic: small (0.03-0.4) on the active dimensions, varying per class and per
item, and close to 1 with means close to 0 on collapsed dimensions. This generator reproduces those
features so a search method can be judged without a model; real posteriors come from
``latentsearch index`` or ``bench/bench_engine.py --model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticBank", "query_families", "vae_like_posteriors"]


@dataclass(frozen=True)
class SyntheticBank:
    """``mu``, ``log_sigma``: ``(N, d)`` float64; ``labels``: ``(N,)`` int64."""

    mu: np.ndarray
    log_sigma: np.ndarray
    labels: np.ndarray


def vae_like_posteriors(
    n: int, d: int = 10, *, classes: int = 10, collapsed: int | None = None, seed: int = 0
) -> SyntheticBank:
    """Generate ``n`` posteriors in ``d`` dimensions (``collapsed`` dims default to d // 8)."""
    rng = np.random.default_rng(seed)
    collapsed = d // 8 if collapsed is None else collapsed
    active = d - collapsed
    centers = rng.normal(0.0, 1.0, size=(classes, d))
    spread = rng.uniform(0.35, 0.8, size=(classes, d))
    base_ls = rng.uniform(np.log(0.04), np.log(0.35), size=(classes, d))
    labels = rng.integers(0, classes, size=n)
    mu = centers[labels] + spread[labels] * rng.standard_normal((n, d))
    # Per-item confidence: one shared factor plus per-dimension noise; points far from their class
    # centre (atypical items) get larger sigmas, as encoders do.
    item = 0.35 * rng.standard_normal((n, 1))
    dev = np.abs(mu - centers[labels]) / spread[labels]
    log_sigma = base_ls[labels] + item + 0.25 * rng.standard_normal((n, d)) + 0.15 * dev
    if collapsed:
        cols = np.arange(active, d)
        mu[:, cols] = 0.03 * rng.standard_normal((n, collapsed))
        log_sigma[:, cols] = np.log(rng.uniform(0.9, 1.02, size=(n, collapsed)))
    return SyntheticBank(mu=mu, log_sigma=log_sigma, labels=labels.astype(np.int64))


def query_families(
    bank: SyntheticBank | tuple[np.ndarray, np.ndarray], n: int, *, seed: int = 1
) -> dict[str, np.ndarray]:
    """The three query families of the benchmark, each ``(n, d)``.

    * ``box``: z uniform in [-5, 5]^d (a person's sliders);
    * ``prior``: z ~ N(0, I);
    * ``posterior``: z ~ q(z|x) of random items.
    """
    mu, log_sigma = (bank.mu, bank.log_sigma) if isinstance(bank, SyntheticBank) else bank
    rng = np.random.default_rng(seed)
    d = mu.shape[1]
    rows = rng.integers(0, mu.shape[0], size=n)
    return {
        "box": rng.uniform(-5.0, 5.0, size=(n, d)),
        "prior": rng.standard_normal((n, d)),
        "posterior": mu[rows] + np.exp(log_sigma[rows]) * rng.standard_normal((n, d)),
    }

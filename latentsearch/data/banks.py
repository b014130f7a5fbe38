"""Deterministic synthetic posterior banks shaped like a trained VAE's (for tests and benchmarks).

A VAE trained on a 10-class image set gives posteriors whose means cluster by class and whose
sigmas are heteroscedastic: small (0.03-0.4) on the active dimensions, varying per class and per
item, and close to 1 with means close to 0 on collapsed dimensions. This generator reproduces those
features so a search method can be judged without a model; real posteriors come from
``latentsearch index`` or ``bench/bench_engine.py --model``.
"""

from __future__ import annotations

import numpy as np

from latentsearch.bank import PosteriorBank
from latentsearch.posterior import DiagonalGaussian

__all__ = ["query_families", "vae_like_posteriors"]


def vae_like_posteriors(
    n: int, d: int = 10, *, classes: int = 10, collapsed: int | None = None, seed: int = 0
) -> PosteriorBank:
    """Generate ``n`` posteriors in ``d`` dimensions (``collapsed`` dims default to d // 8).

    Returns a bank of ``(n, d)`` float64 ``mu`` and ``log_sigma`` with ``(n,)`` int64 class labels.
    """
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
    return PosteriorBank(mu, log_sigma, labels=labels.astype(np.int64))


def query_families(
    bank: PosteriorBank | tuple[np.ndarray, np.ndarray], n: int, *, seed: int = 1
) -> dict[str, np.ndarray]:
    """The three query families of the benchmark, each ``(n, d)``, for a bank or ``(mu, log_sigma)``.

    * ``box``: z uniform in [-5, 5]^d (a person's sliders);
    * ``prior``: z ~ N(0, I);
    * ``posterior``: z ~ q(z|x) of random items.
    """
    if isinstance(bank, PosteriorBank):
        posteriors = bank.posteriors
    else:
        posteriors = DiagonalGaussian(bank[0], log_sigma=bank[1])
    rng = np.random.default_rng(seed)
    d = posteriors.dim
    rows = rng.integers(0, len(posteriors), size=n)
    return {
        "box": rng.uniform(-5.0, 5.0, size=(n, d)),
        "prior": rng.standard_normal((n, d)),
        "posterior": posteriors[rows].sample(rng),
    }

"""The tests' independent ground truth: float64 numpy written from the formulas, nothing else.

This module imports nothing from ``latentsearch``: every test that needs a true answer (the
engine in any mode, the indexer, the quickstart) compares against these functions, and these
functions are checked against hand-computed values in ``tests/test_reference.py``.

For a bank of N diagonal Gaussians q(z|x_n) = N(mu_n, diag(sigma_n^2)) in d dimensions:

    log q(z|x)             = -1/2 sum(((z - mu) / sigma)^2) - sum(log sigma) - d/2 log(2 pi)
    E_{z ~ N(m, s^2)} log q = -1/2 sum(((m - mu)^2 + s^2) / sigma^2) - sum(log sigma) - d/2 log(2 pi)
    KL(N(m, s^2) || q)      = sum(log(sigma / s) + (s^2 + (m - mu)^2) / (2 sigma^2) - 1/2)

With a uniform prior over the N items (those passing a label filter):

    log q(z)   = logsumexp_n log q(z|x_n) - log N   (aggregate posterior density)
    p(n | z)   = exp(log q(z|x_n) - logsumexp_m log q(z|x_m))

Rankings are by score descending, ties broken by ascending row (the engine's rule).

Shapes: query points / query means and stds are ``(B, d)`` (a single ``(d,)`` is taken as
``B = 1``); ``mu`` and ``log_sigma`` are ``(N, d)``; scores are ``(B, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = [
    "LOG_2PI",
    "SIGMA_REGIMES",
    "expected_log_q",
    "kl_to",
    "log_q",
    "log_qz",
    "logsumexp",
    "make_bank",
    "top_k",
]

LOG_2PI = math.log(2.0 * math.pi)

# Elements of one (b, N, d) intermediate block: bounds memory for large banks and batches.
_BLOCK_ELEMENTS = 2_000_000


def _queries(x: np.ndarray) -> np.ndarray:
    """``(B, d)`` float64 from ``(B, d)`` or ``(d,)``."""
    return np.atleast_2d(np.asarray(x, dtype=np.float64))


def _bank(mu: np.ndarray, log_sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    assert mu.ndim == 2 and mu.shape == log_sigma.shape, (mu.shape, log_sigma.shape)
    return mu, log_sigma


def _blocks(b: int, per_query: int) -> Iterator[slice]:
    """Slices over ``b`` queries, each block holding about ``_BLOCK_ELEMENTS`` elements."""
    step = max(1, _BLOCK_ELEMENTS // max(1, per_query))
    for start in range(0, b, step):
        yield slice(start, start + step)


def log_q(z: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """``(B, N)`` log q(z_b | x_n) for query points ``z (B, d)``."""
    z = _queries(z)
    mu, log_sigma = _bank(mu, log_sigma)
    sigma = np.exp(log_sigma)
    d = mu.shape[1]
    out = np.empty((z.shape[0], mu.shape[0]))
    for s in _blocks(z.shape[0], mu.size):
        u = (z[s, None, :] - mu[None]) / sigma[None]  # (b, N, d)
        out[s] = -0.5 * (u**2).sum(-1) - log_sigma.sum(-1) - d / 2 * LOG_2PI
    return out


def expected_log_q(mean: np.ndarray, std: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """``(B, N)`` E_{z ~ N(mean_b, diag(std_b^2))} log q(z | x_n); ``std = 0`` gives :func:`log_q`."""
    mean, std = _queries(mean), _queries(std)
    assert mean.shape == std.shape, (mean.shape, std.shape)
    mu, log_sigma = _bank(mu, log_sigma)
    var = np.exp(2.0 * log_sigma)
    d = mu.shape[1]
    out = np.empty((mean.shape[0], mu.shape[0]))
    for s in _blocks(mean.shape[0], mu.size):
        quad = (((mean[s, None, :] - mu[None]) ** 2 + std[s, None, :] ** 2) / var[None]).sum(-1)
        out[s] = -0.5 * quad - log_sigma.sum(-1) - d / 2 * LOG_2PI
    return out


def kl_to(mean: np.ndarray, std: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """``(B, N)`` KL(N(mean_b, diag(std_b^2)) || q(.|x_n)) by the closed form; needs ``std > 0``.

    This is what the engine reports in ``kl`` for distribution queries (it ranks by the expected
    log-likelihood; the query's entropy is constant per query, so the order is the same).
    """
    mean, std = _queries(mean), _queries(std)
    assert mean.shape == std.shape and np.all(std > 0), "KL to a point mass is undefined"
    mu, log_sigma = _bank(mu, log_sigma)
    sigma = np.exp(log_sigma)
    out = np.empty((mean.shape[0], mu.shape[0]))
    for s in _blocks(mean.shape[0], mu.size):
        m, sd = mean[s, None, :], std[s, None, :]
        terms = np.log(sigma[None] / sd) + (sd**2 + (m - mu[None]) ** 2) / (2.0 * sigma[None] ** 2) - 0.5
        out[s] = terms.sum(-1)
    return out


def logsumexp(scores: np.ndarray) -> np.ndarray:
    """``(B,)`` float64 ``log sum_n exp(scores[b, n])`` for ``(B, N)`` scores (max-shifted)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    top = scores.max(axis=1)
    return top + np.log(np.exp(scores - top[:, None]).sum(axis=1))


def log_qz(scores: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """``(B,)`` aggregate-posterior log density from ``(B, N)`` scores over the ``allowed`` rows."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if allowed is not None:
        scores = scores[:, allowed]
    return logsumexp(scores) - math.log(scores.shape[1])


def leave_one_out_log_qz(scores: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``(S,)`` ``log (1/(N-1)) sum_{j != own[s]} exp(scores[s, j])`` for ``(S, N)`` scores and the
    ``(S,)`` row each sample was drawn from (typicality's reference)."""
    scores = np.array(np.atleast_2d(scores), dtype=np.float64)
    scores[np.arange(scores.shape[0]), own] = -np.inf
    return logsumexp(scores) - math.log(scores.shape[1] - 1)


def top_k(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Rows of the top ``k``: score descending, ties by ascending row.

    Args:
        scores: ``(N,)`` scores of one query, or ``(B, N)`` of a batch.
        k: how many; above the number of candidates, all of them.
        allowed: ``(N,)`` bool mask of the candidate rows (a label filter); default all.

    Returns:
        ``(min(k, n_allowed),)`` rows, or ``(B, min(k, n_allowed))`` for a batch.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 2:
        picked = [top_k(row, k, allowed) for row in scores]
        return np.stack(picked) if picked else np.empty((0, 0), dtype=np.int64)
    rows = np.arange(scores.size) if allowed is None else np.flatnonzero(allowed)
    order = np.lexsort((rows, -scores[rows]))  # last key first: -score, then row
    return rows[order][:k]


# -- the banks every comparison with the ground truth runs over ---------------------------------
# Sigma regimes where float32 screening is hardest: moderate, log-uniform over six decades, all
# tiny, per-item scales from 1e-4 to 1e2 in one bank, and VAE-like collapsed dimensions.
SIGMA_REGIMES = ("moderate", "loguniform", "tiny", "mixed", "collapsed")


def make_bank(n: int, d: int, regime: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, log_sigma)``, each ``(n, d)`` float64: means uniform in [-4, 4], sigmas of ``regime``."""
    mu = rng.uniform(-4.0, 4.0, size=(n, d))
    if regime == "moderate":
        log_sigma = rng.uniform(math.log(0.05), math.log(2.0), size=(n, d))
    elif regime == "loguniform":
        log_sigma = rng.uniform(math.log(1e-4), math.log(1e2), size=(n, d))
    elif regime == "tiny":
        log_sigma = rng.uniform(math.log(1e-4), math.log(1e-3), size=(n, d))
    elif regime == "mixed":  # per-item scale: some tiny-sigma items, some huge, in one bank
        scale = rng.choice([1e-4, 1e-2, 1.0, 1e2], size=(n, 1))
        log_sigma = np.log(scale) + rng.uniform(-0.3, 0.3, size=(n, d))
    elif regime == "collapsed":  # sigma ~ 1, mu ~ 0 on the trailing half; small sigma on the rest
        log_sigma = rng.uniform(math.log(1e-3), math.log(0.4), size=(n, d))
        c = np.arange(d // 2, d)
        mu[:, c] = 0.03 * rng.standard_normal((n, c.size))
        log_sigma[:, c] = np.log(rng.uniform(0.9, 1.02, size=(n, c.size)))
    else:
        raise ValueError(f"unknown sigma regime {regime!r}; one of {SIGMA_REGIMES}")
    return mu, log_sigma


def assert_batch_is_brute_force(rows: np.ndarray, scores: np.ndarray, ref: np.ndarray, k: int) -> None:
    """``rows``/``scores (B, k)`` of an exact batch equal the float64 brute force's top-``k`` of
    ``ref (B, N)`` (rows exactly, ties by row; scores to 1e-12 relative)."""
    for b in range(ref.shape[0]):
        want = top_k(ref[b], k)
        np.testing.assert_array_equal(rows[b], want)
        np.testing.assert_allclose(scores[b], ref[b][want], rtol=1e-12, atol=1e-9)

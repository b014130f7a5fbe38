"""The lifted inner-product form of log q(z|x).

For a diagonal Gaussian with mean mu and standard deviation sigma (d dimensions)::

    log q(z|x) = <[z^2, z, 1], [-1/(2 sigma^2), mu/sigma^2, c]>
    c = -sum(mu^2 / (2 sigma^2)) - sum(log sigma) - d/2 log(2 pi)

and for a query Gaussian N(m, s^2), ``E_z log q(z|x) = <[m^2 + s^2, m, 1], same item vector>``.
Lifted vectors have n = 2d + 1 coordinates. Evaluated in float32 the identity cancels
catastrophically when sigma is small, so float32 scores are only ever used with the rigorous error
bound below, and final scores are always recomputed in float64 from (mu, log sigma).
"""

from __future__ import annotations

import numpy as np

from latentsearch.posterior import LOG_2PI

__all__ = [
    "FLOAT32_EPS",
    "error_coefficient",
    "lift_distributions",
    "lift_items",
    "lift_points",
    "lift_queries",
]

FLOAT32_EPS = float(np.finfo(np.float32).eps) / 2.0  # unit roundoff u = 2^-24


def lift_items(mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """Lift posteriors to item vectors.

    Args:
        mu, log_sigma: ``(N, d)`` float arrays.

    Returns:
        ``(N, 2d + 1)`` float64: ``[-1/(2 sigma^2), mu/sigma^2, c]``.
    """
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    n, d = mu.shape
    inv_var = np.exp(-2.0 * log_sigma)
    out = np.empty((n, 2 * d + 1), dtype=np.float64)
    out[:, :d] = -0.5 * inv_var
    np.multiply(mu, inv_var, out=out[:, d : 2 * d])
    out[:, 2 * d] = -0.5 * np.einsum("ij,ij->i", mu * mu, inv_var) - log_sigma.sum(1) - 0.5 * d * LOG_2PI
    return out


def lift_points(z: np.ndarray) -> np.ndarray:
    """Lift query points ``(B, d)`` to ``(B, 2d + 1)`` float64 ``[z^2, z, 1]``."""
    z = np.asarray(z, dtype=np.float64)
    return np.concatenate([z * z, z, np.ones((z.shape[0], 1))], axis=1)


def lift_distributions(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Lift query Gaussians ``N(mean, std^2)`` (each ``(B, d)``) to ``[m^2 + s^2, m, 1]``."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    return np.concatenate([mean * mean + std * std, mean, np.ones((mean.shape[0], 1))], axis=1)


def lift_queries(points: np.ndarray, std: np.ndarray | None = None) -> np.ndarray:
    """Lifted queries ``(B, 2d + 1)``: the points ``(B, d)`` (:func:`lift_points`), or the Gaussians
    ``N(points, std^2)`` with ``std`` ``(B, d)`` (:func:`lift_distributions`)."""
    return lift_points(points) if std is None else lift_distributions(points, std)


def error_coefficient(n: int) -> float:
    """kappa such that ``|fl32(<q, x>) - <q, x>| <= kappa * sum_j |q_j| |x_j|``.

    Covers rounding q and x to float32 (2u) and any float32 summation order of n products, with or
    without FMA (gamma_n = n u / (1 - n u)), plus the float64 evaluation of the reference; doubled
    as a safety margin.
    """
    m = n + 4
    return 2.0 * (m * FLOAT32_EPS / (1.0 - m * FLOAT32_EPS))

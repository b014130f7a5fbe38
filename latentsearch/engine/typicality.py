"""Typicality: where a query's log q(z) falls among the log densities of the data's own latents.

At build time ``samples`` points are drawn from the posteriors of random items (``z = mu + sigma *
eps`` for items chosen uniformly with replacement, seeded), and the leave-one-out aggregate-posterior
log density of each, ``log (1/(N-1)) sum_{j != i} q(z|x_j)`` over every item but the draw's own
(certified like a query's), is stored sorted. A query's typicality is the fraction of those
reference values ``<= log q(query)``: near 0 for a point far from every item (a box corner), about
uniform on [0, 1] for latents of new items from the data's distribution (leaving the own item out
makes each draw such a latent; with it, the draw's own, often tight, posterior dominates its sum
and a new item's latent would score near 0), and near 1 on top of a catalogue item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latentsearch.errors import CorruptIndexError

__all__ = ["TypicalityReference", "reference_points"]


@dataclass(frozen=True, kw_only=True)
class TypicalityReference:
    """The sorted reference log densities.

    Attributes:
        log_qz: ``(S,)`` float64 ascending ``log q(z)`` of the reference sample.
    """

    log_qz: np.ndarray

    def __post_init__(self) -> None:
        arr = self.log_qz
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or (np.diff(arr) < 0).any():
            raise CorruptIndexError("typicality reference must be a non-empty ascending finite (S,) array")

    def __len__(self) -> int:
        return int(self.log_qz.size)

    def percentile(self, log_qz: np.ndarray) -> np.ndarray:
        """``(B,)`` fraction in [0, 1] of reference values ``<= log_qz (B,)``."""
        return np.searchsorted(self.log_qz, log_qz, side="right") / self.log_qz.size


def reference_points(
    mu: np.ndarray, log_sigma: np.ndarray, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``rows (samples,)`` int64 items chosen uniformly (with replacement, ascending) and
    ``z (samples, d)`` float64 draws ``mu_i + sigma_i * eps`` from their posteriors."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.integers(0, mu.shape[0], size=samples)).astype(np.int64)
    eps = rng.standard_normal((samples, mu.shape[1]))
    return rows, np.asarray(mu[rows]) + np.exp(np.asarray(log_sigma[rows])) * eps

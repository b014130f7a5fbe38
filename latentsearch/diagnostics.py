"""Latent diagnostics of a bank of posteriors: which dimensions carry information, and their ranges.

Base layer (numpy and :mod:`latentsearch.posterior` only): the indexer computes them for every
version it publishes, ``latentsearch train`` on its validation split, and the client receives
them over gRPC as the same :class:`LatentDiagnostics`.

Per latent dimension ``j`` of ``N`` posteriors ``N(mu_i, diag(sigma_i^2))``:

* ``kl[j]``: the mean over items of ``KL(q(z_j|x_i) || N(0, 1))`` in nats (the formula is
  :meth:`DiagonalGaussian.kl`'s, applied to one dimension at a time);
* ``active[j]``: ``kl[j] >= threshold`` (default :data:`ACTIVE_KL_THRESHOLD`, 0.1 nats). A
  dimension below it has collapsed to the prior: its posterior is (almost) the same for every
  item, so moving along it changes nothing;
* ``mean_p01[j]``, ``mean_p99[j]``: the 1st and 99th percentiles of the items' means (numpy's
  default linear interpolation), a slider's useful range; ``mean_min[j]``, ``mean_max[j]``: the
  extremes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError
from latentsearch.posterior import DiagonalGaussian

__all__ = ["ACTIVE_KL_THRESHOLD", "LatentDiagnostics", "latent_diagnostics"]

# A dimension is active when its mean KL to the prior is at least this many nats.
ACTIVE_KL_THRESHOLD = 0.1
# Rows per chunk of the KL pass: bounds the (rows, d) float64 temporaries.
_CHUNK_ROWS = 65536
_ARRAYS = ("kl", "mean_p01", "mean_p99", "mean_min", "mean_max")


@dataclass(frozen=True, kw_only=True)
class LatentDiagnostics:
    """Per-dimension diagnostics (see the module docstring); every array is ``(d,)``."""

    kl: np.ndarray  # float64 mean KL to N(0, 1), nats
    threshold: float  # nats; active = kl >= threshold
    mean_p01: np.ndarray  # float64 1st percentile of the items' means
    mean_p99: np.ndarray  # float64 99th percentile
    mean_min: np.ndarray  # float64
    mean_max: np.ndarray  # float64

    @property
    def dim(self) -> int:
        return int(self.kl.shape[0])

    @property
    def active(self) -> np.ndarray:
        """``(d,)`` bool: ``kl >= threshold``."""
        return np.asarray(self.kl >= self.threshold)

    @property
    def collapsed(self) -> list[int]:
        """Dimensions (0-based) whose mean KL is below the threshold."""
        return [int(j) for j in np.flatnonzero(~self.active)]

    def summary(self) -> str:
        """``"8/10 active; collapsed: 2, 3 (KL < 0.1 nats)"``."""
        text = f"{self.dim - len(self.collapsed)}/{self.dim} active"
        if self.collapsed:
            text += f"; collapsed: {', '.join(map(str, self.collapsed))} (KL < {self.threshold:g} nats)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (floats round-trip exactly through ``json``)."""
        out: dict[str, Any] = {name: [float(v) for v in getattr(self, name)] for name in _ARRAYS}
        out["threshold"] = float(self.threshold)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], dim: int | None = None) -> LatentDiagnostics:
        """Inverse of :meth:`to_dict`.

        Raises:
            InvalidArgumentError: a missing key, arrays of different lengths (or not ``dim``), or
                values that are not finite (``field`` names the key).
        """
        return cls.from_arrays(
            threshold=data.get("threshold"), dim=dim, **{name: data.get(name) for name in _ARRAYS}
        )

    @classmethod
    def from_arrays(cls, *, threshold: Any, dim: int | None = None, **arrays: Any) -> LatentDiagnostics:
        """From the ``(d,)`` arrays (``kl``, ``mean_p01``, ``mean_p99``, ``mean_min``, ``mean_max``)."""
        if (
            not isinstance(threshold, (int, float))
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
        ):
            raise InvalidArgumentError(
                f"threshold must be a finite number, got {threshold!r}", field="threshold"
            )
        values = {}
        for name in _ARRAYS:
            raw = arrays.get(name)
            if raw is None:
                raise InvalidArgumentError(f"diagnostics lack {name!r}", field=name)
            arr = np.asarray(raw, dtype=np.float64)
            dim = arr.shape[0] if dim is None and arr.ndim == 1 else dim
            if arr.ndim != 1 or arr.shape[0] != dim or not np.isfinite(arr).all():
                raise InvalidArgumentError(
                    f"diagnostics {name!r} must be {dim} finite numbers, got shape {arr.shape}", field=name
                )
            values[name] = arr
        return cls(threshold=float(threshold), **values)


def latent_diagnostics(
    mean: np.ndarray, log_sigma: np.ndarray, *, threshold: float = ACTIVE_KL_THRESHOLD
) -> LatentDiagnostics:
    """Diagnostics of ``N`` posteriors with ``(N, d)`` ``mean`` and ``log_sigma`` (memory maps are
    read in chunks of rows; the percentiles read one column at a time)."""
    mean, log_sigma = np.asarray(mean), np.asarray(log_sigma)
    if mean.ndim != 2 or mean.shape != log_sigma.shape or mean.shape[0] == 0:
        raise InvalidArgumentError(
            f"mean and log_sigma must be the same (N, d) shape with N >= 1, got {mean.shape} and "
            f"{log_sigma.shape}",
            field="mean",
        )
    n, d = mean.shape
    total = np.zeros(d, dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        # (rows, d, 1): each dimension is its own 1-d Gaussian, so kl() (a sum over the last axis)
        # is the per-dimension KL to N(0, 1).
        q = DiagonalGaussian(mean[rows, :, None], log_sigma=log_sigma[rows, :, None])
        total += np.asarray(q.kl(), dtype=np.float64).sum(axis=0)
    columns: dict[str, Any] = {"mean_p01": [], "mean_p99": [], "mean_min": [], "mean_max": []}
    for j in range(d):
        col = np.asarray(mean[:, j], dtype=np.float64)
        p01, p99 = np.percentile(col, [1.0, 99.0])
        columns["mean_p01"].append(float(p01))
        columns["mean_p99"].append(float(p99))
        columns["mean_min"].append(float(col.min()))
        columns["mean_max"].append(float(col.max()))
    return LatentDiagnostics.from_arrays(threshold=threshold, kl=total / n, **columns)

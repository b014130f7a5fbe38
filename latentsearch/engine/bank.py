"""A validated bank of N diagonal-Gaussian posteriors with ids and optional labels."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError, NotFoundError
from model.posterior import LOG_2PI, DiagonalGaussian

__all__ = ["PosteriorBank"]

# exp(-2 log sigma) must stay finite in float64 for the lifted form.
_LOG_SIGMA_MIN = -300.0
_LOG_SIGMA_MAX = 300.0


def _first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def _as_matrix(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgumentError(f"{name} must be numeric, got dtype {arr.dtype}", field=name)
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{name} must have shape (N, d), got {arr.shape}", field=name)
    return arr.astype(np.float64, copy=False)


class PosteriorBank:
    """N posteriors ``q(z|x_i) = N(mu_i, diag(sigma_i^2))`` stored as float64 ``mu`` and ``log_sigma``.

    Attributes:
        mu, log_sigma: ``(N, d)`` float64 (possibly memory-mapped, read-only).
        ids: ``(N,)`` unicode array of unique external ids, or ``None`` (the id of row i is ``str(i)``).
        labels: ``(N,)`` int64 labels or ``None``.
    """

    def __init__(
        self,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        *,
        ids: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        validate: bool = True,
    ) -> None:
        self.mu = mu
        self.log_sigma = log_sigma
        self.ids = ids
        self.labels = labels
        if validate:
            self._validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        mu: Any,
        *,
        log_sigma: Any = None,
        logvar: Any = None,
        sigma: Any = None,
        ids: Sequence[Any] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> PosteriorBank:
        """Validate and copy user arrays. Give exactly one of ``log_sigma``, ``logvar``, ``sigma``.

        Raises:
            InvalidArgumentError: naming the argument and the first bad row.
        """
        given = [
            n for n, v in (("log_sigma", log_sigma), ("logvar", logvar), ("sigma", sigma)) if v is not None
        ]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"give exactly one of log_sigma, logvar, sigma (got {given or 'none'})", field="log_sigma"
            )
        mu_arr = np.array(_as_matrix("mu", mu), dtype=np.float64, copy=True)
        if log_sigma is not None:
            ls = np.array(_as_matrix("log_sigma", log_sigma), dtype=np.float64, copy=True)
        elif logvar is not None:
            ls = 0.5 * _as_matrix("logvar", logvar)
        else:
            sg = _as_matrix("sigma", sigma)
            bad = ~(np.isfinite(sg) & (sg > 0))
            if bad.any():
                raise InvalidArgumentError(
                    f"sigma must be finite and > 0; first bad row {_first_bad_row(bad)}", field="sigma"
                )
            ls = np.log(sg)
        ids_arr = None if ids is None else cls._normalise_ids(ids)
        labels_arr = None if labels is None else cls._normalise_labels(labels)
        return cls(mu_arr, ls, ids=ids_arr, labels=labels_arr)

    @classmethod
    def from_posterior(cls, posterior: DiagonalGaussian, **kwargs: Any) -> PosteriorBank:
        p = posterior.numpy()
        return cls.from_arrays(p.mean, log_sigma=p.log_sigma, **kwargs)

    @staticmethod
    def _normalise_ids(ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise InvalidArgumentError(f"ids must be one-dimensional, got shape {arr.shape}", field="ids")
        if arr.dtype.kind in "iu":
            arr = arr.astype(str)
        elif arr.dtype.kind == "O":
            if not all(isinstance(v, (str, int, np.integer)) for v in arr):
                raise InvalidArgumentError("ids must be strings or integers", field="ids")
            arr = np.array([str(v) for v in arr], dtype=str)
        elif arr.dtype.kind == "S":
            arr = np.char.decode(arr, "utf-8")
        elif arr.dtype.kind != "U":
            raise InvalidArgumentError(f"ids must be strings or integers, got dtype {arr.dtype}", field="ids")
        empty = np.char.str_len(arr) == 0 if arr.size else np.zeros(0, bool)
        if empty.any():
            raise InvalidArgumentError(
                f"ids must be non-empty; first empty id at row {int(np.flatnonzero(empty)[0])}", field="ids"
            )
        return arr

    @staticmethod
    def _normalise_labels(labels: Any) -> np.ndarray:
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise InvalidArgumentError(
                f"labels must be one-dimensional, got shape {arr.shape}", field="labels"
            )
        if arr.size and arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                return arr.astype(np.int64)
            raise InvalidArgumentError(f"labels must be integers, got dtype {arr.dtype}", field="labels")
        return arr.astype(np.int64)

    def _validate(self) -> None:
        mu, ls = self.mu, self.log_sigma
        if mu.ndim != 2 or ls.ndim != 2:
            raise InvalidArgumentError("mu and log_sigma must be (N, d) arrays", field="mu")
        if mu.shape != ls.shape:
            raise InvalidArgumentError(
                f"mu {mu.shape} and log_sigma {ls.shape} have different shapes", field="log_sigma"
            )
        n, d = mu.shape
        if n == 0:
            raise InvalidArgumentError("the bank is empty: need at least one posterior", field="mu")
        if d == 0:
            raise InvalidArgumentError("latent dimension d must be >= 1", field="mu")
        bad = ~np.isfinite(mu)
        if bad.any():
            raise InvalidArgumentError(f"mu has NaN or inf; first bad row {_first_bad_row(bad)}", field="mu")
        bad = ~(np.isfinite(ls) & (ls > _LOG_SIGMA_MIN) & (ls < _LOG_SIGMA_MAX))
        if bad.any():
            raise InvalidArgumentError(
                f"sigma must be finite and > 0 (log sigma in ({_LOG_SIGMA_MIN}, {_LOG_SIGMA_MAX})); "
                f"first bad row {_first_bad_row(bad)}",
                field="sigma",
            )
        if self.ids is not None:
            if self.ids.shape != (n,):
                raise InvalidArgumentError(f"ids has shape {self.ids.shape}, expected ({n},)", field="ids")
            uniq, counts = np.unique(self.ids, return_counts=True)
            if (counts > 1).any():
                dup = uniq[counts > 1][0]
                rows = np.flatnonzero(self.ids == dup)[:2].tolist()
                raise InvalidArgumentError(f"duplicate id {dup!r} at rows {rows}", field="ids")
        if self.labels is not None and self.labels.shape != (n,):
            raise InvalidArgumentError(
                f"labels has shape {self.labels.shape}, expected ({n},)", field="labels"
            )

    # -- accessors ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mu.shape[1])

    @cached_property
    def penalty(self) -> np.ndarray:
        """``(N,)`` float64 ``sum(log sigma) + d/2 log(2 pi)``, the per-item constant of -log q."""
        return self.log_sigma.sum(axis=1) + 0.5 * self.dim * LOG_2PI

    @cached_property
    def _id_to_row(self) -> dict[str, int]:
        assert self.ids is not None
        return {str(v): i for i, v in enumerate(self.ids.tolist())}

    @cached_property
    def label_set(self) -> frozenset[int]:
        return frozenset() if self.labels is None else frozenset(np.unique(self.labels).tolist())

    def id_of(self, rows: np.ndarray) -> list[str]:
        """External ids of ``rows`` (any integer array)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.ids is None:
            return [str(r) for r in rows.tolist()]
        return self.ids[rows].tolist()

    def row_of(self, item_id: str | int) -> int:
        """Row of an external id. Raises NotFoundError for unknown ids."""
        key = str(item_id)
        if self.ids is None:
            if key.isdigit() and int(key) < len(self) and str(int(key)) == key:
                return int(key)
        else:
            row = self._id_to_row.get(key)
            if row is not None:
                return row
        raise NotFoundError(f"unknown id {key!r}", field="id")

    def posterior(self, rows: Any = slice(None)) -> DiagonalGaussian:
        """The posteriors of ``rows`` as a float64 :class:`DiagonalGaussian`."""
        return DiagonalGaussian.from_log_sigma(self.mu[rows], self.log_sigma[rows])

    def log_prob_rows(self, z: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 ``log q(z_b | x_rows[b, c])``.

        Args:
            z: ``(B, d)`` float64 query points.
            rows: ``(B, C)`` int64 rows (all valid).

        Returns:
            ``(B, C)`` float64, computed as ``model.posterior.log_prob_matrix`` does.
        """
        inv_sigma = np.exp(-self.log_sigma[rows])  # (B, C, d)
        u = (z[:, None, :] - self.mu[rows]) * inv_sigma
        return -0.5 * (u * u).sum(-1) - self.penalty[rows]

    def expected_log_prob_rows(self, mean: np.ndarray, std: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 ``E_{z ~ N(mean_b, std_b^2)} log q(z | x_rows[b, c])``.

        Shapes as :meth:`log_prob_rows`; ``std`` is ``(B, d)`` like ``mean``.
        """
        inv_var = np.exp(-2.0 * self.log_sigma[rows])  # (B, C, d)
        diff = mean[:, None, :] - self.mu[rows]
        quad = ((diff * diff + (std * std)[:, None, :]) * inv_var).sum(-1)
        return -0.5 * quad - self.penalty[rows]

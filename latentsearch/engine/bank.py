"""A validated bank of N diagonal-Gaussian posteriors with ids and optional labels."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError, NotFoundError
from latentsearch.posterior import LOG_2PI, DiagonalGaussian

__all__ = ["LOG_SIGMA_LIMIT", "PosteriorBank", "first_bad_row", "normalise_ids", "normalise_labels"]

# exp(-2 log sigma) must stay finite in float64 for the lifted form.
LOG_SIGMA_LIMIT = 300.0


def first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def _bad_row(field: str, message: str, row: int | None = None) -> InvalidArgumentError:
    where = "" if row is None else f"; first bad row {row}"
    return InvalidArgumentError(f"{field} {message}{where}", field=field)


def _check_length(field: str, arr: np.ndarray, n: int | None) -> None:
    if arr.ndim != 1:
        raise _bad_row(field, f"must have shape (N,), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise _bad_row(field, f"has {arr.shape[0]} entries but mu has {n} rows", min(arr.shape[0], n))


def normalise_ids(ids: Any, n: int | None = None) -> np.ndarray:
    """``(N,)`` unique, non-empty external ids as a unicode array.

    Accepts strings, integers (written in decimal), UTF-8 bytes, or an object array of str/int.

    Raises:
        InvalidArgumentError: ``field="ids"``, naming the first bad row (for a duplicate, the
            first row that repeats an earlier id).
    """
    arr = np.asarray(ids)
    _check_length("ids", arr, n)
    if arr.dtype.kind in "iu":
        arr = arr.astype(str)
    elif arr.dtype.kind == "O":
        if not all(isinstance(v, (str, int, np.integer)) for v in arr):
            raise _bad_row("ids", "must hold strings or integers")
        arr = np.array([str(v) for v in arr], dtype=str)
    elif arr.dtype.kind == "S":
        try:
            arr = np.char.decode(arr, "utf-8")
        except UnicodeDecodeError as exc:
            raise _bad_row("ids", f"byte strings must be UTF-8 ({exc})") from exc
    elif arr.dtype.kind != "U":
        raise _bad_row("ids", f"must hold strings or integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return arr
    empty = np.char.str_len(arr) == 0
    if empty.any():
        raise _bad_row("ids", "must be non-empty", int(np.flatnonzero(empty)[0]))
    order = np.argsort(arr, kind="stable")
    ordered = arr[order]
    dup = np.flatnonzero(ordered[1:] == ordered[:-1])
    if dup.size:
        row = int(order[dup + 1].min())
        first = int(np.flatnonzero(arr == arr[row])[0])
        raise _bad_row("ids", f"duplicate id {str(arr[row])!r} (also at row {first})", row)
    return arr


def normalise_labels(labels: Any, n: int | None = None) -> np.ndarray:
    """``(N,)`` int64 labels; whole-number floats are accepted.

    Raises:
        InvalidArgumentError: ``field="labels"``, naming the first bad row.
    """
    arr = np.asarray(labels)
    _check_length("labels", arr, n)
    if arr.dtype.kind in "iu" or arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~(np.isfinite(arr) & (arr == np.round(arr)))
        if bad.any():
            raise _bad_row("labels", "must be integers", int(np.flatnonzero(bad)[0]))
        return arr.astype(np.int64)
    raise _bad_row("labels", f"must be integers, got dtype {arr.dtype}")


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
            n = int(mu.shape[0])
            self.ids = None if ids is None else normalise_ids(ids, n)
            self.labels = None if labels is None else normalise_labels(labels, n)

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
                    f"sigma must be finite and > 0; first bad row {first_bad_row(bad)}", field="sigma"
                )
            ls = np.log(sg)
        return cls(mu_arr, ls, ids=ids, labels=labels)

    @classmethod
    def from_posterior(cls, posterior: DiagonalGaussian, **kwargs: Any) -> PosteriorBank:
        p = posterior.numpy()
        return cls.from_arrays(p.mean, log_sigma=p.log_sigma, **kwargs)

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
            raise InvalidArgumentError(f"mu has NaN or inf; first bad row {first_bad_row(bad)}", field="mu")
        bad = ~(np.isfinite(ls) & (ls > -LOG_SIGMA_LIMIT) & (ls < LOG_SIGMA_LIMIT))
        if bad.any():
            raise InvalidArgumentError(
                f"sigma must be finite and > 0 (log sigma in ({-LOG_SIGMA_LIMIT}, {LOG_SIGMA_LIMIT})); "
                f"first bad row {first_bad_row(bad)}",
                field="sigma",
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
            ``(B, C)`` float64, computed as ``latentsearch.posterior.log_prob_matrix`` does.
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

"""The one catalogue type: N diagonal-Gaussian posteriors with external ids and optional labels.

Base layer (numpy, :mod:`latentsearch.errors`, :mod:`latentsearch.posterior`): the synthetic banks
of :mod:`latentsearch.data`, the npz reader of the indexer and the search engine all hold a
:class:`PosteriorBank`. Its checks of user arrays (the first bad row named, the argument named in
``field``) are the project's only validation of a bank's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError, NotFoundError, quoted
from latentsearch.posterior import DiagonalGaussian

__all__ = [
    "LOG_SIGMA_LIMIT",
    "MAX_ID_LENGTH",
    "SCALE_ARGS",
    "PosteriorBank",
    "normalise_ids",
    "normalise_labels",
]

# exp(-2 log sigma) must stay finite in float64 for the lifted form.
LOG_SIGMA_LIMIT = 300.0
# Longest external id, in characters: a bank refuses longer ids and the server's GetItem takes no
# longer one (INVALID_ARGUMENT), so every id that can be indexed can be fetched. Ids are names, not payloads.
MAX_ID_LENGTH = 1024
# The three ways to give the scales, in the order they are named in messages.
SCALE_ARGS = ("log_sigma", "logvar", "sigma")


def _first_bad_row(bad: np.ndarray) -> int:
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
    """``(N,)`` unique, non-empty external ids of at most :data:`MAX_ID_LENGTH` characters, as a
    unicode array.

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
        arr = np.array([_id_text(v, row) for row, v in enumerate(arr)], dtype=str)
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
    long = np.char.str_len(arr) > MAX_ID_LENGTH
    if long.any():
        row = int(np.flatnonzero(long)[0])
        raise _bad_row("ids", f"must be at most {MAX_ID_LENGTH} characters, got {len(arr[row])}", row)
    order = np.argsort(arr, kind="stable")
    ordered = arr[order]
    dup = np.flatnonzero(ordered[1:] == ordered[:-1])
    if dup.size:
        row = int(order[dup + 1].min())
        first = int(np.flatnonzero(arr == arr[row])[0])
        raise _bad_row("ids", f"duplicate id {str(arr[row])!r} (also at row {first})", row)
    return arr


def _id_text(value: str | int | np.integer, row: int) -> str:
    """``value`` as an id string; an integer too long for ``str`` (Python refuses more than 4,300
    digits) is refused like any id longer than MAX_ID_LENGTH."""
    try:
        return str(value)
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise _bad_row("ids", f"must be at most {MAX_ID_LENGTH} characters ({exc})", row) from exc


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


def _check_matrix(name: str, arr: Any) -> None:
    """``arr`` must be a real ``(N, d)`` array."""
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        dtype = getattr(arr, "dtype", type(arr).__name__)
        raise InvalidArgumentError(f"{name} must be a real (N, d) array, got dtype {dtype}", field=name)
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{name} must have shape (N, d), got {arr.shape}", field=name)


def _check_pair(mu: Any, scale: Any, name: str) -> None:
    """``mu`` and the scales ``name`` are real ``(N, d)`` arrays of one shape, N >= 1 and d >= 1."""
    _check_matrix("mu", mu)
    _check_matrix(name, scale)
    (n, d), (n2, d2) = mu.shape, scale.shape
    if n2 != n:
        raise _bad_row(name, f"has {n2} rows but mu has {n}", min(n, n2))
    if d2 != d:
        raise InvalidArgumentError(f"{name} has shape {scale.shape}, expected {(n, d)} like mu", field=name)
    if n == 0:
        raise InvalidArgumentError("the bank is empty: need at least one posterior", field="mu")
    if d == 0:
        raise InvalidArgumentError("latent dimension d must be >= 1", field="mu")


def _check_values(mu: np.ndarray, log_sigma: np.ndarray) -> None:
    bad = ~np.isfinite(mu)
    if bad.any():
        raise _bad_row("mu", "has NaN or inf", _first_bad_row(bad))
    bad = ~((log_sigma > -LOG_SIGMA_LIMIT) & (log_sigma < LOG_SIGMA_LIMIT))  # False for NaN too
    if bad.any():
        raise _bad_row(
            "sigma",
            f"must be finite and > 0 (log sigma within +-{LOG_SIGMA_LIMIT:g})",
            _first_bad_row(bad),
        )


def _is_row_number(key: str, n: int) -> bool:
    """Whether ``key`` is the canonical decimal of a row in ``[0, n)``: ASCII digits, no leading zero,
    checked by length before ``int()`` (which refuses strings of over 4,300 digits, and digits
    such as "²" that ``str.isdigit`` accepts)."""
    if not (key.isascii() and key.isdigit()) or len(key) > len(str(n)) or (key[0] == "0" and key != "0"):
        return False
    return int(key) < n


def _float64(arr: np.ndarray, copy: bool) -> np.ndarray:
    """A C-contiguous float64 version of ``arr``: always a new array with ``copy``, else only if needed."""
    return np.array(arr, dtype=np.float64, order="C") if copy else np.ascontiguousarray(arr, np.float64)


class PosteriorBank:
    """N posteriors ``q(z|x_i) = N(mu_i, diag(sigma_i^2))`` with their ids and labels.

    Args:
        mu, log_sigma: ``(N, d)`` real arrays; float64 ones (memory maps included) are used as they
            are, not copied.
        ids: ``(N,)`` unique external ids (see :func:`normalise_ids`), or ``None``.
        labels: ``(N,)`` integer labels, or ``None``.
        validate: check shapes and values (see :meth:`from_arrays`); ``False`` only for arrays
            known to be valid (an index this project wrote).

    Attributes:
        posteriors: the ``(N,)`` batch of float64 :class:`DiagonalGaussian`.
        ids: ``(N,)`` unicode array of unique external ids, or ``None`` (the id of row i is ``str(i)``).
        labels: ``(N,)`` int64 labels or ``None``.
    """

    def __init__(
        self,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        *,
        ids: Sequence[Any] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        validate: bool = True,
    ) -> None:
        if validate:
            _check_pair(mu, log_sigma, "log_sigma")
            n = int(mu.shape[0])
            ids = None if ids is None else normalise_ids(ids, n)
            labels = None if labels is None else normalise_labels(labels, n)
        self.posteriors = DiagonalGaussian(mu, log_sigma=log_sigma)
        if validate:
            _check_values(self.mu, self.log_sigma)
        self.ids: np.ndarray | None = None if ids is None else np.asanyarray(ids)
        self.labels: np.ndarray | None = None if labels is None else np.asanyarray(labels)

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
        copy: bool = True,
    ) -> PosteriorBank:
        """Validate user arrays into a bank. Give exactly one of ``log_sigma``, ``logvar``, ``sigma``.

        ``copy=False`` keeps ``mu`` and ``log_sigma`` when they are C-contiguous float64 already
        (for arrays nobody else holds, such as those just read from a file).

        Raises:
            InvalidArgumentError: ``field`` names the argument: ``mu``; the scale argument given
                for a bad shape; ``sigma`` for any bad scale value; ``ids``; ``labels``. Bad values
                name the first bad row.
        """
        given = {k: v for k, v in zip(SCALE_ARGS, (log_sigma, logvar, sigma), strict=True) if v is not None}
        if len(given) != 1:
            raise InvalidArgumentError(
                f"give exactly one of {', '.join(SCALE_ARGS)} (got {', '.join(given) or 'none'})",
                field="log_sigma",
            )
        ((name, raw),) = given.items()
        mu_arr, scale = np.asarray(mu), np.asarray(raw)
        _check_pair(mu_arr, scale, name)
        if name == "sigma":
            bad = ~(np.isfinite(scale) & (scale > 0))
            if bad.any():
                raise _bad_row("sigma", "must be finite and > 0", _first_bad_row(bad))
            ls = np.log(scale, dtype=np.float64)
        elif name == "logvar":
            ls = 0.5 * scale.astype(np.float64, copy=False)
        else:
            ls = _float64(scale, copy)
        return cls(_float64(mu_arr, copy), ls, ids=ids, labels=labels)

    # -- accessors ----------------------------------------------------------------------------
    @property
    def mu(self) -> np.ndarray:
        """``(N, d)`` float64 means (possibly memory-mapped, read-only)."""
        return self.posteriors.mean

    @property
    def log_sigma(self) -> np.ndarray:
        """``(N, d)`` float64 log standard deviations (possibly memory-mapped, read-only)."""
        return self.posteriors.log_sigma

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mu.shape[1])

    @property
    def penalty(self) -> np.ndarray:
        """``(N,)`` float64 ``sum(log sigma) + d/2 log(2 pi)``, the per-item constant of -log q (cached)."""
        return self.posteriors.log_normalizer

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
        """Row of an external id (a string, or an integer meaning its decimal string).

        Raises only NotFoundError(field="id"), for an unknown id of any length; its message quotes
        at most the id's first :data:`~latentsearch.errors.QUOTE_LIMIT` characters.
        """
        try:
            key = str(item_id)
        except ValueError:  # an int beyond Python's int-to-str digit limit
            raise NotFoundError("unknown id (an integer too long to write in decimal)", field="id") from None
        if self.ids is None:
            if _is_row_number(key, len(self)):
                return int(key)
        else:
            row = self._id_to_row.get(key)
            if row is not None:
                return row
        raise NotFoundError(f"unknown id {quoted(key)}", field="id")

    # -- scores (the engine's exact float64 rerank) --------------------------------------------
    def log_prob_rows(self, z: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 ``log q(z_b | x_rows[b, c])`` (:meth:`DiagonalGaussian.log_prob`).

        Args:
            z: ``(B, d)`` float64 query points.
            rows: ``(B, C)`` int64 rows (all valid).

        Returns:
            ``(B, C)`` float64.
        """
        return self.posteriors[rows].log_prob(z[:, None, :])

    def expected_log_prob_rows(self, mean: np.ndarray, std: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 ``E_{z ~ N(mean_b, std_b^2)} log q(z | x_rows[b, c])``
        (:meth:`DiagonalGaussian.expected_log_prob`).

        Shapes as :meth:`log_prob_rows`; ``std`` is ``(B, d)`` like ``mean``.
        """
        return self.posteriors[rows].expected_log_prob(mean[:, None, :], std[:, None, :])

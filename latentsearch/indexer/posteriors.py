"""Read and validate precomputed posteriors from an ``.npz`` file.

The archive holds

* ``mu``: ``(N, d)`` real means;
* exactly one scale key, ``(N, d)`` real: ``logvar`` (log sigma^2), ``log_sigma`` or ``sigma`` (> 0);
* optional ``ids``: ``(N,)`` unique non-empty strings or integers;
* optional ``labels``: ``(N,)`` integers.

Every problem is reported as an :class:`~latentsearch.errors.InvalidArgumentError` whose message
names the npz key and, for bad values, the first bad row.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.engine.bank import LOG_SIGMA_LIMIT, first_bad_row, normalise_ids, normalise_labels
from latentsearch.errors import InvalidArgumentError, NotFoundError

__all__ = ["SCALE_KEYS", "Posteriors", "read_posteriors_npz", "validate_posteriors"]

log = logging.getLogger(__name__)

SCALE_KEYS = ("logvar", "log_sigma", "sigma")


@dataclass(frozen=True)
class Posteriors:
    """Validated posteriors.

    Attributes:
        mu: ``(N, d)`` float64 means.
        log_sigma: ``(N, d)`` float64 log standard deviations.
        ids: ``(N,)`` unicode ids, or ``None`` (row numbers).
        labels: ``(N,)`` int64 labels, or ``None``.
        scale_key: the npz key the scales came from.
    """

    mu: np.ndarray
    log_sigma: np.ndarray
    ids: np.ndarray | None
    labels: np.ndarray | None
    scale_key: str = "log_sigma"

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mu.shape[1])


def _bad(key: str, message: str, row: int | None = None) -> InvalidArgumentError:
    where = "" if row is None else f"; first bad row {row}"
    return InvalidArgumentError(f"npz key {key!r}: {message}{where}", field=key)


def _matrix(key: str, arr: np.ndarray, n: int | None, d: int | None) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise _bad(key, f"must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise _bad(key, f"must have shape (N, d), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise _bad(key, f"has {arr.shape[0]} rows but 'mu' has {n}", min(arr.shape[0], n))
    if d is not None and arr.shape[1] != d:
        raise _bad(key, f"has shape {arr.shape}, expected {(n, d)} like 'mu'", 0)
    return arr.astype(np.float64, copy=False)


def validate_posteriors(
    mu: np.ndarray,
    *,
    logvar: np.ndarray | None = None,
    log_sigma: np.ndarray | None = None,
    sigma: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> Posteriors:
    """Validate arrays as read from an npz; see the module docstring.

    Raises:
        InvalidArgumentError: naming the key and the first bad row.
    """
    given = {
        k: v for k, v in (("logvar", logvar), ("log_sigma", log_sigma), ("sigma", sigma)) if v is not None
    }
    if len(given) != 1:
        raise InvalidArgumentError(
            f"npz must hold exactly one of the keys {', '.join(map(repr, SCALE_KEYS))} "
            f"(found {', '.join(map(repr, given)) or 'none'})",
            field="logvar",
        )
    mu64 = _matrix("mu", np.asarray(mu), None, None)
    n, d = mu64.shape
    if n == 0 or d == 0:
        raise _bad("mu", f"must have N >= 1 rows and d >= 1 columns, got {mu64.shape}")
    bad = ~np.isfinite(mu64)
    if bad.any():
        raise _bad("mu", "has NaN or inf", first_bad_row(bad))
    ((key, raw),) = given.items()
    scale = _matrix(key, np.asarray(raw), n, d)
    if key == "sigma":
        bad = ~(np.isfinite(scale) & (scale > 0))
        if bad.any():
            raise _bad(key, "must be finite and > 0", first_bad_row(bad))
        ls = np.log(scale)
    else:
        ls = 0.5 * scale if key == "logvar" else scale
        if not np.isfinite(ls).all():
            raise _bad(key, "has NaN or inf", first_bad_row(~np.isfinite(ls)))
    bad = ~((ls > -LOG_SIGMA_LIMIT) & (ls < LOG_SIGMA_LIMIT))
    if bad.any():
        raise _bad(
            key, f"sigma out of range (log sigma must be within +-{LOG_SIGMA_LIMIT:g})", first_bad_row(bad)
        )
    return Posteriors(
        mu=np.ascontiguousarray(mu64, dtype=np.float64),
        log_sigma=np.ascontiguousarray(ls, dtype=np.float64),
        ids=None if ids is None else _checked(normalise_ids, np.asarray(ids), n),
        labels=None if labels is None else _checked(normalise_labels, np.asarray(labels), n),
        scale_key=key,
    )


def _checked(check: Any, values: np.ndarray, n: int) -> np.ndarray:
    """Run the engine's ids/labels normalisation, reporting failures under the npz key."""
    try:
        return check(values, n)
    except InvalidArgumentError as exc:
        raise _bad(exc.field or "ids", exc.message) from exc


def read_posteriors_npz(path: str | os.PathLike[str]) -> Posteriors:
    """Read and validate ``path`` (see the module docstring).

    Raises:
        NotFoundError: no such file.
        InvalidArgumentError: unreadable archive, missing/unknown keys or bad values (message names
            the key and the first bad row).
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: no such posteriors file", field="posteriors")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if "mu" not in keys:
                raise InvalidArgumentError(
                    f"{p}: npz key 'mu' is missing (found {', '.join(sorted(keys)) or 'no arrays'})",
                    field="mu",
                )
            arrays = {}
            for key in ("mu", *SCALE_KEYS, "ids", "labels"):
                if key in keys:
                    try:
                        arrays[key] = z[key]
                    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
                        raise InvalidArgumentError(
                            f"{p}: npz key {key!r} is unreadable ({exc})", field=key
                        ) from exc
    except InvalidArgumentError:
        raise
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(f"{p}: not a readable .npz archive ({exc})", field="posteriors") from exc
    unknown = keys - set(arrays)
    if unknown:
        log.warning("%s: ignoring npz keys %s", p, ", ".join(sorted(unknown)))
    try:
        return validate_posteriors(**arrays)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{p}: {exc.message}", field=exc.field) from exc

"""Read precomputed posteriors from an ``.npz`` file into a :class:`~latentsearch.bank.PosteriorBank`.

The archive holds

* ``mu``: ``(N, d)`` real means;
* exactly one scale key, ``(N, d)`` real: ``logvar`` (log sigma^2), ``log_sigma`` or ``sigma`` (> 0);
* optional ``ids``: ``(N,)`` unique non-empty strings or integers;
* optional ``labels``: ``(N,)`` integers;
* optional ``label_names``: ``(L,)`` strings, the name of each label (read by
  :func:`read_label_names`; the catalogue checks them against the labels).

The values are validated by the bank (:meth:`PosteriorBank.from_arrays`), the one place that
checks posteriors; this module adds the archive's own checks and reports every problem as an
:class:`~latentsearch.errors.InvalidArgumentError` whose message names the file, the npz key and,
for bad values, the first bad row.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from latentsearch.bank import SCALE_ARGS, PosteriorBank
from latentsearch.errors import InvalidArgumentError, NotFoundError

__all__ = ["LABEL_NAMES_KEY", "read_label_names", "read_posteriors_npz"]

log = logging.getLogger(__name__)

_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile)
LABEL_NAMES_KEY = "label_names"


def read_posteriors_npz(path: str | os.PathLike[str]) -> PosteriorBank:
    """Read and validate ``path`` (see the module docstring).

    Raises:
        NotFoundError: no such file.
        InvalidArgumentError: unreadable archive, missing/unknown keys or bad values (``field`` is
            the npz key; the message names the file, the key and the first bad row).
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: no such posteriors file", field="posteriors")
    arrays = _read_arrays(p)
    scales = [k for k in SCALE_ARGS if k in arrays]  # npz keys are named like the bank's arguments
    if len(scales) != 1:
        raise InvalidArgumentError(
            f"{p}: npz must hold exactly one of the keys {', '.join(map(repr, SCALE_ARGS))} "
            f"(found {', '.join(map(repr, scales)) or 'none'})",
            field="logvar",
        )
    (scale_key,) = scales
    try:
        bank = PosteriorBank.from_arrays(
            arrays["mu"],
            **{scale_key: arrays[scale_key]},
            ids=arrays.get("ids"),
            labels=arrays.get("labels"),
            copy=False,  # fresh arrays nobody else holds
        )
    except InvalidArgumentError as exc:
        # The bank names its arguments; a bad scale is reported under the key it came from.
        key = scale_key if exc.field in SCALE_ARGS else exc.field or "mu"
        raise InvalidArgumentError(f"{p}: npz key {key!r}: {exc.message}", field=key) from exc
    log.info("read %d posteriors (d=%d, scales from %r) from %s", len(bank), bank.dim, scale_key, p)
    return bank


def _read_arrays(p: Path) -> dict[str, np.ndarray]:
    """The archive's known arrays by key; ``mu`` is required."""
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if "mu" not in keys:
                raise InvalidArgumentError(
                    f"{p}: npz key 'mu' is missing (found {', '.join(sorted(keys)) or 'no arrays'})",
                    field="mu",
                )
            arrays = {}
            for key in ("mu", *SCALE_ARGS, "ids", "labels"):
                if key in keys:
                    try:
                        arrays[key] = z[key]
                    except _READ_ERRORS as exc:
                        raise InvalidArgumentError(
                            f"{p}: npz key {key!r} is unreadable ({exc})", field=key
                        ) from exc
    except InvalidArgumentError:
        raise
    except _READ_ERRORS as exc:
        raise InvalidArgumentError(f"{p}: not a readable .npz archive ({exc})", field="posteriors") from exc
    unknown = keys - set(arrays) - {LABEL_NAMES_KEY}
    if unknown:
        log.warning("%s: ignoring npz keys %s", p, ", ".join(sorted(unknown)))
    return arrays


def read_label_names(path: str | os.PathLike[str]) -> list[str] | None:
    """The archive's ``label_names`` as a list of str, or ``None`` when it has none.

    Raises:
        InvalidArgumentError: ``field="label_names"``: unreadable, or not a 1-D array of strings.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if LABEL_NAMES_KEY not in z.files:
                return None
            names = z[LABEL_NAMES_KEY]
    except _READ_ERRORS as exc:
        raise InvalidArgumentError(
            f"{p}: npz key {LABEL_NAMES_KEY!r} is unreadable ({exc})", field=LABEL_NAMES_KEY
        ) from exc
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise InvalidArgumentError(
            f"{p}: npz key {LABEL_NAMES_KEY!r} must be a 1-D array of strings, got "
            f"{names.dtype} {names.shape}",
            field=LABEL_NAMES_KEY,
        )
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in names.tolist()]

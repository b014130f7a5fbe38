"""TLS credential files: read the PEM file an option names, or fail in one line naming both.

Base layer (only :mod:`latentsearch.errors`), shared by the server (``--tls-cert``, ``--tls-key``),
the client and the load generator (``--tls-ca``), so a missing, unreadable or non-PEM file is
refused the same way everywhere, before anything is bound, loaded or dialled.
"""

from __future__ import annotations

import os
from pathlib import Path

from latentsearch.errors import InvalidArgumentError

__all__ = ["PEM_MARKER", "read_pem"]

# Every PEM block (certificate, private key, CA bundle) starts with a line holding this.
PEM_MARKER = b"-----BEGIN "


def read_pem(path: str | os.PathLike[str], *, field: str) -> bytes:
    """The bytes of the PEM file ``path`` given as option ``field`` (``"tls_cert"``, ``"tls_key"``,
    ``"tls_ca"``).

    Raises:
        InvalidArgumentError: ``field=field``, when the file is missing, unreadable (or a
            directory) or holds no PEM block; the message names the option (``--tls-cert``) and
            the file, e.g. ``--tls-ca /etc/ca.pem: No such file or directory``.
    """
    option = "--" + field.replace("_", "-")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidArgumentError(f"{option} {path}: {reason}", field=field) from exc
    if PEM_MARKER not in data:
        raise InvalidArgumentError(f"{option} {path}: not a PEM file (no '-----BEGIN' line)", field=field)
    return data

"""Why a listening port could not be bound, as one error naming the port (no OSError traceback)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from latentsearch.errors import UnavailableError

__all__ = ["bind_errno", "bind_error"]


def bind_error(what: str, host: str, port: int, code: int | None, *, field: str) -> UnavailableError:
    """The error of a failed bind of ``what`` (e.g. ``"port"``, ``"metrics port"``) to ``host:port``.

    ``code``: the bind's errno (``None``: unknown). EADDRINUSE reads "<what> P is in use".
    """
    if code == errno.EADDRINUSE:
        message = f"{what} {port} is in use (binding {host}:{port}); stop what holds it or choose another"
    elif code is not None:
        message = f"cannot bind {what} {port} on {host}: {os.strerror(code)}"
    else:
        message = f"cannot bind {what} {port} on {host}"
    return UnavailableError(message, field=field)


def bind_errno(host: str, port: int) -> int | None:
    """The errno a plain TCP listening socket gets binding ``host:port`` now (``None``: it binds).

    Tells why a library that reports a failed bind without its errno (grpc) failed. Like grpc, it
    sets SO_REUSEADDR, so connections in TIME_WAIT do not count as the port being in use.
    """
    name = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    for family, kind, proto, _, address in infos:
        with contextlib.closing(socket.socket(family, kind, proto)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc.errno
    return None

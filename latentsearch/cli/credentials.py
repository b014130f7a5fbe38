"""The bearer token of ``serve``, ``query`` and ``loadtest``: one place that says where it comes from.

Order of precedence (the first one given wins):

1. ``--token-file PATH``: the file's text, one trailing newline stripped (a secret file such as
   ``/run/secrets/latentsearch_token``);
2. ``--token TOKEN``: works, but the command line is readable by every local user
   (``ps``, ``/proc/PID/cmdline``), so it logs a warning;
3. the environment variable ``LATENTSEARCH_TOKEN``.

``--token-file`` and ``--token`` exclude each other; an explicit option beats the environment (an
info line says the variable was ignored). None of them: no token (a server then accepts every
call). A token is never echoed in a message.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from latentsearch.errors import InvalidArgumentError

__all__ = ["TOKEN_ENV", "add_token_arguments", "resolve_token"]

log = logging.getLogger(__name__)

TOKEN_ENV = "LATENTSEARCH_TOKEN"
# What an HTTP/2 header value of a bearer token may hold: printable ASCII, no spaces.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


def add_token_arguments(parser: argparse.ArgumentParser, *, serving: bool) -> None:
    """Add ``--token-file`` and ``--token`` (mutually exclusive) to a sub-command's parser."""
    what = "the token every call but health must send" if serving else "the bearer token to send"
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"file holding {what} (one trailing newline stripped); beats ${TOKEN_ENV}",
    )
    group.add_argument(
        "--token",
        default=None,
        help=f"{what} (beats ${TOKEN_ENV}); every local user can read it in the process list: "
        f"prefer --token-file or ${TOKEN_ENV}",
    )


def resolve_token(
    token_file: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The bearer token: ``token_file``'s text, else ``token``, else ``$LATENTSEARCH_TOKEN``, else None.

    Args:
        token_file: ``--token-file``: its text with one trailing newline (``\\n`` or ``\\r\\n``) stripped.
        token: ``--token`` (logs a warning that the command line is visible to other local users).
        environ: the environment to read ``LATENTSEARCH_TOKEN`` from (default ``os.environ``).

    Raises:
        InvalidArgumentError: ``token_file`` does not exist or cannot be read, or the token
            found is empty or holds characters a bearer token cannot carry (``field`` names the
            option: ``token_file``, ``token`` or ``LATENTSEARCH_TOKEN``).
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        value, source, field = _read_token_file(Path(token_file)), f"token file {token_file}", "token_file"
    elif token is not None:
        log.warning(
            "--token puts the token on the command line, where every local user can read it "
            "(ps, /proc/PID/cmdline); use --token-file or $%s instead",
            TOKEN_ENV,
        )
        value, source, field = token, "--token", "token"
    elif TOKEN_ENV in env:
        value, source, field = env[TOKEN_ENV], f"${TOKEN_ENV}", TOKEN_ENV
    else:
        return None
    if (token_file is not None or token is not None) and TOKEN_ENV in env:
        log.info("$%s is set but ignored: %s wins", TOKEN_ENV, "--token-file" if token_file else "--token")
    if not value:
        raise InvalidArgumentError(f"{source} is empty (a bearer token must not be)", field=field)
    if not _TOKEN_RE.fullmatch(value):
        raise InvalidArgumentError(
            f"{source} holds a character a bearer token cannot carry (printable ASCII without spaces only)",
            field=field,
        )
    return value


def _read_token_file(path: Path) -> str:
    """``path``'s text without one trailing newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"no token file {path}", field="token_file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidArgumentError(f"cannot read token file {path}: {reason}", field="token_file") from exc
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text

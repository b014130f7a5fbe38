"""The project's one exception tree.

Every error latentsearch raises on purpose derives from :class:`LatentSearchError`. Each subclass
names the gRPC status code the server boundary translates it to (``grpc_code``), so library code
never imports grpc. Errors raised because a library failed are re-raised with ``from exc``.

The way back is here too: :func:`error_for_status` turns a failed call's status code name, details
and field into the matching error (what the client raises), so the mapping between the tree and the
status codes lives in this one module. A failed call carries :func:`status_details`
(``"<field>: <message>"``) and, when there is a field, the field alone in its trailing metadata
under :data:`FIELD_METADATA_KEY`.
"""

from __future__ import annotations

__all__ = [
    "FIELD_METADATA_KEY",
    "QUOTE_LIMIT",
    "CorruptIndexError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LatentSearchError",
    "NotFoundError",
    "PermissionDeniedError",
    "RemoteError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for_status",
    "quoted",
    "shorten",
    "status_details",
]


class LatentSearchError(Exception):
    """Base class of every latentsearch error.

    ``field`` names the offending argument or request field when there is one, so messages and
    gRPC details can point at it.
    """

    # The status code name this error travels as (grpc.StatusCode member names).
    grpc_code = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(LatentSearchError, ValueError):
    """Bad input: wrong shape or dimension, NaN/inf, k out of range, sigma <= 0."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(LatentSearchError, KeyError):
    """An id, label, version or file that does not exist."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class FailedPreconditionError(LatentSearchError, RuntimeError):
    """The operation cannot run in the current state (e.g. an empty bank, a model without a decoder)."""

    grpc_code = "FAILED_PRECONDITION"


class CorruptIndexError(FailedPreconditionError):
    """Index files are missing, truncated, half-written or fail their checksums."""


class UnavailableError(LatentSearchError, RuntimeError):
    """Nothing to serve yet (no index loaded) or shutting down."""

    grpc_code = "UNAVAILABLE"


class ResourceExhaustedError(LatentSearchError, RuntimeError):
    """A bounded queue or size limit was exceeded."""

    grpc_code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(LatentSearchError):
    """The caller's deadline passed before its request was computed."""

    grpc_code = "DEADLINE_EXCEEDED"


class UnauthenticatedError(LatentSearchError):
    """Missing or invalid credentials (the bearer token)."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(LatentSearchError):
    """Valid credentials that do not allow the call."""

    grpc_code = "PERMISSION_DENIED"


class RemoteError(LatentSearchError):
    """A failed call whose status code has no class of its own (``INTERNAL``, ``UNIMPLEMENTED``, ...).

    ``grpc_code`` holds the call's status code name.
    """

    def __init__(self, message: str, *, code: str = "UNKNOWN", field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.grpc_code = code


# Status code name -> the class it comes back as; CorruptIndexError travels as its base class.
_BY_CODE: dict[str, type[LatentSearchError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}
# Trailing metadata key of a failed call's field (a request field path: "z", "queries[3].z", ...).
FIELD_METADATA_KEY = "latentsearch-field"
# Most characters of user input a message quotes: status details travel in gRPC metadata, whose
# size the client bounds (8 KiB by default), so a message never echoes unbounded input.
QUOTE_LIMIT = 80


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` when it has at most ``limit`` characters, else its first ``limit`` and its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)`` for a message, cut to the first ``limit`` characters (and the length) when
    longer: the way every message quotes a string it was given."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def status_details(exc: LatentSearchError) -> str:
    """The status details ``exc`` travels with: ``"<field>: <message>"``, or the message alone."""
    return f"{exc.field}: {exc.message}" if exc.field else exc.message


def error_for_status(code: str, details: str, *, field: str | None = None) -> LatentSearchError:
    """The error of a failed call: status ``code`` (a name such as ``"NOT_FOUND"``), its ``details``
    and the ``field`` its trailing metadata named (``None``: none).

    The class is the one whose ``grpc_code`` is ``code``, else :class:`RemoteError` holding it.
    Details written by :func:`status_details` lose their ``"<field>: "`` prefix again, so a
    server's error comes back with its class, field and message; other details (e.g. grpc's own
    "failed to connect ...") are the message as they are.
    """
    prefix = f"{field}: " if field else None
    message = details[len(prefix) :] if prefix and details.startswith(prefix) else details
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(message, code=code, field=field)
    return cls(message, field=field)

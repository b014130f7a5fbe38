"""The project's one exception tree.

Every error latentsearch raises on purpose derives from :class:`LatentSearchError`. Each subclass
names the gRPC status code the server boundary translates it to (``grpc_code``), so library code
never imports grpc. Errors raised because a library failed are re-raised with ``from exc``.
"""

from __future__ import annotations

__all__ = [
    "CorruptIndexError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LatentSearchError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
]


class LatentSearchError(Exception):
    """Base class of every latentsearch error.

    ``field`` names the offending argument or request field when there is one, so messages and
    gRPC details can point at it.
    """

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

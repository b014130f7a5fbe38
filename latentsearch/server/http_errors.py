"""Project errors -> HTTP status codes: the HTTP API's one mapping table.

Every error of the exception tree (:mod:`latentsearch.errors`) names the gRPC status code it travels
as (``grpc_code``); the HTTP status is looked up from that code here, so a subclass (e.g.
CorruptIndexError, a FailedPreconditionError) maps like its base. The body carries the same
message as the gRPC status details (``"<field>: <message>"``, bounded the same way), the code's
name and the field::

    {"error": {"code": "INVALID_ARGUMENT", "message": "z: z has 3 coordinates ...", "field": "z"}}
"""

from __future__ import annotations

from typing import Any

from latentsearch.errors import LatentSearchError, shorten, status_details
from latentsearch.server.servicer import MAX_DETAILS

__all__ = ["HTTP_STATUS", "INTERNAL_STATUS", "error_body", "http_status"]

# gRPC status code name -> HTTP status.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,  # InvalidArgumentError: the body names the field
    "UNAUTHENTICATED": 401,  # UnauthenticatedError: missing or wrong bearer token
    "PERMISSION_DENIED": 403,  # PermissionDeniedError
    "NOT_FOUND": 404,  # NotFoundError: an id, label or version
    "FAILED_PRECONDITION": 409,  # FailedPreconditionError, CorruptIndexError: no model, no decoder, ...
    "RESOURCE_EXHAUSTED": 429,  # ResourceExhaustedError: the request queue is full; retry later
    "UNAVAILABLE": 503,  # UnavailableError: no index version loaded yet, or shutting down
    "DEADLINE_EXCEEDED": 504,  # DeadlineExceededError
}
# Anything else (a RemoteError's code, an unexpected exception): an internal error.
INTERNAL_STATUS = 500


def http_status(exc: LatentSearchError) -> int:
    """The HTTP status of ``exc``."""
    return HTTP_STATUS.get(exc.grpc_code, INTERNAL_STATUS)


def error_body(exc: LatentSearchError) -> dict[str, Any]:
    """The JSON body of a failed call: the gRPC status details as ``message``, code and field."""
    return {
        "error": {
            "code": exc.grpc_code,
            "message": shorten(status_details(exc), MAX_DETAILS),
            "field": exc.field,
        }
    }

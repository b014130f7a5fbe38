"""Bearer-token authentication as a grpc.aio server interceptor (the health service stays open)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from latentsearch.errors import InvalidArgumentError
from latentsearch.server.metrics import ServerMetrics

__all__ = ["OPEN_PREFIXES", "UNAUTHENTICATED_MESSAGE", "BearerTokenInterceptor", "bearer_matches"]

log = logging.getLogger(__name__)

# Methods anyone may call: load balancers probe health without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# What a call without the right token is answered (gRPC details, HTTP error message).
UNAUTHENTICATED_MESSAGE = "authorization: missing or invalid bearer token"


def bearer_matches(expected: bytes, value: str | bytes | None) -> bool:
    """Whether an ``authorization`` value is ``expected`` (``b"Bearer <token>"``), in constant time."""
    if value is None:
        return False
    given = value.encode() if isinstance(value, str) else bytes(value)
    return hmac.compare_digest(given, expected)


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls without metadata ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Args:
        token: the required bearer token.
        metrics: where rejected calls are counted (method, ``UNAUTHENTICATED``); ``None``: nowhere.
    """

    def __init__(self, token: str, *, metrics: ServerMetrics | None = None) -> None:
        if not token:
            raise InvalidArgumentError("token must be non-empty", field="token")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        log.debug("rejected unauthenticated call to %s", method)
        return _deny(handler, method.rsplit("/", 1)[-1], self._metrics)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return bearer_matches(self._expected, value)
        return False


def _deny(
    handler: grpc.RpcMethodHandler, method: str, metrics: ServerMetrics | None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED (and counts it).

    It takes the request bytes as they are (no deserializer): nothing an unauthenticated caller
    sends is parsed, so malformed bytes get UNAUTHENTICATED too.
    """

    async def abort(request: Any, context: aio.ServicerContext) -> None:
        start = time.perf_counter()
        try:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        finally:
            if metrics is not None:
                metrics.observe(method, "UNAUTHENTICATED", time.perf_counter() - start)

    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)

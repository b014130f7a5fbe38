"""Request bytes that do not parse: INVALID_ARGUMENT after the token check, counted, logged at a bounded rate.

grpc parses a request with its handler's deserializer before any servicer code runs; a parse error
there becomes UNKNOWN "Unexpected DecodeError" with a traceback in the log for every call. The
handlers registered through :class:`GuardedRegistry` parse leniently instead: bytes that do not
parse become a :class:`MalformedRequest`, which the wrapped behaviour hands to
:meth:`MalformedRequests.reject` (INVALID_ARGUMENT, field ``request``). The bearer-token
interceptor (:mod:`server.auth`) picks the handler first, and its rejecting handler does not parse
the bytes at all, so an unauthenticated call gets UNAUTHENTICATED whatever it sends.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc
from grpc import aio

from latentsearch.errors import FIELD_METADATA_KEY, InvalidArgumentError, shorten, status_details
from latentsearch.server.metrics import ServerMetrics

__all__ = [
    "LOG_INTERVAL",
    "GuardedRegistry",
    "HandlerRegistry",
    "LogThrottle",
    "MalformedRequest",
    "MalformedRequests",
    "add_guarded",
    "guard_handler",
]

log = logging.getLogger(__name__)

S = TypeVar("S")

# Seconds between two log lines about malformed requests (the next line counts those left out).
LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class MalformedRequest:
    """What a guarded handler's deserializer returns for bytes that do not parse."""

    size: int  # bytes received
    reason: str  # the parser's message


# Answers a malformed request to a method ("/package.Service/Method"): aborts the call (raises).
Reject = Callable[[str, MalformedRequest, aio.ServicerContext], Awaitable[None]]


class HandlerRegistry(Protocol):
    """Where handlers are registered: a ``grpc.aio.Server`` or a :class:`GuardedRegistry`."""

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None: ...


class LogThrottle:
    """Logs a warning at most once per ``interval`` seconds; the next line says how many were left out.

    For one event loop (no lock).
    """

    def __init__(
        self, logger: logging.Logger, interval: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self.suppressed = 0  # lines left out since the last one logged

    def warning(self, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line was logged less than ``interval`` seconds ago; True if logged."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (and %d more since the last such line, not logged)"
            args = (*args, self.suppressed)
        self._logger.warning(msg, *args)
        self.suppressed = 0
        self._next = now + self.interval
        return True


class MalformedRequests:
    """Answers malformed requests: INVALID_ARGUMENT (field ``request``), counted in ``metrics`` (by
    method) and logged through a :class:`LogThrottle` of ``log_interval`` seconds, without traceback."""

    def __init__(
        self,
        metrics: ServerMetrics | None = None,
        *,
        log_interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.log = LogThrottle(log, log_interval, clock=clock)

    async def reject(self, method: str, request: MalformedRequest, context: aio.ServicerContext) -> None:
        if self.metrics is not None:
            self.metrics.count_malformed(method.rsplit("/", 1)[-1])
        reason = shorten(request.reason)
        self.log.warning(
            "malformed request to %s from %s (%d bytes): %s", method, context.peer(), request.size, reason
        )
        error = InvalidArgumentError(f"the request bytes do not parse ({reason})", field="request")
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            status_details(error),
            trailing_metadata=((FIELD_METADATA_KEY, "request"),),
        )


class GuardedRegistry:
    """Registers handlers on ``server``, each wrapped by :func:`guard_handler` with ``reject``.

    Stands in for the server in the generated ``add_<Service>Servicer_to_server(servicer, server)``
    functions, which call these two methods only.
    """

    def __init__(self, server: HandlerRegistry, reject: Reject) -> None:
        self._server = server
        self._reject = reject

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGenericHandler(h, self._reject) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: guard_handler(h, f"/{service_name}/{name}", self._reject)
                for name, h in method_handlers.items()
            },
        )


def add_guarded(
    add: Callable[[S, aio.Server], None], servicer: S, server: HandlerRegistry, reject: Reject
) -> None:
    """``add(servicer, server)`` (a generated ``add_<Service>Servicer_to_server``) with every handler
    guarded by :func:`guard_handler`."""
    # The generated function types its argument as a server but calls only the two methods
    # GuardedRegistry has.
    add(servicer, cast(aio.Server, GuardedRegistry(server, reject)))


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are guarded (each wrapped once, then cached)."""

    def __init__(self, inner: grpc.GenericRpcHandler, reject: Reject) -> None:
        self._inner = inner
        self._reject = reject
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}  # only methods the inner handler serves

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._guarded.get(method)
        if handler is None:
            inner = self._inner.service(handler_call_details)
            if inner is None:
                return None
            handler = self._guarded[method] = guard_handler(inner, method, self._reject)
        return handler


def guard_handler(handler: grpc.RpcMethodHandler, method: str, reject: Reject) -> grpc.RpcMethodHandler:
    """``handler`` of RPC ``method`` with a deserializer that never raises and a behaviour that hands
    a :class:`MalformedRequest` to ``reject`` instead of the servicer.

    Handlers without a deserializer (raw bytes) or with a synchronous behaviour are returned as they are.
    """
    parse = handler.request_deserializer
    if parse is None:
        return handler
    kwargs: dict[str, Any] = {
        "request_deserializer": _lenient(parse),
        "response_serializer": handler.response_serializer,
    }
    for kind, make, wrap in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(wrap(behaviour, method, reject), **kwargs) if _is_async(behaviour) else handler
    return handler


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or whatever else a parser raises on bad bytes
            return MalformedRequest(len(data), str(exc) or type(exc).__name__)

    return lenient


def _is_async(behaviour: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _unary_in(behaviour: Callable[..., Any], method: str, reject: Reject) -> Callable[..., Any]:
    """``behaviour(request, context)`` (a coroutine function or an async generator function), guarded."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            if type(request) is MalformedRequest:
                await reject(method, request, context)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def call(request: Any, context: aio.ServicerContext) -> Any:
        if type(request) is MalformedRequest:
            await reject(method, request, context)
        return await behaviour(request, context)

    return call


def _stream_in(behaviour: Callable[..., Any], method: str, reject: Reject) -> Callable[..., Any]:
    """``behaviour(request_iterator, context)``, each request checked as the servicer reads it."""

    async def checked(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is MalformedRequest:
                await reject(method, request, context)
            yield request

    if inspect.isasyncgenfunction(behaviour):

        async def stream(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(checked(requests, context), context):
                yield response

        return stream

    async def call(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
        return await behaviour(checked(requests, context), context)

    return call


# The four handler kinds: the handler's attribute, grpc's constructor, the guard of its behaviour.
_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler], Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _unary_in),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _unary_in),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _stream_in),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _stream_in),
)

"""The grpc.aio servicer: a thin layer that runs :class:`EngineService` calls off the event loop and
translates project errors to status codes (the only place they are translated)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from grpc import aio

from latentsearch.errors import (
    FIELD_METADATA_KEY,
    LatentSearchError,
    ResourceExhaustedError,
    shorten,
    status_details,
)
from latentsearch.server.admission import AdmissionControl
from latentsearch.server.batcher import MicroBatcher
from latentsearch.server.engine_service import EngineService, NearestQuery, QueryKey, is_plain
from latentsearch.server.metrics import ServerMetrics
from latentsearch.server.scheduler import batch_chunks
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

__all__ = ["LatentSearchServicer", "run_nearest_group"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest status details sent: they travel in a trailer, and a client refuses metadata over its
# limit (8 KiB by default) with RESOURCE_EXHAUSTED instead of the error. Messages quote at most
# QUOTE_LIMIT characters of user input (errors.quoted); this bounds them whatever they hold.
MAX_DETAILS = 1024


class LatentSearchServicer(pb_grpc.LatentSearchServicer):
    """Implements ``latentsearch.v1.LatentSearch``.

    Args:
        service: the core answering requests.
        executor: where blocking work runs (FAISS and numpy release the GIL).
        batcher: micro-batcher for Nearest (``None``: each call searched alone).
        metrics: where request counts and latencies go (``None``: nowhere).
        admission: bounded in-flight counter for every call run on ``executor`` without the
            batcher (default: 1024 in flight).
        chunk_queries: most queries of a NearestBatch searched in one task on the search threads
            (:func:`~latentsearch.server.scheduler.batch_chunks`); chunks run one after another as
            bulk work, so small calls are answered between them.
        inline_cost_s: a plain Nearest (:func:`~latentsearch.server.engine_service.is_plain`)
            whose snapshot measured its cost at most this many seconds (``Snapshot.nearest_cost_s``)
            is answered on the event loop itself: no batching wait, no thread hop (0: never).
    """

    def __init__(
        self,
        service: EngineService,
        *,
        executor: Executor,
        batcher: MicroBatcher | None = None,
        metrics: ServerMetrics | None = None,
        admission: AdmissionControl | None = None,
        chunk_queries: int = 64,
        inline_cost_s: float = 0.0,
    ) -> None:
        self.service = service
        self.chunk_queries = chunk_queries
        self.inline_cost_s = inline_cost_s
        self.executor = executor
        self.admission = admission or AdmissionControl(executor=executor, limit=1024)
        self.batcher = batcher
        self.metrics = metrics
        # The tasks of the RPCs that entered a handler, until each task ends (its reply sent).
        self._calls: set[asyncio.Task[Any]] = set()

    def calls_in_flight(self) -> set[asyncio.Task[Any]]:
        """The RPCs running now, as the tasks grpc runs them in (done once the reply is sent)."""
        return set(self._calls)

    # -- RPCs ---------------------------------------------------------------------------------
    async def Nearest(self, request: pb.NearestRequest, context: aio.ServicerContext) -> pb.NearestResponse:
        return await self._call("Nearest", context, self._nearest(request, context))

    async def NearestBatch(
        self, request: pb.NearestBatchRequest, context: aio.ServicerContext
    ) -> pb.NearestBatchResponse:
        return await self._call("NearestBatch", context, self._nearest_batch(request, context), sized=True)

    async def NearestToDistribution(
        self, request: pb.NearestToDistributionRequest, context: aio.ServicerContext
    ) -> pb.NearestToDistributionResponse:
        return await self._call(
            "NearestToDistribution",
            context,
            self._blocking(context, self.service.nearest_to_distribution, request),
        )

    async def Encode(self, request: pb.EncodeRequest, context: aio.ServicerContext) -> pb.EncodeResponse:
        return await self._call("Encode", context, self._blocking(context, self.service.encode, request))

    async def Decode(self, request: pb.DecodeRequest, context: aio.ServicerContext) -> pb.DecodeResponse:
        return await self._call("Decode", context, self._blocking(context, self.service.decode, request))

    async def GetItem(self, request: pb.GetItemRequest, context: aio.ServicerContext) -> pb.GetItemResponse:
        return await self._call("GetItem", context, self._blocking(context, self.service.get_item, request))

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoResponse:
        return await self._call("Info", context, self._blocking(context, self.service.info, request))

    # -- internals ----------------------------------------------------------------------------
    async def _nearest(self, request: pb.NearestRequest, context: aio.ServicerContext) -> pb.NearestResponse:
        query = self.service.parse_nearest(request)  # captures the snapshot that answers
        snap = query.snapshot
        if snap.nearest_cost_s <= self.inline_cost_s and is_plain(query.key, snap.engine):
            # cheaper than the hop to a search thread and back
            return self.service.search_group(snap, query.key, [query.z])[0]
        if self.batcher is None:
            replies = await self._blocking(
                context, self.service.search_group, query.snapshot, query.key, [query.z]
            )
            return replies[0]
        reply: pb.NearestResponse = await self.batcher.submit(query.key, query, deadline=_deadline(context))
        return reply

    async def _nearest_batch(
        self, request: pb.NearestBatchRequest, context: aio.ServicerContext
    ) -> pb.NearestBatchResponse:
        """Parse (and bound the reply: EngineService.parse_batch), then search chunk by chunk as bulk
        work, every chunk answered by the snapshot the batch started with."""
        deadline = _deadline(context)
        admission, service = self.admission, self.service
        with admission.admit(deadline):
            snap, parsed = await admission.execute(service.parse_batch, request, deadline=deadline, bulk=True)
            results: list[pb.NearestResponse] = []
            for chunk in batch_chunks([q.key.k for q in parsed], self.chunk_queries):
                part = parsed[chunk.start : chunk.stop]
                results += await admission.execute(
                    service.search_parsed, snap, part, chunk.start, deadline=deadline, bulk=True
                )
        return pb.NearestBatchResponse(results=results, index_version=snap.version)

    async def _blocking(self, context: aio.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the search threads through the bounded in-flight counter."""
        return await self.admission.run(fn, *args, deadline=_deadline(context))

    async def _call(
        self, method: str, context: aio.ServicerContext, work: Awaitable[T], *, sized: bool = False
    ) -> T:
        """Await ``work``, translating project errors to status codes and recording metrics.

        A reply larger than the server sends (``max_reply_bytes``) is answered RESOURCE_EXHAUSTED
        here and counted so: grpc would fail it the same way after the handler returned, and the
        call would count as OK. ``sized``: the request was checked against a bound on its reply
        before the work (NearestBatch; measuring a reply of many MiB would cost what sending it does).
        """
        start = time.perf_counter()
        code = "OK"
        task = asyncio.current_task()
        if task is not None and task not in self._calls:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        try:
            reply = await work
            if not sized:
                _check_reply_size(reply, self.service.max_reply_bytes)
            return reply
        except LatentSearchError as exc:
            code = exc.grpc_code
            status = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
            trailing = ((FIELD_METADATA_KEY, exc.field),) if exc.field else ()
            await context.abort(status, shorten(status_details(exc), MAX_DETAILS), trailing_metadata=trailing)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
            raise
        finally:
            if self.metrics is not None:
                self.metrics.observe(method, code, time.perf_counter() - start)


def _check_reply_size(reply: Any, limit: int) -> None:
    """Raise ResourceExhaustedError when ``reply`` (a protobuf message) is over ``limit`` bytes."""
    size = reply.ByteSize()
    if size > limit:
        raise ResourceExhaustedError(
            f"the reply takes {size} bytes, more than the {limit} this server sends in one message",
            field="reply",
        )


def _deadline(context: aio.ServicerContext) -> float | None:
    """The call's deadline in ``loop.time()`` (monotonic) seconds, or ``None``."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def run_nearest_group(
    service: EngineService, *, on_search: Callable[[float], None] | None = None
) -> Callable[[QueryKey, list[NearestQuery]], list[Any]]:
    """The batcher's function: one search for queries sharing a key (and a snapshot), one reply each.

    The replies are built here, on the search thread, from the batch's arrays. ``on_search`` gets
    each round's wall-clock seconds (metrics).
    """

    def run(key: QueryKey, queries: list[NearestQuery]) -> list[Any]:
        start = time.perf_counter()
        try:
            return service.search_group(queries[0].snapshot, key, [q.z for q in queries])
        finally:
            if on_search is not None:
                on_search(time.perf_counter() - start)

    return run

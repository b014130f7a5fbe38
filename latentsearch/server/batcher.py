"""Dynamic micro-batching: concurrent requests sharing a key are answered by one blocking call.

Requests wait in a bounded queue (full: RESOURCE_EXHAUSTED at once). A collector takes the first
waiting request, keeps collecting for up to ``max_wait_ms`` or until ``max_batch`` requests, groups
them by key and runs each group's function in the executor; callers whose deadline has already
passed are answered DEADLINE_EXCEEDED without being computed. While every executor slot is busy the
queue grows, so batches grow with load.

The collector is woken once per round, not once per request: while it collects, a request only
wakes it when the queue reaches ``max_batch`` (a timer ends the round otherwise), so a round of n
requests costs one timer and one wake-up rather than n (this path runs on the event loop, which
also runs every gRPC call).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from latentsearch.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)

__all__ = ["DeadlineExceededError", "MicroBatcher"]  # the error lives in latentsearch.errors

log = logging.getLogger(__name__)

BatchFn = Callable[[Any, list[Any]], Sequence[Any]]


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future[Any]
    deadline: float | None  # loop.time() units


class MicroBatcher:
    """Groups concurrent :meth:`submit` calls with equal keys into one ``run(key, items)`` call.

    Args:
        run: blocking ``run(key, items) -> results`` (one result per item, in order); runs in
            ``executor``.
        max_batch: most requests collected into one round (all keys together).
        max_wait_ms: how long a round keeps collecting after its first request (0: no wait).
        queue_size: most requests waiting; beyond it :meth:`submit` raises ResourceExhaustedError.
        max_concurrent: rounds computing at once (match the executor's threads).
        on_batch: called with each group's size (metrics).
        on_depth: called with the queue depth as a round takes its requests, before and after
            (metrics; sampled once per round, not per request: the per-request update cost more than
            the rest of the batcher's work on a call in multiprocess metrics).
    """

    def __init__(
        self,
        run: BatchFn,
        *,
        executor: Executor,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        queue_size: int = 1024,
        max_concurrent: int = 2,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("queue_size", queue_size),
            ("max_concurrent", max_concurrent),
        ):
            if value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {value}", field=name)
        if max_wait_ms < 0:
            raise InvalidArgumentError(f"max_wait_ms must be >= 0, got {max_wait_ms}", field="max_wait_ms")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._queue: deque[_Pending] = deque()
        # Resolved to wake the collector: when idle, by the next request; while collecting, by the
        # request that fills a batch (or the round's timer).
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1  # queue length at which submit() resolves the waiter
        self._slots = asyncio.Semaphore(max_concurrent)
        self._inflight: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not yet taken into a round)."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered: queued, collected or computing."""
        return self._pending

    def start(self) -> None:
        """Start the collector (call from the event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="micro-batcher")

    async def submit(self, key: Hashable, item: Any, *, deadline: float | None = None) -> Any:
        """Queue ``item`` and wait for its result (its exception is raised here).

        ``deadline`` is in ``loop.time()`` units; ``None``: no deadline.
        """
        loop = asyncio.get_running_loop()
        if self._closed or self._task is None:
            raise UnavailableError("the server is shutting down", field="server")
        if deadline is not None and loop.time() >= deadline:
            raise DeadlineExceededError("deadline exceeded before the request was queued", field="deadline")
        if len(self._queue) >= self.queue_size:
            raise ResourceExhaustedError(
                f"request queue is full ({self.queue_size} waiting); retry later", field="queue"
            )
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append(_Pending(key, item, fut, deadline))
        if len(queue) >= self._wake_at:
            self._wake()
        self._pending += 1
        try:
            return await fut
        finally:
            self._pending -= 1

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the collector."""
        self._closed = True
        self._wake()
        if self._task is not None:
            await self._task
            self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, wake_at: int, timeout: float | None) -> None:
        """Wait until the queue holds ``wake_at`` requests, :meth:`close`, or ``timeout`` seconds."""
        self._wake_at = wake_at
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            while not queue:
                if self._closed:
                    return
                await self._sleep(loop, 1, None)
            if len(queue) < self.max_batch and self.max_wait > 0 and not self._closed:
                await self._sleep(loop, self.max_batch, self.max_wait)  # let the round fill
            self._on_depth(len(queue))
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            await self._slots.acquire()
            while len(batch) < self.max_batch and queue:  # arrived while waiting for a slot
                batch.append(queue.popleft())
            self._on_depth(len(queue))
            task = loop.create_task(self._dispatch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            groups: dict[Hashable, list[_Pending]] = {}
            for p in batch:
                if p.future.done():  # the caller went away
                    continue
                if p.deadline is not None and now >= p.deadline:
                    p.future.set_exception(
                        DeadlineExceededError("deadline exceeded while queued", field="deadline")
                    )
                    continue
                groups.setdefault(p.key, []).append(p)
            for key, members in groups.items():
                self._on_batch(len(members))
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._run, key, [p.item for p in members]
                    )
                    if len(results) != len(members):
                        raise RuntimeError(
                            f"batch function returned {len(results)} results for {len(members)}"
                        )
                except Exception as exc:
                    for p in members:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, res in zip(members, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(res)
        finally:
            self._slots.release()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

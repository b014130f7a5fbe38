"""Admission control for work that runs on the search threads without the micro-batcher.

A bounded in-flight counter: at most ``limit`` calls are queued for or running on the executor;
beyond it a call fails RESOURCE_EXHAUSTED at once (the same contract as the batcher's bounded
queue). A call whose deadline has passed is answered DEADLINE_EXCEEDED without being computed,
both when it arrives and when a search thread picks it up. A call made of several steps (a
NearestBatch split into chunks) is admitted once (:meth:`AdmissionControl.admit`) and runs each step
with :meth:`AdmissionControl.execute`, as bulk work when the executor is a
:class:`~latentsearch.server.scheduler.SearchThreads`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

from latentsearch.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from latentsearch.server.scheduler import SearchThreads

__all__ = ["AdmissionControl"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class AdmissionControl:
    """Runs blocking calls in ``executor`` with at most ``limit`` of them in flight.

    Args:
        executor: the search threads.
        limit: most calls queued for or running on ``executor``.
        on_inflight: called with the in-flight count when it changes (metrics).

    Deadlines are ``time.monotonic()`` seconds (the default event loop's ``loop.time()`` clock).
    """

    def __init__(
        self, *, executor: Executor, limit: int, on_inflight: Callable[[int], None] | None = None
    ) -> None:
        if limit < 1:
            raise InvalidArgumentError(f"limit must be >= 1, got {limit}", field="limit")
        self._executor = executor
        self.limit = limit
        self._on_inflight = on_inflight or (lambda n: None)
        self._inflight = 0
        self._closed = False

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        """Refuse new calls (UNAVAILABLE); calls already admitted finish."""
        self._closed = True

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """``fn(*args)`` on the executor, admitted or refused at once; its exception is raised here."""
        with self.admit(deadline):
            return await self.execute(fn, *args, deadline=deadline)

    @contextlib.contextmanager
    def admit(self, deadline: float | None = None) -> Iterator[None]:
        """Count one call in flight for the ``with`` block, or refuse it at once (UNAVAILABLE when
        closed, DEADLINE_EXCEEDED when ``deadline`` passed, RESOURCE_EXHAUSTED at the limit)."""
        if self._closed:
            raise UnavailableError("the server is shutting down", field="server")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("deadline exceeded before the request was queued", field="deadline")
        if self._inflight >= self.limit:
            raise ResourceExhaustedError(
                f"too many requests in flight ({self.limit}); retry later", field="queue"
            )
        self._inflight += 1
        self._on_inflight(self._inflight)
        try:
            yield
        finally:
            self._inflight -= 1
            self._on_inflight(self._inflight)

    async def execute(
        self, fn: Callable[..., T], *args: Any, deadline: float | None = None, bulk: bool = False
    ) -> T:
        """``fn(*args)`` on the executor for a call already admitted; skipped (DEADLINE_EXCEEDED)
        when ``deadline`` passes first. ``bulk``: queued as bulk work (see SearchThreads)."""
        call = functools.partial(_checked, deadline, fn, *args)
        if bulk and isinstance(self._executor, SearchThreads):
            return await asyncio.wrap_future(self._executor.submit_bulk(call))
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)


def _checked(deadline: float | None, fn: Callable[..., T], *args: Any) -> T:
    """Skip ``fn`` when the deadline passed while the call waited for a search thread."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceededError("deadline exceeded while queued", field="deadline")
    return fn(*args)

"""The search threads, scheduled so that big calls cannot starve small ones.

Two queues feed the threads: *interactive* work (batched Nearest rounds, NearestToDistribution,
GetItem, Info, Encode, Decode: anything submitted the plain :meth:`Executor.submit` way) and *bulk*
work (the chunks a NearestBatch is split into, :func:`batch_chunks`, each submitted with
:meth:`SearchThreads.submit_bulk` only once the previous one is answered). A free thread takes
interactive work first, except that after ``bulk_every`` interactive tasks in a row a waiting bulk
chunk goes next (bulk work is slowed under load, never stopped), and at most ``threads - 1`` threads
run bulk work at once when there are several, so one is always free for a small call.

So a Nearest call waits for at most one chunk (a thread's current task), never for a whole
NearestBatch: with 4 clients sending 1024-query batches it no longer queues behind seconds of
search (before: Nearest's median latency went from 3.5 ms to 3.7 s).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from latentsearch.errors import InvalidArgumentError, UnavailableError

__all__ = ["CHUNK_NEIGHBOURS", "SearchThreads", "batch_chunks"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Most result neighbours (sum of k) one bulk chunk computes, besides at most max_batch queries: a
# chunk then costs about what one full batched Nearest round does (64 queries at k = 10 is 640;
# reply building grows with k, the search itself much less).
CHUNK_NEIGHBOURS = 6400


def batch_chunks(ks: Sequence[int], max_queries: int, max_neighbours: int = CHUNK_NEIGHBOURS) -> list[range]:
    """Consecutive ranges of query indices, each at most ``max_queries`` long with ``sum(k)`` at most
    ``max_neighbours`` (a single query above it forms its own chunk). ``ks``: each query's k."""
    chunks: list[range] = []
    start, load = 0, 0
    for i, k in enumerate(ks):
        if i > start and (i - start >= max_queries or load + k > max_neighbours):
            chunks.append(range(start, i))
            start, load = i, 0
        load += k
    if start < len(ks):
        chunks.append(range(start, len(ks)))
    return chunks


class _Task:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.future: Future[Any] = Future()


class SearchThreads(Executor):
    """A fixed pool of ``threads`` threads with an interactive and a bulk queue (module docstring).

    Args:
        threads: threads running blocking work (FAISS and numpy release the GIL).
        bulk_every: interactive tasks run in a row, while bulk work waits, before one bulk task.
        name: thread name prefix.
    """

    def __init__(self, threads: int, *, bulk_every: int = 4, name: str = "latentsearch-search") -> None:
        if threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}", field="threads")
        if bulk_every < 1:
            raise InvalidArgumentError(f"bulk_every must be >= 1, got {bulk_every}", field="bulk_every")
        self.threads = threads
        self.bulk_every = bulk_every
        self.max_bulk = max(1, threads - 1)  # threads running bulk work at once
        self._interactive: deque[_Task] = deque()
        self._bulk: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._streak = 0  # interactive tasks taken in a row while bulk work waited
        self._running_bulk = 0
        self._shutdown = False
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(threads)
        ]
        for t in self._workers:
            t.start()

    @property
    def waiting(self) -> tuple[int, int]:
        """(interactive, bulk) tasks waiting for a thread."""
        with self._cond:
            return len(self._interactive), len(self._bulk)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` as interactive work."""
        return self._put(self._interactive, fn, args, kwargs)

    def submit_bulk(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` as bulk work (one bounded chunk of a big call)."""
        return self._put(self._bulk, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; the threads finish what is queued (``cancel_futures``: cancel it) and exit."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for queue in (self._interactive, self._bulk):
                    while queue:
                        queue.popleft().future.cancel()
            self._cond.notify_all()
        if wait:
            for t in self._workers:
                if t is not threading.current_thread():
                    t.join()

    # -- internals ----------------------------------------------------------------------------
    def _put(
        self, queue: deque[_Task], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        task = _Task(fn, args, kwargs)
        with self._cond:
            if self._shutdown:
                raise UnavailableError("the search threads are shut down", field="server")
            queue.append(task)
            self._cond.notify()
        return task.future

    def _take(self) -> tuple[_Task, bool] | None:
        """The next task and whether it is bulk work (call holding the lock); ``None``: none may run."""
        bulk_ok = bool(self._bulk) and self._running_bulk < self.max_bulk
        if self._interactive and not (bulk_ok and self._streak >= self.bulk_every):
            self._streak = self._streak + 1 if self._bulk else 0
            return self._interactive.popleft(), False
        if bulk_ok:
            self._streak = 0
            self._running_bulk += 1
            return self._bulk.popleft(), True
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
                while taken is None:
                    if self._shutdown and not self._interactive and not self._bulk:
                        return
                    self._cond.wait()
                    taken = self._take()
            task, bulk = taken
            try:
                if task.future.set_running_or_notify_cancel():
                    try:
                        result = task.fn(*task.args, **task.kwargs)
                    except BaseException as exc:
                        task.future.set_exception(exc)
                    else:
                        task.future.set_result(result)
            finally:
                if bulk:
                    with self._cond:
                        self._running_bulk -= 1
                        self._cond.notify_all()
            del task, taken  # drop references to the arguments and result before waiting again

"""The engine's thread pool for compiled kernels that release the GIL (one per process)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["pool", "run_sliced"]

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_SIZE = 0


def pool(threads: int) -> ThreadPoolExecutor:
    """A pool of at least ``threads`` workers (grown, never shrunk)."""
    global _POOL, _SIZE
    with _LOCK:
        if _POOL is None or threads > _SIZE:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="latentsearch-kernel")
            _SIZE = threads
        return _POOL


def run_sliced(run: Callable[[int, int], None], n: int, threads: int, *, step: int = 1) -> None:
    """``run(a, b)`` over ``[0, n)`` cut into ``threads`` contiguous slices (cuts at multiples of
    ``step``), in parallel on :func:`pool` when more than one; exceptions propagate."""
    threads = max(1, min(threads, -(-n // step)))
    if threads == 1:
        run(0, n)
        return
    cuts = (np.linspace(0, -(-n // step), threads + 1).astype(int) * step).tolist()
    cuts[-1] = n
    futures = [pool(threads).submit(run, a, b) for a, b in itertools.pairwise(cuts)]
    for f in futures:
        f.result()

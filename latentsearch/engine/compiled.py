"""What the engine's compiled (numba) kernels share: one way to compile, one thread pool."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numba import njit

__all__ = ["jit", "pool", "run_sliced"]


def jit(fn: Callable[..., Any] | None = None, *, fastmath: bool | set[str] = False) -> Any:
    """``njit(cache=True, nogil=True)``; without an on-disk cache where numba finds nowhere to write
    one (numba raises then, at decoration): the function is then compiled once per process.
    Usable bare (``@jit``) or with options (``@jit(fastmath={"contract"})``)."""
    if fn is None:
        return lambda f: jit(f, fastmath=fastmath)
    try:
        return njit(cache=True, nogil=True, fastmath=fastmath)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(cache=False, nogil=True, fastmath=fastmath)(fn)


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

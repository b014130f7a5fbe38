"""Fused float32 block-maximum screen of a batch of lifted queries (numba, generated per width).

The certified screen of :mod:`latentsearch.engine.exact` needs, per query, a threshold t and every
item whose float32 score reaches it. FAISS's flat search gives the (k + extra)-th score and the
top list, but spends about as long in its per-query heaps as in its matrix product, and numpy's
product writes a ``(B, n_g)`` score matrix that the block maxima then read back. This kernel fuses
the two: the items are stored in blocks of :data:`BLOCK`, dimension-major inside a block
(:class:`BlockTiles`), and for :data:`ROWS` queries at a time it accumulates the scores of
:data:`LANES` consecutive items in registers and keeps only each block's maximum, so nothing but
``(B, n_blocks)`` maxima is written. The loop over the lifted width is unrolled into generated
source (one function per width, compiled by numba and cached on disk where a cache directory can
be written), since a loop that numba compiles generically neither vectorises across items nor
keeps its accumulators in registers (13x slower, measured).

:func:`block_screen` then takes t, the (kg)-th largest block maximum (at most the (kg)-th largest
score: the maxima of distinct blocks are scores of distinct items), and scores again only the
blocks whose maximum reaches t (the generated ``candidates``, its width loop unrolled the same
way). A float32 dot product summed in another order can differ from the kernel's by up to twice
the group's error bound E (any order is within E of the exact score,
:func:`~latentsearch.engine.lifting.error_coefficient`), so items of those blocks are kept from
``t - slack``: every block's best item is then among the candidates, and
every item left out has *some* float32 score below t, hence an exact score below t + E, which is
what the caller's certification assumes.

Measured (``bench.ab_screen``, one process, one thread, the exact flat path with this screen and
with FAISS's flat search in a new random order each round; bench/results/ab-screen-2026-12-03-*):
on Fashion-MNIST VAE banks (one scale group) 1.17-1.55x at 200k items (B = 8 / 16 / 64; the flat
path went from 0.84-0.93x to 1.02-1.36x FAISS ``IndexFlatIP`` top-10) and 1.09-1.53x at 1M
(1.06-1.48x ``IndexFlatIP``); on the synthetic bank of the server benchmark (70k items in scale
groups of 54,803 and 15,195) 0.91-1.22x, about 1.05x: two screens per call, each with its fixed
costs. With 2 threads on the 2-core host no path got faster than with one (0.75-1.56x). Where
the time goes (70k items, B = 64): the block maxima ~75 us per query (~1.5 ns per item and query:
numba emits 8-wide AVX2 with the query coefficients spilled, about a quarter of the FMA peak), the
rescan of the ~26 candidate blocks ~23 us (their tiles are out of cache by then). Blocks of 256
made that rescan cost as much as the maxima; per-lane maxima (16 per block) wrote 16x more and
lost at 1M. The rescan was a loop over the width until session 14; generated like the maxima it
went from 25 to 7 us per query with the tiles in cache (10k random items, B = 64) and from 34 to
16 us at 70k, 49 to 30 us at 200k (out of cache: what remains is memory), which made the whole
exact flat path 1.09 / 1.15 / 1.17x faster on the server's 70k bank at B = 8 / 16 / 64 and 1.02 /
1.06 / 1.06x on the 200k VAE bank (box queries; one process, the two rescans alternated in 7
rounds; identical answers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np

from latentsearch.engine.compiled import run_sliced

__all__ = [
    "BLOCK",
    "LANES",
    "MAX_WIDTH",
    "ROWS",
    "BlockTiles",
    "Kernels",
    "block_maxima",
    "block_screen",
    "kernel",
]

log = logging.getLogger(__name__)

# Items per block (one maximum each; a multiple of LANES). Measured at 70k-1M items, B = 64: 256
# made the rescan of the candidate blocks cost as much as the maxima (26 blocks of 256 items per
# query), 64 a fifth of it.
BLOCK = 64
LANES = 16  # consecutive items scored at once (two AVX2 registers of float32 per query)
ROWS = 8  # queries per pass over a block
# Tiles per pass of all the query groups (48 blocks at width 21): a chunk stays in L2 while every
# group scores it. Measured against one pass per block (random items, width 21, B = 16 and 64,
# 20k-1M items, one process, alternated): 3-11% faster, 0.79 vs 0.90 ns per item and query with
# the tiles in L1; the exact flat path 1.05-1.10x on the server's 70k bank and 1.07-1.09x on the
# 200k VAE bank (B = 8 / 16 / 64, box queries, the two kernels alternated in 7 rounds).
CHUNK_BYTES = 256 * 1024
# Widest lifted vector (2 d + 1) served: the generated function grows as ROWS * width lines and
# its compilation with it (measured: width 21 2.9 s, 33 4.6 s, 65 8.9 s, once per machine when
# cached); wider groups keep FAISS.
MAX_WIDTH = 33
CACHE_ENV = "LATENTSEARCH_KERNEL_CACHE"  # directory for the generated sources and numba's cache


class Kernels(NamedTuple):
    """The two compiled functions of one lifted width (generated by :func:`_source`).

    ``maxima(q32 (R, width), tiles (nb, width * BLOCK), out (R, nb))``: R a multiple of
    :data:`ROWS`; ``out[q, b]`` = the largest float32 score of block b.

    ``candidates(q32 (B, width), tiles, items, maxima (B, nb), t (B,), floor (B,), local (B, C),
    counts (B,)) -> int``: ``local[q, :counts[q]]`` = the items scoring >= ``floor[q]`` in the
    blocks whose maximum reaches ``t[q]`` (ascending); returns the first query with more than C
    of them, else -1.
    """

    maxima: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
    candidates: Callable[..., int]


_kernels: dict[int, Kernels] = {}
_lock = threading.Lock()


class BlockTiles:
    """A group's float32 lifted vectors in blocks of :data:`BLOCK`, dimension-major in each.

    Attributes:
        items: ``m``, the real items; positions ``>= m`` of the last block repeat item ``m - 1``
            (so a block's maximum is always a real item's score; callers drop those positions).
        tiles: ``(n_blocks, width * BLOCK)`` float32, ``tiles[b, j * BLOCK + l]`` = coordinate j of
            item ``b * BLOCK + l``.
    """

    def __init__(self, xb: np.ndarray) -> None:
        """``xb``: ``(m, width)`` float32 lifted vectors, ``m >= 1``."""
        m, width = xb.shape
        nb = -(-m // BLOCK)
        padded = np.empty((nb * BLOCK, width), dtype=np.float32)
        padded[:m] = xb
        padded[m:] = xb[m - 1]
        self.items = m
        self.tiles = np.ascontiguousarray(padded.reshape(nb, BLOCK, width).transpose(0, 2, 1)).reshape(
            nb, width * BLOCK
        )

    @property
    def blocks(self) -> int:
        return int(self.tiles.shape[0])


def _source(width: int) -> str:
    """Source of the :class:`Kernels` for lifted vectors of ``width`` coordinates.

    ``block_maxima`` scores :data:`ROWS` queries x :data:`LANES` items at a time with the query
    coefficients as scalars, over chunks of about :data:`CHUNK_BYTES` of tiles (each chunk read from
    memory once for all the query groups, the coefficients set up once per group and chunk rather
    than per block); ``candidates`` rescans a block for one query, the width unrolled the
    same way (a loop over the width kept there, as before, cost 4x: ~1 us per block of 64 items).
    """
    chunk = max(1, CHUNK_BYTES // (width * BLOCK * 4))  # blocks per pass of the query groups
    lines = [
        "import numpy as np",
        "from numba import njit",
        "",
        "",
        '@njit(cache=CACHE, nogil=True, fastmath={"contract"})',
        "def block_maxima(q32, tiles, out):",
        "    nb = tiles.shape[0]",
        f"    lanes = np.empty(({ROWS}, {LANES}), np.float32)",
        f"    for c0 in range(0, nb, {chunk}):",
        f"        c1 = min(nb, c0 + {chunk})",
        f"        for q in range(0, q32.shape[0], {ROWS}):",
    ]
    for r in range(ROWS):
        lines += [f"            a{r}_{j} = q32[q + {r}, {j}]" for j in range(width)]
    lines += [
        "            for b in range(c0, c1):",
        "                t = tiles[b]",
        "                lanes[:, :] = -np.inf",
        f"                for g in range(0, {BLOCK}, {LANES}):",
        f"                    for l in range({LANES}):",
        "                        i = g + l",
    ]
    for j in range(width):
        lines.append(f"                        x = t[{j * BLOCK} + i]")
        for r in range(ROWS):
            op = "=" if j == 0 else "+="
            lines.append(f"                        s{r} {op} a{r}_{j} * x")
    for r in range(ROWS):
        lines.append(f"                        v = lanes[{r}, l]")
        lines.append(f"                        lanes[{r}, l] = s{r} if s{r} > v else v")
    lines += [
        f"                for r in range({ROWS}):",
        "                    best = lanes[r, 0]",
        f"                    for l in range(1, {LANES}):",
        "                        v = lanes[r, l]",
        "                        best = v if v > best else best",
        "                    out[q + r, b] = best",
        "",
        "",
        '@njit(cache=CACHE, nogil=True, fastmath={"contract"})',
        "def candidates(q32, tiles, items, maxima, t, floor, local, counts):",
        "    cap = local.shape[1]",
        f"    acc = np.empty({BLOCK}, np.float32)",
        "    for q in range(q32.shape[0]):",
    ]
    lines += [f"        a{j} = q32[q, {j}]" for j in range(width)]
    lines += [
        "        tq = t[q]",
        "        fq = floor[q]",
        "        c = 0",
        "        for b in range(tiles.shape[0]):",
        "            if maxima[q, b] < tq:",
        "                continue",
        "            tb = tiles[b]",
        f"            for i in range({BLOCK}):",
        "                s = a0 * tb[i]",
    ]
    lines += [f"                s += a{j} * tb[{j * BLOCK} + i]" for j in range(1, width)]
    lines += [
        "                acc[i] = s",
        f"            base = b * {BLOCK}",
        f"            for i in range({BLOCK}):",
        "                if acc[i] >= fq and base + i < items:",
        "                    if c == cap:",
        "                        return q",
        "                    local[q, c] = base + i",
        "                    c += 1",
        "        counts[q] = c",
        "    return -1",
        "",
    ]
    return "\n".join(lines)


def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentsearch" / "kernels"


def _from_file(width: int, source: str) -> Kernels:
    """Import the generated source from the cache directory (numba caches beside it)."""
    text = source.replace("cache=CACHE", "cache=True")
    tag = hashlib.sha256(f"{text}\n{numba.__version__}".encode()).hexdigest()[:12]
    name = f"latentsearch_screen_w{width}_{tag}"
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)  # atomic: a concurrent process imports one whole file or the other
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OSError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(name, module)
    return Kernels(module.block_maxima, module.candidates)


def _in_memory(source: str) -> Kernels:
    namespace: dict[str, Any] = {"CACHE": False}
    exec(compile(source, "<latentsearch.engine.screen>", "exec"), namespace)  # our own generated source
    return Kernels(namespace["block_maxima"], namespace["candidates"])


def kernel(width: int) -> Kernels:
    """The compiled :class:`Kernels` for ``width`` (generated, compiled once per process)."""
    fns = _kernels.get(width)
    if fns is not None:
        return fns
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"lifted width {width} outside [1, {MAX_WIDTH}]")
    with _lock:
        fns = _kernels.get(width)
        if fns is None:
            t = time.perf_counter()
            source = _source(width)
            try:
                fns = _from_file(width, source)
                _run_once(fns, width)
            except Exception as exc:  # an unwritable cache or numba refusing to cache there
                log.debug("screen kernel for width %d not cached on disk (%s)", width, exc)
                fns = _in_memory(source)
                _run_once(fns, width)
            _kernels[width] = fns
            log.debug("screen kernel for width %d ready in %.2f s", width, time.perf_counter() - t)
    return fns


def _run_once(fns: Kernels, width: int) -> None:
    """Compile (or load) ``fns`` for the argument types :func:`block_screen` passes."""
    q = np.zeros((ROWS, width), np.float32)
    tiles = np.zeros((1, width * BLOCK), np.float32)
    maxima = np.empty((ROWS, 1), np.float32)
    fns.maxima(q, tiles, maxima)
    t = np.zeros(ROWS, np.float32)
    local = np.empty((ROWS, BLOCK), np.int64)
    fns.candidates(q, tiles, 1, maxima, t, t - 1, local, np.zeros(ROWS, np.int64))


def block_maxima(q32: np.ndarray, tiles: BlockTiles, threads: int = 1) -> np.ndarray:
    """``(B, n_blocks)`` float32: the largest float32 score ``<q_b, x_i>`` in each block.

    Args:
        q32: ``(B, width)`` float32 lifted queries (finite).
        tiles: the items.
        threads: the queries are split into this many slices (of whole ``ROWS``) run in parallel.
    """
    nq, width = q32.shape
    fn = kernel(width).maxima
    rows = -(-nq // ROWS) * ROWS
    q = np.zeros((rows, width), dtype=np.float32)  # padding rows' maxima are dropped
    q[:nq] = q32
    out = np.empty((rows, tiles.blocks), dtype=np.float32)
    run_sliced(lambda a, b: fn(q[a:b], tiles.tiles, out[a:b]), rows, threads, step=ROWS)
    return out[:nq]


def block_screen(
    q32: np.ndarray, tiles: BlockTiles, kg: int, slack: np.ndarray, cap: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every item whose float32 score may reach t, the ``kg``-th largest block maximum per query.

    Args:
        q32: ``(B, width)`` float32 lifted queries (finite).
        tiles: the group's items; requires ``tiles.blocks >= kg``.
        kg: candidates wanted per query.
        slack: ``(B,)`` float64, at least twice the bound on a float32 score's error for each query.
        cap: most candidates per query; past it ``None`` (scores too flat to screen this way).
        threads: the queries are split into this many slices run in parallel.

    Returns:
        ``local (B, C)`` int64 local ids (-1 padding), at least ``kg`` per query, and ``t (B,)``
        float64 such that every other item has a float32 score ``< t``; or ``None``.
    """
    q32 = np.ascontiguousarray(q32, dtype=np.float32)
    nq, nb = q32.shape[0], tiles.blocks
    maxima = block_maxima(q32, tiles, threads)  # (B, nb)
    t = np.partition(maxima, nb - kg, axis=1)[:, nb - kg]  # (B,) float32
    floor = (t.astype(np.float64) - slack).astype(np.float32)
    floor = np.nextafter(floor, np.float32(-np.inf))  # rounding t - slack must not raise it
    local = np.full((nq, cap), -1, dtype=np.int64)
    counts = np.zeros(nq, dtype=np.int64)
    over = np.zeros(nq, dtype=bool)

    candidates = kernel(q32.shape[1]).candidates

    def run(a: int, b: int) -> None:
        arrays = (q32[a:b], tiles.tiles, tiles.items, maxima[a:b], t[a:b], floor[a:b])
        over[a] = candidates(*arrays, local[a:b], counts[a:b]) >= 0

    run_sliced(run, nq, threads)
    if over.any():
        return None
    return local[:, : max(int(counts.max()), 1)], t.astype(np.float64)

"""Compiled exact branch and bound over the approximate index's partitions (numba).

One fused loop per query, no Python, numpy temporaries or FAISS heap in it:

1. an upper bound of the per-dimension (mu, sigma) box bound of every partition
   (``approx._dimension_bound``: with D the distance from z_j to [lo_j, hi_j],
   ``max_sigma in [slo, shi] -D^2/(2 sigma^2) - log sigma`` in closed form), without logarithms so
   the loop vectorises, read from a float32 box rounded outward (:func:`_loose_bounds`), plus the
   rounding margin the Python path adds;
2. the partitions in buckets of that bound, best first (:func:`_bucket_order`, a counting sort:
   O(P), where a binary heap's build and pops cost 2-3x more); optionally (approximate search)
   first the ``first`` partitions of best centroid posterior (buckets of the centroid score, each
   bucket sorted as it is reached, so the order is exact); the items of each scanned partition
   scored in float64 (item-major rows, see :func:`_quad`), a partition whose
   best item is below the k-th score skipped in one vectorised pass, the others into a top-k
   min-heap;
3. stop when the current bucket's largest bound is below the k-th score (exact; a partition of
   the current bucket below it is skipped), or after ``max_visits`` partitions (approximate).

Measured (the old and the new kernel side by side in one process, 200k Fashion-MNIST VAE
posteriors, d = 10, one core, the other core busy): the bucket order, the skipped partitions, the
float32 box and an inlined item loop took the exact search from 790-1,690 us to 500-1,030 us per
query (1.55-1.65x; box, prior, posterior and uniform [-5, 5] queries, the same partitions scanned
and the same answers).
What it costs now, per query (200k, one core): the bounds (~8-11 ns per partition), the
bucket order (~5-6 ns per partition), then the scan: ~0.37 us per scanned partition (~37 items)
while its rows are in cache, 1.3-1.8 us from memory (the same query repeated vs fresh ones); exact
search scans 6-20% of the partitions. The scan reads each partition's rows as one contiguous,
item-major run of ``mu`` and ``1/sigma`` (:func:`_quad`): the earlier per-partition ``(d, n_p)``
blocks, read dimension by dimension, cost 2-4x more per item (18-41 vs 8-9 ns at d = 10, in and
out of cache) and made the kernel 1.2-1.7x slower at 1M items (box, prior, posterior queries of a
Fashion-MNIST VAE bank; 1.0-1.3x at 200k, where more of the bank stays in cache). What is left is
memory latency: partitions are visited in bound order, scattered over the bank; software prefetch
of the next partitions (llvm.prefetch, 1-4 partitions ahead) gained 0-7% and huge pages 15% in
a 2M-item test. Fewer bytes did not pay either: a float32 screen of each partition (float32 copies
of mu and 1/sigma, a rigorous lower bound ``Q >= (1 - 2^-10)(1 - 2^-22) Q32 - 1023 ||e||^2`` with
``e_j`` the rounding's shift of ``u_j``, the few items whose bound reaches the k-th score rescored
from the float64 rows) was 0.95-1.0x at 1M and 0.7-0.85x at 200k in an A/B in one session (same
visits, same answers): the scattered partitions cost their latency, not their bytes, and the screen
adds work per item. The exact box bound with logarithms, once computed for each partition about to be
scanned, pruned 1 of 785 scans and cost 10%: dropped.

Not done, measured: bounding coarse cells of partitions first (each cell's box the union of its
partitions' boxes, expanded best bound first through one heap of cells and partitions). On that
bank, for the k-th score an exact search ends with, 64-69 of 73 cells (k-means of the partitions'
box centres, ~sqrt(L) cells), 214-234 of 300, 311-507 of 1,000 still had a bound above it (about
what a random grouping gives: a union box is much looser than its members), and grouping by the
partitions' bounds at sample queries did no better; CPU time per query was 0-30% worse than the
flat pass over every partition at every cell count tried. The per-query cost is the scan of the
survivors (~1.2 us each) as much as the bounds.

A batch of exact queries (:func:`_search_batched`, from ``BATCH_MIN`` queries per thread) pays
that latency once per partition rather than once per query: each query computes its bounds and
scans its ``BATCH_LEAD`` partitions of best bound first, then the partitions are taken in memory
order, each scanned for every query whose bound for it is still at least its k-th score. It scans
5-25% more partitions than the best-first order, and at B = 64 it took 0.38 -> 0.23, 1.30 -> 0.52
and 0.80 -> 0.41 ms per query (box, prior, posterior) at 200k items and 1.28 -> 0.82, 4.16 -> 1.79,
2.74 -> 1.31 ms at 1M (A/B in one session, Fashion-MNIST VAE bank); ``BATCH_LEAD`` 4-128 changed
1M figures by under 15% (16-32 best). In that pass a partition is copied once, dimension-major,
for all the queries that scan it (:func:`_quad_t`: the loop over its items vectorises, each sum
bit for bit the item loop's): 0.73-0.84x the time of exact B = 64 searches and 0.88-0.92x of
approximate ones, the same rows (``bench.ab_kernel``, 200k items, an A/A copy within 0.98-1.02;
bench/results/ab-kernel-2026-12-02-n200000-quadt.md). An approximate batch takes the same pass
over the partitions each query chose (its ``first`` by centroid, then by bound within
``max_visits``): it gained less (before that copy), 0.79 -> 0.69, 0.92 -> 0.78, 0.95 -> 0.67 ms
per query at B = 64, 200k items, budget 0.06, the same recall (1.000 / 0.994 / 0.999; per-query
and batched in turn in one process, one core): each approximate query scans fewer partitions
(~5%), so fewer are shared, and a third of its cost is its own bounds and orders (~0.3 ms at
5,360 partitions on that machine).

Items of a partition are contiguous in a float64 copy of ``mu`` and ``1/sigma`` (:class:`KernelIndex`,
made once from the bank), the outliers the partitions leave out (small scale groups) in one more
"partition" that is always scanned. The kernel's score ``-1/2 sum(((z - mu) / sigma)^2) - sum(log
sigma) - d/2 log 2 pi`` is the formula of :class:`~latentsearch.posterior.DiagonalGaussian`, but
summed in its own order: it may differ from the engine's float64 score (the definition) by a few
ulps. So the kernel also returns ``outside``, a rigorous upper bound on the engine score of every
item it did not return (a pruned partition's bound; a scored item's kernel score plus
``SCORE_SLACK`` times its magnitude), and :meth:`KernelIndex.search` rescores the k returned items
with the engine's scorer: where the k-th engine score is above ``outside``, the top-k is the float64
brute force's, ties by row included; elsewhere (near ties with an item left out, rare) the caller
falls back to another exact path.

Threads: the kernel releases the GIL (``nogil``); a batch is split into ``threads`` contiguous
slices run on a small module thread pool. numba's own ``prange`` was not used: its default
"workqueue" threading layer aborts when two Python threads (a server's search threads) enter a
parallel region at once, and a thread pool respects the engine's thread count exactly. A call of
a few queries can instead be split (``split``): the partitions cut into contiguous shares, each
searched as a bank of its own on its own thread, the shares' top-k merged (:func:`_merge_splits`,
the proof unchanged). At 10M items, 2 cores, single approximate queries 4.9-5.3 -> 3.5-3.9 ms;
exact ones 0.91-1.20x, since each share prunes with its own k-th score (the engine splits
approximate calls only, ``EngineConfig.split_min_items``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from latentsearch.engine.approx import ApproxIndex
from latentsearch.engine.compiled import jit, run_sliced
from latentsearch.engine.exact import Rescore, Selection, _topk
from latentsearch.posterior import LOG_2PI

__all__ = [
    "BATCH_MIN",
    "SCORE_SLACK",
    "KernelArrays",
    "KernelIndex",
    "KernelResult",
    "kernel_log_prob",
    "partition_key",
    "warm",
]

log = logging.getLogger(__name__)

# Relative bound on |kernel score - engine score| per item, against 0.5 sum(u^2) + |log normaliser|:
# both sum at most 2d + 2 rounded float64 terms (d <= 128 here: < 3e-14 relative); 30x that margin.
SCORE_SLACK = 1e-12
# Relative margin added to a partition's bound for float64 rounding (what approx.py adds).
_BOUND_SLACK = 1e-9
# An exact search scans this many partitions by their centroid posterior's score before the order of
# the bounds. At 200k items 8 or 32 changed no query's number of scanned partitions (the bound's
# order finds a good k-th score as fast), so none.
EXACT_FIRST = 0
_LOG_2PI = LOG_2PI
# The exact search visits partitions in buckets of their bound (a counting sort, not a heap): bucket
# of ``g = 1 + (best bound - bound) / _BUCKET_NATS`` from its float64 bits, 2^_BUCKET_BITS buckets
# per octave of g (g within 2^(1/32) ~ 2.2% share a bucket), _BUCKETS in all (the last holds every
# g past 2^(_BUCKETS / 32)); bucket 0 holds the partitions that are never pruned (+inf).
_BUCKETS = 1024
# Searches of at least BATCH_MIN queries per thread run together, partition by partition
# (_search_batched), in slices of BATCH_MAX queries (its (P, B) bounds: 19 MiB at 38k partitions),
# each query first scanning its BATCH_LEAD partitions of best bound.
BATCH_MIN = 8
BATCH_MAX = 64
BATCH_LEAD = 16
_BUCKET_BITS = 5
_BUCKET_NATS = 0.25
_ONE_BITS = 0x3FF0000000000000  # the bits of float64 1.0


# -- the compiled part ---------------------------------------------------------------------------
# Rows of the (6, d, P) float32 per-partition box array (dimension-major: loops over partitions
# vectorise), each value rounded outward (KernelIndex.__init__).
_LO, _HI, _INV_SLO2, _INV_SHI2, _LOG_SLO, _LOG_SHI = range(6)


@jit
def _loose_bounds(z: np.ndarray, box: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
    """``out (P,)``: an upper bound of the box bound of each partition for the point ``z (d,)``,
    without logarithms (so the loop over partitions vectorises): where D (the distance from z_j to
    [lo, hi]) lies strictly inside [slo, shi], ``-1/2 - log D`` is replaced by ``-1/2 - log slo``.
    -inf where ``counts`` is 0, +inf for the last partition (the outliers), rounding margin added.
    The cases are told apart by ``(D / slo)^2 <= 1`` and ``(D / shi)^2 >= 1``, products computed
    anyway (two arrays fewer to read); where rounding misplaces a D within an ulp of slo or shi,
    either formula is the maximum to second order in that ulp, far inside the margin.

    ``box (6, d, P)`` is float32 rounded outward (lo down, hi up, 1/slo^2, 1/shi^2, log slo and
    log shi down), the arithmetic float64: each case's value only grows when D shrinks or those
    values do, a perturbed case choice never lowers the value below the maximum (x_hi >= 1 with
    the rounded values implies it with the true ones; the other two cases are at least
    ``-1/2 - log slo``, the maximum over every sigma >= slo), so the bound stays an upper bound of
    the true box bound while the pass reads half the bytes (1.5x faster from 5,000 partitions)."""
    d, n_parts = box.shape[1], box.shape[2]
    for p in range(n_parts):
        out[p] = 0.0
    for j in range(d):
        zj = z[j]
        lo, hi = box[_LO, j], box[_HI, j]
        inv_slo2, inv_shi2 = box[_INV_SLO2, j], box[_INV_SHI2, j]
        log_slo, log_shi = box[_LOG_SLO, j], box[_LOG_SHI, j]
        for p in range(n_parts):
            dist = max(max(lo[p] - zj, zj - hi[p]), 0.0)
            d2 = dist * dist
            x_lo, x_hi = d2 * inv_slo2[p], d2 * inv_shi2[p]  # (D / slo)^2, (D / shi)^2
            at_lo = -0.5 * x_lo - log_slo[p]
            at_hi = -0.5 * x_hi - log_shi[p]
            inside = -0.5 - log_slo[p]
            out[p] += at_lo if x_lo <= 1.0 else (at_hi if x_hi >= 1.0 else inside)
    const = -0.5 * d * _LOG_2PI
    for p in range(n_parts):
        b = out[p] + const
        b += _BOUND_SLACK * (1.0 + abs(b))
        b = b if b == b else np.inf  # NaN (degenerate box): never prune it
        out[p] = -np.inf if counts[p] == 0 else b
    out[n_parts - 1] = np.inf if counts[n_parts - 1] > 0 else -np.inf


@njit(inline="always")
def _worse(s1: float, r1: int, s2: float, r2: int) -> bool:
    """Whether (score s1, row r1) ranks below (s2, r2): lower score, or equal score and larger row."""
    return s1 < s2 or (s1 == s2 and r1 > r2)


@njit(inline="always")
def _swap(ts: np.ndarray, tp: np.ndarray, tr: np.ndarray, a: int, b: int) -> None:
    """Exchange entries ``a`` and ``b`` of the top-k heap (score, position, row arrays)."""
    ts[a], ts[b] = ts[b], ts[a]
    tp[a], tp[b] = tp[b], tp[a]
    tr[a], tr[b] = tr[b], tr[a]


@njit(inline="always")
def _top_sift_down(ts: np.ndarray, tp: np.ndarray, tr: np.ndarray, i: int, n: int) -> None:
    """Min-heap of the top-k (worst at the root) on (score, row): move entry ``i`` down."""
    while True:
        left = 2 * i + 1
        if left >= n:
            return
        w = left
        right = left + 1
        if right < n and _worse(ts[right], tr[right], ts[left], tr[left]):
            w = right
        if not _worse(ts[w], tr[w], ts[i], tr[i]):
            return
        _swap(ts, tp, tr, i, w)
        i = w


@njit(inline="always")
def _top_push(ts: np.ndarray, tp: np.ndarray, tr: np.ndarray, n: int, s: float, i: int, r: int) -> None:
    """Add (score s, position i, row r) as entry ``n`` of the top-k min-heap and sift it up."""
    c = n
    ts[c], tp[c], tr[c] = s, i, r
    while c > 0:
        parent = (c - 1) // 2
        if not _worse(ts[c], tr[c], ts[parent], tr[parent]):
            break
        _swap(ts, tp, tr, c, parent)
        c = parent


@njit(inline="always")
def _quad(z: np.ndarray, mu_b: np.ndarray, inv_b: np.ndarray, a: int, b: int, quad: np.ndarray) -> None:
    """``quad[: b - a]``: ``sum_j ((z_j - mu_j) / sigma_j)^2`` of the positions ``a..b-1``, rows of
    ``mu_b`` / ``inv_b (M, d)`` (item-major: each partition is one contiguous run of both arrays,
    read front to back; dimensions summed in ascending order).

    Four items at a time, each with its own sum: the sums are the one-item loop's, bit for bit
    (same terms, same order), but four independent chains of additions instead of one hide the
    latency of each (5-15% faster searches, exact and approximate, B = 1 and 64, 200k items, in an
    A/B in one process; ``fastmath`` reassociation gave about the same and changes the bits)."""
    d = z.shape[0]
    n = b - a
    c = 0
    while c + 4 <= n:
        m0, m1, m2, m3 = mu_b[a + c], mu_b[a + c + 1], mu_b[a + c + 2], mu_b[a + c + 3]
        v0, v1, v2, v3 = inv_b[a + c], inv_b[a + c + 1], inv_b[a + c + 2], inv_b[a + c + 3]
        s0 = s1 = s2 = s3 = 0.0
        for j in range(d):
            zj = z[j]
            u0 = (zj - m0[j]) * v0[j]
            u1 = (zj - m1[j]) * v1[j]
            u2 = (zj - m2[j]) * v2[j]
            u3 = (zj - m3[j]) * v3[j]
            s0 += u0 * u0
            s1 += u1 * u1
            s2 += u2 * u2
            s3 += u3 * u3
        quad[c], quad[c + 1], quad[c + 2], quad[c + 3] = s0, s1, s2, s3
        c += 4
    while c < n:
        m, v = mu_b[a + c], inv_b[a + c]
        s = 0.0
        for j in range(d):
            u = (z[j] - m[j]) * v[j]
            s += u * u
        quad[c] = s
        c += 1


@njit(inline="always")
def _quad_t(z: np.ndarray, mu_t: np.ndarray, inv_t: np.ndarray, n: int, quad: np.ndarray) -> None:
    """``quad[:n]``: ``sum_j ((z_j - mu_j) / sigma_j)^2`` of the ``n`` items of ``mu_t`` / ``inv_t
    (d, >= n)`` (one partition, dimension-major: the loop over items vectorises). Each item's sum is
    :func:`_quad`'s bit for bit (the same terms added in the same, ascending order of dimensions)."""
    for c in range(n):
        quad[c] = 0.0
    for j in range(z.shape[0]):
        zj = z[j]
        m, v = mu_t[j], inv_t[j]
        for c in range(n):
            u = (zj - m[c]) * v[c]
            quad[c] += u * u


@njit(inline="always")
def _scratch(
    offsets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A search's per-query scratch for ``P = offsets.size - 1`` partitions: bound ``(P,)``, seen
    ``(P,)`` bool, order and key ``(P,)`` int64 (:func:`_bucket_order`), bucket starts
    ``(_BUCKETS + 1,)``, bucket maxima ``(_BUCKETS,)``, and quad, room for the largest partition."""
    n_parts = offsets.shape[0] - 1
    largest = 0
    for p in range(n_parts):
        largest = max(largest, offsets[p + 1] - offsets[p])
    return (
        np.empty(n_parts), np.empty(n_parts, dtype=np.bool_), np.empty(n_parts, dtype=np.int64),
        np.empty(n_parts, dtype=np.int64), np.empty(_BUCKETS + 1, dtype=np.int64), np.empty(_BUCKETS),
        np.empty(largest),
    )  # fmt: skip


@jit
def _search(
    points: np.ndarray,
    start: int,
    stop: int,
    offsets: np.ndarray,
    mu_b: np.ndarray,
    inv_b: np.ndarray,
    log_norm: np.ndarray,
    rows: np.ndarray,
    allowed: np.ndarray,
    box: np.ndarray,
    centre_t: np.ndarray,
    counts: np.ndarray,
    k: int,
    first: int,
    max_visits: int,
    out_pos: np.ndarray,
    out_score: np.ndarray,
    out_outside: np.ndarray,
    out_visits: np.ndarray,
) -> None:
    """Top-k of queries ``start..stop-1`` of ``points (B, d)``; see the module docstring.

    Args:
        offsets: ``(P + 1,)`` int64, partition p's items are positions ``offsets[p]:offsets[p+1]``.
        mu_b, inv_b: ``(M, d)`` float64 mu and 1/sigma, partition p's items rows
            ``offsets[p]:offsets[p+1]``; log_norm ``(M,)`` ``sum(log sigma) + d/2 log 2 pi``.
        rows: ``(M,)`` int64 bank row per position (tie order).
        allowed: ``(M,)`` uint8 (0: filtered out) or ``(0,)`` for no filter.
        box: ``(6, d, P)`` float32 per-partition box (rows ``_LO`` .. ``_LOG_SHI``, rounded
            outward).
        centre_t: ``(2d + 1, P)`` float64 lifted centroid posterior of each partition.
        counts: ``(P,)`` int64 (selected) items per partition.
        first: partitions scanned first in order of their centroid posterior's score (those
            whose bound is below the k-th score skipped), before the order of the bounds.
        max_visits: partitions scanned at most (-1: until the bound stops the search), more while
            fewer than k (selected) items were found.
        out_pos, out_score: ``(B, k)`` positions (-1 padding) and kernel scores, best first.
        out_outside: ``(B,)`` upper bound on the score of every item not returned.
        out_visits: ``(B,)`` partitions scanned.
    """
    n_parts = box.shape[2]
    bound, seen, order, key, starts, bmax, quad = _scratch(offsets)
    guess = np.empty(n_parts)
    ts = np.empty(k)
    tp = np.empty(k, dtype=np.int64)
    tr = np.empty(k, dtype=np.int64)
    filtered = allowed.size > 0
    for b in range(start, stop):
        z = points[b]
        _loose_bounds(z, box, counts, bound)
        n_top = 0
        outside = -np.inf  # upper bound of every item not (or no longer) in the top-k, so far
        visits = 0
        seen[:] = False
        if first > 0:  # the best centroid posteriors first: an approximate search's order
            _centroid_scores(z, centre_t, bound, guess)
            n_order = _bucket_order(guess, seen, order, key, starts, bmax)
            i = end = 0
            while i < n_order and visits < first:
                p, i, end = _next_by_centroid(order, i, end, key, starts, guess)
                seen[p] = True
                if n_top == k and bound[p] < ts[0]:
                    outside = max(outside, bound[p])
                    continue
                visits += 1
                n_top, outside = _scan_partition(
                    z, p, offsets, mu_b, inv_b, log_norm, rows, allowed, filtered, quad, ts, tp, tr, n_top, k,
                    outside,
                )  # fmt: skip
        # then best bound first (by buckets of the bound), until the bound proves the top-k
        n_order = _bucket_order(bound, seen, order, key, starts, bmax)
        i = 0
        while i < n_order:
            p = order[i]
            if n_top == k:
                cut = key[p]  # the bucket of p and every later one hold bounds <= bmax[cut]
                if bmax[cut] < ts[0]:
                    outside = max(outside, bmax[cut])
                    break
                if visits >= max_visits >= 0:  # the budget is spent (and k items found)
                    rest = -np.inf
                    for j in range(i, n_order):
                        rest = max(rest, bound[order[j]])
                    outside = max(outside, rest)
                    break
                if bound[p] < ts[0]:
                    outside = max(outside, bound[p])
                    i += 1
                    continue
            i += 1
            visits += 1
            n_top, outside = _scan_partition(
                z, p, offsets, mu_b, inv_b, log_norm, rows, allowed, filtered, quad, ts, tp, tr, n_top, k,
                outside,
            )  # fmt: skip
        out_outside[b] = outside
        out_visits[b] = visits
        _emit(ts, tp, tr, n_top, out_pos[b], out_score[b])


@jit
def _merge_splits(
    pos: np.ndarray,
    score: np.ndarray,
    outside: np.ndarray,
    visits: np.ndarray,
    rows: np.ndarray,
    log_norm: np.ndarray,
    out_pos: np.ndarray,
    out_score: np.ndarray,
    out_outside: np.ndarray,
    out_visits: np.ndarray,
) -> None:
    """The top-k of queries searched in ``S`` shares of the partitions (:meth:`KernelIndex.search`'s
    ``split``, each share searched by :func:`_search` as a bank of its own):
    ``pos``, ``score (S, B, k)``, ``outside``, ``visits (S, B)`` into ``out_pos``, ``out_score (B,
    k)``, ``out_outside``, ``out_visits (B,)``, best first, ties by row.

    Every item not returned either was left out by its share (below that share's ``outside``) or is
    a share's result ranked below the merged k-th (its kernel score plus the slack of an evicted
    entry, as :func:`_take` keeps it): ``out_outside`` is the maximum of both, so the proof of a
    split search is the proof of one search over all the partitions."""
    n_split, nq, k = pos.shape
    ts = np.empty(k)
    tp = np.empty(k, dtype=np.int64)
    tr = np.empty(k, dtype=np.int64)
    for b in range(nq):
        n_top = 0
        worst = -np.inf
        for t in range(n_split):
            worst = max(worst, outside[t, b])
            for c in range(k):
                i = pos[t, b, c]
                if i < 0:
                    break
                s, r = score[t, b, c], rows[i]
                if n_top < k:
                    _top_push(ts, tp, tr, n_top, s, i, r)
                    n_top += 1
                    continue
                if _worse(ts[0], tr[0], s, r):
                    s, i = ts[0], tp[0]
                    ts[0], tp[0], tr[0] = score[t, b, c], pos[t, b, c], r
                    _top_sift_down(ts, tp, tr, 0, k)
                worst = max(worst, s + SCORE_SLACK * (abs(s) + 2.0 * abs(log_norm[i])))
        out_outside[b] = worst
        n_visits = 0
        for t in range(n_split):
            n_visits += visits[t, b]
        out_visits[b] = n_visits
        _emit(ts, tp, tr, n_top, out_pos[b], out_score[b])


@njit(inline="always")
def _emit(
    ts: np.ndarray, tp: np.ndarray, tr: np.ndarray, n_top: int, pos: np.ndarray, score: np.ndarray
) -> None:
    """Heap sort the top-k heap's ``n_top`` entries out into ``pos``, ``score (k,)``, best first
    (-1 / -inf padding); the heap is consumed."""
    for c in range(pos.shape[0]):
        pos[c] = -1
        score[c] = -np.inf
    n = n_top
    while n > 0:
        pos[n - 1] = tp[0]
        score[n - 1] = ts[0]
        n -= 1
        ts[0], tp[0], tr[0] = ts[n], tp[n], tr[n]
        _top_sift_down(ts, tp, tr, 0, n)


@jit
def _search_batched(
    points: np.ndarray,
    start: int,
    stop: int,
    offsets: np.ndarray,
    mu_b: np.ndarray,
    inv_b: np.ndarray,
    log_norm: np.ndarray,
    rows: np.ndarray,
    allowed: np.ndarray,
    box: np.ndarray,
    centre_t: np.ndarray,
    counts: np.ndarray,
    k: int,
    first: int,
    max_visits: int,
    lead: int,
    out_pos: np.ndarray,
    out_score: np.ndarray,
    out_outside: np.ndarray,
    out_visits: np.ndarray,
) -> None:
    """The search of :func:`_search` for queries ``start..stop-1`` together, partition by
    partition: each partition is read from memory once for every query that still needs it,
    instead of once per query (the per-query search's cost is the latency of partitions scattered
    over the bank).

    Per query, first the partitions it will consider: the bounds of every partition; then its
    ``lead`` partitions (of best centroid posterior when ``first`` > 0, else of best bound bucket)
    scanned at once, as the per-query search would (a k-th score to prune with); then the rest of
    its ``first`` partitions by centroid and, in buckets of the bound, every other partition
    (exact, ``max_visits`` -1) or (approximate) those whose bound is not below the k-th score so
    far, until ``max_visits`` partitions in all. Then the partitions in memory order, each scanned
    for every query that considers it and whose bound for it is not below its k-th score at that
    moment (a partition below it is left out, its bound kept in ``outside``, as in
    :func:`_search`). A query that found fewer than k (selected) items goes on alone, best bound
    first, until it has k; the bound of every partition it never considered is kept in
    ``outside``.

    A query may scan more partitions than in the best-first order (a partition is judged against
    the k-th score found so far, not against the one the best-first order would have found by
    then), and an approximate one may scan fewer (a considered partition pruned in the pass is not
    replaced by the next by bound, and ``first`` counts the pruned ones), but the same proof
    holds. Arguments as :func:`_search`, with ``lead`` partitions scanned before the pass.
    """
    n_parts = box.shape[2]
    nq = stop - start
    bounds_t = np.empty((n_parts, nq))  # (P, B): a partition's bound for every query, contiguous
    # (P, B) 0: not considered, 1: considered, not yet scanned, 2: scanned (or pruned) before the pass
    state = np.zeros((n_parts, nq), dtype=np.uint8)
    bound, seen_q, order, key, starts, bmax, quad = _scratch(offsets)
    guess = np.empty(n_parts)
    ts = np.empty((nq, k))
    tp = np.empty((nq, k), dtype=np.int64)
    tr = np.empty((nq, k), dtype=np.int64)
    n_top = np.zeros(nq, dtype=np.int64)
    outside = np.full(nq, -np.inf)
    visits = np.zeros(nq, dtype=np.int64)
    filtered = allowed.size > 0
    for q in range(nq):
        z = points[start + q]
        _loose_bounds(z, box, counts, bound)
        for p in range(n_parts):
            bounds_t[p, q] = bound[p]
        seen_q[:] = False
        taken = 0
        if first > 0:  # the best centroid posteriors first: an approximate search's order
            _centroid_scores(z, centre_t, bound, guess)
            n_order = _bucket_order(guess, seen_q, order, key, starts, bmax)
            i = end = 0
            while i < n_order and taken < first:
                p, i, end = _next_by_centroid(order, i, end, key, starts, guess)
                seen_q[p] = True
                taken += 1
                if taken > lead:
                    state[p, q] = 1
                    continue
                state[p, q] = 2
                if n_top[q] == k and bound[p] < ts[q, 0]:
                    outside[q] = max(outside[q], bound[p])
                    continue
                visits[q] += 1
                n_top[q], outside[q] = _scan_partition(
                    z, p, offsets, mu_b, inv_b, log_norm, rows, allowed, filtered, quad, ts[q], tp[q],
                    tr[q], n_top[q], k, outside[q],
                )  # fmt: skip
        n_order = _bucket_order(bound, seen_q, order, key, starts, bmax)
        i = 0
        if first == 0:
            while i < min(lead, n_order):
                p = order[i]
                i += 1
                state[p, q] = 2
                taken += 1
                visits[q] += 1
                n_top[q], outside[q] = _scan_partition(
                    z, p, offsets, mu_b, inv_b, log_norm, rows, allowed, filtered, quad, ts[q], tp[q],
                    tr[q], n_top[q], k, outside[q],
                )  # fmt: skip
        if max_visits < 0:
            for j in range(i, n_order):
                state[order[j], q] = 1
            continue
        while i < n_order and taken < max_visits:
            p = order[i]
            i += 1
            if n_top[q] == k:
                if bmax[key[p]] < ts[q, 0]:  # this bucket and every later one: below the k-th
                    break
                if bound[p] < ts[q, 0]:
                    continue
            state[p, q] = 1
            taken += 1
    d = points.shape[1]
    mu_t = np.empty((d, quad.shape[0]))  # (d, n_p) the partition being scanned, dimension-major
    inv_t = np.empty((d, quad.shape[0]))
    need = np.empty(nq, dtype=np.int64)
    for p in range(n_parts):
        m = 0  # the queries that scan p (a query's check depends on its own top-k only)
        for q in range(nq):
            if state[p, q] != 1:
                continue
            b = bounds_t[p, q]
            if n_top[q] == k and b < ts[q, 0]:
                outside[q] = max(outside[q], b)
                continue
            need[m] = q
            m += 1
        if m == 0:
            continue
        lo_i, hi_i = offsets[p], offsets[p + 1]
        for c in range(hi_i - lo_i):
            for j in range(d):
                mu_t[j, c] = mu_b[lo_i + c, j]
                inv_t[j, c] = inv_b[lo_i + c, j]
        for t in range(m):
            q = need[t]
            visits[q] += 1
            _quad_t(points[start + q], mu_t, inv_t, hi_i - lo_i, quad)
            n_top[q], outside[q] = _take(
                lo_i, hi_i, log_norm, rows, allowed, filtered, quad, ts[q], tp[q], tr[q], n_top[q], k,
                outside[q],
            )  # fmt: skip
    if max_visits >= 0:
        for q in range(nq):
            if n_top[q] < k:  # too few (selected) items: on alone, by bound, until k are found
                for p in range(n_parts):
                    bound[p] = bounds_t[p, q]
                    seen_q[p] = state[p, q] != 0
                n_order = _bucket_order(bound, seen_q, order, key, starts, bmax)
                for i in range(n_order):
                    if n_top[q] == k:
                        break
                    p = order[i]
                    state[p, q] = 2
                    visits[q] += 1
                    n_top[q], outside[q] = _scan_partition(
                        points[start + q], p, offsets, mu_b, inv_b, log_norm, rows, allowed, filtered, quad,
                        ts[q], tp[q], tr[q], n_top[q], k, outside[q],
                    )  # fmt: skip
            for p in range(n_parts):  # what it never considered: bounded by the bound
                if state[p, q] == 0:
                    outside[q] = max(outside[q], bounds_t[p, q])
    for q in range(nq):
        out_outside[start + q] = outside[q]
        out_visits[start + q] = visits[q]
        _emit(ts[q], tp[q], tr[q], n_top[q], out_pos[start + q], out_score[start + q])


@njit(inline="always")
def _sort_descending(order: np.ndarray, a: int, b: int, key: np.ndarray) -> None:
    """Reorder ``order[a:b]`` by ``key[order[.]]``, largest first."""
    if b - a > 1:
        part = order[a:b].copy()
        by = np.argsort(-key[part])
        for t in range(b - a):
            order[a + t] = part[by[t]]


@njit(inline="always")
def _next_by_centroid(
    order: np.ndarray, i: int, end: int, key: np.ndarray, starts: np.ndarray, guess: np.ndarray
) -> tuple[int, int, int]:
    """The partition at ``order[i]`` of a bucket order by centroid score (:func:`_bucket_order` of
    ``guess``), each bucket sorted best first as it is reached (``end``: the end of the bucket
    sorted so far, 0 at the start), so the order is exact; returns it, ``i + 1`` and ``end``."""
    if i == end:  # a new bucket: its partitions by centroid score, best first
        end = starts[key[order[i]]]
        _sort_descending(order, i, end, guess)
    return order[i], i + 1, end


@njit(inline="always")
def _bucket_order(
    bound: np.ndarray,
    seen: np.ndarray,
    order: np.ndarray,
    key: np.ndarray,
    starts: np.ndarray,
    bmax: np.ndarray,
) -> int:
    """The partitions not ``seen`` whose ``bound (P,)`` is above -inf, in ``order[:n]`` by bucket of
    the bound, best bucket first (within a bucket, by partition); returns n.

    ``key (P,)`` receives each partition's bucket and ``bmax (_BUCKETS,)`` each bucket's largest
    bound; ``starts (_BUCKETS + 1,)`` is scratch. The bucket is a non-decreasing function of the
    computed ``g`` (float rounding is monotone, and so are the bits of positive floats), so every
    partition of a later bucket has a bound at most ``bmax`` of an earlier one: the search stops
    once the current bucket's ``bmax`` is below the k-th score. Cost O(P + _BUCKETS), no branches
    on the order of the bounds (a binary heap's build and pops cost 2-3x more at 5,000 partitions).
    """
    n_parts = bound.shape[0]
    best = -np.inf
    for p in range(n_parts):
        if bound[p] < np.inf and not seen[p]:
            best = max(best, bound[p])
    for c in range(_BUCKETS + 1):
        starts[c] = 0
    for c in range(_BUCKETS):
        bmax[c] = -np.inf
    shift = 52 - _BUCKET_BITS
    g = np.empty(1)
    gi = g.view(np.int64)
    for p in range(n_parts):
        b = bound[p]
        if seen[p] or b == -np.inf:
            key[p] = -1
            continue
        if b == np.inf:
            c = 0
        else:
            g[0] = 1.0 + (best - b) * (1.0 / _BUCKET_NATS)
            c = min(_BUCKETS - 1, 1 + ((gi[0] - _ONE_BITS) >> shift))
        key[p] = c
        starts[c + 1] += 1
        bmax[c] = max(bmax[c], b)
    for c in range(_BUCKETS):
        starts[c + 1] += starts[c]
    n = starts[_BUCKETS]
    for p in range(n_parts):  # starts[c] ends as the end of bucket c
        c = key[p]
        if c >= 0:
            order[starts[c]] = p
            starts[c] += 1
    return n


@jit
def _centroid_scores(z: np.ndarray, centre_t: np.ndarray, bound: np.ndarray, out: np.ndarray) -> None:
    """``out (P,)``: log q(z | centroid posterior) of each partition (``centre_t (2d + 1, P)``, lifted,
    dimension-major), -inf where ``bound`` is (nothing selected), +inf for the outliers (last)."""
    d, n_parts = z.shape[0], bound.shape[0]
    for p in range(n_parts):
        out[p] = centre_t[2 * d, p]
    for j in range(d):
        z2, zj = z[j] * z[j], z[j]
        a, c = centre_t[j], centre_t[d + j]
        for p in range(n_parts):
            out[p] += a[p] * z2 + c[p] * zj
    for p in range(n_parts):
        if bound[p] == -np.inf:
            out[p] = -np.inf
    out[n_parts - 1] = np.inf if bound[n_parts - 1] > -np.inf else -np.inf


@njit(inline="always")
def _scan_partition(
    z: np.ndarray,
    p: int,
    offsets: np.ndarray,
    mu_b: np.ndarray,
    inv_b: np.ndarray,
    log_norm: np.ndarray,
    rows: np.ndarray,
    allowed: np.ndarray,
    filtered: bool,
    quad: np.ndarray,
    ts: np.ndarray,
    tp: np.ndarray,
    tr: np.ndarray,
    n_top: int,
    k: int,
    outside: float,
) -> tuple[int, float]:
    """Score partition ``p``'s (selected) items into the top-k heap; the new heap size and bound on
    the items left out."""
    _quad(z, mu_b, inv_b, offsets[p], offsets[p + 1], quad)
    return _take(
        offsets[p], offsets[p + 1], log_norm, rows, allowed, filtered, quad, ts, tp, tr, n_top, k, outside
    )


@njit(inline="always")
def _take(
    lo_i: int,
    hi_i: int,
    log_norm: np.ndarray,
    rows: np.ndarray,
    allowed: np.ndarray,
    filtered: bool,
    quad: np.ndarray,
    ts: np.ndarray,
    tp: np.ndarray,
    tr: np.ndarray,
    n_top: int,
    k: int,
    outside: float,
) -> tuple[int, float]:
    """The (selected) items of positions ``lo_i..hi_i-1``, whose ``quad[: hi_i - lo_i]`` is computed,
    into the top-k heap; the new heap size and bound on the items left out."""
    if n_top == k and not filtered:  # most scanned partitions hold no item above the k-th score
        best = -np.inf
        top = -np.inf
        for c in range(hi_i - lo_i):
            ln = log_norm[lo_i + c]
            s = -0.5 * quad[c] - ln
            best = max(best, s)
            top = max(top, s + SCORE_SLACK * (0.5 * quad[c] + abs(ln)))
        if best < ts[0]:  # none enters (a tie would, by row): only the bound on those left out
            return n_top, max(outside, top)
    for c in range(hi_i - lo_i):
        i = lo_i + c
        if filtered and allowed[i] == 0:
            continue
        s = -0.5 * quad[c] - log_norm[i]
        r = rows[i]
        if n_top < k:
            _top_push(ts, tp, tr, n_top, s, i, r)
            n_top += 1
        elif _worse(ts[0], tr[0], s, r):  # better than the k-th: evict it
            e = tp[0]
            outside = max(outside, ts[0] + SCORE_SLACK * (abs(ts[0]) + 2.0 * abs(log_norm[e])))
            ts[0], tp[0], tr[0] = s, i, r
            _top_sift_down(ts, tp, tr, 0, k)
        else:
            outside = max(outside, s + SCORE_SLACK * (0.5 * quad[c] + abs(log_norm[i])))
    return n_top, outside


@jit
def _log_prob(
    z: np.ndarray, mu_b: np.ndarray, inv_b: np.ndarray, offsets: np.ndarray, log_norm: np.ndarray
) -> np.ndarray:
    """``(M,)`` kernel score of every position for one point ``z (d,)`` (the loop of :func:`_search`)."""
    out = np.empty(log_norm.shape[0])
    for p in range(offsets.shape[0] - 1):
        a, b = offsets[p], offsets[p + 1]
        _quad(z, mu_b, inv_b, a, b, out[a:b])
    return -0.5 * out - log_norm


_warm_lock = threading.Lock()
_warmed = False


def warm() -> float:
    """Compile (or load from numba's cache) the kernel on a tiny input, once per process.

    Returns the seconds it took (0 once warm); logged at DEBUG.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return 0.0
        t = time.perf_counter()
        mu = np.array([[0.0, 0.0], [1.0, 0.5], [-1.0, 2.0], [3.0, -1.0]])
        ls = np.zeros((4, 2))
        box = np.array([[[0.0, 0.0], [-1.0, 2.0]], [[1.0, 0.5], [-1.0, 2.0]]])  # lo, hi per partition
        ones = np.ones((2, 2))
        lists = np.array([0, 0, 1, -1], dtype=np.int32)
        index = KernelIndex(mu, ls, lists, 2, box[0], box[1], ones, ones)
        # and as loaded: the saved arrays memory-mapped read-only (another compiled signature,
        # otherwise compiled in the first query after a load: seconds)
        frozen = {}
        for name, value in asdict(index.arrays).items():
            frozen[name] = value.copy()
            frozen[name].setflags(write=False)
        loaded = KernelIndex(mu, ls, lists, 2, box[0], box[1], ones, ones, arrays=KernelArrays(**frozen))
        for idx in (index, loaded):
            idx.search(mu[:1], 2, max_visits=-1)
            idx.search(mu[:1], 2, max_visits=-1, split=2)
            idx.search(mu[:1], 2, max_visits=1, first=1)
            idx.search(mu[:2], 2, batched=True)
            idx.search(mu[:2], 2, max_visits=1, first=1, batched=True)
        _in_order(np.zeros((1, 2), dtype=np.int64), np.zeros((1, 2)))
        kernel_log_prob(index, mu[0])
        _warmed = True
        took = time.perf_counter() - t
    log.debug("search kernel compiled or loaded in %.2f s", took)
    return took


def kernel_log_prob(index: KernelIndex, z: np.ndarray) -> np.ndarray:
    """The kernel's own score of every position of ``index`` for one point ``z (d,)``, ``(M,)``
    (position order: bank rows ``index.rows``), for tests."""
    z = np.ascontiguousarray(z, dtype=np.float64)
    return np.asarray(_log_prob(z, index.mu_b, index.inv_b, index.offsets, index.log_norm))


# -- the Python side -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class KernelResult:
    """One batch's top-k from the kernel.

    Attributes:
        rows, scores: ``(B, k)`` int64 bank rows and float64 engine scores, best first, ties by row
            (-1 / -inf padding).
        certified: ``(B,)`` bool, the top-k is provably the float64 brute force's.
        visits: ``(B,)`` int64 partitions scanned.
    """

    rows: np.ndarray
    scores: np.ndarray
    certified: np.ndarray
    visits: np.ndarray


@jit
def _in_order(rows: np.ndarray, scores: np.ndarray) -> bool:
    """Whether every row of ``(B, k)`` results is already best first: score descending, then row
    ascending, padding (row -1, score -inf) last (what ``_topk`` would return; it costs ~4x more,
    the numpy form of this check ~10x more per query)."""
    for b in range(rows.shape[0]):
        for c in range(rows.shape[1] - 1):
            s0, s1, r0, r1 = scores[b, c], scores[b, c + 1], rows[b, c], rows[b, c + 1]
            if not (s0 > s1 or (s0 == s1 and (r0 < r1 or r1 < 0))):
                return False
    return True


@dataclass(frozen=True, eq=False)
class KernelArrays:
    """The bank in the kernel's order: the part of a :class:`KernelIndex` that costs O(N d) to make
    (a sort and a gather of the bank), saved beside an engine and memory-mapped on load.

    Attributes:
        rows: ``(M,)`` int64 bank row of every position, by partition (the outliers last).
        mu_b, inv_b: ``(M, d)`` float64 mu and 1/sigma, one row per position.
        log_norm: ``(M,)`` float64 ``sum(log sigma) + d/2 log 2 pi`` per position.
    """

    rows: np.ndarray
    mu_b: np.ndarray
    inv_b: np.ndarray
    log_norm: np.ndarray


def partition_key(list_of_row: np.ndarray, nlist: int) -> np.ndarray:
    """``(N,)`` int64 kernel partition of every row: its list, or ``nlist`` (the outliers' partition,
    scanned always) for rows outside the partitions (``list_of_row`` -1)."""
    return np.where(list_of_row < 0, nlist, list_of_row).astype(np.int64)


def _round_f32(values: np.ndarray, *, down: bool) -> np.ndarray:
    """float64 ``values`` as float32 rounded down (or up): the nearest float32 not above (below)
    each value; out of range: +-inf or the largest finite float32 on the right side; NaN stays."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        out = values.astype(np.float32)
        wrong = out > values if down else out < values
        out[wrong] = np.nextafter(out[wrong], np.float32(-np.inf if down else np.inf))
    return out


class _Share(NamedTuple):
    """Partitions ``lo..hi-1`` of a :class:`KernelIndex` as an index of their own for :func:`_search`
    (positions stay the whole index's): their ``offsets (n + 2,)``, ``box (6, d, n + 1)`` and
    ``centre_t (2d + 1, n + 1)`` copied contiguous, and as their last partition (what
    :func:`_search` scans always: the outliers) the index's outliers when the share ends the index,
    else an empty one (never scanned)."""

    lo: int
    hi: int
    last: bool
    offsets: np.ndarray
    box: np.ndarray
    centre_t: np.ndarray

    @classmethod
    def of(cls, index: KernelIndex, lo: int, hi: int) -> _Share:
        n_parts = index.box.shape[2]
        if hi == n_parts:
            return cls(
                lo, hi, True, index.offsets[lo : hi + 1].copy(),
                np.ascontiguousarray(index.box[:, :, lo:hi]), np.ascontiguousarray(index.centre_t[:, lo:hi]),
            )  # fmt: skip
        offsets = np.append(index.offsets[lo : hi + 1], index.offsets[hi])  # the empty last partition
        box = np.concatenate([index.box[:, :, lo:hi], index.box[:, :, -1:]], axis=2)
        centre_t = np.concatenate([index.centre_t[:, lo:hi], index.centre_t[:, -1:]], axis=1)
        return cls(lo, hi, False, offsets, np.ascontiguousarray(box), np.ascontiguousarray(centre_t))

    def counts(self, counts: np.ndarray) -> np.ndarray:
        """This share's ``(n + 1,)`` slice of the index's (selected) items per partition."""
        if self.last:
            return counts[self.lo : self.hi]
        return np.append(counts[self.lo : self.hi], 0)


class KernelIndex:
    """The bank reordered by partition for :func:`_search`; see the module docstring.

    Args:
        mu, log_sigma: ``(N, d)`` float64 bank posteriors.
        list_of_row: ``(N,)`` partition of every row, -1 for rows outside the partitions (scanned
            always, as one more partition).
        nlist: number of partitions L.
        lo, hi, slo, shi: ``(L, d)`` float64 per-partition box of mu and of sigma.
        centroids: ``(L, 2d + 1)`` lifted centroid posterior of each partition (the order of an
            approximate search); None: zeros.
        arrays: the bank in this order as saved with an engine (:attr:`arrays` of an index made
            from the same bank and partitions); None: made from ``mu`` and ``log_sigma``.

    Attributes:
        rows: ``(M,)`` int64 bank row of every position; offsets ``(L + 2,)``.
        mu_b, inv_b: ``(M, d)`` float64 mu and 1/sigma, partition p's items rows
            ``offsets[p]:offsets[p+1]``; log_norm ``(M,)``.
        box: ``(6, d, L + 1)`` float32 per-partition mu and sigma boxes, in the forms the bound
            uses, rounded outward.
    """

    def __init__(
        self,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        list_of_row: np.ndarray,
        nlist: int,
        lo: np.ndarray,
        hi: np.ndarray,
        slo: np.ndarray,
        shi: np.ndarray,
        centroids: np.ndarray | None = None,
        *,
        arrays: KernelArrays | None = None,
    ) -> None:
        d = mu.shape[1]
        key = partition_key(list_of_row, nlist)
        sizes = np.bincount(key, minlength=nlist + 1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if arrays is None:
            order = np.argsort(key, kind="stable").astype(np.int64)
            self.rows = order
            self.mu_b = np.ascontiguousarray(np.asarray(mu, dtype=np.float64)[order])
            ls = np.asarray(log_sigma, dtype=np.float64)[order]
            self.inv_b = np.exp(-ls)
            self.log_norm = ls.sum(-1) + 0.5 * d * LOG_2PI
        else:  # saved with the engine (memory-mapped on load): checked by the caller
            self.rows, self.mu_b, self.inv_b = arrays.rows, arrays.mu_b, arrays.inv_b
            self.log_norm = arrays.log_norm
        # the outliers' "partition" (last) is always scanned: its box is a placeholder
        one = np.ones((1, d))
        lo_a, hi_a = np.concatenate([lo, -one]), np.concatenate([hi, one])
        # partitions hold no float64-only item (sigma this small lifts past float32): clipping keeps
        # 1 / slo^2 finite
        slo_a, shi_a = np.concatenate([np.maximum(slo, 1e-150), one]), np.concatenate([shi, one])
        rounded = [
            _round_f32(lo_a, down=True), _round_f32(hi_a, down=False),
            _round_f32(1.0 / (slo_a * slo_a), down=True), _round_f32(1.0 / (shi_a * shi_a), down=True),
            _round_f32(np.log(slo_a), down=True), _round_f32(np.log(shi_a), down=True),
        ]  # fmt: skip
        self.box = np.ascontiguousarray(np.stack([a.T for a in rounded]))  # (6, d, P) float32
        centre = np.zeros((nlist + 1, 2 * d + 1))
        if centroids is not None:
            centre[:nlist] = centroids
        self.centre_t = np.ascontiguousarray(centre.T)  # (2d + 1, P)
        self.sizes = sizes.astype(np.int64)
        self.d = d
        self._filters: weakref.WeakKeyDictionary[Selection, tuple[np.ndarray, np.ndarray]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._share_cache: dict[int, list[_Share]] = {}

    @classmethod
    def of_approx(
        cls, mu: np.ndarray, log_sigma: np.ndarray, approx: ApproxIndex, *, arrays: KernelArrays | None = None
    ) -> KernelIndex:
        """The kernel's index over the bank ``mu``, ``log_sigma`` ``(N, d)`` and its partitions."""
        centroids = approx.ivf.quantizer.reconstruct_n(0, approx.nlist).astype(np.float64)
        return cls(
            mu, log_sigma, approx.list_of_row, approx.nlist, approx.lo, approx.hi, approx.slo, approx.shi,
            centroids, arrays=arrays,
        )  # fmt: skip

    @property
    def arrays(self) -> KernelArrays:
        """What an engine saves of this index (the rest is remade from the partitions at load)."""
        return KernelArrays(rows=self.rows, mu_b=self.mu_b, inv_b=self.inv_b, log_norm=self.log_norm)

    @property
    def nbytes(self) -> int:
        return int(self.mu_b.nbytes + self.inv_b.nbytes + self.log_norm.nbytes + self.rows.nbytes)

    def _shares(self, split: int) -> list[_Share]:
        """The partitions cut into ``split`` contiguous shares (at most one per partition), made once
        per count."""
        with self._lock:
            found = self._share_cache.get(split)
        if found is None:
            n_parts = self.box.shape[2]
            cuts = np.unique(np.linspace(0, n_parts, min(split, n_parts) + 1).astype(np.int64))
            found = [_Share.of(self, int(lo), int(hi)) for lo, hi in itertools.pairwise(cuts.tolist())]
            with self._lock:
                found = self._share_cache.setdefault(split, found)
        return found

    def _filter(self, selection: Selection | None) -> tuple[np.ndarray, np.ndarray]:
        """``allowed (M,)`` uint8 (``(0,)`` without a filter) and ``counts (L + 1,)`` int64."""
        if selection is None:
            return np.zeros(0, dtype=np.uint8), self.sizes
        with self._lock:
            found = self._filters.get(selection)
        if found is None:
            allowed = np.ascontiguousarray(selection.mask[self.rows], dtype=np.uint8)
            cum = np.concatenate([[0], np.cumsum(allowed, dtype=np.int64)])
            counts = cum[self.offsets[1:]] - cum[self.offsets[:-1]]
            found = (allowed, counts)
            with self._lock:
                found = self._filters.setdefault(selection, found)
        return found

    def search(
        self,
        points: np.ndarray,
        k: int,
        *,
        max_visits: int = -1,
        first: int | None = None,
        selection: Selection | None = None,
        rescore: Rescore | None = None,
        threads: int = 1,
        batched: bool | None = None,
        split: int = 1,
    ) -> KernelResult:
        """Top-k of ``points (B, d)`` float64 (see the module docstring).

        Args:
            k: results per query (>= 1; past the selected items, padding).
            max_visits: partitions scanned at most per query (-1: until the bound proves the top-k).
            first: partitions scanned first in order of their centroid posterior's score, then by
                bound (default: ``max_visits`` when bounded, the approximate order, else
                ``EXACT_FIRST``).
            selection: label filter (rows that may be returned).
            rescore: the engine's float64 scorer for the returned rows (None: the kernel's scores,
                certified against themselves: for callers without the engine's formula).
            threads: queries are split into this many slices run in parallel.
            batched: each thread's queries searched together, partition by partition
                (:func:`_search_batched`, in slices of ``BATCH_MAX`` queries); None: when a thread
                has at least ``BATCH_MIN`` queries (and ``split`` is 1).
            split: (not batched) every query searched in this many shares of the partitions, each
                share on its own thread, and the shares' top-k merged (:func:`_merge_splits`):
                ``first`` and ``max_visits`` are divided among the shares; ``threads`` is then
                ignored. For a single query on a large bank, where one query's scan is long enough
                to pay for a second thread's start (each share bounds and orders only its own
                partitions, but prunes with its own k-th score).
        """
        points = np.ascontiguousarray(points, dtype=np.float64)
        nq = points.shape[0]
        if first is None:
            first = max_visits if max_visits >= 0 else EXACT_FIRST
        threads = max(1, min(threads, nq))
        if batched is None:
            batched = split == 1 and nq >= BATCH_MIN * threads
        allowed, counts = self._filter(selection)
        pos = np.empty((nq, k), dtype=np.int64)
        kscore = np.empty((nq, k))
        outside = np.empty(nq)
        visits = np.empty(nq, dtype=np.int64)

        def run(a: int, b: int) -> None:
            if not batched:
                _search(
                    points, a, b, self.offsets, self.mu_b, self.inv_b, self.log_norm, self.rows, allowed,
                    self.box, self.centre_t, counts, k, first, max_visits, pos, kscore, outside,
                    visits,
                )  # fmt: skip
                return
            for c in range(a, b, BATCH_MAX):
                _search_batched(
                    points, c, min(b, c + BATCH_MAX), self.offsets, self.mu_b, self.inv_b, self.log_norm,
                    self.rows, allowed, self.box, self.centre_t, counts, k, first, max_visits, BATCH_LEAD,
                    pos, kscore, outside, visits,
                )  # fmt: skip

        if split > 1 and not batched:
            share_first = -(-first // split)
            share_visits = max_visits if max_visits < 0 else -(-max_visits // split)
            shares = self._shares(split)
            s_pos = np.empty((len(shares), nq, k), dtype=np.int64)
            s_score = np.empty((len(shares), nq, k))
            s_outside = np.empty((len(shares), nq))
            s_visits = np.empty((len(shares), nq), dtype=np.int64)

            def run_shares(a: int, b: int) -> None:
                for t in range(a, b):
                    share = shares[t]
                    _search(
                        points, 0, nq, share.offsets, self.mu_b, self.inv_b, self.log_norm, self.rows,
                        allowed, share.box, share.centre_t, share.counts(counts), k, share_first,
                        share_visits, s_pos[t], s_score[t], s_outside[t], s_visits[t],
                    )  # fmt: skip

            run_sliced(run_shares, len(shares), len(shares))
            _merge_splits(
                s_pos, s_score, s_outside, s_visits, self.rows, self.log_norm, pos, kscore, outside, visits
            )
        else:
            run_sliced(run, nq, threads)
        rows = np.where(pos >= 0, self.rows[np.maximum(pos, 0)], -1)
        if rescore is None:
            scores = kscore
        else:
            scores = rescore(np.arange(nq), np.maximum(rows, 0))
            scores[rows < 0] = -np.inf
            if not _in_order(rows, scores):  # the kernel's order is the engine's, but for near ties
                rows, scores = _topk(rows, scores, k)
        kth = scores[:, k - 1]
        certified = (kth > outside) | np.isneginf(outside)
        return KernelResult(rows=rows, scores=scores, certified=certified, visits=visits)

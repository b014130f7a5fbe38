"""Partitioning the approximate index's items by k-means on their posterior-shape features.

Two ways to give each of ``n`` items one of ``nlist`` lists, both deterministic for a seed:

* :func:`flat_partition`: one k-means with ``nlist`` centroids trained on a sample, then every item
  assigned to its nearest centroid. Assignment costs ``n x nlist x f`` per item batch: at 10M items
  and 12 sqrt(N) ~ 38,000 lists that is ~7.6e12 multiply-adds, tens of minutes on 2 cores.
* :func:`two_level_partition`: a coarse k-means with about ``sqrt(nlist)`` centroids trained on a
  sample, every item assigned to its coarse cell, then inside each cell a k-means with a share of
  the lists proportional to the cell's items, trained on (a subsample of) the cell's items and
  assigning them. Each item is compared with about ``2 sqrt(nlist)`` centroids instead of ``nlist``
  (~200x less work at 10M). An item may not be in the list of its globally nearest fine centroid
  (it is in the nearest one of its coarse cell), which only matters for partition quality: the
  engine's per-partition bounds are computed from the lists' actual members, so they stay rigorous
  for any assignment.

``features(positions)`` gives the ``(m, f)`` float32 features of the items at ``positions`` (int64,
ascending, into ``0..n-1``); the items are read through it chunk by chunk, so no ``(n, f)`` copy
of the features is ever held.

``assign(positions, centroids)``, when given, replaces the pass that assigns *every* item to its
nearest of the trained centroids (flat: the ``nlist`` centroids; two-level: the coarse cells), the
one pass whose reads and work grow with ``n`` x centroids: it returns the ``(m,)`` int64 nearest of
``centroids (k, f)`` float32 for the items at ``positions (m,)`` (int64, ascending), e.g. as Ray
tasks over the posteriors' files (``indexer/ray_build.py``). A cell's fine pass keeps assigning
locally: it assigns the features it has just read to train the cell's k-means, a larger cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import faiss
import numpy as np

from latentsearch.errors import InvalidArgumentError

__all__ = [
    "FINE_POINTS_PER_LIST",
    "TWO_LEVEL_MIN_LISTS",
    "Assign",
    "Features",
    "fine_list_counts",
    "flat_partition",
    "partition_items",
    "two_level_partition",
]

log = logging.getLogger(__name__)

Features = Callable[[np.ndarray], np.ndarray]
# (positions (m,) int64, centroids (k, f) float32) -> (m,) int64 nearest centroid (module docstring).
Assign = Callable[[np.ndarray, np.ndarray], np.ndarray]

# From this many lists up, :func:`partition_items` clusters in two levels (see the module docstring).
TWO_LEVEL_MIN_LISTS = 4096
# A cell's k-means trains on at most this many of its items per list it gets (FAISS subsamples with
# the k-means seed); at 10M items the lists average ~260 items.
FINE_POINTS_PER_LIST = 128
_CHUNK = 262_144


def partition_items(
    features: Features,
    n: int,
    nlist: int,
    *,
    sample: int,
    iters: int,
    seed: int,
    assign: Assign | None = None,
) -> np.ndarray:
    """``(n,)`` int64 list in ``[0, nlist)`` of every item: two-level k-means from
    :data:`TWO_LEVEL_MIN_LISTS` lists up, flat k-means below (arguments as :func:`flat_partition`)."""
    part = two_level_partition if nlist >= TWO_LEVEL_MIN_LISTS else flat_partition
    return part(features, n, nlist, sample=sample, iters=iters, seed=seed, assign=assign)


def flat_partition(
    features: Features,
    n: int,
    nlist: int,
    *,
    sample: int,
    iters: int,
    seed: int,
    assign: Assign | None = None,
) -> np.ndarray:
    """``(n,)`` int64 nearest of ``nlist`` k-means centroids for each of ``n`` items.

    Args:
        features: reads the ``(m, f)`` float32 features of items by position (module docstring).
        n: items; nlist: centroids, in ``[1, n]``.
        sample: k-means trains on this many items drawn without replacement (all when fewer).
        iters: k-means iterations; seed: seed of the sample and of the k-means.
        assign: assigns every item to its nearest centroid instead of this process (module
            docstring); None: :func:`_assign`.

    Raises:
        InvalidArgumentError: ``assign`` returned another shape or a centroid out of range.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    train = _sample(n, sample, seed)
    centroids = _kmeans(features(train), nlist, iters=iters, seed=seed)
    return _assign_every(features, n, centroids, assign)


def two_level_partition(
    features: Features,
    n: int,
    nlist: int,
    *,
    sample: int,
    iters: int,
    seed: int,
    assign: Assign | None = None,
) -> np.ndarray:
    """``(n,)`` int64 list in ``[0, nlist)`` of each of ``n`` items, by two-level k-means.

    About ``sqrt(nlist)`` coarse cells (k-means trained on ``sample`` items), every item assigned
    to its nearest cell; cell ``c`` gets :func:`fine_list_counts` lists, numbered consecutively
    cell after cell, and a k-means of that many centroids trained on at most
    :data:`FINE_POINTS_PER_LIST` of its items per list (seed ``seed + 1 + c``) assigns its items.
    Arguments as :func:`flat_partition` (``assign`` assigns the items to the coarse cells).
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    n_coarse = max(1, min(nlist, round(math.sqrt(nlist))))
    train = _sample(n, sample, seed)
    coarse_centroids = _kmeans(features(train), n_coarse, iters=iters, seed=seed)
    coarse = _assign_every(features, n, coarse_centroids, assign)
    counts = np.bincount(coarse, minlength=n_coarse)
    lists = fine_list_counts(counts, nlist)
    first = np.cumsum(lists) - lists  # first list id of every cell
    order = np.argsort(coarse, kind="stable")  # positions cell by cell, ascending within a cell
    ends = np.cumsum(counts)
    out = np.empty(n, dtype=np.int64)
    for c in range(n_coarse):
        members = order[ends[c] - counts[c] : ends[c]]
        k = int(lists[c])
        if k <= 1:
            out[members] = first[c]
            continue
        x = features(members)
        centroids = _kmeans(x, k, iters=iters, seed=seed + 1 + c, max_points=FINE_POINTS_PER_LIST)
        out[members] = first[c] + _nearest(x, centroids)
    log.debug(
        "two-level k-means: %d items, %d coarse cells (%d-%d items), %d lists",
        n,
        n_coarse,
        int(counts.min()),
        int(counts.max()),
        int(lists.sum()),
    )
    return out


def fine_list_counts(counts: np.ndarray, nlist: int) -> np.ndarray:
    """``(C,)`` int64 lists per coarse cell: proportional to its ``counts (C,)`` items, at least one
    per non-empty cell, at most its items, ``nlist`` in all (requires ``nonempty <= nlist <= n``).

    Largest remainders round the proportional shares; ties go to the lower cell index.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    share = counts * (nlist / max(1, n))
    lists = np.minimum(np.maximum(np.floor(share).astype(np.int64), counts > 0), counts)
    while (left := nlist - int(lists.sum())) != 0:
        if left > 0:  # hand out the rest by largest remainder, to cells with items to spare
            room = lists < counts
            rem = np.where(room, share - lists, -np.inf)
            pick = np.argsort(-rem, kind="stable")[: min(left, int(room.sum()))]
            lists[pick] += 1
        else:  # the at-least-one rule overshot: take back from the cells with the most lists
            over = lists > 1
            rem = np.where(over, lists - share, -np.inf)
            pick = np.argsort(-rem, kind="stable")[: min(-left, int(over.sum()))]
            lists[pick] -= 1
    return lists


def _sample(n: int, sample: int, seed: int) -> np.ndarray:
    """``(m,)`` int64 ascending positions of ``min(n, sample)`` items drawn without replacement."""
    if n <= sample:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def _kmeans(x: np.ndarray, k: int, *, iters: int, seed: int, max_points: int = 1 << 30) -> np.ndarray:
    """``(k, f)`` float32 k-means centroids of ``x (m, f)`` float32 (``k <= m``)."""
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max_points,
    )
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    assert kmeans.centroids is not None  # set by train
    return np.asarray(kmeans.centroids, dtype=np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(m,)`` int64 index of the nearest (L2) of ``centroids (k, f)`` for each row of ``x (m, f)``."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64)


def _assign(features: Features, positions: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(m,)`` int64 nearest centroid of the items at ``positions (m,)``, read in chunks."""
    out = np.empty(positions.size, dtype=np.int64)
    for start in range(0, positions.size, _CHUNK):
        out[start : start + _CHUNK] = _nearest(features(positions[start : start + _CHUNK]), centroids)
    return out


def _assign_every(features: Features, n: int, centroids: np.ndarray, assign: Assign | None) -> np.ndarray:
    """``(n,)`` int64 nearest of ``centroids (k, f)`` for every item: by ``assign`` when given
    (its answer checked), else :func:`_assign` in this process."""
    positions = np.arange(n, dtype=np.int64)
    if assign is None:
        return _assign(features, positions, centroids)
    out = np.asarray(assign(positions, centroids))
    k = centroids.shape[0]
    if out.shape != (n,) or out.dtype.kind not in "iu" or (n and (out.min() < 0 or out.max() >= k)):
        raise InvalidArgumentError(
            f"assign must return ({n},) integers in [0, {k}), got {out.dtype} {out.shape}", field="assign"
        )
    return out.astype(np.int64, copy=False)

"""Approximate search: fine partitions by posterior shape, probed by their centroid posterior.

Build: items are clustered by k-means on their *posterior shape*, the per-dimension standardised
``[mu, log sigma]`` (2d features), into many small partitions (default about 12 sqrt(N), ~80
items each at N = 1M; from 4096 partitions up by two-level k-means, see engine/partition.py: at 1M
items 5x faster to build than one flat k-means, for the same recall). The build reads the bank
in chunks of rows sorted by partition, reducing each partition's bounds over contiguous runs, and
never holds an (N, 2d) copy. The lifted float32 vectors ``x = [-1/(2 sigma^2), mu/sigma^2, c]`` of each
partition form one inverted list of a FAISS ``IVF<nlist>,Flat`` inner-product index whose ids are
bank rows. Each partition is represented by the lifted vector of its *centroid posterior*
N(mean of mu, exp(mean of log sigma)^2): the coarse quantizer is a flat inner-product index over
those representatives, so a query scans first the partitions whose typical member explains z best.

Measured on 200k posteriors of a Fashion-MNIST VAE (bench/model_bank.py), scanning 3% of the items:
recall@10 0.992 box / 0.995 prior / 0.993 posterior samples with these partitions, against
0.89 / 0.99 / 0.81 for k-means on the raw lifted vectors (FAISS's usual IVF) at 2%, and 0.97 / 0.97
/ 0.92 with 6x coarser partitions at 5%. Finer partitions shift cost to the coarse quantizer
(nlist x (2d + 1) per query), which is a BLAS matrix product for batched queries.

Search: the ``nprobe`` best partitions are scanned in float32 and the best ``rerank`` candidates
are rescored exactly in float64 by the engine, log-sigma penalty included. A label filter restricts
both the partitions considered (only those holding selected items) and the scan.

Exact search over the partitions (branch and bound, ``SearchEngine`` exact mode): the scan above
gives T, the k-th exact score among its candidates, a lower bound on the true k-th score. Every
other partition whose rigorous upper bound on log q(z|x) reaches T is scanned too. Three bounds,
cheapest first:

* lifted box: ``<q, mid> + <|q|, rad>`` over the partition's box of lifted vectors (two matrix
  products for a batch of queries);
* partition-centred: with m the partition's mean mu and u = z - m, every member's score is
  ``sum_j [a_j u_j^2 + b'_j u_j] + c'`` with a = -1/(2 sigma^2), b' = (mu - m)/sigma^2 and
  c' = -sum((mu - m)^2/(2 sigma^2)) - sum(log sigma) - d/2 log 2 pi; bounding a, b' and c' over the
  members gives one matrix product plus ``sum_j |u_j| rad(b')_j`` (tight for queries near the data);
* per-dimension (mu, sigma) box, for what survives the first two:

      max_{x in P} log q(z|x)
          <= sum_j max_{mu in [lo,hi], sigma in [slo,shi]} (-(z-mu)^2/(2 sigma^2) - log sigma)
             - d/2 log 2 pi

  With D the distance from z_j to [lo_j, hi_j] the inner maximum sits at sigma* = clip(D, slo, shi)
  (for a query Gaussian N(m, s^2), D^2 becomes D^2 + s^2).

Items of a scanned partition that the float32 scan dropped score at most its last candidate plus
the float32 error bound; a query where that could reach T falls back to the flat exact scan. On
1M Fashion-MNIST VAE posteriors this scans a few % of the bank and is 20-37x faster than the numpy
brute force. With ``EngineConfig.approx_certify`` the same bounds flag approximate answers that are
provably exact.

Scale groups too small to matter (tiny-sigma outliers whose float32 scores are imprecise) are not
put in the partitions; they are searched by the certified exact path and merged.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

from latentsearch.engine.config import EngineConfig
from latentsearch.engine.exact import (
    BitmapFilter,
    ExactIndex,
    Rescore,
    ScaleGroup,
    Selection,
    _rescore_padded,
    _topk,
)
from latentsearch.engine.lifting import lift_items, lift_queries
from latentsearch.engine.partition import Assign, partition_items
from latentsearch.posterior import LOG_2PI

__all__ = [
    "ApproxIndex",
    "ApproxQuery",
    "AssignRows",
    "PartitionBounds",
    "PartitionScan",
    "default_nlist",
    "default_nprobe",
]

log = logging.getLogger(__name__)

_CHUNK = 262_144

# The build's every-item assignment, done elsewhere (e.g. as Ray tasks, indexer/ray_build.py):
# (bank rows (m,) int64 ascending, centroids (k, 2d) float32, center (2d,) float64, scale (2d,)
# float64) -> (m,) int64 nearest centroid of each row's features (f - center) / scale in float32,
# f = [mu, log sigma] in float64. See ApproxIndex.build and engine/partition.py.
AssignRows = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def default_nlist(n_items: int) -> int:
    """About ``12 sqrt(N)`` partitions, at least 16 items each on average, within [1, 65536]."""
    return int(max(1, min(65536, round(12 * math.sqrt(n_items)), n_items // 16)))


def default_nprobe(nlist: int) -> int:
    """Scan about 3% of the partitions, at least 8."""
    return int(min(nlist, max(8, math.ceil(0.03 * nlist))))


@dataclass(frozen=True, eq=False)
class ApproxQuery:
    """One batch of B queries, in every form :meth:`ApproxIndex.search` uses.

    Attributes:
        points: ``(B, d)`` float64 query points, or the means of query Gaussians.
        std: ``(B, d)`` float64 standard deviations of query Gaussians; None for point queries.
        lifted: ``(B, 2d + 1)`` float64 lifted queries (``lift_points`` / ``lift_distributions``).
        rescore: exact float64 scorer, ``rescore(query_idx (B',), rows (B', C)) -> (B', C)``,
            query indices into this batch.
        selection: the rows that may be returned (label filter); None for every row.
    """

    points: np.ndarray
    std: np.ndarray | None
    lifted: np.ndarray
    rescore: Rescore
    selection: Selection | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @cached_property
    def q32(self) -> np.ndarray:
        """``(B, 2d + 1)`` C-contiguous float32 lifted queries, what FAISS scans with."""
        return np.ascontiguousarray(self.lifted, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class PartitionScan:
    """The float32 candidates of a scan over some partitions per query.

    Attributes:
        dist: ``(B, rerank)`` float32 scores, best first (-inf padding).
        labels: ``(B, rerank)`` int64 bank rows (-1 padding).
        scanned: ``(B, L)`` bool, the partitions each query scanned.
    """

    dist: np.ndarray
    labels: np.ndarray
    scanned: np.ndarray

    def hidden(self, err: np.ndarray) -> np.ndarray:
        """``(B,)`` float64 bound on the exact score of any scanned item the scan did not keep.

        Such an item's float32 score is at most the last candidate's, so its exact score is at
        most that plus ``err (B,)``, the float32 error bound; -inf when the scan kept every item.
        """
        return np.where(self.labels[:, -1] >= 0, self.dist[:, -1].astype(np.float64) + err, -np.inf)


@dataclass(frozen=True, eq=False)
class _Needed:
    """``(M,)`` arrays of (query, partition) pairs whose upper bound reaches the query's threshold."""

    query: np.ndarray  # int64 query index in the batch
    partition: np.ndarray  # int64 partition id
    bound: np.ndarray  # float64 rigorous upper bound of log q(z|x) over the partition


class PartitionBounds:
    """Rigorous upper bounds of log q(z|x) (or its expectation) over every partition, for one batch.

    ``cheap`` holds, for every (query, partition) pair, the smaller of two bounds that cost matrix
    products: the lifted box ``<q, mid> + <|q|, rad>`` and the partition-centred bound
    ``sum_j [a_hi u_j^2 + bmid_j u_j + |u_j| brad_j] + c_hi`` (u = z - m; tight for queries near the
    data). :meth:`refine` adds the per-dimension (mu, sigma) box bound (:func:`_box_bound`) for the
    pairs asked, computing each pair once: the branch and bound of a search and the normaliser of
    its match probabilities (:mod:`latentsearch.engine.probability`) share one object.

    Attributes:
        index, query: the partitions and the batch bounded.
        cheap: ``(B, L)`` float64 bound per (query, partition), rounding margin included.
    """

    def __init__(self, index: ApproxIndex, query: ApproxQuery) -> None:
        self.index = index
        self.query = query
        points, std, queries = query.points, query.std, query.lifted
        absq = np.abs(queries)
        bound = queries @ index.lifted_mid.T + absq @ index.lifted_rad.T  # (B, L)
        bound += 1e-12 * (absq @ index.lifted_margin.T)
        centred = queries @ index.centred_w.T  # (B, L)
        m = index.centred[0]
        step = max(1, 4_000_000 // max(1, index.nlist * points.shape[1]))
        for s in range(0, points.shape[0], step):
            u = np.abs(points[s : s + step, None, :] - m[None, :, :])  # (b, L, d)
            centred[s : s + step] += np.einsum("bld,ld->bl", u, index.centred_rad)
        if std is not None:  # E|z - m| <= |mean - m| + std: add the std part of the |u| term
            centred += std @ index.centred_rad.T
        np.minimum(bound, centred, out=bound)
        bound += 1e-9 * (1.0 + np.abs(bound))
        self.cheap = bound
        self._refined = np.full(bound.shape, np.nan)  # (B, L) min(cheap, box) once computed

    def refine(self, q: np.ndarray, part: np.ndarray) -> np.ndarray:
        """``(M,)`` float64 bound for the pairs ``(q[i], part[i])``: the cheap one and the
        per-dimension box one (the lifted box is part of the cheap bound already)."""
        todo = np.flatnonzero(np.isnan(self._refined[q, part]))
        index, query = self.index, self.query
        points, std = query.points, query.std
        for s in range(0, todo.size, 1 << 18):
            t = todo[s : s + (1 << 18)]
            qs, ps = q[t], part[t]
            box = _dimension_bound(
                points[qs],
                None if std is None else std[qs],
                index.lo[ps],
                index.hi[ps],
                index.slo[ps],
                index.shi[ps],
            )
            self._refined[qs, ps] = np.minimum(self.cheap[qs, ps], box + 1e-9 * (1.0 + np.abs(box)))
        return self._refined[q, part]


@dataclass(frozen=True, eq=False)
class _PartitionFilter:
    """What a :class:`Selection` keeps of each partition.

    Attributes:
        counts: ``(L,)`` int64 selected items per partition.
        lists: selector over the partition ids holding at least one, for the coarse quantizer.
    """

    counts: np.ndarray
    lists: BitmapFilter


class ApproxIndex:
    """Partitions of lifted vectors in a FAISS IVF inner-product index, with per-partition boxes.

    Attributes:
        ivf: FAISS ``IndexIVFFlat`` (inner product) whose ids are bank rows and whose quantizer
            holds the lifted centroid posterior of every partition.
        lo, hi: ``(L, d)`` float64 per-partition bounds of mu.
        slo, shi: ``(L, d)`` float64 per-partition bounds of sigma.
        list_of_row: ``(N,)`` int32 partition of every bank row (-1: not in the partitions).
        exact_groups: scale groups searched exactly instead (outliers).
        nprobe: default partitions scanned per query.
        features: ``(2, 2d)`` float64 centre and scale of the ``[mu, log sigma]`` clustering
            features (kept so items can later be assigned the same way).
        lifted_box: ``(2, L, 2d + 1)`` float64 per-partition min and max of the lifted vectors.
        centred: ``(3, L, d)`` float64 per partition: its mean mu ``m`` and the box of
            ``(mu - m) / sigma^2``; ``centred_c``: ``(L,)`` max over members of
            ``-sum((mu - m)^2 / (2 sigma^2)) - sum(log sigma) - d/2 log 2 pi``. Together with the
            sigma box they give the partition-centred bound (see :meth:`_needed`).
    """

    def __init__(
        self,
        *,
        ivf: faiss.IndexIVF,
        lo: np.ndarray,
        hi: np.ndarray,
        slo: np.ndarray,
        shi: np.ndarray,
        list_of_row: np.ndarray,
        exact_groups: list[int],
        factory: str,
        nprobe: int,
        features: np.ndarray,
        lifted_box: np.ndarray,
        centred: np.ndarray,
        centred_c: np.ndarray,
    ) -> None:
        self.ivf = ivf
        self.lo, self.hi, self.slo, self.shi = lo, hi, slo, shi
        self.list_of_row = list_of_row
        self.exact_groups = exact_groups
        self.factory = factory
        self.nprobe = nprobe
        self.features = features
        self.lifted_box = lifted_box
        self.lifted_mid = 0.5 * (lifted_box[0] + lifted_box[1])
        self.lifted_rad = 0.5 * (lifted_box[1] - lifted_box[0])
        # (L, 2d + 1) weights of the lifted bound's rounding margin: a constant of the index, once
        # here rather than per call (at 1M items, 12,000 x 21 elements allocated per query).
        self.lifted_margin = np.abs(self.lifted_mid) + self.lifted_rad
        self.centred, self.centred_c = centred, centred_c
        # Partition-centred bound in lifted form: with u = z - m,
        #   sum_j [u_j^2 ahi_j + u_j bmid_j + |u_j| brad_j] + c_hi,  ahi = -1/(2 shi^2),
        # whose |u| part is computed elementwise and the rest as one matrix product.
        m, blo, bhi = centred
        ahi = -0.5 / (shi * shi)
        bmid, self.centred_rad = 0.5 * (blo + bhi), 0.5 * (bhi - blo)
        self.centred_w = np.concatenate(
            [ahi, bmid - 2.0 * ahi * m, ((ahi * m - bmid) * m).sum(1, keepdims=True) + centred_c[:, None]],
            axis=1,
        )  # (L, 2d + 1)
        self.list_sizes = np.bincount(list_of_row[list_of_row >= 0], minlength=lo.shape[0])
        # Per label filter: its partition counts and quantizer selector, dropped with the selection.
        self._filters: weakref.WeakKeyDictionary[Selection, _PartitionFilter] = weakref.WeakKeyDictionary()
        self._filters_lock = threading.Lock()

    @property
    def nlist(self) -> int:
        return int(self.lo.shape[0])

    def info(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "metric": "inner_product",
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "partition_features": "standardised [mu, log_sigma]",
            "items_partitioned": int(self.list_sizes.sum()),
            "exact_groups": self.exact_groups,
            "largest_list": int(self.list_sizes.max(initial=0)),
        }

    # -- build --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        config: EngineConfig,
        *,
        groups: list[ScaleGroup],
        assign_rows: AssignRows | None = None,
    ) -> ApproxIndex:
        """Cluster, bound and index the posteriors of the scale groups large enough to partition.

        Args:
            mu, log_sigma: ``(N, d)`` float64.
            groups: the exact index's scale groups; groups holding under 1% of the items (and
                under 65,536 items) stay on the exact path.
            assign_rows: assigns every partitioned item to its nearest k-means centroid (the flat
                centroids, or the coarse cells of the two-level k-means) instead of this process;
                the bounds below come from the lists' actual members, so they stay rigorous for
                any assignment. None: assigned here.
        """
        n_items, d = mu.shape
        n = 2 * d + 1
        big = [
            i for i, g in enumerate(groups) if not g.direct and (len(g) >= 65_536 or len(g) >= 0.01 * n_items)
        ]
        exact_groups = [i for i in range(len(groups)) if i not in big]
        rows = np.sort(np.concatenate([groups[i].rows for i in big])) if big else np.zeros(0, np.int64)
        nlist = config.approx_nlist or default_nlist(max(1, rows.size))
        nlist = max(1, min(nlist, max(1, rows.size)))
        center, scale = _feature_scale(mu, log_sigma, rows, d)

        def features(p: np.ndarray) -> np.ndarray:
            """``(m, 2d)`` float32 standardised ``[mu, log sigma]`` of the items at positions ``p``."""
            r = rows[p]
            f = np.concatenate([mu[r], log_sigma[r]], axis=1)
            return np.ascontiguousarray((f - center) / scale, dtype=np.float32)

        def by_rows(p: np.ndarray, centroids: np.ndarray) -> np.ndarray:
            """``assign_rows`` on the bank rows at positions ``p``."""
            assert assign_rows is not None
            return assign_rows(rows[p], centroids, center, scale)

        sample, iters = config.kmeans_sample, config.kmeans_iters
        hook: Assign | None = None if assign_rows is None else by_rows
        assign = partition_items(
            features, rows.size, nlist, sample=sample, iters=iters, seed=config.seed, assign=hook
        )
        list_of_row = np.full(n_items, -1, dtype=np.int32)
        list_of_row[rows] = assign
        # Rows list by list (ascending within a list): every pass below reads contiguous segments
        # of one list each and reduces them with reduceat, and the inverted lists fill in order.
        order = np.argsort(assign, kind="stable")
        sorted_rows, sorted_lists = rows[order], assign[order]
        del order, assign
        counts = np.bincount(sorted_lists, minlength=nlist)
        empty = counts == 0
        sum_mu, sum_ls = np.zeros((nlist, d)), np.zeros((nlist, d))
        lo, hi = np.full((nlist, d), np.inf), np.full((nlist, d), -np.inf)
        slo, shi = np.full((nlist, d), np.inf), np.full((nlist, d), -np.inf)
        for start in range(0, rows.size, _CHUNK):
            r, seg = sorted_rows[start : start + _CHUNK], _Segments(sorted_lists[start : start + _CHUNK])
            m, ls = mu[r], log_sigma[r]
            seg.reduce_into(np.add, sum_mu, m)
            seg.reduce_into(np.add, sum_ls, ls)
            seg.reduce_into(np.minimum, lo, m)
            seg.reduce_into(np.maximum, hi, m)
            seg.reduce_into(np.minimum, slo, ls)
            seg.reduce_into(np.maximum, shi, ls)
        centre_mu = sum_mu / np.maximum(counts, 1)[:, None]
        centre_ls = sum_ls / np.maximum(counts, 1)[:, None]
        lo[empty], hi[empty], slo[empty], shi[empty] = 0.0, 0.0, 0.0, 0.0

        factory = f"IVF{nlist},Flat"
        # index_factory returns the concrete class, here IndexIVFFlat; its stub says Index.
        ivf = cast(faiss.IndexIVF, faiss.index_factory(n, factory, faiss.METRIC_INNER_PRODUCT))
        ivf.quantizer.add(np.ascontiguousarray(lift_items(centre_mu, centre_ls), dtype=np.float32))
        ivf.is_trained = True
        llo, lhi = np.full((nlist, n), np.inf), np.full((nlist, n), -np.inf)
        blo, bhi = np.full((nlist, d), np.inf), np.full((nlist, d), -np.inf)
        c_hi = np.full(nlist, -np.inf)
        for start in range(0, rows.size, _CHUNK):
            r = np.ascontiguousarray(sorted_rows[start : start + _CHUNK], dtype=np.int64)
            a = sorted_lists[start : start + _CHUNK]
            seg = _Segments(a)
            m, ls = mu[r], log_sigma[r]
            lifted = lift_items(m, ls)
            seg.reduce_into(np.minimum, llo, lifted)
            seg.reduce_into(np.maximum, lhi, lifted)
            add_preassigned(ivf, np.ascontiguousarray(lifted, dtype=np.float32), a, ids=r)
            del lifted
            delta = m - centre_mu[a]
            inv_var = np.exp(-2.0 * ls)
            seg.reduce_into(np.minimum, blo, delta * inv_var)
            seg.reduce_into(np.maximum, bhi, delta * inv_var)
            c = -0.5 * (delta * delta * inv_var).sum(1) - ls.sum(1) - 0.5 * d * LOG_2PI
            seg.reduce_into(np.maximum, c_hi, c)
        llo[empty], lhi[empty] = 0.0, 0.0
        blo[empty], bhi[empty], c_hi[empty] = 0.0, 0.0, 0.0
        log.info(
            "approx index: %d items in %d partitions (%s), %d outlier scale groups on the exact path",
            rows.size,
            nlist,
            factory,
            len(exact_groups),
        )
        return cls(
            ivf=ivf,
            lo=lo,
            hi=hi,
            slo=np.exp(slo),
            shi=np.exp(shi),
            list_of_row=list_of_row,
            exact_groups=exact_groups,
            factory=factory,
            nprobe=config.approx_nprobe or default_nprobe(nlist),
            features=np.stack([center, scale]),
            lifted_box=np.stack([llo, lhi]),
            centred=np.stack([centre_mu, blo, bhi]),
            centred_c=c_hi,
        )

    # -- search -------------------------------------------------------------------------------
    def upper_bounds(self, points: np.ndarray, std: np.ndarray | None) -> np.ndarray:
        """``(B, L)`` rigorous upper bound of log q(z|x) (or its expectation) over each partition.

        Args:
            points: ``(B, d)`` query points or query means.
            std: ``(B, d)`` query standard deviations, or None for point queries.
        """
        queries = lift_queries(points, std)
        out = np.empty((points.shape[0], self.nlist))
        step = max(1, 2_000_000 // max(1, self.nlist * points.shape[1]))
        for s in range(0, points.shape[0], step):
            sl = slice(s, s + step)
            out[sl] = _box_bound(
                queries[sl, None, :],
                points[sl, None, :],
                None if std is None else std[sl, None, :],
                self.lifted_mid,
                self.lifted_rad,
                self.lo,
                self.hi,
                self.slo,
                self.shi,
            )
        return out

    def search(
        self,
        query: ApproxQuery,
        *,
        k: int,
        rerank: int,
        nprobe: int,
        exact_index: ExactIndex,
        extra: int,
        exact: bool = False,
        certify: bool = False,
        bounds: PartitionBounds | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k by scanning the best partitions, reranked exactly; with ``exact``, certified.

        Three steps. The coarse step (:meth:`scan_best`) scans the ``nprobe`` partitions with the
        best centroid posterior and keeps the ``rerank`` best float32 candidates; the rescore step
        (:meth:`_rerank`) merges the outlier groups' exact top-k and rescores in float64: its k-th
        score T is a lower bound on the true k-th score. With ``exact=True`` the branch-and-bound
        step (:meth:`_branch_and_bound`) scans every other partition whose rigorous upper bound
        (:meth:`_needed`) reaches T; items left out of a scanned partition score at most its last
        float32 candidate plus the float32 error bound, and a query where that could reach T falls
        back to the exact flat scan. The result is then the float64 brute force's top-k (ties by
        row).

        Args:
            query: the batch of B queries (points or Gaussians, lifted, scorer, label filter).
            k: results wanted; rerank: float32 candidates kept per scan (>= k for exact answers).
            nprobe: partitions scanned first (clipped to [1, nlist]).
            exact_index, extra: the exact path (outlier groups, fallback) and its screen width.
            exact: return the exact top-k (certified by branch and bound).
            certify: without ``exact``, compute whether each answer is provably exact (costs
                the partition bounds).
            bounds: the batch's partition bounds when the caller already has them (computed here
                otherwise, when needed).

        Returns:
            ``rows (B, k)`` int64, ``scores (B, k)`` float64 (padded with -1 / -inf past the
            selected items) and ``certified (B,)`` bool.
        """
        nq = len(query)
        first = self.scan_best(query, nprobe=nprobe, rerank=rerank, fill=None if exact else min(k, rerank))
        rows, top = self._rerank(query, first.labels, k, exact_index, extra)
        if not (exact or certify):
            return rows, top, np.zeros(nq, dtype=bool)

        threshold = top[:, k - 1]  # k-th exact score so far: a lower bound on the true one
        err = self._error(exact_index, query.lifted)
        hidden = first.hidden(err)
        needed = self._needed(query, threshold, first.scanned, bounds)
        if not exact:
            certified = hidden < threshold
            certified[needed.query] = False
            return rows, top, certified

        fallback = self._branch_and_bound(query, rows, top, needed, hidden >= threshold, rerank, err)
        bad = np.flatnonzero(fallback)
        if bad.size:
            log.debug("exact search: %d of %d queries fell back to the flat scan", bad.size, nq)
            rescore = query.rescore
            rows[bad], top[bad] = exact_index.search(
                query.lifted[bad],
                k,
                extra=extra,
                rescore=lambda qi, r: rescore(bad[qi], r),
                selection=query.selection,
            )
        return rows, top, np.ones(nq, dtype=bool)

    def scan_best(self, query: ApproxQuery, *, nprobe: int, rerank: int, fill: int | None) -> PartitionScan:
        """Coarse step: the best ``rerank`` float32 candidates of the ``nprobe`` best partitions.

        Args:
            nprobe: partitions per query, best centroid posterior first (clipped to [1, nlist]).
            fill: when given, queries whose scan kept fewer than ``fill`` (selected) items are
                rescanned over twice as many partitions until they have them or every
                partition was scanned.
        """
        nq, q32, selection = len(query), query.q32, query.selection
        nprobe = max(1, min(nprobe, self.nlist))
        lists = self._probe(q32, nprobe, selection)
        dist, labels = self._scan(q32, lists, rerank, selection)
        scanned = np.zeros((nq, self.nlist), dtype=bool)
        _mark(scanned, np.arange(nq), lists)
        if fill is not None:
            short = np.flatnonzero(labels[:, fill - 1] < 0)
            probe = nprobe
            while short.size and probe < self.nlist:
                probe = min(self.nlist, 2 * probe)
                more = self._probe(q32[short], probe, selection)
                dist[short], labels[short] = self._scan(q32[short], more, rerank, selection)
                _mark(scanned, short, more)
                short = short[labels[short, fill - 1] < 0]
        return PartitionScan(dist=dist, labels=labels, scanned=scanned)

    def _rerank(
        self, query: ApproxQuery, labels: np.ndarray, k: int, exact_index: ExactIndex, extra: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rescore step: float64 top-k of ``labels (B, C)`` (-1 padding) and the outlier groups.

        Returns ``rows (B, k)`` int64 and ``scores (B, k)`` float64, best first, ties by row.
        """
        cand = labels
        if self.exact_groups:
            outliers, _ = exact_index.search(
                query.lifted,
                k,
                extra=extra,
                rescore=query.rescore,
                selection=query.selection,
                only=self.exact_groups,
            )
            cand = np.concatenate([cand, outliers], axis=1)
        return _topk(cand, _rescore_padded(query.rescore, np.arange(len(query)), cand), k)

    def _branch_and_bound(
        self,
        query: ApproxQuery,
        rows: np.ndarray,
        top: np.ndarray,
        needed: _Needed,
        fallback: np.ndarray,
        rerank: int,
        err: np.ndarray,
    ) -> np.ndarray:
        """Branch-and-bound step: scan the ``needed`` partitions and merge them into the top-k.

        Args:
            rows, top: ``(B, k)`` current top-k rows and float64 scores, updated in place.
            needed: unscanned partitions whose upper bound reaches the k-th score ``top[:, -1]``.
            fallback: ``(B,)`` bool, queries already bound for the flat exact scan (not scanned).
            rerank: float32 candidates kept per query; err: ``(B,)`` float32 error bound.

        Returns:
            ``(B,)`` bool: ``fallback`` plus the queries whose second scan dropped an item that
            could still reach the k-th score.
        """
        fallback = fallback.copy()
        keep = ~fallback[needed.query]
        q, part, ub = needed.query[keep], needed.partition[keep], needed.bound[keep]
        if q.size == 0:
            return fallback
        threshold = top[:, -1].copy()  # the k-th score before this step's merge
        todo, inv, cnt = np.unique(q, return_inverse=True, return_counts=True)
        order = np.lexsort((-ub, inv))  # by query, best bound first
        pos = np.arange(q.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        pick = np.full((todo.size, int(cnt.max())), -1, dtype=np.int64)
        pick[inv[order], pos] = part[order]
        d2, l2 = self._scan(query.q32[todo], pick, rerank, query.selection)
        hidden2 = np.where(l2[:, -1] >= 0, d2[:, -1].astype(np.float64) + err[todo], -np.inf)
        fallback[todo[hidden2 >= threshold[todo]]] = True
        merged = np.concatenate([rows[todo], l2], axis=1)
        rows[todo], top[todo] = _topk(merged, _rescore_padded(query.rescore, todo, merged), top.shape[1])
        return fallback

    def partition_bounds(self, query: ApproxQuery) -> PartitionBounds:
        """Rigorous upper bounds of log q(z|x) over every partition for ``query`` (see
        :class:`PartitionBounds`): the cheap bounds now, the per-dimension box on demand."""
        return PartitionBounds(self, query)

    def _needed(
        self,
        query: ApproxQuery,
        threshold: np.ndarray,
        scanned: np.ndarray,
        bounds: PartitionBounds | None = None,
    ) -> _Needed:
        """Unscanned partitions whose rigorous upper bound reaches the query's threshold.

        The cheap bounds of ``bounds`` first, then the per-dimension (mu, sigma) box
        (:meth:`PartitionBounds.refine`) where they do not prune. Partitions holding no selected
        item are skipped.

        Args:
            threshold: ``(B,)`` float64 score a partition's bound must reach.
            scanned: ``(B, L)`` bool, partitions already scanned per query.
            bounds: the batch's partition bounds (default: computed here).
        """
        bounds = self.partition_bounds(query) if bounds is None else bounds
        counts = self.selected_counts(query.selection)
        bound = bounds.cheap.copy()
        bound[scanned] = -np.inf
        bound[:, counts == 0] = -np.inf
        q, part = np.nonzero(bound >= threshold[:, None])
        if q.size == 0:
            return _Needed(query=q, partition=part, bound=np.zeros(0))
        box = bounds.refine(q, part)
        keep = box >= threshold[q]
        return _Needed(query=q[keep], partition=part[keep], bound=box[keep])

    def selected_counts(self, selection: Selection | None) -> np.ndarray:
        """``(L,)`` int64 items of each partition that ``selection`` keeps (all without one)."""
        return self.list_sizes if selection is None else self._partitions_of(selection).counts

    def error(self, exact_index: ExactIndex, queries: np.ndarray) -> np.ndarray:
        """``(B,)`` float64 bound on the float32 score error of every partitioned item."""
        return self._error(exact_index, queries)

    def range_scan(
        self, q32: np.ndarray, lists: np.ndarray, radius: float, selection: Selection | None
    ) -> np.ndarray:
        """Bank rows of the (selected) items of partitions ``lists (m,)`` whose float32 score for
        the one query ``q32 (n,)`` is ``> radius`` (a float32 value); ``(M,)`` int64.

        Every other item of those partitions scores ``<= radius`` in float32.
        """
        params = faiss.SearchParametersIVF()
        params.nprobe = int(lists.size)
        if selection is not None:
            params.sel = selection.rows.selector
        x = np.ascontiguousarray(q32[None, :], dtype=np.float32)
        keys = np.ascontiguousarray(lists[None, :], dtype=np.int64)
        coarse = np.zeros(keys.shape, dtype=np.float32)  # unused by flat inverted lists
        result = faiss.RangeSearchResult(1)
        sp = faiss.swig_ptr
        # the stub omits range_search_preassigned_c, the SWIG method FAISS's wrapper calls (the
        # wrapper itself refuses params, hence the selector and a per-call nprobe)
        self.ivf.range_search_preassigned_c(  # type: ignore[attr-defined]
            1, sp(x), float(radius), sp(keys), sp(coarse), result, False, params
        )
        found = int(faiss.rev_swig_ptr(result.lims, 2)[1])
        return faiss.rev_swig_ptr(result.labels, found).astype(np.int64) if found else np.zeros(0, np.int64)

    def _probe(self, q32: np.ndarray, nprobe: int, selection: Selection | None) -> np.ndarray:
        """``(B, nprobe)`` partitions with the best centroid posterior (-1 where none is left).

        With a selection, partitions holding no selected item are skipped.
        """
        params = None if selection is None else self._partitions_of(selection).lists.params
        _, lists = self.ivf.quantizer.search(q32, min(nprobe, self.nlist), params=params)
        return np.ascontiguousarray(lists, dtype=np.int64)

    def _scan(
        self, q32: np.ndarray, lists: np.ndarray, rerank: int, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``rerank`` float32 scores and rows in the given partitions (``(B, m)``, -1 = skip).

        Returns ``dist (B, rerank)`` float32 and ``labels (B, rerank)`` int64, best first, padded
        with -inf / -1.
        """
        nq, m = lists.shape
        if m == 0:
            return np.full((nq, rerank), -np.inf, dtype=np.float32), np.full((nq, rerank), -1, dtype=np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe = m
        if selection is not None:
            params.sel = selection.rows.selector
        return _search_preassigned(self.ivf, q32, rerank, lists, params)

    def _error(self, exact_index: ExactIndex, queries: np.ndarray) -> np.ndarray:
        """``(B,)`` float32 score error bound for the partitioned items."""
        bounds = exact_index.error_bounds(queries)
        in_parts = [g for g in range(bounds.shape[1]) if g not in self.exact_groups]
        return bounds[:, in_parts].max(axis=1) if in_parts else np.zeros(queries.shape[0])

    def _partitions_of(self, selection: Selection) -> _PartitionFilter:
        """What ``selection`` keeps of each partition (computed once per selection)."""
        with self._filters_lock:
            found = self._filters.get(selection)
        if found is None:
            rows = self.list_of_row[selection.mask]
            counts = np.bincount(rows[rows >= 0], minlength=self.nlist)
            found = _PartitionFilter(counts=counts, lists=BitmapFilter.from_mask(counts > 0))
            with self._filters_lock:
                found = self._filters.setdefault(selection, found)
        return found


def _search_preassigned(
    ivf: faiss.IndexIVF, q32: np.ndarray, k: int, lists: np.ndarray, params: faiss.SearchParametersIVF
) -> tuple[np.ndarray, np.ndarray]:
    """``ivf.search_preassigned`` over ``lists (B, m)`` with per-call ``params`` (nprobe = m, selector).

    Neither ``faiss.contrib.ivf_tools.search_preassigned`` nor FAISS's Python wrapper of
    ``IndexIVF.search_preassigned`` can do this: both read nprobe from the index (setting it would
    race between concurrent searches) and the wrapper rejects ``params``, hence no ID selector. So
    this calls the C++ method on the arrays' buffers, which are C-contiguous and typed here.

    Returns ``dist (B, k)`` float32 and ``labels (B, k)`` int64 (``-inf`` / -1 past the items).
    """
    nq, m = lists.shape
    q32 = np.ascontiguousarray(q32, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    coarse = np.zeros((nq, m), dtype=np.float32)  # unused by flat inverted lists
    dist = np.empty((nq, k), dtype=np.float32)
    labels = np.empty((nq, k), dtype=np.int64)
    sp = faiss.swig_ptr
    # the stub omits search_preassigned_c, the SWIG method the Python search_preassigned wraps
    ivf.search_preassigned_c(  # type: ignore[attr-defined]
        nq, sp(q32), k, sp(lists), sp(coarse), sp(dist), sp(labels), False, params
    )
    return dist, labels


def _feature_scale(
    mu: np.ndarray, log_sigma: np.ndarray, rows: np.ndarray, d: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(2d,)`` mean and standard deviation (1 where under 1e-6) of ``[mu, log sigma]`` over
    ``rows``, in two passes of ``_CHUNK`` rows (no ``(N, 2d)`` copy); zeros and ones without rows."""
    if rows.size == 0:
        return np.zeros(2 * d), np.ones(2 * d)
    total = np.zeros(2 * d)
    for start in range(0, rows.size, _CHUNK):
        r = rows[start : start + _CHUNK]
        total += np.concatenate([mu[r], log_sigma[r]], axis=1).sum(axis=0)
    center = total / rows.size
    total = np.zeros(2 * d)
    for start in range(0, rows.size, _CHUNK):
        r = rows[start : start + _CHUNK]
        total += ((np.concatenate([mu[r], log_sigma[r]], axis=1) - center) ** 2).sum(axis=0)
    scale = np.sqrt(total / rows.size)
    return center, np.where(scale > 1e-6, scale, 1.0)


class _Segments:
    """The runs of equal values of a sorted ``(m,)`` int64 array of partition ids."""

    def __init__(self, lists: np.ndarray) -> None:
        self.starts = np.flatnonzero(np.concatenate([[True], lists[1:] != lists[:-1]]))
        self.ids = lists[self.starts]

    def reduce_into(self, ufunc: np.ufunc, target: np.ndarray, values: np.ndarray) -> None:
        """``target[p] = ufunc(target[p], ufunc over the rows of values (m, ...) in p's run)``."""
        target[self.ids] = ufunc(target[self.ids], ufunc.reduceat(values, self.starts, axis=0))


def _mark(mask: np.ndarray, query_rows: np.ndarray, lists: np.ndarray) -> None:
    """Set ``mask[query_rows[b], lists[b, j]]`` for every valid (>= 0) partition id."""
    b, j = np.nonzero(lists >= 0)
    mask[query_rows[b], lists[b, j]] = True


def _box_bound(
    queries: np.ndarray,
    points: np.ndarray,
    std: np.ndarray | None,
    mid: np.ndarray,
    rad: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    slo: np.ndarray,
    shi: np.ndarray,
) -> np.ndarray:
    """Rigorous upper bound of log q(z|x) over boxes, broadcasting over leading axes.

    The smaller of (a) the lifted-space box bound ``<q, mid> + <|q|, rad>`` and (b) the
    per-dimension (mu, sigma) box bound of the module docstring, plus a margin for float64
    rounding.

    Args:
        queries: ``(..., 2d + 1)`` lifted queries; points, std: ``(..., d)`` (std None for points).
        mid, rad: ``(..., 2d + 1)`` lifted box centre and half-width.
        lo, hi, slo, shi: ``(..., d)`` mu and sigma boxes.
    """
    lifted = (queries * mid).sum(-1) + (np.abs(queries) * rad).sum(-1)
    slack = 1e-12 * (np.abs(queries) * (np.abs(mid) + rad)).sum(-1)
    bound = np.minimum(lifted, _dimension_bound(points, std, lo, hi, slo, shi))
    return bound + slack + 1e-9 * (1.0 + np.abs(bound))


def _dimension_bound(
    points: np.ndarray,
    std: np.ndarray | None,
    lo: np.ndarray,
    hi: np.ndarray,
    slo: np.ndarray,
    shi: np.ndarray,
) -> np.ndarray:
    """The per-dimension (mu, sigma) box bound of the module docstring, ``(...)`` float64, before
    any rounding margin; arguments as :func:`_box_bound`'s, broadcasting over leading axes."""
    dist = np.maximum(np.maximum(lo - points, points - hi), 0.0)
    d2 = dist * dist
    if std is not None:
        d2 = d2 + std * std
    slo2, shi2 = slo * slo, shi * shi
    at_lo = -0.5 * d2 / slo2 - np.log(slo)
    at_hi = -0.5 * d2 / shi2 - np.log(shi)
    inside = -0.5 - 0.5 * np.log(np.maximum(d2, 1e-300))
    term = np.where(d2 <= slo2, at_lo, np.where(d2 >= shi2, at_hi, inside))
    return term.sum(-1) - 0.5 * points.shape[-1] * LOG_2PI

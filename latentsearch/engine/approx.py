"""Approximate search: fine partitions by posterior shape, probed by their centroid posterior.

Build: items are clustered by k-means on their *posterior shape*, the per-dimension standardised
``[mu, log sigma]`` (2d features), into many small partitions (default about 12 sqrt(N), ~80
items each at N = 1M). The lifted float32 vectors ``x = [-1/(2 sigma^2), mu/sigma^2, c]`` of each
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

Certification (optional, ``EngineConfig.approx_certify``): every partition also keeps the
per-dimension box of its members, ``mu_j in [lo_j, hi_j]``, ``sigma_j in [slo_j, shi_j]``, which
gives a rigorous upper bound on log q(z|x) over the partition, separable per dimension:

    max_{x in P} log q(z|x)
        <= sum_j max_{mu in [lo,hi], sigma in [slo,shi]} (-(z-mu)^2/(2 sigma^2) - log sigma)
           - d/2 log 2 pi

With D the distance from z_j to [lo_j, hi_j] the inner maximum sits at sigma* = clip(D, slo, shi)
(for a query Gaussian N(m, s^2), D^2 becomes D^2 + s^2). A query is certified exact when every
unscanned partition's bound, and every dropped candidate's float32 score plus its error bound, is
below the k-th exact score. In 10+ dimensions the boxes are wide, so certification is rare; it is
off by default because the bound costs O(nlist * d) per query.

Scale groups too small to matter (tiny-sigma outliers whose float32 scores are imprecise) are not
put in the partitions; they are searched by the certified exact path and merged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from latentsearch.engine.config import EngineConfig
from latentsearch.engine.lifting import lift_items
from model.posterior import LOG_2PI

__all__ = ["ApproxIndex", "default_nlist", "default_nprobe"]

log = logging.getLogger(__name__)

_CHUNK = 262_144


def default_nlist(n_items: int) -> int:
    """About ``12 sqrt(N)`` partitions, at least 16 items each on average, within [1, 65536]."""
    return int(max(1, min(65536, round(12 * math.sqrt(n_items)), n_items // 16)))


def default_nprobe(nlist: int) -> int:
    """Scan about 3% of the partitions, at least 8."""
    return int(min(nlist, max(8, math.ceil(0.03 * nlist))))


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
    """

    def __init__(
        self,
        *,
        ivf: faiss.Index,
        lo: np.ndarray,
        hi: np.ndarray,
        slo: np.ndarray,
        shi: np.ndarray,
        list_of_row: np.ndarray,
        exact_groups: list[int],
        factory: str,
        nprobe: int,
        features: np.ndarray,
    ) -> None:
        self.ivf = ivf
        self.lo, self.hi, self.slo, self.shi = lo, hi, slo, shi
        self.log_slo, self.log_shi = np.log(slo), np.log(shi)
        self.list_of_row = list_of_row
        self.exact_groups = exact_groups
        self.factory = factory
        self.nprobe = nprobe
        self.features = features
        self.list_sizes = np.bincount(list_of_row[list_of_row >= 0], minlength=lo.shape[0])

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
        cls, mu: np.ndarray, log_sigma: np.ndarray, config: EngineConfig, *, groups: list[Any]
    ) -> ApproxIndex:
        """Cluster, bound and index the posteriors of the scale groups large enough to partition.

        Args:
            mu, log_sigma: ``(N, d)`` float64.
            groups: the exact index's scale groups; groups holding under 1% of the items (and
                under 65,536 items) stay on the exact path.
        """
        n_items, d = mu.shape
        n = 2 * d + 1
        big = [
            i
            for i, g in enumerate(groups)
            if g.index is not None and (len(g) >= 65_536 or len(g) >= 0.01 * n_items)
        ]
        exact_groups = [i for i in range(len(groups)) if i not in big]
        rows = np.sort(np.concatenate([groups[i].rows for i in big])) if big else np.zeros(0, np.int64)
        nlist = config.approx_nlist or default_nlist(max(1, rows.size))
        nlist = max(1, min(nlist, max(1, rows.size)))
        rng = np.random.default_rng(config.seed)

        if rows.size:
            feat = np.concatenate([mu[rows], log_sigma[rows]], axis=1)
            center, scale = feat.mean(axis=0), feat.std(axis=0)
            del feat
        else:
            center, scale = np.zeros(2 * d), np.ones(2 * d)
        scale = np.where(scale > 1e-6, scale, 1.0)

        def features(r: np.ndarray) -> np.ndarray:
            f = np.concatenate([mu[r], log_sigma[r]], axis=1)
            return np.ascontiguousarray((f - center) / scale, dtype=np.float32)

        def lifted32(r: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(lift_items(mu[r], log_sigma[r]), dtype=np.float32)

        assigner = faiss.IndexFlatL2(2 * d)
        if rows.size:
            sample = rows
            if rows.size > config.kmeans_sample:
                sample = np.sort(rng.choice(rows, config.kmeans_sample, replace=False))
            kmeans = faiss.Kmeans(
                2 * d,
                nlist,
                niter=config.kmeans_iters,
                seed=config.seed,
                verbose=False,
                min_points_per_centroid=1,
                max_points_per_centroid=1 << 30,
            )
            kmeans.train(features(sample))
            assigner.add(kmeans.centroids)

        list_of_row = np.full(n_items, -1, dtype=np.int32)
        sum_mu = np.zeros((nlist, d))
        sum_ls = np.zeros((nlist, d))
        lo = np.full((nlist, d), np.inf)
        hi = np.full((nlist, d), -np.inf)
        slo = np.full((nlist, d), np.inf)
        shi = np.full((nlist, d), -np.inf)
        assigns = []
        for start in range(0, rows.size, _CHUNK):
            r = rows[start : start + _CHUNK]
            _, assign = assigner.search(features(r), 1)
            a = assign[:, 0].astype(np.int64)
            assigns.append(a)
            list_of_row[r] = a
            m, ls = mu[r], log_sigma[r]
            np.add.at(sum_mu, a, m)
            np.add.at(sum_ls, a, ls)
            np.minimum.at(lo, a, m)
            np.maximum.at(hi, a, m)
            np.minimum.at(slo, a, ls)
            np.maximum.at(shi, a, ls)
        counts = np.bincount(list_of_row[list_of_row >= 0], minlength=nlist)
        empty = counts == 0
        centre_mu = sum_mu / np.maximum(counts, 1)[:, None]
        centre_ls = sum_ls / np.maximum(counts, 1)[:, None]
        lo[empty], hi[empty], slo[empty], shi[empty] = 0.0, 0.0, 0.0, 0.0

        factory = f"IVF{nlist},Flat"
        ivf = faiss.index_factory(n, factory, faiss.METRIC_INNER_PRODUCT)
        ivf.quantizer.add(np.ascontiguousarray(lift_items(centre_mu, centre_ls), dtype=np.float32))
        ivf.is_trained = True
        for start, a in zip(range(0, rows.size, _CHUNK), assigns, strict=True):
            r = np.ascontiguousarray(rows[start : start + _CHUNK], dtype=np.int64)
            x = lifted32(r)
            ivf.add_core(r.size, faiss.swig_ptr(x), faiss.swig_ptr(r), faiss.swig_ptr(a))
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
        )

    # -- search -------------------------------------------------------------------------------
    def upper_bounds(self, points: np.ndarray, std: np.ndarray | None) -> np.ndarray:
        """``(B, L)`` upper bound of log q(z|x) (or its expectation) over each partition.

        Args:
            points: ``(B, d)`` query points or query means.
            std: ``(B, d)`` query standard deviations, or None for point queries.
        """
        nq, d = points.shape
        out = np.empty((nq, self.nlist))
        step = max(1, 2_000_000 // max(1, self.nlist * d))
        for s in range(0, nq, step):
            z = points[s : s + step, None, :]  # (b, 1, d)
            dist = np.maximum(np.maximum(self.lo - z, z - self.hi), 0.0)  # (b, L, d)
            d2 = dist * dist
            if std is not None:
                d2 += (std[s : s + step] ** 2)[:, None, :]
            # sigma* = clip(sqrt(d2), slo, shi); term = -d2/(2 sigma*^2) - log sigma*
            sig = np.clip(np.sqrt(d2), self.slo, self.shi)
            term = -0.5 * d2 / (sig * sig) - np.log(sig)
            out[s : s + step] = term.sum(-1) - 0.5 * d * LOG_2PI
        return out

    def candidates(
        self,
        points: np.ndarray,
        std: np.ndarray | None,
        *,
        k: int,
        rerank: int,
        nprobe: int,
        queries: np.ndarray,
        exact_index: Any,
        extra: int,
        rescore: Any,
        selection: Any = None,
        certify: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate rows for an exact rerank, and a bound on what was not looked at.

        Args:
            points, std: ``(B, d)`` query points (or means) and stds (None for point queries).
            k: results wanted; rerank: float32 candidates kept from the partitions.
            queries: ``(B, 2d + 1)`` float64 lifted queries.
            exact_index, extra, rescore, selection: the exact path for outlier groups.

        Returns:
            ``cand (B, C)`` int64 rows (-1 padding) and ``missed (B,)`` float64: no item outside
            ``cand`` has a score above it (compare with the k-th exact score to certify); +inf
            unless ``certify``.
        """
        nq = points.shape[0]
        q32 = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = max(1, min(nprobe, self.nlist))
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if selection is not None:
            params.sel = selection.row_params.sel
            params.quantizer_params = self._selected_lists(selection)
        dist, labels = self.ivf.search(q32, rerank, params=params)
        # The probed partitions may hold fewer than k (selected) items, e.g. small partitions or a
        # label filter on class-clustered partitions: widen those queries' probe until they hold k.
        short = np.flatnonzero(labels[:, min(k, rerank) - 1] < 0)
        probe = nprobe
        while short.size and probe < self.nlist:
            probe = min(self.nlist, 2 * probe)
            params.nprobe = probe
            d2, l2 = self.ivf.search(q32[short], rerank, params=params)
            dist[short], labels[short] = d2, l2
            short = short[l2[:, min(k, rerank) - 1] < 0]
        missed = np.full(nq, np.inf)
        if certify:
            missed = self._missed_bound(points, std, queries, dist, labels, nprobe, exact_index, selection)
        cand = labels
        if self.exact_groups:
            rows, _ = exact_index.search(
                queries, k, extra=extra, rescore=rescore, selection=selection, only=self.exact_groups
            )
            cand = np.concatenate([cand, rows], axis=1)
        return cand, missed

    def _missed_bound(
        self,
        points: np.ndarray,
        std: np.ndarray | None,
        queries: np.ndarray,
        dist: np.ndarray,
        labels: np.ndarray,
        nprobe: int,
        exact_index: Any,
        selection: Any,
    ) -> np.ndarray:
        """``(B,)`` bound on the score of every item the partition scan did not return."""
        nq = points.shape[0]
        ub = self.upper_bounds(points, std)  # (B, L)
        counts = self.list_sizes if selection is None else self._selected_counts(selection)
        ub[:, counts == 0] = -np.inf
        if nprobe < self.nlist:
            _, probed = self.ivf.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), nprobe)
            np.put_along_axis(ub, np.maximum(probed, 0), -np.inf, axis=1)
            ub_next = ub.max(axis=1)
        else:
            ub_next = np.full(nq, -np.inf)
        bounds = exact_index.error_bounds(queries)
        in_parts = [g for g in range(bounds.shape[1]) if g not in self.exact_groups]
        err = bounds[:, in_parts].max(axis=1) if in_parts else np.zeros(nq)
        dropped = np.where(labels[:, -1] >= 0, dist[:, -1].astype(np.float64) + err, -np.inf)
        return np.maximum(ub_next, dropped)

    def _selected_lists(self, selection: Any) -> faiss.SearchParameters:
        """Quantizer parameters that skip partitions holding no selected item (cached)."""
        params = getattr(selection, "_approx_lists", None)
        if params is None:
            has = self._selected_counts(selection) > 0
            bitmap = np.packbits(has, bitorder="little")
            sel = faiss.IDSelectorBitmap(has.size, faiss.swig_ptr(bitmap))
            params = faiss.SearchParameters(sel=sel)
            selection._keep.extend((bitmap, sel))
            selection._approx_lists = params
        return params

    def _selected_counts(self, selection: Any) -> np.ndarray:
        counts = getattr(selection, "_approx_counts", None)
        if counts is None:
            rows = self.list_of_row[selection.mask]
            counts = np.bincount(rows[rows >= 0], minlength=self.nlist)
            selection._approx_counts = counts
        return counts

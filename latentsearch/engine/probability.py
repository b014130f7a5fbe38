"""Certified normaliser ``sum_i q(z|x_i)``: match probabilities and the aggregate-posterior density.

For a query (a point z, or a Gaussian N(m, s^2) scored by the expected log-likelihood) and the N
items that pass the label filter, with s_i the engine's float64 score of item i::

    log q(z)  = logsumexp_i s_i - log N             (aggregate posterior, uniform prior over items)
    p(i | z)  = exp(s_i) / sum_j exp(s_j)            (posterior responsibility of item i)

The sum S runs over the whole (selected) bank. It is split into terms computed exactly in float64
("scanned"; their sum is ``lower``) and terms only bounded from above (their bounds sum to
``tail``), so ``lower <= S <= lower + tail = upper``. Every bound is rigorous:

* **The search's answer.** The k items the search returned come with exact float64 scores: they
  are added first (the sum starts at ``exp(L0)``, ``L0 = logsumexp`` of the top-k scores) and are
  never scored or counted as scanned again. Elsewhere they may still be bounded, which only widens
  ``upper``.
* **Partitions** (when the engine has an approximate index, for calls of at most
  :data:`PARTITION_MAX_QUERIES` queries): a partition of m selected items whose rigorous upper bound
  on log q(z|x) is U (:class:`~latentsearch.engine.approx.PartitionBounds`: the same cheap bounds
  as the search's branch and bound, refined by the per-dimension box bound where they do not prune)
  contributes at most ``m exp(U)``. A partition with ``U < c_P = log(W / 2) - log N_P`` (N_P
  partitioned items, W the allowed width below) is accepted whole by its bound without touching its
  items, so the accepted ones add at most ``W / 2`` together (their actual bound sum ``T_P`` is what
  enters ``tail``). The other partitions are scanned item by item as below, by a FAISS range search
  over their inverted lists.
* **Items** of scanned partitions and of the flat scale groups: every item of scale group g has a
  float32 score t_i with ``|t_i - s_i| <= E_g(q)`` (the exact path's certified screen, see
  :mod:`latentsearch.engine.exact`), hence ``s_i <= t_i + E_g(q)``. With n the number of items left
  to the screens and the cut ``c = log(W - T_P) - log n``, an item is rescored exactly in float64
  only when ``t_i`` exceeds the largest float32 at most ``c - E_g(q)``; each of the others adds at
  most ``exp(c)`` to ``tail`` (exactly: its float32 threshold plus E_g), so they add at most
  ``W - T_P`` together. A group the search screened densely (a single unfiltered query, see
  :meth:`~latentsearch.engine.exact.ScaleGroup.dense_screen`) hands over its float32 scores
  (:class:`SearchWork`), computed from the same float32 vectors, instead of being scored again.

With ``W = rel_tol exp(L0) <= rel_tol lower``, ``tail <= W`` and the interval always meets
``upper / lower - 1 <= rel_tol`` in one pass; usually much less, since most bounds are far below
their cuts. ``rel_tol = 0`` rescores every item. Both ends are then widened by ``gamma = 2 (N + 4)
2^-53`` for the float64 exponentials and sums, so the interval holds the exact real sum of exp over
the engine's float64 scores; and, in log space, by ``2 (n + 4) 2^-53 (|log S| + 1)`` (n = 2d + 1)
for the float64 rounding of those scores themselves (an independent float64 evaluation of s_i
differs by a few units in the last place of |s_i|, and the items that matter score within
log(N / rel_tol) of the best). The partition bounds hold for the true log q(z|x) with a relative
margin of 1e-9 for their own float64 evaluation, far above the scores' rounding. Groups kept in
float64 (lifted vectors too large for float32) and queries whose float32 bound is not finite are
rescored in full.

Cost (bench/bench_probability.py, 1M Fashion-MNIST VAE posteriors in 12,000 partitions, one query
per call, 2 shared cores): screening every item in float32 (one pass over 84 MB of lifted vectors)
made a call with probabilities 2.8-3.2x the plain exact call. The partition bounds, which the search
has computed already, accept whole a median 94% of the partitions for box-corner queries, 74% for
prior samples and 88% for posterior samples (the bounds stay loose by tens of nats where sigmas
vary within a partition), and the range searches over the kept ones bring the ratio to 1.3-1.8x,
most of the rest being FAISS reading the kept partitions. Batches of more than
:data:`PARTITION_MAX_QUERIES` keep the flat screen: one BLAS matrix product reads the bank once
for all of them, where a range search per query reads the kept partitions once each.

Distribution queries use the expected log-likelihood ``E_{z ~ N(m, s^2)} log q(z|x)``, the score the
engine ranks by, not the Gaussian convolution ``log N(m; mu, sigma^2 + s^2) = log E q(z|x)``: it keeps
p(i | query) consistent with the ranking (the most probable item is the top hit), equals the point
case at s = 0, and is linear in the lifted query ``[m^2 + s^2, m, 1]``, so the same certified float32
screen bounds it. The convolution has no such inner-product form (its variance mixes item and
query), so it would need a full float64 pass per query. By Jensen, ``exp(E log q) <= E q`` item by
item, so the reported log q(query) is a lower bound on ``log E_{z ~ N(m, s^2)} q(z)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import faiss
import numpy as np

from latentsearch.engine.approx import PartitionBounds
from latentsearch.engine.exact import _FLOAT32_SAFE, ExactIndex, Rescore, Selection

__all__ = [
    "DEFAULT_REL_TOL",
    "PARTITION_MAX_QUERIES",
    "Normaliser",
    "SearchWork",
    "normalise",
]

DEFAULT_REL_TOL = 1e-6
# Calls of at most this many queries bound whole partitions (a range search per query over the
# partitions kept); larger batches screen every item with one float32 matrix product.
PARTITION_MAX_QUERIES = 4
_CHUNK_ELEMENTS = 4_000_000  # (queries x items) float32 screen scores held at once
_EPS64 = 2.0**-53
_LOG2 = math.log(2.0)


@dataclass(kw_only=True)
class SearchWork:
    """What the top-k search of a call computed that its normaliser can reuse (filled by the search).

    Attributes:
        partitions: the batch's partition bounds (searches over the approximate index's partitions).
        screens: ``{scale group: (B, n_g) float32 scores}`` of the groups the exact search screened
            densely (a single unfiltered query: every item of the group scored, local id order).
    """

    partitions: PartitionBounds | None = None
    screens: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Normaliser:
    """Certified bounds on ``log sum_i exp(s_i)`` over the selected items, per query.

    Attributes:
        log_scanned: ``(B,)`` float64 log of the exactly scanned part of the sum: the estimate
            reported (the unscanned items' bound is a worst case; their true share is usually far
            smaller), always inside the interval.
        log_lower: ``(B,)`` float64 lower bound.
        log_upper: ``(B,)`` float64 upper bound.
        count: N, the number of items the sum runs over (the label filter's).
        rescored: ``(B,)`` int64 items whose exact score is in the sum (the search's answer
            included); the rest are bounded.
        partitions_read: ``(B,)`` int64 partitions scanned item by item (0 without partitions).
    """

    log_scanned: np.ndarray
    log_lower: np.ndarray
    log_upper: np.ndarray
    count: int
    rescored: np.ndarray
    partitions_read: np.ndarray

    @property
    def log_qz(self) -> np.ndarray:
        """``(B,)`` aggregate-posterior log density ``log_scanned - log N``."""
        return self.log_scanned - math.log(self.count)

    @property
    def rel_error(self) -> np.ndarray:
        """``(B,)`` ``upper / lower - 1``, the certified relative width of the interval."""
        return np.expm1(self.log_upper - self.log_lower)

    def probability(self, scores: np.ndarray) -> np.ndarray:
        """``(B, k)`` p(i | z) for scores ``(B, k)`` (``-inf`` padding gives 0), from ``log_scanned``.

        The true value lies in ``[exp(s - log_upper), exp(s - log_lower)]``.
        """
        return np.exp(scores - self.log_scanned[:, None])


class _Sum:
    """Running ``M + log S`` per query (exact terms) and ``log T`` (bounded tails).

    ``known`` holds the rows already in the sum, as keys ``query * (N + 1) + row``, sorted: exact
    scores of those are not added twice.
    """

    def __init__(self, top_rows: np.ndarray, top_scores: np.ndarray, n_rows: int) -> None:
        first = top_scores.max(axis=1, initial=-np.inf)  # the best score (not always column 0)
        self.shift = np.where(np.isfinite(first), first, 0.0)  # (B,) M
        self.total = np.zeros_like(self.shift)  # (B,) S = sum exp(s - M)
        self.tail = np.full_like(self.shift, -np.inf)  # (B,) log of the unscanned items' bound
        self.rescored = np.zeros(self.shift.shape, dtype=np.int64)
        self._stride = n_rows + 1
        self.known = np.zeros(0, dtype=np.int64)
        valid = top_rows >= 0
        if valid.any():
            qb, _ = np.nonzero(valid)
            keys = np.unique(qb * self._stride + top_rows[valid])  # distinct (query, row) pairs
            self.known = keys
            qi, rows = np.divmod(keys, self._stride)
            col = np.argmax(top_rows[qi] == rows[:, None], axis=1)  # each row's first position
            self.add_pairs(qi, top_scores[qi, col])

    def fresh(self, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(M,)`` bool: pairs (``qi``, ``rows``) (each ``(M,)``) not already in the sum."""
        if self.known.size == 0:
            return np.ones(qi.shape, dtype=bool)
        return ~np.isin(qi * self._stride + rows, self.known, assume_unique=False)

    def add_exact(self, qi: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
        """Add the exact scores ``(len(qi), C)`` of rows ``(len(qi), C)`` for queries ``qi``."""
        if scores.size == 0:
            return
        fresh = self.fresh(np.repeat(qi, rows.shape[1]), rows.ravel()).reshape(rows.shape)
        scores = np.where(fresh, scores, -np.inf)
        top = np.max(scores, axis=1)
        new = np.maximum(self.shift[qi], top)
        self.total[qi] = self.total[qi] * np.exp(self.shift[qi] - new) + np.exp(
            scores - new[:, None]
        ).sum(axis=1)
        self.shift[qi] = new
        self.rescored[qi] += fresh.sum(axis=1)

    def add_pairs(self, qi: np.ndarray, scores: np.ndarray) -> None:
        """Add exact scores ``(M,)`` of queries ``qi (M,)`` (any order, repeats allowed)."""
        top = np.full(self.shift.shape, -np.inf)
        np.maximum.at(top, qi, scores)
        new = np.maximum(self.shift, top)
        weights = np.exp(scores - new[qi])
        self.total = self.total * np.exp(self.shift - new) + np.bincount(
            qi, weights=weights, minlength=new.size
        )
        self.shift = new
        self.rescored += np.bincount(qi, minlength=new.size)

    def add_tail(self, log_bound: np.ndarray) -> None:
        self.tail = np.logaddexp(self.tail, log_bound)


def normalise(
    exact: ExactIndex,
    queries: np.ndarray,
    top_rows: np.ndarray,
    top_scores: np.ndarray,
    rescore: Rescore,
    selection: Selection | None,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    work: SearchWork | None = None,
) -> Normaliser:
    """Certified bounds on ``log sum_i exp(s_i)`` (see the module docstring).

    Args:
        exact: the exact index (its scale groups and float32 vectors).
        queries: ``(B, n)`` float64 lifted queries.
        top_rows: ``(B, k)`` int64 distinct selected rows per query with exact scores (the
            search's answer; -1 padding), at least one per query for a useful bound.
        top_scores: ``(B, k)`` float64 their exact scores (``-inf`` padding).
        rescore: exact float64 scorer, as for :meth:`ExactIndex.search`.
        selection: the label filter, or ``None`` for every item.
        rel_tol: the relative tolerance, in [0, 1).
        work: what the search computed for this batch: its partition bounds (used for calls of at
            most :data:`PARTITION_MAX_QUERIES` queries) and dense float32 screens (reused instead of
            scoring those groups again); ``None``: flat screens only.
    """
    partitions = None if work is None else work.partitions
    dense = {} if work is None else work.screens
    nq = queries.shape[0]
    n_rows = len(exact.group_of_row)
    count = n_rows if selection is None else selection.count
    acc = _Sum(top_rows, top_scores, n_rows)
    with np.errstate(divide="ignore"):
        # (B,) log W, the width allowed: rel_tol times the sum of the top-k, a lower bound of S
        budget = np.logaddexp.reduce(top_scores, axis=1) + (math.log(rel_tol) if rel_tol > 0 else -np.inf)
    q32 = queries.astype(np.float32)
    bounds = exact.error_bounds(queries)  # (B, G)
    screened = np.isfinite(q32).all(axis=1) & np.isfinite(bounds).all(axis=1)
    screened &= (bounds < _FLOAT32_SAFE).all(axis=1)
    every = np.arange(nq)
    locals_ = [None if selection is None else np.flatnonzero(selection.mask[g.rows]) for g in exact.groups]
    sizes = [len(g) if loc is None else loc.size for g, loc in zip(exact.groups, locals_, strict=True)]

    # Float64-only groups, and every group for queries the float32 screen cannot bound.
    for gi, group in enumerate(exact.groups):
        rows = group.rows if locals_[gi] is None else group.rows[locals_[gi]]
        full = every if group.direct else every[~screened]
        if rows.size and full.size:
            _add_all(acc, full, rows, rescore)

    part = every[screened]
    if part.size == 0:
        return _finish(acc, exact, count, np.zeros(nq, dtype=np.int64))
    flat = [gi for gi, g in enumerate(exact.groups) if not g.direct and sizes[gi]]  # float32 screens
    left = budget[part]  # (B',) log of the width left for the item screens: W, or W - T_P
    read = np.zeros(nq, dtype=np.int64)
    keep = None
    if partitions is not None and rel_tol > 0 and nq <= PARTITION_MAX_QUERIES:
        keep, spent, kept_items = _accept_partitions(partitions, part, left, selection)
        flat = [gi for gi in flat if gi in partitions.index.exact_groups]  # the outlier groups
        acc.add_tail(_scatter(nq, part, spent))
        read[part] = keep.sum(axis=1)
        with np.errstate(divide="ignore"):
            left = left + np.log1p(-np.exp(spent - left))  # T_P <= W / 2
    screen_items = sum(sizes[gi] for gi in flat) + (0.0 if keep is None else kept_items)  # (B',) n
    with np.errstate(divide="ignore"):
        cut = left - np.log(np.maximum(screen_items, 1.0))  # (B',) log of the per-item cut
    if keep is not None:
        assert partitions is not None
        _scan_partitions(acc, partitions, part, keep, cut, exact, selection)
    for gi in flat:
        err = bounds[part, gi]
        reuse = dense.get(gi) if locals_[gi] is None else None
        t_all = None if reuse is None else reuse[part]  # (B', n_g) the search's float32 scores
        _screen_group(acc, exact, gi, part, q32[part], cut - err, err, locals_[gi], rescore, t_all)
    return _finish(acc, exact, count, read)


def _accept_partitions(
    partitions: PartitionBounds, qidx: np.ndarray, budget: np.ndarray, selection: Selection | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which partitions to scan for queries ``qidx (B',)`` with log widths ``budget (B',)``.

    A partition whose bound U is below ``c_P = budget - log 2 - log N_P`` is accepted by its bound
    (the box bound refines the cheap one only where the cheap one reaches c_P).

    Returns:
        ``keep (B', L)`` bool partitions to scan, ``log T_P (B',)`` float64 log of the accepted
        partitions' bound ``sum m exp(U)`` (at most ``budget - log 2``) and ``(B',)`` float64
        selected items in the kept partitions.
    """
    counts = partitions.index.selected_counts(selection)  # (L,)
    nonempty = counts > 0
    c_part = budget - _LOG2 - math.log(max(1, int(counts.sum())))  # (B',)
    bound = partitions.cheap[qidx]  # (B', L) a copy
    bound[:, ~nonempty] = -np.inf
    qb, pp = np.nonzero(bound >= c_part[:, None])
    if qb.size:
        bound[qb, pp] = partitions.refine(qidx[qb], pp)
    keep = bound >= c_part[:, None]
    with np.errstate(divide="ignore"):
        weight = np.where(keep, -np.inf, bound + np.log(counts)[None, :])  # log(m exp(U)), accepted
    spent = np.logaddexp.reduce(weight, axis=1)
    return keep, spent, (keep * counts[None, :]).sum(axis=1).astype(np.float64)


def _scan_partitions(
    acc: _Sum,
    partitions: PartitionBounds,
    qidx: np.ndarray,
    keep: np.ndarray,
    cut: np.ndarray,
    exact: ExactIndex,
    selection: Selection | None,
) -> None:
    """Range-search the kept partitions of queries ``qidx``: exact scores above the float32
    threshold of each query's cut ``(B',)``, the rest bounded (see the module docstring)."""
    index, query = partitions.index, partitions.query
    counts = index.selected_counts(selection)
    err = index.error(exact, query.lifted[qidx])  # (B',) float32 error bound of partitioned items
    thr = _float32_at_most(cut - err)  # items not returned score t <= thr, so s <= thr + err <= cut
    q32 = query.q32
    tail = np.full(acc.tail.shape, -np.inf)
    for j, b in enumerate(qidx.tolist()):
        lists = np.flatnonzero(keep[j])
        if lists.size == 0:
            continue
        rows = index.range_scan(q32[b], lists, float(thr[j]), selection)
        qi = np.full(rows.size, b, dtype=np.int64)
        fresh = acc.fresh(qi, rows)
        if fresh.any():
            acc.add_pairs(qi[fresh], _rescore_pairs(query.rescore, qi[fresh], rows[fresh]))
        rest = int(counts[lists].sum()) - rows.size
        if rest:
            tail[b] = math.log(rest) + float(thr[j]) + float(err[j])
    acc.add_tail(tail)


def _rescore_pairs(rescore: Rescore, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(M,)`` exact scores of the pairs (``qi``, ``rows``), each ``(M,)``."""
    return rescore(qi, rows[:, None])[:, 0]


def _screen_group(
    acc: _Sum,
    exact: ExactIndex,
    gi: int,
    qidx: np.ndarray,
    q32: np.ndarray,
    limit: np.ndarray,
    err: np.ndarray,
    local: np.ndarray | None,
    rescore: Rescore,
    t_all: np.ndarray | None = None,
) -> None:
    """Float32 screen of scale group ``gi`` for queries ``qidx (B',)`` (``q32 (B', n)``): items
    scoring above the largest float32 at most ``limit (B',)`` are rescored exactly, the others
    bounded by that threshold plus ``err (B',)``. ``local``: the selected local ids (None: all);
    ``t_all``: ``(B', n_g)`` float32 scores the search already computed, from the same vectors."""
    group = exact.groups[gi]
    rows = group.rows if local is None else group.rows[local]
    m_all, n = len(group), group.index.d
    xb = faiss.rev_swig_ptr(group.index.get_xb(), m_all * n).reshape(m_all, n)  # FAISS's float32 copy
    if local is not None:
        xb = xb[local]
    thr = _float32_at_most(limit)  # unscanned items have t < thr, so u < limit + err
    step = max(1, _CHUNK_ELEMENTS // qidx.size)
    tail = np.full(acc.tail.shape, -np.inf)
    for start in range(0, rows.size, step):
        chunk = rows[start : start + step]
        # (B', C) float32 screen scores: one BLAS product, or the search's own
        t = q32 @ xb[start : start + step].T if t_all is None else t_all[:, start : start + step]
        if qidx.size == 1:  # over 70,000 scores a 1-d nonzero took 0.11 ms, the 2-d one 0.49 ms
            col = np.flatnonzero(t[0] >= thr[0])
            qb = np.zeros(col.size, dtype=np.int64)
        else:
            qb, col = np.nonzero(t >= thr[:, None])  # the items to scan, ascending in qb
        qi, hit = qidx[qb], chunk[col]
        fresh = acc.fresh(qi, hit)
        if fresh.any():  # one exact score per (query, item) pair, no padding
            acc.add_pairs(qi[fresh], _rescore_pairs(rescore, qi[fresh], hit[fresh]))
        rest = chunk.size - np.bincount(qb, minlength=qidx.size)  # (B',) unscanned, each u < thr + err
        if rest.any():
            with np.errstate(divide="ignore"):
                tail[qidx] = np.logaddexp(tail[qidx], np.log(rest) + thr.astype(np.float64) + err)
    acc.add_tail(tail)


def _add_all(acc: _Sum, qi: np.ndarray, rows: np.ndarray, rescore: Rescore) -> None:
    """Rescore every row of ``rows`` exactly for queries ``qi``, in chunks."""
    step = max(1, _CHUNK_ELEMENTS // (8 * qi.size))
    for start in range(0, rows.size, step):
        chunk = np.broadcast_to(rows[start : start + step], (qi.size, min(step, rows.size - start)))
        acc.add_exact(qi, chunk, rescore(qi, chunk))


def _finish(acc: _Sum, exact: ExactIndex, count: int, read: np.ndarray) -> Normaliser:
    """The interval of the sum in ``acc``, widened for float64 rounding (see the module docstring)."""
    gamma = 2.0 * (count + 4) * _EPS64
    with np.errstate(divide="ignore"):
        exact_log = acc.shift + np.log(acc.total)
    upper = np.logaddexp(exact_log, acc.tail)
    slack = 2.0 * (exact.n_lifted + 4) * _EPS64 * (np.abs(upper) + 1.0)  # (B,) score rounding
    return Normaliser(
        log_scanned=exact_log,
        log_lower=exact_log + math.log1p(-gamma) - slack,
        log_upper=upper + math.log1p(gamma) + slack,
        count=count,
        rescored=acc.rescored,
        partitions_read=read,
    )


def _scatter(nq: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(nq,)`` float64: ``values`` at ``idx``, ``-inf`` elsewhere."""
    out = np.full(nq, -np.inf)
    out[idx] = values
    return out


def _float32_at_most(values: np.ndarray) -> np.ndarray:
    """``(B,)`` float32 values, each the largest float32 ``<= values`` (float64)."""
    r = values.astype(np.float32)
    return np.where(r.astype(np.float64) > values, np.nextafter(r, np.float32(-np.inf)), r)

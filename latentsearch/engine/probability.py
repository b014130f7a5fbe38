"""Certified normaliser ``sum_i q(z|x_i)``: match probabilities and the aggregate-posterior density.

For a query (a point z, or a Gaussian N(m, s^2) scored by the expected log-likelihood) and the N
items that pass the label filter, with s_i the engine's float64 score of item i::

    log q(z)  = logsumexp_i s_i - log N             (aggregate posterior, uniform prior over items)
    p(i | z)  = exp(s_i) / sum_j exp(s_j)            (posterior responsibility of item i)

The sum runs over the whole (selected) bank, so it is bounded with the exact path's certified
float32 screen (see :mod:`latentsearch.engine.exact`): every item of scale group g has a float32
score t_i with ``|t_i - s_i| <= E_g(q)``, hence ``s_i <= u_i = t_i + E_g(q)``. With M a float64
score of a selected item (the best one found by the search) and the cut

    c = M + log(rel_tol) - log N,

every item with ``u_i >= c`` is rescored exactly in float64 ("scanned") and contributes
``exp(s_i)`` exactly; an item is left unscanned only when ``t_i < c_g``, the largest float32 at most
``c - E_g(q)``, so the n_g' unscanned items of group g contribute at most ``n_g' exp(c_g + E_g(q))
<= n_g' exp(c)`` together, and at least 0. Therefore

    lower = sum_{scanned} exp(s_i) <= S <= lower + sum_g n_g' exp(c_g + E_g(q)) = upper.

The item that scored M has ``u >= s = M >= c``, so it is scanned and ``lower >= exp(M)``, while
``upper - lower < N exp(c) = rel_tol exp(M)``: the interval always meets ``upper / lower - 1 <=
rel_tol`` and no second pass is needed; ``rel_tol = 0`` rescores every item. Both ends are then
widened by ``gamma = 2 (N + 4) 2^-53`` for the float64 exponentials and sums, so the interval holds
the exact real sum of exp over the engine's float64 scores; and, in log space, by
``2 (n + 4) 2^-53 (|log S| + 1)`` (n = 2d + 1) for the float64 rounding of those scores themselves
(an independent float64 evaluation of s_i differs by a few units in the last place of |s_i|, and the
items that matter score within log(N / rel_tol) of the best). Groups kept in float64 (lifted vectors
too large for float32) and queries whose float32 bound is not finite are rescored in full.

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
from dataclasses import dataclass

import faiss
import numpy as np

from latentsearch.engine.exact import _FLOAT32_SAFE, ExactIndex, Rescore, Selection

__all__ = ["DEFAULT_REL_TOL", "Normaliser", "normalise"]

DEFAULT_REL_TOL = 1e-6
_CHUNK_ELEMENTS = 4_000_000  # (queries x items) float32 screen scores held at once
_EPS64 = 2.0**-53


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
        rescored: ``(B,)`` int64 items scored exactly in float64 (the rest are bounded).
    """

    log_scanned: np.ndarray
    log_lower: np.ndarray
    log_upper: np.ndarray
    count: int
    rescored: np.ndarray

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
    """Running ``M + log S`` per query (exact terms) and ``log T`` (bounded tails)."""

    def __init__(self, ref: np.ndarray) -> None:
        self.shift = np.array(ref, dtype=np.float64)  # (B,) M
        self.total = np.zeros_like(self.shift)  # (B,) S = sum exp(s - M)
        self.tail = np.full_like(self.shift, -np.inf)  # (B,) log of the unscanned items' bound
        self.rescored = np.zeros(self.shift.shape, dtype=np.int64)

    def add_exact(self, qi: np.ndarray, scores: np.ndarray) -> None:
        """Add the exact scores ``(len(qi), C)`` (``-inf`` padding) of queries ``qi``."""
        if scores.size == 0:
            return
        top = np.max(scores, axis=1)
        new = np.maximum(self.shift[qi], top)
        self.total[qi] = self.total[qi] * np.exp(self.shift[qi] - new) + np.exp(
            scores - new[:, None]
        ).sum(axis=1)
        self.shift[qi] = new
        self.rescored[qi] += np.isfinite(scores).sum(axis=1)

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
    ref: np.ndarray,
    rescore: Rescore,
    selection: Selection | None,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
) -> Normaliser:
    """Certified bounds on ``log sum_i exp(s_i)`` (see the module docstring).

    Args:
        exact: the exact index (its scale groups and float32 vectors).
        queries: ``(B, n)`` float64 lifted queries.
        ref: ``(B,)`` float64 exact score of a selected item per query (best: the top hit).
        rescore: exact float64 scorer, as for :meth:`ExactIndex.search`.
        selection: the label filter, or ``None`` for every item.
        rel_tol: the cut's relative tolerance, in [0, 1).
    """
    nq = queries.shape[0]
    count = len(exact.group_of_row) if selection is None else selection.count
    acc = _Sum(ref)
    cut = ref + (math.log(rel_tol) - math.log(count) if rel_tol > 0 else -np.inf)  # (B,)
    q32 = queries.astype(np.float32)
    bounds = exact.error_bounds(queries)  # (B, G)
    screened = np.isfinite(q32).all(axis=1) & np.isfinite(bounds).all(axis=1)
    screened &= (bounds < _FLOAT32_SAFE).all(axis=1)
    every = np.arange(nq)
    for gi, group in enumerate(exact.groups):
        local = None if selection is None else np.flatnonzero(selection.mask[group.rows])
        rows = group.rows if local is None else group.rows[local]
        if rows.size == 0:
            continue
        full = every if group.direct else every[~screened]
        if full.size:
            _add_all(acc, full, rows, rescore)
        if group.direct or full.size == nq:
            continue
        part = every[screened]
        index = group.index
        m_all, n = len(group), index.d
        xb = faiss.rev_swig_ptr(index.get_xb(), m_all * n).reshape(m_all, n)  # FAISS's float32 copy
        if local is not None:
            xb = xb[local]
        err = bounds[part, gi]
        thr = _float32_at_most(cut[part] - err)  # unscanned items have t < thr, so u < cut
        step = max(1, _CHUNK_ELEMENTS // part.size)
        qp = q32[part]
        for start in range(0, rows.size, step):
            chunk = rows[start : start + step]
            t = qp @ xb[start : start + step].T  # (B', C) float32 screen scores (one BLAS product)
            qb, col = np.nonzero(t >= thr[:, None])  # the items to scan, ascending in qb
            qi = part[qb]
            if qi.size:  # one exact score per (query, item) pair, no padding
                acc.add_pairs(qi, rescore(qi, chunk[col][:, None])[:, 0])
            counts = np.bincount(qb, minlength=part.size)
            rest = chunk.size - counts  # (B',) unscanned items of this chunk, each u < thr + err
            if rest.any():
                tail = np.full(nq, -np.inf)
                with np.errstate(divide="ignore"):
                    tail[part] = np.log(rest) + thr.astype(np.float64) + err
                acc.add_tail(tail)
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
    )


def _add_all(acc: _Sum, qi: np.ndarray, rows: np.ndarray, rescore: Rescore) -> None:
    """Rescore every row of ``rows`` exactly for queries ``qi``, in chunks."""
    step = max(1, _CHUNK_ELEMENTS // (8 * qi.size))
    for start in range(0, rows.size, step):
        chunk = np.broadcast_to(rows[start : start + step], (qi.size, min(step, rows.size - start)))
        acc.add_exact(qi, rescore(qi, chunk))


def _float32_at_most(values: np.ndarray) -> np.ndarray:
    """``(B,)`` float32 values, each the largest float32 ``<= values`` (float64)."""
    r = values.astype(np.float32)
    return np.where(r.astype(np.float64) > values, np.nextafter(r, np.float32(-np.inf)), r)

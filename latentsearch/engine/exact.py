"""Exact top-k by certified float32 screening plus float64 rerank.

Items are lifted to ``x = [-1/(2 sigma^2), mu/sigma^2, c]`` and split into *scale groups* by the
magnitude of ``x`` (powers of ``EngineConfig.scale_group_base``). Each group is a FAISS flat
inner-product index over float32 lifted vectors. For a query ``q = [z^2, z, 1]`` the float32 score
of any item of group g differs from the true log q(z|x) by at most

    E_g(q) = kappa * sum_j |q_j| * max_{i in g} |x_ij|     (see lifting.error_coefficient)

so after reranking the screened candidates exactly, with T the k-th best exact score, an item left
out of group g can only matter if its float32 score is >= T - E_g(q). When the best left-out float32
score of a group is below that, the group is certified; otherwise the group is range-searched with
that radius and the extra items are reranked. The result is the exact float64 top-k, for any sigma.
Grouping keeps one tiny-sigma item from loosening the bound of every other item.

Groups whose float32 lifted vectors would overflow are kept in float64 and always scored exactly.

A single unfiltered query on the CPU over a group of more than ``(k + extra) * DENSE_BLOCK`` items
skips FAISS's per-pair search and heap: one matrix-vector product gives every float32 score, the
maxima of blocks of ``DENSE_BLOCK`` items give t, the (k + extra)-th largest block maximum (at most
the (k + extra)-th largest score: it is one of k + extra distinct items), and the candidates are the
items scoring >= t, found inside the blocks whose maximum reaches t. Items left out score < t, which
plays the part of the k-th float32 score above. Over 70,000 d = 10 posteriors on one core this took a
single exact query from 0.58-0.80 ms to 0.39-0.57 ms; batches of 2 or more were no faster than
FAISS's matrix-product search, so they keep it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from latentsearch.engine import screen
from latentsearch.engine.config import exact_group_index
from latentsearch.engine.gpu import to_gpu
from latentsearch.engine.lifting import error_coefficient, lift_items
from latentsearch.errors import FailedPreconditionError

__all__ = ["BitmapFilter", "ExactIndex", "Rescore", "ScaleGroup", "Selection"]

# Exact float64 scorer: rescore(query_idx (B',), rows (B', C)) -> (B', C) log q for those pairs.
Rescore = Callable[[np.ndarray, np.ndarray], np.ndarray]

log = logging.getLogger(__name__)

_FLOAT32_SAFE = 1e30  # lifted magnitudes above this are scored in float64 only
_LIFT_CHUNK = 262_144
# Dense screen (ScaleGroup.dense_screen): items per block, the most queries and the largest group it
# serves. Batches, larger groups, filtered calls and GPU screens use FAISS.
DENSE_BLOCK = 256
DENSE_MAX_QUERIES = 1
DENSE_MAX_ITEMS = 1 << 18
# Batches of unfiltered queries over groups of (k + extra) * DENSE_BLOCK to DENSE_BATCH_MAX_ITEMS
# items take the fused block-maximum screen (ScaleGroup.batch_screen); beyond it (the copy of the
# group it keeps: 84 MB per million d = 10 items) FAISS. BATCH_SCREEN = False: FAISS for every batch.
DENSE_BATCH_MAX_ITEMS = 1 << 21
BATCH_SCREEN = True


class ScaleGroup:
    """Items whose lifted vectors have similar magnitude.

    Attributes:
        rows: ``(n_g,)`` int64 bank rows, ascending.
        absmax: ``(n,)`` float64 ``max_i |x_ij|`` over the group's lifted vectors.
        direct: True for a float64-only group (lifted vectors too large for float32).
        index: FAISS inner-product index over the group's float32 lifted vectors (local ids
            0..n_g-1), built on first use: with an approximate index, exact search rarely needs it,
            so loading a large bank neither lifts every item nor holds a second copy of them.
    """

    def __init__(
        self,
        rows: np.ndarray,
        absmax: np.ndarray,
        *,
        direct: bool,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        factory: str = "Flat",
        device: str = "cpu",
    ) -> None:
        self.rows = rows
        self.absmax = absmax
        self.direct = direct
        self._source = (mu, log_sigma)
        self._factory = factory
        self._index: faiss.IndexFlat | None = None
        self._gpu_index: faiss.Index | None = None
        self._tiles: screen.BlockTiles | None = None
        self._device = device
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def built(self) -> bool:
        return self._index is not None

    @property
    def index(self) -> faiss.IndexFlat:
        """The group's FAISS flat index (built on first access, thread-safe)."""
        if self.direct:
            raise FailedPreconditionError("a float64-only scale group has no FAISS index")
        if self._index is None:
            with self._lock:
                if self._index is None:
                    mu, log_sigma = self._source
                    index = exact_group_index(self._factory, self.absmax.size)
                    for start in range(0, self.rows.size, _LIFT_CHUNK):
                        chunk = self.rows[start : start + _LIFT_CHUNK]
                        lifted = lift_items(mu[chunk], log_sigma[chunk])
                        index.add(np.ascontiguousarray(lifted, dtype=np.float32))
                    self._index = index
        return self._index

    def dense_ok(self, nq: int, kg: int) -> bool:
        """Whether :meth:`dense_screen` serves a screen of ``nq`` queries for ``kg`` candidates."""
        n = len(self)
        return (
            self._factory == "Flat"  # reads the float32 vectors FAISS holds
            and self._device != "cuda"
            and nq <= DENSE_MAX_QUERIES
            and kg * DENSE_BLOCK < n <= DENSE_MAX_ITEMS
        )

    def batch_ok(self, nq: int, kg: int) -> bool:
        """Whether :meth:`batch_screen` serves an unfiltered screen of ``nq`` >= 2 queries."""
        n = len(self)
        return (
            BATCH_SCREEN
            and nq >= 2
            and self.batch_width_ok()
            and kg * max(DENSE_BLOCK, screen.BLOCK) < n <= DENSE_BATCH_MAX_ITEMS
        )

    def batch_width_ok(self) -> bool:
        """Whether the group's kind (flat, on the CPU, lifted width) can take the batch screen."""
        return self._factory == "Flat" and self._device != "cuda" and self.absmax.size <= screen.MAX_WIDTH

    @property
    def tiles(self) -> screen.BlockTiles:
        """The group's float32 lifted vectors in :mod:`~latentsearch.engine.screen`'s blocks (a
        second copy beside FAISS's, made from it on first use, thread-safe)."""
        if self._tiles is None:
            index = self.index
            with self._lock:
                if self._tiles is None:
                    m, n = len(self), self.absmax.size
                    self._tiles = screen.BlockTiles(faiss.rev_swig_ptr(index.get_xb(), m * n).reshape(m, n))
        return self._tiles

    def batch_screen(
        self, q32: np.ndarray, kg: int, bounds: np.ndarray, threads: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`dense_screen` for a batch, by the fused block-maximum kernel
        (:func:`latentsearch.engine.screen.block_screen`; the same return, ``None`` past ``4 kg``
        candidates for a query). ``bounds``: ``(B,)`` the group's float32 error bound per query.
        """
        return screen.block_screen(q32, self.tiles, kg, 2.0 * bounds, 4 * kg, threads)

    def dense_screen(
        self, q32: np.ndarray, kg: int, scores_out: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Every item whose float32 score reaches a per-query threshold t (see the module docstring).

        Args:
            q32: ``(B, n)`` float32 lifted queries.
            kg: candidates wanted per query; requires ``len(self) > kg * DENSE_BLOCK``.
            scores_out: when given, the ``(B, n_g)`` float32 score of every item (local id order)
                is appended to it, for a caller that needs them all (the probability normaliser).

        Returns:
            ``local (B, C)`` int64 local ids (-1 padding), at least ``kg`` per query, and
            ``t (B,)`` float64 with every other item's float32 score ``< t``; ``None`` when the
            scores are so flat that over ``4 kg`` candidates per query would come back (the caller
            then asks FAISS for the top ``kg``).
        """
        index = self.index
        m, n = len(self), self.absmax.size
        xb = faiss.rev_swig_ptr(index.get_xb(), m * n).reshape(m, n)  # FAISS's own copy, no new one
        nq, bs = q32.shape[0], DENSE_BLOCK
        nb = -(-m // bs)
        scores = np.empty((nq, nb * bs), dtype=np.float32)
        np.matmul(q32, xb.T, out=scores[:, :m])
        scores[:, m:] = -np.inf  # the last block's padding never reaches a (finite) threshold
        if scores_out is not None:
            scores_out.append(scores[:, :m])
        blocks = scores.reshape(nq, nb, bs)
        block_max = blocks.max(axis=2)  # (B, nb)
        t = np.partition(block_max, nb - kg, axis=1)[:, nb - kg]  # kg-th largest block maximum
        qb, blk = np.nonzero(block_max >= t[:, None])  # blocks holding candidates
        vals = blocks[qb, blk]  # (M, bs)
        hit, col = np.nonzero(vals >= t[qb, None])
        if hit.size > 4 * kg * nq:
            return None
        query = qb[hit]  # ascending: np.nonzero walks (qb, blk) in row-major order
        counts = np.bincount(query, minlength=nq)
        local = np.full((nq, int(counts.max())), -1, dtype=np.int64)
        first = np.cumsum(counts) - counts
        local[query, np.arange(query.size) - first[query]] = blk[hit] * bs + col
        return local, t.astype(np.float64)

    def screen_index(self, filtered: bool) -> faiss.Index:
        """The index for a top-k screen: the GPU clone when on CUDA and unfiltered, else the CPU one."""
        if filtered or self._device != "cuda":
            return self.index
        if self._gpu_index is None:
            cpu = self.index
            with self._lock:
                if self._gpu_index is None:
                    self._gpu_index = to_gpu(cpu)
        return self._gpu_index


_DIRECT = np.iinfo(np.int64).max  # group key of the float64-only group


class ExactIndex:
    """Scale groups over a bank's lifted vectors; see the module docstring.

    Attributes:
        groups: the scale groups, in increasing magnitude (a float64-only group last).
        group_of_row: ``(N,)`` int16 group of every bank row (saved, so loading skips the lifting).
    """

    def __init__(self, groups: list[ScaleGroup], n_lifted: int, group_of_row: np.ndarray) -> None:
        self.groups = groups
        self.n_lifted = n_lifted
        self.group_of_row = group_of_row
        self.kappa = error_coefficient(n_lifted)
        self.absmax = np.stack([g.absmax for g in groups], axis=1)  # (n, G)

    @classmethod
    def build(
        cls,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        *,
        base: float = 64.0,
        factory: str = "Flat",
        device: str = "cpu",
    ) -> ExactIndex:
        """Lift ``(N, d)`` posteriors chunk by chunk and group them by lifted L1 magnitude."""
        n_items = mu.shape[0]
        keys = np.empty(n_items, dtype=np.int64)
        absmax: dict[int, np.ndarray] = {}
        for start in range(0, n_items, _LIFT_CHUNK):
            stop = min(start + _LIFT_CHUNK, n_items)
            mag = np.abs(lift_items(mu[start:stop], log_sigma[start:stop]))
            key = np.floor(np.log(mag.sum(axis=1)) / math.log(base)).astype(np.int64)
            key[mag.max(axis=1) > _FLOAT32_SAFE] = _DIRECT
            keys[start:stop] = key
            for k in np.unique(key).tolist():
                chunk_max = mag[key == k].max(axis=0)
                absmax[k] = np.maximum(absmax[k], chunk_max) if k in absmax else chunk_max
        order = sorted(absmax)
        group_of_row = np.searchsorted(np.array(order, dtype=np.int64), keys).astype(np.int16)
        return cls.from_groups(
            mu,
            log_sigma,
            group_of_row,
            [absmax[k] for k in order],
            [k == _DIRECT for k in order],
            factory=factory,
            device=device,
        )

    @classmethod
    def from_groups(
        cls,
        mu: np.ndarray,
        log_sigma: np.ndarray,
        group_of_row: np.ndarray,
        absmax: list[np.ndarray],
        direct: list[bool],
        *,
        factory: str = "Flat",
        device: str = "cpu",
    ) -> ExactIndex:
        """Rebuild from a saved grouping (no lifting; FAISS indexes are built on first use)."""
        groups = [
            ScaleGroup(
                np.flatnonzero(group_of_row == g).astype(np.int64),
                np.asarray(absmax[g], dtype=np.float64),
                direct=bool(direct[g]),
                mu=mu,
                log_sigma=log_sigma,
                factory=factory,
                device=device,
            )
            for g in range(len(absmax))
        ]
        log.debug("exact index: %d scale groups %s", len(groups), [len(g) for g in groups])
        return cls(groups, 2 * mu.shape[1] + 1, group_of_row)

    def warm(self, kg: int) -> float:
        """Compile (or load) the batch screen's kernel now when a batch of ``kg`` candidates per
        group would take it (not in the first batch); returns the seconds it took."""
        if any(g.batch_ok(2, kg) for g in self.groups if not g.direct):
            t = time.perf_counter()
            screen.kernel(self.n_lifted)
            return time.perf_counter() - t
        return 0.0

    def error_bounds(self, queries: np.ndarray) -> np.ndarray:
        """``(B, G)`` float64 bound on the float32 score error of every item of each group."""
        return self.kappa * (np.abs(queries) @ self.absmax)

    # -- search -------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        extra: int,
        rescore: Rescore,
        selection: Selection | None = None,
        only: Iterable[int] | None = None,
        screens: dict[int, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (over the scale groups ``only``, default all).

        Args:
            queries: ``(B, n)`` float64 lifted queries.
            k: results per query (>= 1; may exceed the number of selected items).
            extra: screened candidates per group beyond k (``k + max(k, extra)`` in all).
            rescore: exact float64 scorer, ``rescore(query_idx (B',), rows (B', C)) -> (B', C)``.
            selection: restrict to a subset of rows (label filter), applied inside FAISS.
            screens: when given, receives ``{group: (B, n_g) float32 scores}`` of the groups
                screened densely (every item scored), so the caller need not score them again.

        Returns:
            ``rows (B, k)`` int64 and ``scores (B, k)`` float64, best first, ties by row; rows are
            -1 and scores -inf past the number of selected items.
        """
        nq = queries.shape[0]
        active = list(range(len(self.groups))) if only is None else list(only)
        q32 = queries.astype(np.float32)
        bounds = self.error_bounds(queries)  # (B, G)
        finite = np.isfinite(bounds).all(axis=1) & np.isfinite(q32).all(axis=1)
        finite &= (bounds < _FLOAT32_SAFE).all(axis=1)
        if not finite.all():
            rows, scores = np.full((nq, k), -1, np.int64), np.full((nq, k), -np.inf)
            bad = np.flatnonzero(~finite)
            rows[bad], scores[bad] = self._brute(bad, k, rescore, selection, groups=active)
            good = np.flatnonzero(finite)
            if good.size:
                sub = lambda qi, r: rescore(good[qi], r)  # noqa: E731 - re-index into the caller's batch
                rows[good], scores[good] = self.search(
                    queries[good], k, extra=extra, rescore=sub, selection=selection, only=only
                )
            return rows, scores

        screen = k + max(k, extra)
        cands: list[np.ndarray] = []
        pending: list[tuple[int, np.ndarray]] = []  # (group, kth float32 score per query)
        direct = []
        for gi in active:
            group = self.groups[gi]
            subset = None if selection is None else selection.group(gi)
            params = None if subset is None else subset.params
            count = len(group) if subset is None else subset.count
            kg = min(screen, count)
            if kg == 0:
                continue
            if group.direct:
                direct.append(gi)
                continue
            dense = None
            if params is None and screens is None and group.batch_ok(nq, kg):
                dense = group.batch_screen(q32, kg, bounds[:, gi], faiss.omp_get_max_threads())
            elif params is None and group.dense_ok(nq, kg):
                if screens is None:
                    dense = group.dense_screen(q32, kg)
                else:
                    got: list[np.ndarray] = []
                    dense = group.dense_screen(q32, kg, scores_out=got)
                    screens[gi] = got[0]
            if dense is not None:
                local, kth = dense  # every unscreened item scores < kth in float32
            else:
                dist, local = group.screen_index(params is not None).search(q32, kg, params=params)
                kth = dist[:, kg - 1].astype(np.float64)  # every unscreened item scores <= kth
            cands.append(np.where(local >= 0, group.rows[np.maximum(local, 0)], -1))
            if kg < count:
                pending.append((gi, kth))
        if direct:
            cands.append(self._brute(np.arange(nq), k, rescore, selection, groups=direct)[0])
        cand = np.concatenate(cands, axis=1) if cands else np.full((nq, 1), -1, np.int64)
        scores = _rescore_padded(rescore, np.arange(nq), cand)
        rows, top = _topk(cand, scores, k)

        threshold = top[:, k - 1]  # k-th best exact score (-inf when fewer than k candidates)
        extra_rows: dict[int, list[np.ndarray]] = {}
        for gi, kth in pending:
            group = self.groups[gi]
            params = None if selection is None else selection.group(gi).params
            unsure = np.flatnonzero(kth + bounds[:, gi] >= threshold)
            for b in unsure.tolist():
                radius = _float32_below(threshold[b] - bounds[b, gi])
                _, _, local = group.index.range_search(q32[b : b + 1], radius, params=params)
                extra_rows.setdefault(b, []).append(group.rows[local])
        if extra_rows:
            log.debug("exact search: %d of %d queries needed a range fallback", len(extra_rows), nq)
        for b, more in extra_rows.items():
            merged = np.unique(np.concatenate([cand[b][cand[b] >= 0], *more]))[None, :]
            s = rescore(np.array([b]), merged)
            rows[b], top[b] = (a[0] for a in _topk(merged, s, k))
        return rows, top

    def _brute(
        self,
        query_idx: np.ndarray,
        k: int,
        rescore: Rescore,
        selection: Selection | None,
        groups: Iterable[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Float64 scan of the (selected) rows of ``groups`` for queries ``query_idx``."""
        all_rows = np.concatenate([self.groups[g].rows for g in groups])
        if selection is not None:
            all_rows = all_rows[selection.mask[all_rows]]
        all_rows.sort()
        nq = query_idx.size
        best_rows = np.full((nq, k), -1, np.int64)
        best = np.full((nq, k), -np.inf)
        step = max(1, 4_000_000 // max(1, nq * self.n_lifted))
        for start in range(0, all_rows.size, step):
            chunk = np.broadcast_to(all_rows[start : start + step], (nq, min(step, all_rows.size - start)))
            s = rescore(query_idx, chunk)
            best_rows, best = _topk(np.concatenate([best_rows, chunk], 1), np.concatenate([best, s], 1), k)
        return best_rows, best


@dataclass(frozen=True, eq=False)
class BitmapFilter:
    """A subset of the ids ``0..n-1`` of one FAISS index, as a bitmap ID selector.

    Attributes:
        bitmap: ``(ceil(n / 8),)`` uint8, the subset's mask packed little-endian: the buffer the
            selector reads through a raw pointer, held here as long as the selector is.
        selector: ``faiss.IDSelectorBitmap`` over ``bitmap``.
        params: ``faiss.SearchParameters`` carrying ``selector`` (for ``search``/``range_search``).
        count: number of selected ids.
    """

    bitmap: np.ndarray
    selector: faiss.IDSelectorBitmap
    params: faiss.SearchParameters
    count: int

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> BitmapFilter:
        """The ids ``i`` with ``mask[i]`` (``mask``: ``(n,)`` bool)."""
        bitmap = np.packbits(mask, bitorder="little")
        # FAISS's Python wrapper takes the array: it passes len(bitmap) bytes and a pointer to them
        # (its stub lists only the C++ (n, pointer) form).
        selector = faiss.IDSelectorBitmap(bitmap)  # type: ignore[call-arg, arg-type]
        params = faiss.SearchParameters()
        params.sel = selector  # the wrapper keeps a reference to the selector too
        return cls(bitmap=bitmap, selector=selector, params=params, count=int(np.count_nonzero(mask)))


class Selection:
    """A subset of bank rows (a label filter), as FAISS bitmap selectors; immutable once built.

    Args:
        mask: ``(N,)`` bool, True for rows that may be returned.
        groups: the scale groups whose local ids the per-group selectors address.

    Attributes:
        mask: the ``(N,)`` mask.
        count: number of selected rows.
        rows: selector over bank rows, for indexes whose ids are bank rows (the approximate index).
        per_group: one selector per scale group, over its local ids ``0..n_g-1``.
    """

    def __init__(self, mask: np.ndarray, groups: Sequence[ScaleGroup]) -> None:
        self.mask = mask
        self.rows = BitmapFilter.from_mask(mask)
        self.count = self.rows.count
        self.per_group = tuple(BitmapFilter.from_mask(mask[group.rows]) for group in groups)

    def group(self, gi: int) -> BitmapFilter:
        """The selector of scale group ``gi``."""
        return self.per_group[gi]


def _float32_below(value: float) -> float:
    """The largest float32 strictly below ``value`` (FAISS range search keeps scores > radius)."""
    r = np.float32(value)
    if float(r) >= value:
        r = np.nextafter(r, np.float32(-np.inf))
    return float(np.nextafter(r, np.float32(-np.inf)))


def _rescore_padded(rescore: Rescore, query_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rescore ``rows (B, C)`` where -1 marks padding (scored -inf)."""
    pad = rows < 0
    scores = rescore(query_idx, np.where(pad, 0, rows))
    scores[pad] = -np.inf
    return scores


def _topk(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of each row of ``(B, C)`` candidates: score descending, then row ascending.

    Padding (row -1, score -inf) sorts last. Returns ``(B, k)`` rows and scores, padded.
    """
    nq, c = rows.shape
    key_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((key_rows, -scores), axis=-1)[:, :k]
    out_rows = np.take_along_axis(rows, order, 1)
    out_scores = np.take_along_axis(scores, order, 1)
    if c < k:
        out_rows = np.concatenate([out_rows, np.full((nq, k - c), -1, np.int64)], 1)
        out_scores = np.concatenate([out_scores, np.full((nq, k - c), -np.inf)], 1)
    out_rows = np.where(np.isneginf(out_scores), -1, out_rows)
    return out_rows, out_scores

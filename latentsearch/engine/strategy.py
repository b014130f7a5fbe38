"""Which exact path answers a batch: a cost model of the exact strategies, calibrated by measurement.

Exact mode has two certified paths once a bank has an approximate index: ``"partitions"`` (branch
and bound over the partitions, scanning a few % of the bank) and ``"flat"`` (the certified float32
screen of every item). Neither wins everywhere: per call, the flat screen's cost grows with the bank
but is one BLAS product for a batch, while branch and bound pays a per-query overhead and wins on
large banks with few queries (measured on 2 cores: flat faster at every batch size at 200k items,
partitions 3x faster at B = 1 but slower from B = 64 at 1M).

:class:`StrategyCosts` holds what :func:`calibrate` measured: the seconds of one exact call on each
path at a few batch sizes (:data:`PROBE_BATCH_SIZES`), timed on the built index for each of the
benchmark's three query families (:func:`family_probes`: box, prior and posterior samples), since
the best path differs by family (1M items, B = 64, 1 thread: the kernel 1.2-1.6x faster than the
flat screen on box and posterior queries and 3.3x slower on prior ones). :data:`PROBE_ROUNDS`
rounds each time every size on every path, so all paths see the same machine load, after one
warm-up call each; the minimum over rounds is kept per family, size and path (noise only ever adds
time). Rounds stop once :data:`PROBE_BUDGET_S` is spent (the first always runs). The first round's
work is bounded too: a family's single-query calls stop after :data:`PROBE_CELL_BUDGET_S`, and the
interpreted branch and bound stops being timed at larger sizes once it is :data:`SKIP_FACTOR` times
slower than the compiled one (they do the same work per query) on every family, a per-query path
stops being timed at larger sizes after a call over :data:`LONG_CALL_S` (costed per query from
there), and the flat screen, whose cost does not depend on the queries, is timed on one family
once a call takes over :data:`LONG_CALL_S` (else on each, keeping the least).

When: ``SearchEngine.from_bank`` measures once the approximate index is built, and the costs are
saved in the manifest; an engine saved without them loads with ``costs=None`` and keeps the old
rule (partitions whenever an approximate index exists). ``SearchEngine.calibrate_exact`` measures
again on demand (another host). :meth:`StrategyCosts.predict` predicts a call of B queries by
linear interpolation between the probed sizes (beyond the largest: the same cost per query).
:meth:`StrategyCosts.choose` is minimax over the families: the path whose worst ratio to the best
path of a family is least (the default must stay near the best for every family; the mean time
let one family be 1.6x off at 1M), then the cheaper on average, then the kernel, the partitions,
the flat screen. Tables saved before families hold only the interleaved mean and choose the
cheapest on it; tables saved before the kernel hold only the first two paths. An explicit
``EngineConfig.exact_strategy`` always wins over the model.

Approximate calls (``approx_strategy="auto"``, point queries at the index's nprobe) choose the same
way among the two approximate paths (:data:`APPROX_PATHS`: the compiled kernel and FAISS's scan)
and the exact ones (:meth:`StrategyCosts.choose_approx`), but an approximate path is a candidate
only when its recall@k on the probe families, measured at build against their exact top-k
(:func:`probe_recall`, the least over families and over calls of one and of many queries), reached
``EngineConfig.approx_min_recall``: an exact answer has recall 1, so approximate mode never returns
less than that recall on the probes, and an exact path answers where it ranks better than every
approximate one that qualifies by :data:`EXACT_HANDICAP` (a margin for noise). The engine measures
the approximate paths where approximate mode is the default. On a Fashion-MNIST VAE
bank (200k items, one core) the scan's recall on prior queries was 0.915 (the kernel's 0.991), and
at B = 64 the exact flat screen cost less per query (0.49 ms) than the kernel's batched
approximate search (0.76-0.88 ms): the rule this replaces (the kernel below 8 queries per call,
the scan from 8) answered batches with 0.915 recall. Tables saved without the approximate paths'
costs keep that rule.

How much work the approximate kernel does is measured too (``EngineConfig.approx_kernel_scale``
None): the share of a query's partitions that hold its top-k falls as the bank grows, so the
default work (the ``nprobe`` best centroids, then by bound up to ``approx_kernel_budget`` of the
partitions) is more than a large bank needs, and less than some banks need to reach the recall.
The kernel's recall on the probes is measured at the default work; where it reaches
``approx_min_recall``, :data:`KERNEL_SCALES_LESS` are tried in turn (largest first) and the engine
keeps the smallest whose recall reached ``approx_min_recall`` + :data:`SCALE_MARGIN` (stopping at
the first that fails); where it falls short by at most :data:`SCALE_UP_REACH`,
:data:`KERNEL_SCALES_MORE` are tried (smallest first) and the first that reaches the bar with the
margin is kept (none: the default work, and approximate calls are answered by the exact paths).
:attr:`StrategyCosts.approx_kernel_scale` saves it, and the kernel's costs and recall in the table
are those of that scale.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from latentsearch.engine.typicality import reference_points
from latentsearch.errors import CorruptIndexError, InvalidArgumentError

__all__ = [
    "APPROX_PATHS",
    "BASE_PATHS",
    "FAMILIES",
    "KERNEL_SCALES_LESS",
    "KERNEL_SCALES_MORE",
    "PATHS",
    "PROBE_BATCH_SIZES",
    "PROBE_ROUNDS",
    "SCALE_MARGIN",
    "SCALE_UP_REACH",
    "ApproxChoice",
    "ApproxPath",
    "ExactPath",
    "StrategyCosts",
    "calibrate",
    "family_probes",
    "measure_paths",
    "probe_queries",
    "probe_recall",
]

ExactPath = Literal["partitions", "flat", "kernel"]
PATHS: tuple[ExactPath, ...] = ("partitions", "flat", "kernel")
# Approximate mode's paths for point queries: the compiled kernel, FAISS's scan of the partitions.
ApproxPath = Literal["kernel", "scan"]
APPROX_PATHS: tuple[ApproxPath, ...] = ("kernel", "scan")
# What answers an approximate call: ("approx", an approximate path) or ("exact", an exact path).
ApproxChoice = tuple[Literal["approx"], ApproxPath] | tuple[Literal["exact"], ExactPath]
# The paths every saved cost table holds (the kernel's is optional: tables older than it lack it).
BASE_PATHS: tuple[ExactPath, ...] = ("partitions", "flat")
# Batch sizes probed: single queries, a small batch (below it FAISS scores pair by pair and the
# engine runs on one thread), a batch that runs every BLAS thread.
PROBE_BATCH_SIZES = (1, 16, 64)
# Rounds over every batch size and path; the minimum per size and path is kept. On 2 cores shared
# with other work, one round in two or three was slowed several times over by bursts of load
# (multi-threaded FAISS calls suffer most), so 2 rounds were not enough to see through them.
PROBE_ROUNDS = 3
# No round starts once calibration has taken this long (the first always runs). With 16 single
# queries per family (the engine's calibration) one round of the exact paths took about 1.1 s at
# 200k items on one core, so a budget of 1 s left one round, and a burst of load once timed the
# kernel 5x slower at B = 16 than the rounds before and after: 2.5 s gives 2-3 rounds there.
PROBE_BUDGET_S = 2.5
# A round of a small batch size makes several calls, this many queries in all (single queries'
# costs differ by family: one call would measure one query).
PROBE_MIN_QUERIES = 8
# The probe query families (the benchmark's): calibration times each separately, since the best
# path differs by family (1M items, B = 64: the kernel 1.2-1.6x faster than the flat screen on box
# and posterior queries, 3.3x slower on prior ones).
FAMILIES = ("box", "prior", "posterior")
# With families, a size's calls of one family stop once they took this long (after the first): at
# 10M items one flat call of a single query takes about a second.
PROBE_CELL_BUDGET_S = 0.25
# Branch and bound over the partitions does the kernel's work, interpreted: from the first size at
# which it is this many times slower than the kernel on every family, it is not timed at larger
# sizes (their cost: its cost per query at the last size timed, which only overstates it).
SKIP_FACTOR = 1.5
SKIPPABLE: dict[str, str] = {"partitions": "kernel"}
# Paths whose cost per query hardly depends on the batch size (each query is searched on its own);
# one whose call took longer than LONG_CALL_S at a size is not timed at larger sizes either (10M
# items: one call of 64 single-threaded kernel queries takes about 10 s).
PER_QUERY_PATHS: tuple[str, ...] = ("partitions", "kernel")  # the approximate kernel too
LONG_CALL_S = 1.0
# The flat screen reads the whole bank once per call, whatever the queries (at 1M items its times
# for the three families agreed within 1%): with families, its cost at a size is the least over
# the families timed (more samples against bursts of load), the next family not timed once a call
# took over LONG_CALL_S, and holds for all.
# The order ties are broken in (the compiled kernel first).
_PREFERENCE: tuple[ExactPath, ...] = ("kernel", "partitions", "flat")
# An approximate call takes an exact path over an approximate one that reaches the recall only when
# its rank (worst ratio, mean time) is better by this factor: calibrations of one 200k-item engine
# timed single queries up to 20% apart, which flipped the choice between the approximate kernel and
# the exact one (within 2x of each other, one better on box queries, the other on prior ones).
EXACT_HANDICAP = 1.2
# Shares of its default work the approximate kernel is tried at (see the module docstring), when
# the default work reaches the recall: largest first. Recall@10 of the approximate kernel on a
# Fashion-MNIST VAE bank (box / prior / posterior; 32 single queries each, one core; by centroid
# then up to the budget, as shares of the partitions): at 10M items 3% then 8% (the default) 1.000 /
# 1.000 / 1.000 at 17-23 ms per query, 2% then 5% 1.000 / 1.000 / 1.000 at 12-17 ms, 1% then 3%
# 1.000 / 0.997 / 1.000 at 11 ms; at 1M items 1.000 / 0.994 / 1.000 at 3.5-4.1 ms, 0.991 on prior
# queries at 2% / 5%, 0.978 at 1% / 3%.
KERNEL_SCALES_LESS: tuple[float, ...] = (2 / 3, 1 / 2, 1 / 3)
# ... and when it does not: smallest first. At 1M d = 32 posteriors of a Fashion-MNIST VAE the
# default work's probe recall was 0.979, so approximate calls were answered exactly: 12-28 ms per
# single query, where the approximate kernel took 7.5-9.4 ms.
KERNEL_SCALES_MORE: tuple[float, ...] = (3 / 2, 2.0, 3.0)
# ... and only where the default work's recall came within this of the bar: further below, more
# work did not close the gap (a 4,000-item test bank: 0.593 at the default work, 0.930 at 3x), and
# the three trials would only cost build time.
SCALE_UP_REACH = 0.05
# Another share than the default must clear approx_min_recall by this much on the probes (128
# queries per family: an estimate), the default work only the bar itself.
SCALE_MARGIN = 0.005
_CHOICE_CACHE = 4096
# A candidate of the minimax rank (_worst_ratios): an exact path, or an ApproxChoice.
_C = TypeVar("_C")


@dataclass(frozen=True, kw_only=True)
class StrategyCosts:
    """Measured seconds per exact call on each path at each probed batch size."""

    # Ascending probed batch sizes (B), each >= 1.
    batch_sizes: tuple[int, ...]
    # Seconds of one call of B queries per path, one entry per batch size (with ``families``: the
    # mean over them).
    seconds: dict[str, tuple[float, ...]]
    # The same per query family (``{family: {path: per-size seconds}}``, families of
    # :data:`FAMILIES`); None: a table measured on interleaved probes (saved before families were).
    families: dict[str, dict[str, tuple[float, ...]]] | None = None
    # The approximate paths' seconds per call, per family as ``families`` (``{family: {path:
    # per-size seconds}}``, paths of :data:`APPROX_PATHS`); None: a table saved before they were
    # measured (approximate calls then keep the old rule, see the module docstring).
    approx: dict[str, dict[str, tuple[float, ...]]] | None = None
    # Each approximate path's recall@k on the probes (:func:`probe_recall`), in [0, 1]; with approx.
    approx_recall: dict[str, float] | None = None
    # The share of its default work the approximate kernel does (EngineConfig.approx_kernel_scale,
    # chosen at build, see the module docstring), > 0; its ``approx`` costs and recall are at it.
    approx_kernel_scale: float = 1.0
    # choose()'s answers by batch size (it runs on every exact call): not part of the value.
    _chosen: dict[int, ExactPath] = field(default_factory=dict, init=False, repr=False, compare=False)
    # choose_approx()'s, by (batch size, recall wanted).
    _chosen_approx: dict[tuple[int, float], ApproxChoice] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        tables = [self.seconds, *(self.families or {}).values()]
        ok = (
            len(sizes) >= 1
            and all(isinstance(b, int) and b >= 1 for b in sizes)
            and list(sizes) == sorted(set(sizes))
            and (self.families is None or len(self.families) >= 1)
            and all(
                set(BASE_PATHS) <= set(t) <= set(PATHS)
                and set(t) == set(self.seconds)
                and all(
                    len(v) == len(sizes) and all(np.isfinite(s) and s >= 0 for s in v) for v in t.values()
                )
                for t in tables
            )
        )
        if not ok:
            raise InvalidArgumentError(
                f"strategy costs need ascending batch sizes >= 1 and, for each of {BASE_PATHS} (and "
                f"optionally {PATHS[2:]}), one finite time >= 0 per size, the same paths in every "
                f"family; got {self.batch_sizes!r}, {self.seconds!r}, {self.families!r}",
                field="costs",
            )
        if (self.approx is None) != (self.approx_recall is None) or (
            self.approx is not None and not self._approx_ok()
        ):
            raise InvalidArgumentError(
                f"approximate path costs need the families of the exact table, the same paths of "
                f"{APPROX_PATHS} in each, one finite time >= 0 per size, and a recall in [0, 1] for "
                f"each path; got {self.approx!r}, {self.approx_recall!r}",
                field="costs",
            )
        scale = self.approx_kernel_scale
        if isinstance(scale, bool) or not isinstance(scale, float) or not 0.0 < scale < np.inf:
            raise InvalidArgumentError(
                f"the approximate kernel's scale must be a finite number > 0, got {scale!r}", field="costs"
            )

    def _approx_ok(self) -> bool:
        approx, recall = self.approx or {}, self.approx_recall or {}
        paths = set(next(iter(approx.values()), {}))
        return (
            self.families is not None
            and set(approx) == set(self.families)
            and len(paths) >= 1
            and paths <= set(APPROX_PATHS)
            and set(recall) == paths
            and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in recall.values())
            and all(
                set(t) == paths
                and all(
                    len(v) == len(self.batch_sizes) and all(np.isfinite(x) and x >= 0 for x in v)
                    for v in t.values()
                )
                for t in approx.values()
            )
        )

    def predict(self, path: ExactPath, nq: int, family: str | None = None) -> float:
        """Predicted seconds of one call of ``nq`` queries on ``path`` (of ``family``'s queries
        when given, else the mean over families)."""
        secs = self.seconds[path] if family is None else self._family(family)[path]
        return _interpolate(self.batch_sizes, secs, nq)

    def _family(self, family: str) -> dict[str, tuple[float, ...]]:
        if self.families is None or family not in self.families:
            raise InvalidArgumentError(f"no costs measured for family {family!r}", field="family")
        return self.families[family]

    def worst_ratio(self, path: ExactPath, nq: int) -> float:
        """The largest, over the measured families, of ``path``'s predicted time over the best
        path's for that family (1.0: the best for every family); without families, over the mean."""
        return _worst_ratios(self._exact_times(nq))[path]

    def _exact_times(self, nq: int) -> dict[ExactPath, list[float]]:
        """Each exact path's predicted seconds for ``nq`` queries, one per family (or the mean)."""
        families: list[str | None] = list(self.families) if self.families else [None]
        paths: list[ExactPath] = [p for p in _PREFERENCE if p in self.seconds]
        return {p: [self.predict(p, nq, f) for f in families] for p in paths}

    def choose(self, nq: int) -> ExactPath:
        """The path for a call of ``nq`` queries: the least worst ratio to the best path over the
        query families (minimax: the default must stay near the best for every family, and a
        path fast on average can be several times too slow for one), then the least mean time;
        on a tie the kernel, then the partitions, then the flat screen. A table without families
        (interleaved probes) has one ratio, so the cheapest on average wins."""
        if nq in self._chosen:
            return self._chosen[nq]
        ratios = _worst_ratios(self._exact_times(nq))
        found = min(ratios, key=lambda p: (round(ratios[p], 9), self.predict(p, nq)))
        if len(self._chosen) < _CHOICE_CACHE:
            self._chosen[nq] = found
        return found

    def choose_approx(self, nq: int, min_recall: float) -> ApproxChoice | None:
        """What answers an approximate call of ``nq`` point queries: the least worst ratio to the
        best candidate over the families, then the least mean time (as :meth:`choose`), among the
        approximate paths whose measured recall is at least ``min_recall`` and the exact paths,
        an exact path's rank counted :data:`EXACT_HANDICAP` times worse while an approximate path
        qualifies (on a tie the approximate kernel, the scan, then the exact paths in
        :meth:`choose`'s order).
        None when the table holds no approximate paths (saved before they were measured)."""
        if self.approx is None or self.approx_recall is None or self.families is None:
            return None
        key = (nq, min_recall)
        if key in self._chosen_approx:
            return self._chosen_approx[key]
        recall = self.approx_recall
        candidates: list[ApproxChoice] = [
            ("approx", p) for p in APPROX_PATHS if recall.get(p, -1.0) >= min_recall
        ]
        candidates += [("exact", p) for p in _PREFERENCE if p in self.seconds]
        approx, families = self.approx, self.families

        def cost(c: ApproxChoice, f: str) -> float:
            table = approx[f] if c[0] == "approx" else families[f]
            return _interpolate(self.batch_sizes, table[c[1]], nq)

        times = {c: [cost(c, f) for f in families] for c in candidates}
        ratios = _worst_ratios(times)

        def rank(c: ApproxChoice) -> tuple[float, float]:
            handicap = EXACT_HANDICAP if c[0] == "exact" and len(candidates) > len(self.seconds) else 1.0
            return round(ratios[c] * handicap, 9), float(np.mean(times[c])) * handicap

        found = min(candidates, key=rank)
        if len(self._chosen_approx) < _CHOICE_CACHE:
            self._chosen_approx[key] = found
        return found

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_sizes": list(self.batch_sizes),
            "seconds": {k: list(v) for k, v in self.seconds.items()},
        }
        if self.families is not None:
            out["families"] = {f: {k: list(v) for k, v in t.items()} for f, t in self.families.items()}
        if self.approx is not None:
            out["approx"] = {f: {k: list(v) for k, v in t.items()} for f, t in self.approx.items()}
            out["approx_recall"] = dict(self.approx_recall or {})
            out["approx_kernel_scale"] = self.approx_kernel_scale
        return out

    @classmethod
    def from_dict(cls, data: Any) -> StrategyCosts:
        """Rebuild from :meth:`to_dict` output (with or without ``families``); CorruptIndexError when
        it is not one."""
        try:
            families, approx, recall = data.get("families"), data.get("approx"), data.get("approx_recall")
            return cls(
                batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
                seconds=_table(data["seconds"]),
                families=None if families is None else {str(f): _table(t) for f, t in families.items()},
                approx=None if approx is None else {str(f): _table(t) for f, t in approx.items()},
                approx_recall=None if recall is None else {str(p): float(r) for p, r in recall.items()},
                approx_kernel_scale=float(data.get("approx_kernel_scale", 1.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgumentError) as exc:
            raise CorruptIndexError(f"bad exact strategy costs {data!r}: {exc}") from exc

    @classmethod
    def of_families(
        cls, batch_sizes: tuple[int, ...], families: dict[str, dict[str, tuple[float, ...]]]
    ) -> StrategyCosts:
        """The table of per-family measurements, ``seconds`` their mean."""
        tables = list(families.values())
        mean = {p: tuple(np.mean([t[p] for t in tables], axis=0).tolist()) for p in tables[0]}
        return cls(batch_sizes=batch_sizes, seconds=mean, families=families)


def _worst_ratios(times: Mapping[_C, Sequence[float]]) -> dict[_C, float]:
    """Each candidate's largest ratio, over the columns (query families), of its seconds to the
    column's least: ``times`` maps a candidate to one time per column, in the same column order;
    1.0 for a candidate that is the best in every column. The minimax rank of :meth:`StrategyCosts.
    choose` and :meth:`StrategyCosts.choose_approx` (a zero time is 1.0 against a zero best, inf
    against it otherwise)."""
    best = [min(column) for column in zip(*times.values(), strict=True)]
    return {
        c: max(t / b if b > 0 else (1.0 if t == 0 else np.inf) for t, b in zip(secs, best, strict=True))
        for c, secs in times.items()
    }


def _table(data: Any) -> dict[str, tuple[float, ...]]:
    return {str(k): tuple(float(s) for s in v) for k, v in data.items()}


def _interpolate(sizes: tuple[int, ...], secs: tuple[float, ...], nq: int) -> float:
    """Seconds of a call of ``nq`` queries from those measured at ``sizes``: linear between the
    probed sizes, the first below them, the same cost per query beyond the largest."""
    if nq >= sizes[-1]:
        return secs[-1] * nq / sizes[-1]
    i = bisect.bisect_right(sizes, nq)  # plain Python: np.interp took 3 us a call, per query
    if i == 0:
        return secs[0]
    b0, b1 = sizes[i - 1], sizes[i]
    return secs[i - 1] + (secs[i] - secs[i - 1]) * (nq - b0) / (b1 - b0)


def family_probes(mu: np.ndarray, log_sigma: np.ndarray, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` probe points ``(n, d)`` of each of :data:`FAMILIES`: z uniform in [-5, 5]^d (a
    person's sliders), z ~ N(0, I) (the prior) and z ~ q(z|x) of a random item (the benchmark's
    query families); deterministic for a seed."""
    rng = np.random.default_rng(seed)
    d = mu.shape[1]
    _, posterior = reference_points(mu, log_sigma, n, seed + 1)
    box, prior = rng.uniform(-5.0, 5.0, size=(n, d)), rng.standard_normal((n, d))
    return {"box": box, "prior": prior, "posterior": posterior}


def probe_queries(mu: np.ndarray, log_sigma: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``(n, d)`` probe points, the :func:`family_probes` interleaved row by row (box, prior,
    posterior, box, ...)."""
    families = np.stack(list(family_probes(mu, log_sigma, n, seed=seed).values()))
    return families.transpose(1, 0, 2).reshape(3 * n, -1)[:n]  # (3, n, d) -> interleaved (n, d)


def calibrate(
    run: Callable[[ExactPath, np.ndarray], object],
    probes: np.ndarray | dict[str, np.ndarray],
    *,
    batch_sizes: tuple[int, ...] = PROBE_BATCH_SIZES,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
    paths: tuple[ExactPath, ...] = BASE_PATHS,
    min_queries: int = PROBE_MIN_QUERIES,
) -> StrategyCosts:
    """The exact paths' cost table: :func:`measure_paths` of ``run(path, points)`` (one exact call
    of ``points (B, d)`` on ``path``), the flat screen's cost taken as independent of the queries."""
    tables = measure_paths(
        run,
        probes,
        batch_sizes=batch_sizes,
        rounds=rounds,
        budget_s=budget_s,
        paths=paths,
        min_queries=min_queries,
    )
    if isinstance(probes, dict):
        return StrategyCosts.of_families(tuple(batch_sizes), tables)
    return StrategyCosts(batch_sizes=tuple(batch_sizes), seconds=tables["all"])


def measure_paths(
    run: Callable[[Any, np.ndarray], object],
    probes: np.ndarray | dict[str, np.ndarray],
    *,
    batch_sizes: tuple[int, ...] = PROBE_BATCH_SIZES,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
    paths: tuple[str, ...] = BASE_PATHS,
    query_free: tuple[str, ...] = ("flat",),
    min_queries: int = PROBE_MIN_QUERIES,
) -> dict[str, dict[str, tuple[float, ...]]]:
    """Time ``run(path, points)`` (one call of ``points (B, d)`` on ``path``) on each path:
    ``{family: {path: seconds per call at each of batch_sizes}}`` (family ``"all"`` for an array).

    ``probes``: ``{family: (P, d)}`` (:func:`family_probes`), each family timed on its own and the
    table keeping them (:attr:`StrategyCosts.families`); or one ``(P, d)`` array, the families
    interleaved (the older table without families). A call of B queries takes B consecutive probes,
    the next ones for the next call or size (wrapping around). Size B makes
    ``max(1, min_queries // B)`` calls (with families: that many over the families, at least
    one each, a family's stopping after ``PROBE_CELL_BUDGET_S``; a path of :data:`SKIPPABLE`
    makes the first of them for :data:`PROBE_MIN_QUERIES` queries), the same ones every round, and
    counts their mean. Rounds stop early once ``budget_s`` seconds have gone (after the first).
    ``paths`` are those timed (``BASE_PATHS`` and optionally the kernel). With families, a path of
    :data:`SKIPPABLE` :data:`SKIP_FACTOR` times slower than its compiled twin on every family, or
    one of :data:`PER_QUERY_PATHS` whose call took over :data:`LONG_CALL_S`, stops being timed at
    larger sizes (costed per query from the last size timed); the cost of a path of ``query_free``
    (whose work does not depend on the queries: the flat screen) is the least over the families,
    the first only once a call took over :data:`LONG_CALL_S`.
    """
    by_family = isinstance(probes, dict)
    sets = probes if isinstance(probes, dict) else {"all": probes}
    share = len(sets) if by_family else 1
    cell_budget = PROBE_CELL_BUDGET_S if by_family else np.inf
    best: dict[str, dict[str, list[float]]] = {
        f: {p: [np.inf] * len(batch_sizes) for p in paths} for f in sets
    }
    started = time.perf_counter()
    first = next(iter(sets.values()))
    for path in paths:  # warm-up: first-call allocations and page-ins are not the path's cost
        run(path, first[:1])
    work: dict[str, list[list[np.ndarray]]] = {}  # per family, per size: the calls of every round
    for f, pts in sets.items():
        work[f], start = [], 0
        for b in batch_sizes:
            calls = max(1, min_queries // (b * share))  # small calls: several, over different probes
            rows = np.arange(start, start + calls * b).reshape(calls, b) % len(pts)
            work[f].append([pts[r] for r in rows])
            start += calls * b
    few = [max(1, PROBE_MIN_QUERIES // (b * share)) for b in batch_sizes]
    skipped: dict[str, int] = {}  # path -> the last size index timed
    shared = next(iter(sets))
    for r in range(rounds):  # each round visits every size and path: a burst of load spoils one round
        if r and time.perf_counter() - started > budget_s:
            break
        for i in range(len(batch_sizes)):
            for path in paths:
                if path in skipped:
                    continue
                for f in sets:
                    if path in query_free and f != shared and best[shared][path][i] > LONG_CALL_S:
                        break  # one family's timing of the flat screen is enough for a long call
                    t = time.perf_counter()
                    done = 0
                    # a path with a compiled twin does its twin's work more slowly: the first
                    # PROBE_MIN_QUERIES queries' calls show whether it is dominated
                    todo = work[f][i][: few[i]] if path in SKIPPABLE else work[f][i]
                    for points in todo:
                        run(path, points)
                        done += 1
                        if time.perf_counter() - t > cell_budget:
                            break
                    best[f][path][i] = min(best[f][path][i], (time.perf_counter() - t) / done)
            if r == 0 and by_family:
                for path in paths:
                    fast = SKIPPABLE.get(path)
                    dominated = fast in paths and all(
                        best[f][path][i] >= SKIP_FACTOR * best[f][fast][i] for f in sets
                    )
                    long = path in PER_QUERY_PATHS and max(best[f][path][i] for f in sets) > LONG_CALL_S
                    if path not in skipped and (dominated or long):
                        skipped[path] = i
    for path, last in skipped.items():  # its cost per query at the last size timed
        for f in sets:
            for i in range(last + 1, len(batch_sizes)):
                best[f][path][i] = best[f][path][last] * batch_sizes[i] / batch_sizes[last]
    for path in paths:
        if by_family and path in query_free:
            least = [min(best[f][path][i] for f in sets) for i in range(len(batch_sizes))]
            for f in sets:
                best[f][path] = list(least)
    return {f: {p: tuple(v) for p, v in t.items()} for f, t in best.items()}


def probe_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall@k of ``found (B, k)`` rows against the exact top-k ``truth (B, k)`` (-1: padding,
    never counted): the share of the true rows found, over every query."""
    hits = sum(
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True)
    )
    wanted = int((truth >= 0).sum())
    return 1.0 if wanted == 0 else hits / wanted

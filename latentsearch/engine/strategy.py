"""Which exact path answers a batch: a cost model of the two strategies, calibrated by measurement.

Exact mode has two certified paths once a bank has an approximate index: ``"partitions"`` (branch
and bound over the partitions, scanning a few % of the bank) and ``"flat"`` (the certified float32
screen of every item). Neither wins everywhere: per call, the flat screen's cost grows with the bank
but is one BLAS product for a batch, while branch and bound pays a per-query overhead and wins on
large banks with few queries (measured on 2 cores: flat faster at every batch size at 200k items,
partitions 3x faster at B = 1 but slower from B = 64 at 1M).

:class:`StrategyCosts` holds what :func:`calibrate` measured: the seconds of one exact call on each
path at a few batch sizes (:data:`PROBE_BATCH_SIZES`), timed on the built index with probe queries
of the benchmark's three families (:func:`probe_queries`: box, prior and posterior samples,
interleaved). :data:`PROBE_ROUNDS` rounds each time every size on both paths (a round of single
queries makes several calls), so both paths see the same machine load, after one warm-up call
each; the minimum over rounds is kept per size and path (noise only ever adds time). At 200k items
this takes about 0.8 s on 2 idle cores; from about 1M items one round exceeds
:data:`PROBE_BUDGET_S` and is the only one (about 1.2 s at 1M).

When: ``SearchEngine.from_bank`` measures once the approximate index is built, and the costs are
saved in the manifest; an engine saved without them loads with ``costs=None`` and keeps the old
rule (partitions whenever an approximate index exists). ``SearchEngine.calibrate_exact`` measures
again on demand (another host). :meth:`StrategyCosts.choose` predicts a call of B queries by
linear interpolation between the probed sizes (beyond the largest: the same cost per query) and
picks the cheaper path, partitions on a tie. An explicit ``EngineConfig.exact_strategy`` always
wins over the model.

A third path, ``"kernel"`` (the compiled branch and bound of :mod:`latentsearch.engine.kernels`), is
measured beside them when the engine can run it; costs saved before it existed hold only the first
two, and the model then chooses between those. Where measured, the kernel is taken when it is
predicted no slower than the better of the other two.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from latentsearch.engine.typicality import reference_points
from latentsearch.errors import CorruptIndexError, InvalidArgumentError

__all__ = [
    "BASE_PATHS",
    "PATHS",
    "PROBE_BATCH_SIZES",
    "PROBE_ROUNDS",
    "ExactPath",
    "StrategyCosts",
    "calibrate",
    "probe_queries",
]

ExactPath = Literal["partitions", "flat", "kernel"]
PATHS: tuple[ExactPath, ...] = ("partitions", "flat", "kernel")
# The paths every saved cost table holds (the kernel's is optional: tables older than it lack it).
BASE_PATHS: tuple[ExactPath, ...] = ("partitions", "flat")
# Batch sizes probed: single queries, a small batch (below it FAISS scores pair by pair and the
# engine runs on one thread), a batch that runs every BLAS thread.
PROBE_BATCH_SIZES = (1, 16, 64)
# Rounds over every batch size and path; the minimum per size and path is kept. On 2 cores shared
# with other work, one round in two or three was slowed several times over by bursts of load
# (multi-threaded FAISS calls suffer most), so 2 rounds were not enough to see through them.
PROBE_ROUNDS = 3
# No round starts once calibration has taken this long (the first always runs): 3 rounds take
# about 0.8 s at 200k items on 2 idle cores, one round about 1.2 s at 1M.
PROBE_BUDGET_S = 1.0
# A round of a small batch size makes several calls, this many queries in all (single queries'
# costs differ by family: one call would measure one query).
PROBE_MIN_QUERIES = 8


@dataclass(frozen=True, kw_only=True)
class StrategyCosts:
    """Measured seconds per exact call on each path at each probed batch size."""

    # Ascending probed batch sizes (B), each >= 1.
    batch_sizes: tuple[int, ...]
    # Seconds of one call of B queries per path, one entry per batch size.
    seconds: dict[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        ok = (
            len(sizes) >= 1
            and all(isinstance(b, int) and b >= 1 for b in sizes)
            and list(sizes) == sorted(set(sizes))
            and set(BASE_PATHS) <= set(self.seconds) <= set(PATHS)
            and all(
                len(v) == len(sizes) and all(np.isfinite(s) and s >= 0 for s in v)
                for v in self.seconds.values()
            )
        )
        if not ok:
            raise InvalidArgumentError(
                f"strategy costs need ascending batch sizes >= 1 and, for each of {BASE_PATHS} (and "
                f"optionally {PATHS[2:]}), one finite "
                f"time >= 0 per size; got {self.batch_sizes!r}, {self.seconds!r}",
                field="costs",
            )

    def predict(self, path: ExactPath, nq: int) -> float:
        """Predicted seconds of one call of ``nq`` queries on ``path``."""
        sizes, secs = self.batch_sizes, self.seconds[path]
        if nq >= sizes[-1]:
            return secs[-1] * nq / sizes[-1]
        i = bisect.bisect_right(sizes, nq)  # plain Python: np.interp took 3 us a call, per query
        if i == 0:
            return secs[0]
        b0, b1 = sizes[i - 1], sizes[i]
        return secs[i - 1] + (secs[i] - secs[i - 1]) * (nq - b0) / (b1 - b0)

    def choose(self, nq: int) -> ExactPath:
        """The cheaper path for a call of ``nq`` queries (partitions on a tie with flat, the kernel
        on a tie with either)."""
        flat = self.predict("flat", nq) < self.predict("partitions", nq)
        best: ExactPath = "flat" if flat else "partitions"
        if "kernel" in self.seconds and self.predict("kernel", nq) <= self.predict(best, nq):
            return "kernel"
        return best

    def to_dict(self) -> dict[str, Any]:
        seconds = {k: list(v) for k, v in self.seconds.items()}
        return {"batch_sizes": list(self.batch_sizes), "seconds": seconds}

    @classmethod
    def from_dict(cls, data: Any) -> StrategyCosts:
        """Rebuild from :meth:`to_dict` output; CorruptIndexError when it is not one."""
        try:
            return cls(
                batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
                seconds={str(k): tuple(float(s) for s in v) for k, v in data["seconds"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgumentError) as exc:
            raise CorruptIndexError(f"bad exact strategy costs {data!r}: {exc}") from exc


def probe_queries(mu: np.ndarray, log_sigma: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``(n, d)`` probe points, row by row in turn: z uniform in [-5, 5]^d (a person's sliders),
    z ~ N(0, I) (the prior) and z ~ q(z|x) of a random item (the benchmark's query families)."""
    rng = np.random.default_rng(seed)
    d = mu.shape[1]
    _, posterior = reference_points(mu, log_sigma, n, seed + 1)
    families = np.stack([rng.uniform(-5.0, 5.0, size=(n, d)), rng.standard_normal((n, d)), posterior])
    return families.transpose(1, 0, 2).reshape(3 * n, d)[:n]  # (3, n, d) -> interleaved (n, d)


def calibrate(
    run: Callable[[ExactPath, np.ndarray], object],
    probes: np.ndarray,
    *,
    batch_sizes: tuple[int, ...] = PROBE_BATCH_SIZES,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
    paths: tuple[ExactPath, ...] = BASE_PATHS,
) -> StrategyCosts:
    """Time ``run(path, points)`` (one exact call of ``points (B, d)`` on ``path``) on each path.

    ``probes`` is ``(P, d)``, the query families interleaved row by row; a call of B queries takes B
    consecutive probes, the next ones for the next call or size (wrapping around). Size B makes
    ``max(1, PROBE_MIN_QUERIES // B)`` calls, the same ones every round, and counts their mean.
    Rounds stop early once ``budget_s`` seconds have gone (after the first). ``paths`` are those
    timed (``BASE_PATHS`` and optionally the kernel).
    """
    best: dict[ExactPath, list[float]] = {p: [np.inf] * len(batch_sizes) for p in paths}
    started = time.perf_counter()
    for path in paths:  # warm-up: first-call allocations and page-ins are not the path's cost
        run(path, probes[:1])
    work: list[list[np.ndarray]] = []  # per size: the calls of every round (the same work each round)
    start = 0
    for b in batch_sizes:
        calls = max(1, PROBE_MIN_QUERIES // b)  # small calls: several, over different probes
        rows = np.arange(start, start + calls * b).reshape(calls, b) % len(probes)
        work.append([probes[r] for r in rows])
        start += calls * b
    for r in range(rounds):  # each round visits every size and path: a burst of load spoils one round
        if r and time.perf_counter() - started > budget_s:
            break
        for i, calls_i in enumerate(work):
            for path in paths:
                t = time.perf_counter()
                for points in calls_i:
                    run(path, points)
                best[path][i] = min(best[path][i], (time.perf_counter() - t) / len(calls_i))
    return StrategyCosts(batch_sizes=tuple(batch_sizes), seconds={p: tuple(v) for p, v in best.items()})

"""The search engine: top-k items by exact log q(z|x) over a bank of diagonal-Gaussian posteriors."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from latentsearch.bank import PosteriorBank
from latentsearch.engine.approx import ApproxIndex, ApproxQuery, AssignRows
from latentsearch.engine.config import EngineConfig, SearchMode
from latentsearch.engine.exact import ExactIndex, Rescore, Selection
from latentsearch.engine.gpu import Device, resolve_device
from latentsearch.engine.kernels import KernelIndex, warm
from latentsearch.engine.lifting import lift_points, lift_queries
from latentsearch.engine.probability import DEFAULT_REL_TOL, PARTITION_MAX_QUERIES, SearchWork, normalise
from latentsearch.engine.results import BatchResult, SearchResult
from latentsearch.engine.storage import EngineParts, load_engine, save_engine
from latentsearch.engine.strategy import (
    APPROX_PATHS,
    KERNEL_SCALES_LESS,
    KERNEL_SCALES_MORE,
    PATHS,
    PROBE_BATCH_SIZES,
    PROBE_MIN_QUERIES,
    SCALE_MARGIN,
    SCALE_UP_REACH,
    ApproxChoice,
    ApproxPath,
    ExactPath,
    StrategyCosts,
    calibrate,
    family_probes,
    measure_paths,
    probe_recall,
)
from latentsearch.engine.typicality import TypicalityReference, reference_points
from latentsearch.errors import InvalidArgumentError
from latentsearch.posterior import DiagonalGaussian

__all__ = ["MAX_ABS_COORDINATE", "SearchEngine", "check_points"]

log = logging.getLogger(__name__)

# Query coordinates beyond this are rejected: they are no latent point a VAE produces, and their
# squares would overflow the float32 screening.
MAX_ABS_COORDINATE = 1e6
_SELECTION_CACHE = 32
# The kernel's copy of the bank per approximate index (engine.kernel_index).
_KERNELS: weakref.WeakKeyDictionary[ApproxIndex, KernelIndex] = weakref.WeakKeyDictionary()
_KERNELS_LOCK = threading.Lock()
_PARALLEL_MIN_QUERIES = 8
# approx_strategy="auto": the compiled kernel below this many queries per call, FAISS's scan from it.
_APPROX_KERNEL_MAX_QUERIES = 8
# Calibration times calls of one query on this many probes in all, 16 per family (strategy's
# PROBE_MIN_QUERIES, 8, gave 2 per family): approximate calls choose between the approximate kernel
# and the exact one for single queries, whose costs differ by under 2x, and 2 probes misjudged it
# (200k items: the exact kernel's box queries timed 0.8 ms where 192 took 1.5 ms).
SINGLE_PROBES = 48
# The approximate kernel's recall in calls of one query is measured on this many probes per family
# (its batches on all of them): 384 single calls were a third of a small bank's calibration time.
SINGLE_RECALL_PROBES = 48
_DEFAULT_THREADS = faiss.omp_get_max_threads()
# FAISS flat searches (the exact screens and the approximate index's coarse quantizer) score a batch
# with one BLAS matrix product from this many queries up, one dot product per (query, item) below.
# faiss-cpu 1.15 ships 128,000, so every batch took the per-pair path; at 20, a batch of 64 queries
# over 70,000 d = 10 items screens 3.4x faster on one core. The float32 error bound of the exact
# screens holds for any summation order (see lifting.error_coefficient), so results are unchanged.
# The setting is process-wide; a smaller value already set by the application is kept.
BLAS_MIN_QUERIES = 20
if faiss.cvar.distance_compute_blas_threshold > BLAS_MIN_QUERIES:
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads on this thread, then restore the previous count."""
    before = faiss.omp_get_max_threads()
    if n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class SearchEngine:
    """Top-k search over a :class:`PosteriorBank` ranked by exact float64 ``log q(z|x)``.

    * ``mode="exact"``: certified float32 screening plus float64 rerank; the top-k is identical
      to the float64 brute force, ties broken by ascending row. With an approximate index it
      takes branch and bound over the partitions or the flat screen of every item, whichever
      ``costs`` (measured at build, see :mod:`latentsearch.engine.strategy`) predicts cheaper
      for the call's batch size, unless ``config.exact_strategy`` names one; the third measured
      path, ``"kernel"``, is the same branch and bound compiled (:mod:`latentsearch.engine.kernels`).
    * ``mode="approx"``: point queries scan the best partitions with the compiled kernel or probe
      by centroid posterior with FAISS, then an exact float64 rerank (see
      :mod:`latentsearch.engine.approx`), or take an exact path: under
      ``config.approx_strategy="auto"`` the cheapest by ``costs`` of the exact paths and of the
      approximate ones whose recall measured at build reached ``config.approx_min_recall``.
    * ``mode="auto"`` (default): approx when the bank has an approximate index, else exact.

    Build with :meth:`build`; persist with :meth:`save` / :meth:`load`. Searches are thread-safe.
    """

    def __init__(
        self,
        bank: PosteriorBank,
        config: EngineConfig | None = None,
        *,
        exact: ExactIndex | None = None,
        approx: ApproxIndex | None = None,
        typicality: TypicalityReference | None = None,
        costs: StrategyCosts | None = None,
        kernel: KernelIndex | None = None,
    ) -> None:
        self.bank = bank
        self.config = config or EngineConfig()
        self.exact = exact or ExactIndex.build(
            bank.mu,
            bank.log_sigma,
            base=self.config.scale_group_base,
            factory=self.config.exact_factory,
            device=resolve_device(self.config.device),
        )
        self.approx = approx
        self.typicality = typicality
        # Measured cost of each exact path (see strategy.py); None: the fixed rule (partitions).
        self.costs = costs
        self._selections: OrderedDict[frozenset[int], Selection] = OrderedDict()
        self._lock = threading.Lock()
        self._kernel: KernelIndex | None = None  # the bank by partition (see prepare_kernel)
        if kernel is not None and approx is not None:  # loaded with the engine
            with _KERNELS_LOCK:
                self._kernel = _KERNELS.setdefault(approx, kernel)
        if approx is not None:
            warm()  # compile (or load) the kernel now, not in the first query
        self.exact.warm(10 + max(10, self.config.exact_extra))  # the batch screen, at k = 10

    # -- construction -------------------------------------------------------------------------
    def reconfigured(self, costs: StrategyCosts | None, **changes: Any) -> SearchEngine:
        """The same bank and indexes, shared (nothing rebuilt or measured), under this config with
        ``changes`` (``EngineConfig`` fields) and the cost model ``costs`` (None: the fixed rules):
        to compare paths or settings on one build."""
        return SearchEngine(
            self.bank,
            dataclasses.replace(self.config, **changes),
            exact=self.exact,
            approx=self.approx,
            typicality=self.typicality,
            costs=costs,
        )

    @classmethod
    def build(
        cls,
        mu: Any,
        *,
        log_sigma: Any = None,
        logvar: Any = None,
        sigma: Any = None,
        ids: Sequence[Any] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        config: EngineConfig | None = None,
        build_approx: bool | None = None,
        assign_rows: AssignRows | None = None,
    ) -> SearchEngine:
        """Validate ``(N, d)`` posteriors and build the indexes.

        Args:
            mu: ``(N, d)`` means; give exactly one of ``log_sigma``, ``logvar`` or ``sigma`` (N, d).
            ids: ``(N,)`` unique external ids (strings or integers); default the row number.
            labels: ``(N,)`` integer labels for filtered search.
            build_approx: build the approximate index (the partitions); default when N >=
                ``min(config.partition_min_items, config.approx_min_items)`` or ``config.mode ==
                "approx"``.
            assign_rows: the approximate build's assignment of every item to its k-means centroid,
                done elsewhere (:data:`latentsearch.engine.approx.AssignRows`, e.g. Ray tasks,
                indexer/ray_build.py); None: in this process.
        """
        config = config or EngineConfig()
        bank = PosteriorBank.from_arrays(
            mu, log_sigma=log_sigma, logvar=logvar, sigma=sigma, ids=ids, labels=labels
        )
        return cls.from_bank(bank, config, build_approx=build_approx, assign_rows=assign_rows)

    @classmethod
    def from_bank(
        cls,
        bank: PosteriorBank,
        config: EngineConfig | None = None,
        *,
        build_approx: bool | None = None,
        assign_rows: AssignRows | None = None,
    ) -> SearchEngine:
        """The engine over ``bank`` (arguments as :meth:`build`)."""
        config = config or EngineConfig()
        if build_approx is None:
            least = min(config.partition_min_items, config.approx_min_items)
            build_approx = len(bank) >= least or config.mode == "approx"
        engine = cls(bank, config)
        if build_approx:
            engine.approx = ApproxIndex.build(
                bank.mu, bank.log_sigma, config, groups=engine.exact.groups, assign_rows=assign_rows
            )
            warm()
            engine.costs = engine.calibrate_exact()
        if config.typicality_samples:
            engine.typicality = engine.build_typicality(config.typicality_samples, seed=config.seed)
        return engine

    def build_typicality(self, samples: int, *, seed: int = 0) -> TypicalityReference:
        """The typicality reference: the leave-one-out ``log q(z)`` of ``samples`` draws from random
        items' posteriors (see :mod:`latentsearch.engine.typicality`), certified to the default
        relative tolerance.

        Each draw's own item is left out of its sum, ``log (1/(N-1)) sum_{j != i} q(z|x_j)``: a draw
        then stands for a latent of a new item of the data's distribution, which is what a query
        is. With its own (often tight) posterior in the sum, every draw sits on top of a catalogue
        item, and a new item's latent would score near 0. A bank of one item keeps that item.
        """
        rows, z = reference_points(self.bank.mu, self.bank.log_sigma, samples, seed)
        n = len(self.bank)
        if n < 2:
            top_rows, top_scores, shift = rows[:, None], self.bank.log_prob_rows(z, rows[:, None]), 0.0
        else:
            # the best item other than each draw's own (exact search), a valid start of the sum; the
            # own row goes in as already summed with score -inf: it adds nothing and is never read
            found = self.search_batch_arrays(z, 2, mode="exact").rows  # (S, 2)
            other = np.where(found[:, 0] == rows, found[:, 1], found[:, 0])
            top_rows = np.stack([rows, other], axis=1)  # (S, 2)
            own = np.full((samples, 1), -np.inf)
            top_scores = np.concatenate([own, self.bank.log_prob_rows(z, other[:, None])], axis=1)
            shift = math.log(n) - math.log(n - 1)  # the mean over N - 1 items, not N
        norm = normalise(self.exact, lift_points(z), top_rows, top_scores, self._rescorer(z, None), None)
        return TypicalityReference(log_qz=np.sort(norm.log_qz + shift))

    def calibrate_exact(self, *, seed: int = 0) -> StrategyCosts | None:
        """Measure the exact paths on this host (see :mod:`latentsearch.engine.strategy`): the
        seconds of exact calls at each of ``PROBE_BATCH_SIZES`` on the partitions, the flat screen
        and the compiled kernel, for probe queries of each family (box, prior, posterior; a fixed
        ``seed``: the same probes every time). ``None`` (nothing to choose) without an approximate
        index. Where approximate mode is the default (``config.approx_min_items`` items or more) or
        the configured mode, the approximate kernel and FAISS's scan too, with their recall@10 on
        the same probes (what :meth:`approx_choice` decides by).

        :meth:`from_bank` calls it once the approximate index is built, and the result is saved with
        the engine; call it again (and assign ``engine.costs``) to re-measure on another host.
        """
        if self.approx is None:
            return None
        probes = family_probes(self.bank.mu, self.bank.log_sigma, 2 * max(PROBE_BATCH_SIZES), seed=seed)
        k = min(10, len(self.bank))

        def run(path: ExactPath, points: np.ndarray) -> object:
            return self._search_arrays(points, None, k, "exact", None, None, strategy=path)

        started = time.perf_counter()
        # The approximate paths are measured where approximate mode is the default (or the
        # configured mode); elsewhere approximate calls are rare requests, answered by
        # approx_choice's rule for banks searched exactly, and the measurement would cost a small
        # bank's build several times over (0.1 -> 0.6 s at 4,000 items, single calls being per-call
        # overhead; 3.0 -> 4.9 s at 70k).
        choose_approx = len(self.bank) >= self.config.approx_min_items or self.config.mode == "approx"
        singles = SINGLE_PROBES if choose_approx else PROBE_MIN_QUERIES
        costs = calibrate(run, probes, paths=PATHS, min_queries=singles)
        if choose_approx:
            truth = {f: self._search_arrays(z, None, k, "exact", None, None).rows for f, z in probes.items()}
            scale, kernel_recall = self._choose_kernel_scale(probes, truth, k)
            scaled = self.reconfigured(self.costs, approx_kernel_scale=scale)

            def run_approx(path: ApproxPath, points: np.ndarray) -> object:
                return scaled._search_arrays(points, None, k, "approx", None, None, approx_path=path)

            approx = measure_paths(run_approx, probes, paths=APPROX_PATHS, query_free=(), min_queries=singles)
            recall = {**scaled._probe_recall(probes, truth, k, paths=("scan",)), "kernel": kernel_recall}
            costs = dataclasses.replace(
                costs,
                approx=approx,
                approx_recall={p: recall[p] for p in APPROX_PATHS},
                approx_kernel_scale=scale,
            )
        log.info(
            "path costs in %.2f s (s per call at B = %s, per family): exact %s, approximate %s; "
            "approximate recall@%d %s, kernel scale %.3f",
            time.perf_counter() - started,
            costs.batch_sizes,
            costs.families,
            costs.approx,
            k,
            costs.approx_recall,
            costs.approx_kernel_scale,
        )
        return costs

    def _choose_kernel_scale(
        self, probes: dict[str, np.ndarray], truth: dict[str, np.ndarray], k: int
    ) -> tuple[float, float]:
        """The share of its default work the approximate kernel does, and the kernel's recall@k at
        it on ``probes`` (against their exact top-k ``truth``): ``config.approx_kernel_scale`` when
        set; else, where the default work reaches ``config.approx_min_recall``, the smallest of
        :data:`KERNEL_SCALES_LESS` (largest first, up to the first that fails) whose recall reached
        it + :data:`SCALE_MARGIN`; where it falls short by at most :data:`SCALE_UP_REACH`, the
        first of :data:`KERNEL_SCALES_MORE` that does; else 1 (see
        :mod:`latentsearch.engine.strategy`)."""

        def recall_at(scale: float) -> float:
            trial = self.reconfigured(self.costs, approx_kernel_scale=scale)
            found = trial._probe_recall(probes, truth, k, paths=("kernel",))["kernel"]
            log.debug("approximate kernel at %.3f of its default work: recall@%d %.4f", scale, k, found)
            return found

        if self.config.approx_kernel_scale is not None:
            scale = float(self.config.approx_kernel_scale)
            return scale, recall_at(scale)
        bar = self.config.approx_min_recall
        chosen = (1.0, recall_at(1.0))
        if chosen[1] >= bar:
            for scale in sorted(KERNEL_SCALES_LESS, reverse=True):
                found = recall_at(scale)
                if found < bar + SCALE_MARGIN:
                    break
                chosen = (scale, found)
            return chosen
        if chosen[1] < bar - SCALE_UP_REACH:  # beyond what more work closed on the banks measured
            return chosen
        for scale in sorted(KERNEL_SCALES_MORE):
            found = recall_at(scale)
            if found >= bar + SCALE_MARGIN:
                return scale, found
        return chosen

    def _probe_recall(
        self,
        probes: dict[str, np.ndarray],
        truth: dict[str, np.ndarray],
        k: int,
        *,
        paths: tuple[ApproxPath, ...] = APPROX_PATHS,
    ) -> dict[str, float]:
        """Each of ``paths``' recall@k on ``probes`` (``{family: (P, d)}``) against their exact
        top-k ``truth`` (``{family: (P, k)}`` rows): the least over the families and, for the
        kernel, over calls of ``P`` and calls of one query (the first :data:`SINGLE_RECALL_PROBES`:
        it searches a batch partition by partition, which may scan other partitions; FAISS's scan
        answers a query alike in any batch)."""
        worst: dict[str, float] = dict.fromkeys(paths, 1.0)

        def rows(points: np.ndarray, path: ApproxPath) -> np.ndarray:
            return self._search_arrays(points, None, k, "approx", None, None, approx_path=path).rows

        for family, points in probes.items():
            want = truth[family]
            for path in paths:
                worst[path] = min(worst[path], probe_recall(rows(points, path), want))
            if "kernel" in paths:
                alone = np.concatenate([rows(z[None], "kernel") for z in points[:SINGLE_RECALL_PROBES]])
                worst["kernel"] = min(worst["kernel"], probe_recall(alone, want[:SINGLE_RECALL_PROBES]))
        return worst

    # -- properties ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.bank)

    @property
    def dim(self) -> int:
        return self.bank.dim

    def info(self) -> dict[str, Any]:
        """Counts and parameters, for logs, manifests and the server's Info call."""
        return {
            "items": len(self.bank),
            "latent_dim": self.dim,
            "has_labels": self.bank.labels is not None,
            "scale_groups": [len(g) for g in self.exact.groups],
            "approx": None if self.approx is None else self.approx.info(),
            "exact_costs": None if self.costs is None else self.costs.to_dict(),
            "config": self.config.to_dict(),
            "faiss_version": faiss.__version__,
            "device": resolve_device(self.config.device),
        }

    # -- search -------------------------------------------------------------------------------
    def search(
        self,
        z: Any,
        k: int = 10,
        *,
        mode: SearchMode | None = None,
        labels: Iterable[int] | None = None,
        nprobe: int | None = None,
        with_probability: bool = False,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> SearchResult:
        """Top-k items for one latent point ``z (d,)``.

        Args:
            z: ``(d,)`` latent point.
            k: number of results, 1..``config.max_k`` (above the bank size: the whole bank).
            mode: "exact", "approx" or "auto" (default ``config.mode``).
            labels: only items whose label is in this set (inside the search, not after).
            nprobe: approximate mode only: partitions to scan (default: the index's, ~3% of them).
            with_probability: also return each item's match probability p(i | z), the query's
                aggregate-posterior log density log q(z) with certified bounds, and its typicality
                (see :mod:`latentsearch.engine.probability`): every item is bounded, by its
                partition's bound or its float32 screen, and those that can matter are rescored.
            rel_tol: the certified relative width of the normaliser interval, in [0, 1)
                (``upper / lower - 1 <= rel_tol``; 0 scores every item in float64).
        """
        z_arr = self._check_points(z, "z", single=True)
        return self._search(z_arr, None, k, mode, labels, nprobe, _tol(with_probability, rel_tol))[0]

    def search_batch(
        self,
        z: Any,
        k: int = 10,
        *,
        mode: SearchMode | None = None,
        labels: Iterable[int] | None = None,
        nprobe: int | None = None,
        with_probability: bool = False,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> list[SearchResult]:
        """Top-k items for each of B latent points ``z (B, d)``; one result per query, in order."""
        z_arr = self._check_points(z, "z", single=False)
        return self._search(z_arr, None, k, mode, labels, nprobe, _tol(with_probability, rel_tol))

    def search_batch_arrays(
        self,
        z: Any,
        k: int = 10,
        *,
        mode: SearchMode | None = None,
        labels: Iterable[int] | None = None,
        nprobe: int | None = None,
        with_probability: bool = False,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> BatchResult:
        """:meth:`search_batch` as one :class:`BatchResult` of ``(B, k)`` arrays.

        The same search without building a :class:`SearchResult` per query (no per-query Python
        objects): what a server answering many small calls uses.
        """
        z_arr = self._check_points(z, "z", single=False)
        return self._search_arrays(z_arr, None, k, mode, labels, nprobe, _tol(with_probability, rel_tol))

    def search_distribution(
        self,
        mean: Any,
        std: Any,
        k: int = 10,
        *,
        mode: SearchMode | None = None,
        labels: Iterable[int] | None = None,
        nprobe: int | None = None,
        with_probability: bool = False,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> SearchResult:
        """Top-k items for a query Gaussian ``N(mean, diag(std^2))`` (each ``(d,)``).

        Ranks by ``E_{z ~ N(mean, std^2)} log q(z|x)``, equivalently by smallest
        ``KL(N(mean, std^2) || q(z|x))``, which the result reports in ``kl`` when std > 0.
        """
        m = self._check_points(mean, "mean", single=True)
        s = self._check_std(std, m.shape)
        return self._search(m, s, k, mode, labels, nprobe, _tol(with_probability, rel_tol))[0]

    def search_distribution_batch(
        self,
        mean: Any,
        std: Any,
        k: int = 10,
        *,
        mode: SearchMode | None = None,
        labels: Iterable[int] | None = None,
        nprobe: int | None = None,
        with_probability: bool = False,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> list[SearchResult]:
        """Batched :meth:`search_distribution`: ``mean`` and ``std`` are ``(B, d)``."""
        m = self._check_points(mean, "mean", single=False)
        s = self._check_std(std, m.shape)
        return self._search(m, s, k, mode, labels, nprobe, _tol(with_probability, rel_tol))

    def brute_force(self, z: Any, k: int = 10, *, labels: Iterable[int] | None = None) -> list[SearchResult]:
        """Reference float64 scan of the whole bank for ``z (B, d)`` (slow; for checks and benchmarks)."""
        z_arr = self._check_points(z, "z", single=False)
        k_eff = self._check_k(k)
        selection = self._selection(labels)
        rescore = self._rescorer(z_arr, None)
        rows, scores = self.exact._brute(
            np.arange(z_arr.shape[0]), k_eff, rescore, selection, groups=range(len(self.exact.groups))
        )
        return [self._result(rows[b], scores[b], "exact", True, None) for b in range(z_arr.shape[0])]

    def check_query(
        self, z: Sequence[float], k: int = 10, labels: Iterable[int] | None = None
    ) -> tuple[int, ...] | None:
        """Check one query of a later batched search, without searching; raises what :meth:`search`
        would (InvalidArgumentError naming ``z``, ``k`` or ``labels``).

        For callers that gather single queries into one :meth:`search_batch_arrays` call (the
        server's micro-batcher): each query is checked on its own first, so a bad one fails alone
        rather than its whole batch. A list of floats is checked in plain Python (no array per
        call). Returns the label filter as sorted distinct labels (a key for grouping queries),
        ``None`` without one.
        """
        dim = self.dim
        if not _plain_point_ok(z, dim):
            check_points(z, dim, "z", single=True)  # the array rule: raises for a bad point
        self._check_k(k)
        return None if labels is None else tuple(sorted(self._label_set(labels)))

    # -- internals ----------------------------------------------------------------------------
    def _search(
        self,
        points: np.ndarray,
        std: np.ndarray | None,
        k: int,
        mode: SearchMode | None,
        labels: Iterable[int] | None,
        nprobe: int | None,
        rel_tol: float | None = None,
    ) -> list[SearchResult]:
        batch = self._search_arrays(points, std, k, mode, labels, nprobe, rel_tol)
        return [self._result_of(batch, b) for b in range(points.shape[0])]

    def _search_arrays(
        self,
        points: np.ndarray,
        std: np.ndarray | None,
        k: int,
        mode: SearchMode | None,
        labels: Iterable[int] | None,
        nprobe: int | None,
        rel_tol: float | None = None,
        *,
        strategy: ExactPath | None = None,
        approx_path: ApproxPath | None = None,
    ) -> BatchResult:
        """The search behind every public method; ``strategy`` forces an exact path and
        ``approx_path`` an approximate one (calibration)."""
        k_eff = self._check_k(k)
        if nprobe is not None and (
            isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1
        ):
            raise InvalidArgumentError(f"nprobe must be a positive integer, got {nprobe!r}", field="nprobe")
        resolved = self._resolve_mode(mode)
        selection = self._selection(labels)
        # lifted (B, 2d + 1); the compiled kernel needs none (None: _run lifts where it needs them)
        queries = None if rel_tol is None else lift_queries(points, std)
        rescore = self._rescorer(points, std)
        with _faiss_threads(self._threads_for(points.shape[0])):
            work = SearchWork() if rel_tol is not None else None
            rows, scores, certified = self._run(
                points, std, queries, k_eff, resolved, selection, rescore, nprobe, work, strategy, approx_path
            )
        kl = None
        if std is not None and np.all(std > 0):
            # KL(N(mean, std^2) || q) = -entropy - E log q, and the scores are E log q.
            entropy = DiagonalGaussian.from_std(points, std).entropy()  # (B,)
            kl = np.where(rows >= 0, -entropy[:, None] - scores, np.inf)  # (B, k)
        batch = BatchResult(
            rows=rows, scores=scores, certified=np.asarray(certified, bool), mode=resolved, kl=kl
        )
        if rel_tol is None:
            return batch
        assert queries is not None
        with _faiss_threads(self._threads_for(points.shape[0])):
            norm = normalise(
                self.exact, queries, rows, scores, rescore, selection, rel_tol=rel_tol, work=work
            )
        typicality = np.full(points.shape[0], np.nan)
        if self.typicality is not None and selection is None:
            typicality = self.typicality.percentile(norm.log_qz)
        return dataclasses.replace(
            batch,
            probability=norm.probability(scores),
            log_qz=norm.log_qz,
            log_qz_lower=norm.log_lower - math.log(norm.count),
            log_qz_upper=norm.log_upper - math.log(norm.count),
            typicality=typicality,
        )

    def _threads_for(self, nq: int) -> int:
        """FAISS threads for a call with ``nq`` queries.

        Small calls run on the calling thread: OpenMP's fork/join costs more than their work, and
        under load (or beside a server's other search threads) its spinning threads made a single
        query up to 4x slower in measurements. Batches use ``config.num_threads`` (default: all).
        """
        if nq < _PARALLEL_MIN_QUERIES:
            return 1
        return self.config.num_threads or _DEFAULT_THREADS

    def _split_for(self, nq: int) -> int:
        """Shares of the partitions each of ``nq`` queries is split into on the compiled kernel:
        ``config.num_threads`` (default: all cores) for a small call (run on one thread otherwise)
        on a bank of at least ``config.split_min_items`` items, else 1."""
        if nq >= _PARALLEL_MIN_QUERIES or len(self.bank) < self.config.split_min_items:
            return 1
        return max(1, self.config.num_threads or _DEFAULT_THREADS)

    def _run(
        self,
        points: np.ndarray,
        std: np.ndarray | None,
        queries: np.ndarray | None,
        k_eff: int,
        resolved: str,
        selection: Selection | None,
        rescore: Rescore,
        nprobe: int | None,
        work: SearchWork | None = None,
        strategy: ExactPath | None = None,
        approx_path: ApproxPath | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top-k and whether each answer is certified; ``work``, when given, receives what the
        probability normaliser can reuse (the partition bounds, the dense screens' scores)."""
        nq = points.shape[0]
        if resolved == "approx" and approx_path is None and std is None and nprobe is None:
            choice = self.approx_choice(nq)
            if choice[0] == "exact":  # cheaper than any approximate path that reaches the recall
                resolved, strategy = "exact", choice[1]
            else:
                approx_path = choice[1]
        auto = strategy is None and self.config.exact_strategy == "auto"
        if auto and work is not None and nq <= PARTITION_MAX_QUERIES:
            # With probabilities, "auto" keeps the partitions for small calls whatever the search
            # alone costs: the normaliser reuses their bounds (2-3x cheaper than its flat screen at
            # 1M items, bench_probability); the cost model measures the search only.
            strategy = "partitions"
        path = strategy or self.exact_path(nq)
        if approx_path is None:  # query Gaussians, or a call's own nprobe: by the call's size
            approx_path = self._approx_by_size(nq)
        kernel = (resolved == "exact" and path == "kernel") or (
            resolved == "approx" and approx_path == "kernel"
        )
        if kernel and self.approx is not None and std is None:
            return self._run_kernel(points, k_eff, resolved, selection, rescore, nprobe)
        if queries is None:
            queries = lift_queries(points, std)
        use_partitions = self.approx is not None and (resolved == "approx" or path != "flat")
        if use_partitions:
            assert self.approx is not None
            query = ApproxQuery(points=points, std=std, lifted=queries, rescore=rescore, selection=selection)
            bounds = None
            if work is not None and points.shape[0] <= PARTITION_MAX_QUERIES:  # what the normaliser uses
                bounds = work.partitions = self.approx.partition_bounds(query)
            rows, scores, certified = self.approx.search(
                query,
                k=k_eff,
                rerank=max(self.config.approx_rerank, k_eff),
                nprobe=self.approx.nprobe if nprobe is None else nprobe,
                exact_index=self.exact,
                extra=self.config.exact_extra,
                exact=resolved == "exact",
                certify=self.config.approx_certify,
                bounds=bounds,
            )
        else:
            rows, scores = self.exact.search(
                queries,
                k_eff,
                extra=self.config.exact_extra,
                rescore=rescore,
                selection=selection,
                screens=None if work is None else work.screens,
            )
            certified = np.ones(points.shape[0], dtype=bool)
        return rows, scores, certified

    @property
    def kernel_scale(self) -> float:
        """The share of its default work the approximate kernel does: ``config.approx_kernel_scale``
        when set, else the one measured at build (``costs.approx_kernel_scale``), else 1."""
        if self.config.approx_kernel_scale is not None:
            return float(self.config.approx_kernel_scale)
        return 1.0 if self.costs is None else self.costs.approx_kernel_scale

    def kernel_index(self) -> KernelIndex:
        """The bank reordered by partition for the compiled kernel (made once, thread-safe)."""
        if self._kernel is None:
            a = self.approx
            assert a is not None
            with _KERNELS_LOCK:  # engines sharing one approximate index (and bank) share it too
                found = _KERNELS.get(a)
                if found is None:
                    found = KernelIndex.of_approx(self.bank.mu, self.bank.log_sigma, a)
                    _KERNELS[a] = found
                    log.debug("kernel index: %d items, %.0f MiB", len(self.bank), found.nbytes / 2**20)
            self._kernel = found
        return self._kernel

    def _run_kernel(
        self,
        points: np.ndarray,
        k_eff: int,
        resolved: str,
        selection: Selection | None,
        rescore: Rescore,
        nprobe: int | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The compiled branch and bound (:mod:`latentsearch.engine.kernels`) for point queries.

        Exact: unbounded, and the (rare) queries it cannot certify (a near tie with an item left
        out) are answered again by the flat certified screen. Approx: the index's ``nprobe``
        partitions with the best centroid posterior, then by bound up to
        ``config.approx_kernel_budget`` of the partitions, both times :attr:`kernel_scale` (a given
        ``nprobe``: those partitions by centroid only); an answer is certified when the bound
        stopped the search first.
        """
        assert self.approx is not None
        nq = points.shape[0]
        exact = resolved == "exact"
        if exact:
            first, visits = 0, -1
        elif nprobe is None:  # the default probes by centroid, then by bound within the budget
            scale, nlist = self.kernel_scale, self.approx.nlist
            first = min(nlist, max(1, math.ceil(scale * self.approx.nprobe)))
            visits = max(first, min(nlist, math.ceil(scale * self.config.approx_kernel_budget * nlist)))
        else:
            first = visits = int(nprobe)
        found = self.kernel_index().search(
            points,
            k_eff,
            max_visits=visits,
            first=first,
            selection=selection,
            rescore=rescore,
            threads=self._threads_for(nq),
            split=1 if exact else self._split_for(nq),
        )
        rows, scores, certified = found.rows, found.scores, found.certified
        bad = np.flatnonzero(~certified)
        if exact and bad.size:
            log.debug("kernel search: %d of %d queries fell back to the flat scan", bad.size, nq)
            rows[bad], scores[bad] = self.exact.search(
                lift_points(points[bad]),
                k_eff,
                extra=self.config.exact_extra,
                rescore=lambda qi, r: rescore(bad[qi], r),
                selection=selection,
            )
            certified = np.ones(nq, dtype=bool)
        elif not exact and not self.config.approx_certify:
            certified = np.zeros(nq, dtype=bool)  # approximate answers claim nothing unless asked
        return rows, scores, certified

    def approx_choice(self, nq: int) -> ApproxChoice:
        """What answers an approximate call of ``nq`` point queries at the index's nprobe:
        ``config.approx_strategy`` when it names a path; else (``"auto"``) the cheapest by the
        measured costs among the exact paths and the approximate ones whose measured recall reached
        ``config.approx_min_recall`` (:meth:`StrategyCosts.choose_approx`); else, on a bank searched
        exactly by default (below ``config.approx_min_items``: its build measured the exact paths
        only), a call of ``_APPROX_KERNEL_MAX_QUERIES`` queries or more by the exact path
        :meth:`exact_path` picks, a smaller one by the approximate kernel; else (costs saved without
        the approximate paths) by the call's size.

        Why exact for those batches: at 70k items of a Fashion-MNIST VAE (one core, B = 8 / 16 /
        64, 256 queries per family) the scan reached recall@10 0.994 / 0.927 / 0.963 (box / prior
        / posterior) and cost 1.05-1.33x the exact path's time (flat screen), which is certified;
        the build's own measurement, where it is made (``mode="approx"``), picks the same.
        """
        strategy = self.config.approx_strategy
        if strategy != "auto":
            return ("approx", strategy)
        costs = self.costs
        found = None if costs is None else costs.choose_approx(nq, self.config.approx_min_recall)
        if found is not None:
            return found
        exact_default = costs is not None and len(self.bank) < self.config.approx_min_items
        if exact_default and nq >= _APPROX_KERNEL_MAX_QUERIES:
            return ("exact", self.exact_path(nq))
        return ("approx", self._approx_by_size(nq))

    def _approx_by_size(self, nq: int) -> ApproxPath:
        """The approximate path by the call's size alone (``approx_strategy`` "auto": the kernel
        below ``_APPROX_KERNEL_MAX_QUERIES`` queries, the scan from there)."""
        strategy = self.config.approx_strategy
        if strategy != "auto":
            return strategy
        return "kernel" if nq < _APPROX_KERNEL_MAX_QUERIES else "scan"

    def exact_path(self, nq: int) -> ExactPath:
        """The exact path a call of ``nq`` queries takes when the bank has an approximate index:
        ``config.exact_strategy`` when it names one, else the cheaper by the measured costs, else
        (an engine saved without costs) the partitions."""
        strategy = self.config.exact_strategy
        if strategy != "auto":
            return strategy
        return "partitions" if self.costs is None else self.costs.choose(nq)

    def _result_of(self, batch: BatchResult, b: int) -> SearchResult:
        """Query ``b`` of ``batch`` as a :class:`SearchResult`."""
        result = self._result(
            batch.rows[b],
            batch.scores[b],
            batch.mode,
            bool(batch.certified[b]),
            None if batch.kl is None else batch.kl[b],
        )
        if batch.probability is None:
            return result
        assert batch.log_qz is not None and batch.log_qz_lower is not None
        assert batch.log_qz_upper is not None and batch.typicality is not None
        return dataclasses.replace(
            result,
            probability=batch.probability[b][batch.rows[b] >= 0],
            log_qz=float(batch.log_qz[b]),
            log_qz_lower=float(batch.log_qz_lower[b]),
            log_qz_upper=float(batch.log_qz_upper[b]),
            typicality=float(batch.typicality[b]),
        )

    def _result(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        mode: str,
        certified: bool,
        kl: np.ndarray | None,
    ) -> SearchResult:
        keep = rows >= 0
        rows, scores = rows[keep], scores[keep]
        labels = None if self.bank.labels is None else np.asarray(self.bank.labels[rows], dtype=np.int64)
        return SearchResult(
            ids=self.bank.id_of(rows),
            rows=rows,
            scores=scores,
            labels=labels,
            mode=mode,
            certified=certified,
            kl=None if kl is None else kl[keep],
        )

    def _rescorer(self, points: np.ndarray, std: np.ndarray | None) -> Rescore:
        bank = self.bank
        if std is None:
            return lambda qi, rows: bank.log_prob_rows(points[qi], rows)
        return lambda qi, rows: bank.expected_log_prob_rows(points[qi], std[qi], rows)

    def _resolve_mode(self, mode: SearchMode | None) -> str:
        mode = mode or self.config.mode
        if mode not in ("auto", "exact", "approx"):
            raise InvalidArgumentError(f"mode must be auto, exact or approx, got {mode!r}", field="mode")
        if mode == "exact" or self.approx is None:
            return "exact"
        if mode == "auto" and len(self.bank) < self.config.approx_min_items:
            return "exact"
        return "approx"

    def _check_k(self, k: Any) -> int:
        if type(k) is not int and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
            raise InvalidArgumentError(f"k must be an integer, got {type(k).__name__}", field="k")
        if k < 1 or k > self.config.max_k:
            raise InvalidArgumentError(f"k must be in [1, {self.config.max_k}], got {k}", field="k")
        return int(min(k, len(self.bank)))

    def _check_points(self, value: Any, field: str, *, single: bool) -> np.ndarray:
        return check_points(value, self.dim, field, single=single)

    def _check_std(self, std: Any, shape: tuple[int, ...]) -> np.ndarray:
        arr = _real_array(std, "std")
        if arr.ndim == 1 and shape[0] == 1:
            arr = arr[None, :]
        if arr.shape != shape:
            raise InvalidArgumentError(
                f"std must have the shape of mean {shape}, got {arr.shape}", field="std"
            )
        if not (np.isfinite(arr).all() and (arr >= 0).all()):
            raise InvalidArgumentError("std must be finite and >= 0", field="std")
        if (arr > MAX_ABS_COORDINATE).any():
            raise InvalidArgumentError(f"std must be <= {MAX_ABS_COORDINATE:g}", field="std")
        return arr

    def _selection(self, labels: Iterable[int] | None) -> Selection | None:
        if labels is None:
            return None
        wanted = self._label_set(labels)
        with self._lock:
            sel = self._selections.get(wanted)
            if sel is not None:
                self._selections.move_to_end(wanted)
                return sel
        assert self.bank.labels is not None  # _label_set refuses a bank without labels
        mask = np.isin(self.bank.labels, np.fromiter(wanted, dtype=np.int64))
        sel = Selection(mask, self.exact.groups)
        with self._lock:
            self._selections[wanted] = sel
            while len(self._selections) > _SELECTION_CACHE:
                self._selections.popitem(last=False)
        return sel

    def _label_set(self, labels: Iterable[int]) -> frozenset[int]:
        """A label filter as the set of labels it keeps, all known to the bank."""
        if self.bank.labels is None:
            raise InvalidArgumentError("this bank has no labels to filter on", field="labels")
        try:
            values = list(labels)
        except TypeError as exc:
            raise InvalidArgumentError(f"labels must be integers: {exc}", field="labels") from exc
        if all(type(v) is int for v in values):  # plain ints (a request's labels): nothing to convert
            wanted = frozenset(values)
        else:
            try:
                if any(isinstance(v, (str, bytes)) for v in values):
                    raise TypeError("strings are not labels")
                wanted = frozenset(int(v) for v in values)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidArgumentError(f"labels must be integers: {exc}", field="labels") from exc
            if any(isinstance(v, (float, np.floating)) and v != int(v) for v in values):
                raise InvalidArgumentError(f"labels must be integers, got {values[:10]}", field="labels")
        if not wanted:
            raise InvalidArgumentError("labels filter is empty", field="labels")
        unknown = wanted - self.bank.label_set
        if unknown:
            raise InvalidArgumentError(f"unknown label(s) {sorted(unknown)[:10]}", field="labels")
        return wanted

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write the engine to directory ``path`` (atomically; see :mod:`latentsearch.engine.storage`).

        ``extra`` is JSON metadata kept in the manifest (model hash, dataset fingerprint, ...).
        """
        parts = EngineParts(
            self.bank,
            self.config,
            self.exact,
            self.approx,
            typicality=self.typicality,
            costs=self.costs,
            kernel=self.kernel_index() if self._uses_kernel() else None,
        )
        return save_engine(parts, Path(path), overwrite=overwrite, extra=extra)

    @classmethod
    def load(
        cls, path: str | Path, *, mmap: bool = True, verify: bool = False, device: Device = "auto"
    ) -> SearchEngine:
        """Load a saved engine; arrays are memory-mapped unless ``mmap=False``.

        ``verify=True`` checks every file's sha256 against the manifest (sizes are always checked);
        ``device`` picks where the exact flat screens run on this host (see ``EngineConfig.device``).
        """
        parts = load_engine(Path(path), mmap=mmap, verify=verify, device=device)
        engine = cls(
            parts.bank,
            parts.config,
            exact=parts.exact,
            approx=parts.approx,
            typicality=parts.typicality,
            costs=parts.costs,
            kernel=parts.kernel,
        )
        if parts.kernel is None:  # saved before the kernel's arrays were
            engine.prepare_kernel(background=True)
        return engine

    def _uses_kernel(self) -> bool:
        """Whether this engine's config can take the compiled kernel (it has partitions and a
        strategy that may choose it)."""
        cfg = self.config
        may = cfg.exact_strategy in ("auto", "kernel") or cfg.approx_strategy != "scan"
        return self.approx is not None and may

    def prepare_kernel(self, *, background: bool = False) -> threading.Thread | None:
        """Make the compiled kernel's copy of the bank (:meth:`kernel_index`) now rather than in the
        first query that needs it, when this engine's config can take the kernel at all.

        :meth:`load` calls it with ``background=True`` for an engine saved without the copy (before
        2026-12-01 late; newer ones memory-map the saved one): a daemon thread builds the copy (at 1M items
        d = 10 about 1-2 s and 176 MiB; ~10x both at 10M) while the load returns at once; a query
        arriving before it is done waits for it (the same lock). Returns that thread (None when run
        inline or when nothing is to be made). Errors in the thread are logged; the first query
        that needs the kernel then raises them itself.
        """
        if not self._uses_kernel():
            return None
        if not background:
            self.kernel_index()
            return None

        def build() -> None:
            try:
                self.kernel_index()
            except Exception:  # the query path raises it again, where a caller sees it
                log.exception("building the kernel index in the background failed")

        thread = threading.Thread(target=build, name="latentsearch-kernel-index", daemon=True)
        thread.start()
        return thread


def check_points(value: Any, dim: int, field: str = "z", *, single: bool = True) -> np.ndarray:
    """Latent points as a ``(B, d)`` float64 array: one ``(d,)`` point (``single``, B = 1) or a
    ``(B, d)`` batch with B >= 1, finite, every coordinate within +-MAX_ABS_COORDINATE.

    The engine's rule for query points, also for callers that take latents without searching
    (the server's Decode). Raises InvalidArgumentError(field=field).
    """
    arr = _real_array(value, field)
    if single:
        if arr.shape != (dim,):
            raise InvalidArgumentError(f"{field} must have shape ({dim},), got {arr.shape}", field=field)
        arr = arr[None, :]
    elif arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] < 1:
        raise InvalidArgumentError(
            f"{field} must have shape (B, {dim}) with B >= 1, got {arr.shape}", field=field
        )
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{field} contains NaN or inf", field=field)
    if (np.abs(arr) > MAX_ABS_COORDINATE).any():
        raise InvalidArgumentError(
            f"{field} coordinates must be within +-{MAX_ABS_COORDINATE:g}", field=field
        )
    return arr


def _tol(with_probability: bool, rel_tol: Any) -> float | None:
    """The normaliser's relative tolerance when probabilities are asked for, else ``None``."""
    if not with_probability:
        return None
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"rel_tol must be a number, got {type(rel_tol).__name__}", field="rel_tol")
    if not 0.0 <= float(rel_tol) < 1.0:
        raise InvalidArgumentError(f"rel_tol must be in [0, 1), got {rel_tol!r}", field="rel_tol")
    return float(rel_tol)


def _plain_point_ok(z: Any, dim: int) -> bool:
    """Whether ``z`` is a list of ``dim`` Python floats that :func:`check_points` accepts, checked in
    plain Python. False for anything else, valid or not: :func:`check_points` then decides."""
    if type(z) is not list or len(z) != dim:
        return False
    lim = MAX_ABS_COORDINATE
    for v in z:  # noqa: SIM110 - a loop: all() over a generator took twice as long (d = 10)
        if type(v) is not float or not -lim <= v <= lim:  # NaN, inf or too large
            return False
    return True


def _real_array(value: Any, field: str) -> np.ndarray:
    """``value`` as a float64 array; only real numbers (int, uint, float) are accepted."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{field} must be an array of real numbers: {exc}", field=field) from exc
    if arr.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"{field} must hold real numbers, got dtype {arr.dtype}", field=field)
    return arr.astype(np.float64, copy=False)

"""Typed configuration of the search engine."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import faiss

from latentsearch.errors import InvalidArgumentError

__all__ = ["EngineConfig", "SearchMode", "exact_group_index"]

SearchMode = Literal["auto", "exact", "approx"]


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Every knob of :class:`~latentsearch.engine.SearchEngine`, with its default.

    FAISS choices are data: the factory strings and the metric are recorded in the saved manifest.
    """

    # Default search mode. "auto" answers exactly below `approx_min_items` items, approximately above.
    mode: SearchMode = "auto"
    # Bank size from which "auto" means "approx" (an approximate index is always built from here).
    approx_min_items: int = 100_000
    # Bank size from which the partitions (the approximate index) are built even where "auto" still
    # answers exactly: exact search then takes the partition branch and bound / compiled kernel when
    # the measured costs say so. The partitions are built from min(this, approx_min_items) items.
    # Measured (Fashion-MNIST VAE posteriors, d = 10, one core, loaded 2-core machine): at 70k items
    # they cost 2.1 s of build (vs 0.04 s for the flat screen alone) and made exact B = 1 queries
    # 1.1-1.7x faster per family (0.52-0.80 ms vs 0.90 ms); at 20k 0.7 s of build for 0.9-1.3x.
    partition_min_items: int = 50_000
    # Largest k a caller may ask for; k above the bank size simply returns the whole bank.
    max_k: int = 1000
    # FAISS factory string of each exact scale group and its metric (lifted inner product). The
    # certified screen needs every float32 score exactly as computed, so it must build a plain flat
    # index needing no training: in practice "Flat" (checked at construction, see exact_group_index).
    exact_factory: str = "Flat"
    metric: Literal["inner_product"] = "inner_product"
    # Exact mode screens k + max(k, exact_extra) float32 candidates per scale group before the
    # certified float64 rerank; a larger value means fewer fallbacks, more rerank work.
    exact_extra: int = 16
    # Items are grouped by the magnitude of their lifted vector (powers of this base) so tiny-sigma
    # items, whose float32 scores carry large error bounds, do not loosen everyone's bound.
    scale_group_base: float = 64.0
    # Approximate mode: number of partitions (None: about 12 * sqrt(N), ~80 items each at 1M).
    approx_nlist: int | None = None
    # Partitions scanned per query, best centroid posterior first (None: about 3% of them).
    approx_nprobe: int | None = None
    # Candidates from the approximate scan that are reranked exactly in float64.
    approx_rerank: int = 64
    # How exact mode finds the exact top-k when an approximate index exists: "partitions" scans the
    # best partitions, then every partition whose rigorous upper bound reaches the k-th score found
    # (branch and bound, typically a few % of the bank); "flat" screens every item; "auto" picks the
    # cheaper of the two per call from the batch size and the costs measured when the index was
    # built (see engine/strategy.py; an engine saved without them uses "partitions"). "kernel" is
    # the same branch and bound compiled into one loop per query (engine/kernels.py; point queries,
    # CPU; query Gaussians take "partitions"), which "auto" measures beside the other two.
    exact_strategy: Literal["auto", "partitions", "flat", "kernel"] = "auto"
    # How approximate mode scans point queries: "kernel" scans, with the compiled kernel, the nprobe
    # partitions of best centroid posterior, then others in order of their rigorous bound up to
    # `approx_kernel_budget` of them, stopping early, certified, when the bound proves the top-k
    # (a call's own nprobe: those partitions by centroid only); "scan" probes the
    # nprobe best centroid posteriors with FAISS and reranks; "auto" takes, per call, the cheapest
    # by the costs measured at build (engine/strategy.py) of the exact paths and of those two whose
    # recall measured at build reached `approx_min_recall` (measured where approximate mode is the
    # default or `mode`; on banks searched exactly by default: the kernel below 8 queries per call,
    # the exact path the costs pick from 8 (at 70k items it was 1.05-1.33x faster than the scan,
    # whose recall was 0.93-0.99); in engines saved without costs: the kernel below 8, the scan
    # from 8). At 200k items of a Fashion-MNIST VAE, one
    # core: the kernel 1.8 ms per query at B = 1 (recall 0.991-1.000), at B = 64 0.76-0.88 ms,
    # where the scan cost 0.30-0.37 ms at prior recall 0.915 and the exact flat screen 0.49 ms.
    approx_strategy: Literal["auto", "kernel", "scan"] = "auto"
    # The least recall@k on the probe families (box, prior, posterior) at which "auto" lets an
    # approximate path answer; else an exact path does (recall 1). The bar.
    approx_min_recall: float = 0.99
    # Fraction of the partitions the kernel may scan per approximate query. At 200k items of a
    # Fashion-MNIST VAE (exact search scans 6-17% of them), recall@10 box / prior / posterior: by
    # centroid alone 0.996 / 0.972 / 0.992 at 0.03; by bound alone 0.995 / 0.955 / 0.997 at 0.03 and
    # 0.999 / 0.992 / 1.000 at 0.08; 0.02 by centroid then by bound to 0.06: 0.999 / 0.999 / 1.000,
    # at 30-50% less CPU than the exact search. Measured again with the bucket-order kernel (128
    # queries per family): by bound alone to 0.06 is 1.4-1.8x faster at 200k and 1M for recall
    # 0.998 / 0.995 / 1.000 and 1.000 / 0.995 / 1.000, but on a synthetic bank (vae_like_posteriors,
    # 20k items, 300 partitions) its prior recall fell to 0.15 where the centroid order gives 0.77:
    # the bound alone ranks prior queries by the partitions' smallest sigma, so it is not the default.
    # 0.06 (the default until session 9) left prior recall at 0.985-0.986 on two of three banks of
    # new models (200k items): 0.08 reached 0.993 on one, and 0.998 at 200k and 1M on the third
    # (0.993 / 0.995 at 0.06), for 15-26% more time per query at 200k and 4-15% at 1M (B = 1, one
    # core, 192 queries per family, the budgets in turn in one process).
    approx_kernel_budget: float = 0.08
    # The share of that work (the nprobe partitions by centroid, then up to approx_kernel_budget of
    # them) the approximate kernel does, > 0: ceil(scale * nprobe) partitions by centroid, then by
    # bound up to scale * approx_kernel_budget of them (at most all). None: measured at build where
    # the approximate paths are (engine/strategy.py: less work while the recall on the probes still
    # reaches approx_min_recall with a margin, more where the default work falls short; saved with
    # the costs). The share a query's top-k spans falls as the bank grows: at 10M items of a
    # Fashion-MNIST VAE half the default work kept recall@10 at 0.998-1.000 and took single queries
    # from 19-24 to 13-14 ms; at 1M items the default work is needed (prior recall 0.991 at 2/3).
    approx_kernel_scale: float | None = None
    # Compute the rigorous per-partition bound to flag approximate answers proven exact (costly).
    approx_certify: bool = False
    # k-means iterations and training sample used to build the partitions. At 1M items these
    # build in ~20 s; 2x the sample and iterations took 2.5x longer for no measurable recall gain.
    kmeans_iters: int = 10
    kmeans_sample: int = 131_072
    # Seed for every random choice made while building.
    seed: int = 0
    # Where the exact path's flat screens run: "auto" uses a GPU when faiss-gpu sees one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # FAISS / BLAS threads (None: leave the library default, all cores).
    num_threads: int | None = None
    # On a bank of at least this many items, an approximate call of fewer than 8 queries answered by
    # the compiled kernel (run on the calling thread otherwise) splits each query's partitions into
    # num_threads shares searched on as many threads and merges their top-k. At 10M items (2 cores,
    # Fashion-MNIST VAE bank) single approximate queries took 3.5-3.9 ms instead of 4.9-5.3 (1.4x,
    # same recall); exact ones gained 0.91-1.20x (each share prunes with its own k-th score), so
    # they are not split. Not measured below 10M: smaller banks stay on one thread.
    split_min_items: int = 2_000_000
    # Typicality reference: log q(z) of this many posterior samples of random items, computed when
    # the index is built and saved with it (0: none; queries then report typicality as NaN). Each
    # sample screens the whole bank once: 1024 give percentiles to 0.1% and cost about 3 s at 70k
    # items and about 12 s at 1M on 2 cores (2048 doubled a 1M publish).
    typicality_samples: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "exact", "approx"):
            raise InvalidArgumentError(f"mode must be auto, exact or approx, got {self.mode!r}", field="mode")
        for name in (
            "approx_min_items", "partition_min_items", "max_k", "approx_rerank", "kmeans_iters",
            "split_min_items",
        ):  # fmt: skip
            _check_int(self, name, minimum=1)
        for name in ("kmeans_sample",):
            _check_int(self, name, minimum=1)
        for name in ("approx_nlist", "approx_nprobe"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        _check_int(self, "exact_extra", minimum=0)
        _check_int(self, "typicality_samples", minimum=0)
        if not self.scale_group_base > 1.0:
            raise InvalidArgumentError("scale_group_base must be > 1", field="scale_group_base")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgumentError(
                f"device must be auto, cpu or cuda, got {self.device!r}", field="device"
            )
        if self.exact_strategy not in ("auto", "partitions", "flat", "kernel"):
            raise InvalidArgumentError(
                f"exact_strategy must be auto, partitions, flat or kernel, got {self.exact_strategy!r}",
                field="exact_strategy",
            )
        if self.approx_strategy not in ("auto", "kernel", "scan"):
            raise InvalidArgumentError(
                f"approx_strategy must be auto, kernel or scan, got {self.approx_strategy!r}",
                field="approx_strategy",
            )
        recall = self.approx_min_recall
        if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 <= recall <= 1.0:
            raise InvalidArgumentError(
                f"approx_min_recall must be a fraction in [0, 1], got {recall!r}", field="approx_min_recall"
            )
        budget = self.approx_kernel_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise InvalidArgumentError(
                f"approx_kernel_budget must be a fraction in (0, 1], got {budget!r}",
                field="approx_kernel_budget",
            )
        scale = self.approx_kernel_scale
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < math.inf
        ):
            raise InvalidArgumentError(
                f"approx_kernel_scale must be None or a finite number > 0, got {scale!r}",
                field="approx_kernel_scale",
            )
        if self.metric != "inner_product":
            raise InvalidArgumentError("only the lifted inner_product metric is supported", field="metric")
        exact_group_index(self.exact_factory, _PROBE_DIM)  # a tiny empty index: rejects bad strings now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Rebuild from :meth:`to_dict` output, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_PROBE_DIM = 3  # lifted dimension 2d + 1 of a d = 1 bank: the smallest the engine builds


def exact_group_index(factory: str, n: int) -> faiss.IndexFlat:
    """An empty FAISS inner-product index of one exact scale group, over ``n``-dim lifted vectors.

    The exact path's proof bounds the error of float32 scores computed from the stored float32
    vectors, so the index must be a flat index that needs no training (``faiss.IndexFlat``, inner
    product): quantised (``SQfp16``, ``PQ``), graph (``HNSW``, ``NSG``), partitioned (``IVF``) or
    wrapped (``IDMap``, ``Refine``, pre-transforms) indexes would return scores or candidates the
    bound does not cover.

    Raises:
        InvalidArgumentError: (``field="exact_factory"``) ``factory`` is not a string, does not
            parse, needs training, or builds anything but a flat inner-product index.
    """
    if not isinstance(factory, str):
        raise InvalidArgumentError(
            f"exact_factory must be a FAISS factory string, got {type(factory).__name__}",
            field="exact_factory",
        )
    try:
        index = faiss.index_factory(n, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # FAISS says "Error in <function> at <file>:<line>: <reason>"; keep the reason.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(": ", 1)[-1]
        raise InvalidArgumentError(
            f"FAISS cannot build exact_factory {factory!r} ({reason})",
            field="exact_factory",
        ) from exc
    if not index.is_trained:
        raise InvalidArgumentError(
            f"exact_factory {factory!r} needs training; exact scale groups must be flat indexes that need "
            "none (use 'Flat')",
            field="exact_factory",
        )
    # index_factory returns the concrete class (IndexFlat, IndexHNSWFlat, ...), owning its object.
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InvalidArgumentError(
            f"exact_factory {factory!r} builds {type(index).__name__}, which the exact path cannot "
            "certify; exact scale groups must be flat inner-product indexes (use 'Flat')",
            field="exact_factory",
        )
    return index


def _check_int(config: EngineConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)

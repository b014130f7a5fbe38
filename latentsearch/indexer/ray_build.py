"""The index build's every-item step on Ray: assigning each item to its nearest k-means centroid,
as Ray tasks over row shards of the encode step's memory-mapped posteriors.

The approximate index (:meth:`latentsearch.engine.approx.ApproxIndex.build`, partitions from
:mod:`latentsearch.engine.partition`) trains k-means on a sample (that fits one machine at any N),
then assigns *every* item to its nearest centroid in the standardised ``[mu, log sigma]`` features
(below 4096 lists: the ``nlist`` centroids; from there up: the ~sqrt(nlist) coarse cells) and
reduces per partition. The assignment is the step whose cost grows with N x centroids (the flat
k-means: 10M items, 38k lists, 20 features, about 8e12 multiply-adds), so a :class:`RayAssigner`
passed to the build (``SearchEngine.build(..., assign_rows=...)``, the engine's
:data:`~latentsearch.engine.approx.AssignRows` hook) runs it as Ray tasks: each task memory-maps
``mu.npy`` / ``logvar.npy`` itself (the files must be on storage every node sees, like
:mod:`indexer.ray_encode`'s shards), computes its rows' features and searches the centroids with
FAISS. The build then reduces the partitions' boxes and bounds from that assignment in the driver,
where the bank is in memory anyway (a pass linear in N x d).

**The same assignment as the local build, bit for bit.** Features are computed with the build's own
float64 arithmetic (``log sigma = 0.5 * logvar`` in float64, ``(f - center) / scale``, then float32),
and each shard is a multiple of FAISS's 4096-query block that divides the build's 262,144-row chunks,
so every FAISS block holds the same rows as in the local build and scores them with the same BLAS
call (a remainder under FAISS's 20-query BLAS threshold joins the shard before it, unless a chunk
starts there, as in the build).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np
import ray
import ray.exceptions

from latentsearch.errors import InvalidArgumentError, UnavailableError
from latentsearch.indexer.config import IndexJobConfig
from latentsearch.indexer.encode import LOGVAR_FILE, MU_FILE
from latentsearch.indexer.ray_encode import ray_session

__all__ = ["BUILD_CHUNK", "FAISS_BLOCK", "RayAssigner", "ray_assign", "ray_assigner", "shard_bounds"]

log = logging.getLogger(__name__)

# Rows per pass of the build's assignment loop (engine/partition.py's _CHUNK).
BUILD_CHUNK = 262_144
# Queries per FAISS exhaustive-search block (faiss' distance_compute_blas_query_bs) and the batch
# size from which FAISS scores with BLAS (distance_compute_blas_threshold).
FAISS_BLOCK = 4096
_BLAS_THRESHOLD = 20
# Default rows per Ray task: 16 FAISS blocks; 4 tasks per build chunk.
DEFAULT_SHARD_ROWS = 65_536


def shard_bounds(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` positions in the row list of each task (see the module docstring).

    Raises:
        InvalidArgumentError: ``shard_rows`` is not a multiple of FAISS_BLOCK dividing BUILD_CHUNK.
    """
    if shard_rows < FAISS_BLOCK or shard_rows % FAISS_BLOCK or BUILD_CHUNK % shard_rows:
        raise InvalidArgumentError(
            f"shard_rows must be a multiple of {FAISS_BLOCK} that divides {BUILD_CHUNK}, got {shard_rows}",
            field="shard_rows",
        )
    bounds = [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]
    if len(bounds) > 1:
        start, stop = bounds[-1]
        # FAISS scores a search of fewer than 20 queries without BLAS: keep the build's call sizes
        if stop - start < _BLAS_THRESHOLD and start % BUILD_CHUNK:
            bounds[-2:] = [(bounds[-2][0], stop)]
    return bounds


def _features(mu: np.ndarray, log_sigma: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(R, 2d)`` float32 standardised ``[mu, log sigma]`` (the build's arithmetic)."""
    f = np.concatenate([mu, log_sigma], axis=1)
    return np.ascontiguousarray((f - center) / scale, dtype=np.float32)


@ray.remote
def _assign_shard(
    directory: str, rows: np.ndarray, centroids: np.ndarray, center: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """One task: the ``(R,)`` int64 nearest centroid of ``rows`` (sorted bank rows)."""
    mu32 = np.load(Path(directory) / MU_FILE, mmap_mode="r")
    logvar32 = np.load(Path(directory) / LOGVAR_FILE, mmap_mode="r")
    mu = np.asarray(mu32[rows], dtype=np.float64)
    log_sigma = 0.5 * np.asarray(logvar32[rows], dtype=np.float64)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    _, found = index.search(_features(mu, log_sigma, center, scale), 1)
    return found[:, 0].astype(np.int64)


def ray_assign(
    directory: Path,
    rows: np.ndarray,
    centroids: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> np.ndarray:
    """``(R,)`` int64 nearest of ``centroids`` ``(L, 2d)`` float32 for bank ``rows`` ``(R,)`` of
    ``directory/mu.npy`` + ``logvar.npy`` ((N, d) float32, as the encode step writes them), in the
    features standardised by ``center`` and ``scale`` ``(2d,)`` float64, as Ray tasks of
    ``shard_rows`` rows (module docstring). Needs a connected Ray session (``ray.init``).

    Raises:
        InvalidArgumentError: mismatched shapes, bad ``shard_rows``.
        UnavailableError: a task failed (a worker died, the cluster went away).
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or center.shape != (centroids.shape[1],) or scale.shape != center.shape:
        raise InvalidArgumentError(
            f"centroids {centroids.shape}, center {center.shape} and scale {scale.shape} do not match",
            field="centroids",
        )
    bounds = shard_bounds(rows.size, shard_rows)
    t0 = time.perf_counter()
    shared = [ray.put(v) for v in (centroids, center, scale)]  # sent once, not per task
    futures = [_assign_shard.remote(str(directory), rows[s:e], *shared) for s, e in bounds]
    assign = np.empty(rows.size, dtype=np.int64)
    try:
        for (s, e), part in zip(bounds, ray.get(futures), strict=True):
            assign[s:e] = part
    except ray.exceptions.RayError as exc:
        raise UnavailableError(f"the Ray assignment failed: {type(exc).__name__}: {exc}") from exc
    log.info("Ray assigned %d items to %d centroids in %d tasks, %.2f s",
             rows.size, centroids.shape[0], len(bounds), time.perf_counter() - t0)
    return assign


class RayAssigner:
    """The engine build's assignment hook on Ray (``SearchEngine.build(..., assign_rows=...)``):
    ``assigner(rows, centroids, center, scale) -> (R,)`` int64 nearest centroid per bank row, by
    :func:`ray_assign` over the posteriors in ``directory``, on the cluster at ``address`` (joined for
    the call unless this process is connected already; see :func:`indexer.ray_encode.ray_session`).
    """

    def __init__(
        self, directory: Path, *, address: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS
    ) -> None:
        self.directory = Path(directory)
        self.address = address
        self.shard_rows = shard_rows
        shard_bounds(BUILD_CHUNK, shard_rows)  # validate now

    def __call__(
        self, rows: np.ndarray, centroids: np.ndarray, center: np.ndarray, scale: np.ndarray
    ) -> np.ndarray:
        with ray_session(self.address):
            return ray_assign(self.directory, rows, centroids, center, scale, shard_rows=self.shard_rows)


def ray_assigner(directory: Path, config: IndexJobConfig) -> RayAssigner:
    """The index job's assign step under ``--ray`` (``run_index_job(..., assign=ray_assigner)``):
    a :class:`RayAssigner` over the job's encoded posteriors in ``directory``, on ``config.ray_address``."""
    return RayAssigner(directory, address=config.ray_address)

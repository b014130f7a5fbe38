"""The encode step on Ray Data (``latentsearch index --ray``): the same ``mu.npy`` / ``logvar.npy``
as :func:`indexer.encode.encode_dataset`, computed by a pool of actors on a Ray cluster.

Flow (the *driver* is the process running the job; see :data:`indexer.job.EncodeStep`):

1. The work is the dataset's rows cut into chunks of ``batch_size``: ``ray.data.from_numpy`` over
   the chunks' first rows (a few bytes per chunk, so there are no read tasks competing with the
   actors for CPUs, and the driver never reads an item).
2. ``map_batches(_ShardEncoder, compute=ActorPoolStrategy(size=ray_actors), num_gpus=ray_gpus_per_actor,
   num_cpus=ray_cpus_per_actor)``: each actor opens the dataset itself (``load_data(config.data)``:
   every format the indexer reads, so the data must be at the same path on every node), loads the
   model once (:func:`model.loader.load_model`, on its GPU when it has one) and checks its hash
   against the driver's, then per chunk reads the rows, encodes them
   (:func:`indexer.encode.encode_posteriors`) and writes a *shard* ``shards/<first row>-<rows>.npz``
   (``start`` (1,) int64, ``mu`` and ``logvar`` (rows, d) float32) under a temporary name, renamed
   when complete. It returns only the shard's path and row count.
3. The driver streams those small rows (the progress bar counts items), then copies every shard into
   the ``(N, d)`` float32 memmaps, checks that each row was written exactly once, and removes the
   shards. The job builds and publishes from the memmaps exactly as after a local encode.

Parquet data (:class:`latentsearch.data.readers.ParquetDataset`) takes another route, Ray Data's own
reader: ``ray.data.read_parquet`` streams the item column (and each row's file, for errors) in
blocks, order preserved, to a pool of :class:`_ParquetEncoder` actors that decode the images or
arrays (:func:`latentsearch.data.parquet.decode_items`) and encode them; the driver writes each
returned batch into the memmaps at the next rows and checks that exactly N rows came back. The pool
starts one actor short of ``ray_actors`` (Ray Data lists the files in a task that needs a CPU).

The shards live in the version's staging area, so ``--out`` must be on storage every node sees. A
killed driver or worker leaves only the staging area, which the next job removes
(:meth:`indexer.root.IndexRoot.clean_stale`); the current version is untouched until the publish.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.exceptions

from latentsearch import errors
from latentsearch.data.builtin import load_data
from latentsearch.data.parquet import ItemColumn, decode_items
from latentsearch.data.readers import Dataset, ParquetDataset
from latentsearch.errors import (
    CorruptIndexError,
    FailedPreconditionError,
    InvalidArgumentError,
    LatentSearchError,
    UnavailableError,
)
from latentsearch.indexer.config import IndexJobConfig
from latentsearch.indexer.encode import (
    LOGVAR_FILE,
    MU_FILE,
    EncodedPosteriors,
    check_encodable,
    encode_posteriors,
)
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.loader import InputRule, LoadedModel, load_model
from latentsearch.progress import Progress

__all__ = ["SHARD_DIR", "ray_encode", "ray_session"]

log = logging.getLogger(__name__)

# Sub-folder of the encode directory holding the shards while the actors run.
SHARD_DIR = "shards"
# Chunks per Ray block: a block is the unit Ray hands to an actor, so smaller blocks balance better.
_CHUNKS_PER_BLOCK = 4
# CPUs a Parquet read task asks for: none (reading is I/O-bound; any CPU share would wait behind the
# actors that hold every CPU of a small cluster, and the job would never start).
_READ_CPUS = 0.0
# The column of the file each row came from (ray.data.read_parquet's include_paths), for errors.
_PATH_COLUMN = "path"


class _ShardEncoder:
    """One Ray actor: opens the dataset and loads the model once, then encodes chunks into shards.

    A LatentSearchError (bad data, a node whose data or model differ from the driver's) is returned as
    data in the ``error`` column, as JSON ``{"type", "field", "message"}``, not raised: Ray drops the
    cause of a failed task on its way to the driver, and would retry a failed actor constructor.
    """

    def __init__(
        self,
        *,
        config: IndexJobConfig,
        input_rule: InputRule,
        model_hash: str,
        shape: tuple[int, ...],
        dtype: str,
        shard_dir: str,
    ) -> None:
        self.config = config
        self.shard_dir = Path(shard_dir)
        self.error: LatentSearchError | None = None
        try:
            self.dataset = load_data(config.data, **config.data_options)
            if self.dataset.shape != shape or self.dataset.dtype.str != dtype:
                raise FailedPreconditionError(
                    f"{config.data}: a Ray worker reads {self.dataset.shape} {self.dataset.dtype}, the "
                    f"driver {shape} {dtype}; the data must be the same on every node"
                )
            self.model = _actor_model(config, input_rule, model_hash)
        except LatentSearchError as exc:
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch["data"]``: ``(k,)`` first rows of chunks -> ``{"shard": (k,) str, "rows": (k,) int64,
        "error": (k,) str}`` (one row per chunk; on an error, one row with no shard)."""
        paths, counts = [], []
        try:
            if self.error is not None:
                raise self.error
            for start in batch["data"].astype(np.int64).tolist():
                paths.append(self._encode_chunk(start))
                counts.append(min(self.config.batch_size, len(self.dataset) - start))
        except LatentSearchError as exc:
            return {"shard": np.array([""]), "rows": np.array([0]), "error": np.array([_error_text(exc)])}
        rows = np.array(counts, dtype=np.int64)
        return {"shard": np.array(paths), "rows": rows, "error": np.array([""] * len(paths))}

    def _encode_chunk(self, start: int) -> str:
        """Encode rows ``[start, start + batch_size)`` into a shard; its path."""
        stop = min(start + self.config.batch_size, len(self.dataset))
        mu, logvar = encode_posteriors(self.model, self.dataset.read(start, stop), bf16=self.config.bf16)
        if mu.shape != (stop - start, self.model.latent_dim) or logvar.shape != mu.shape:
            raise InvalidArgumentError(
                f"encoder returned mu {mu.shape} / logvar {logvar.shape} for {stop - start} items; "
                f"expected ({stop - start}, {self.model.latent_dim})",
                field="model",
            )
        path = self.shard_dir / f"{start:012d}-{stop - start}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, start=np.array([start], np.int64), mu=mu, logvar=logvar)
        os.replace(tmp, path)  # a shard is either whole or absent
        return str(path)


class _ParquetEncoder:
    """One Ray actor of the Parquet path: loads the model once, then decodes and encodes the blocks
    ``ray.data.read_parquet`` streams to it (errors returned as data, as in :class:`_ShardEncoder`)."""

    def __init__(
        self, *, config: IndexJobConfig, input_rule: InputRule, model_hash: str, column: ItemColumn
    ) -> None:
        self.config = config
        self.column = column
        self.error: LatentSearchError | None = None
        try:
            self.model = _actor_model(config, input_rule, model_hash)
        except LatentSearchError as exc:
            self.error = exc

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """``batch``: a pyarrow Table of ``k`` rows (the item column and Ray's ``path`` column) ->
        ``{"mu", "logvar": (k, d) float32, "error": (k,) str}`` in the block's row order (on an
        error, one row whose ``error`` is set)."""
        d = 0
        try:
            if self.error is not None:
                raise self.error
            d = self.model.latent_dim
            # a batch may join blocks of several files: decode each file's run of rows under its name
            paths = np.array(batch.column(_PATH_COLUMN).to_pylist(), dtype=object)
            cuts = [0, *(np.flatnonzero(paths[1:] != paths[:-1]) + 1).tolist(), len(paths)]
            values = batch.column(self.column.name)
            runs = [
                decode_items(values.slice(a, b - a), self.column, file=str(paths[a]), first_row=None)
                for a, b in itertools.pairwise(cuts)
                if b > a
            ]
            empty = np.empty((0, *self.column.item_shape), self.column.dtype)
            items = np.concatenate(runs) if runs else empty
            mu, logvar = encode_posteriors(self.model, items, bf16=self.config.bf16)
            if mu.shape != (len(items), d) or logvar.shape != mu.shape:
                raise InvalidArgumentError(
                    f"encoder returned mu {mu.shape} / logvar {logvar.shape} for {len(items)} items; "
                    f"expected ({len(items)}, {d})",
                    field="model",
                )
        except LatentSearchError as exc:
            zero = np.zeros((1, d), np.float32)
            return {"mu": zero, "logvar": zero, "error": np.array([_error_text(exc)])}
        return {"mu": mu, "logvar": logvar, "error": np.array([""] * len(mu))}


def _actor_model(config: IndexJobConfig, input_rule: InputRule, model_hash: str) -> LoadedModel:
    """The model an actor encodes with (on its GPU when it has one), checked against the driver's
    hash; a CPU actor runs ``max(1, int(ray_cpus_per_actor))`` torch threads."""
    assert config.model is not None
    device = "cuda" if config.ray_gpus_per_actor > 0 else "cpu"
    model = load_model(config.model, input_shape=config.input_shape, device=device, input_rule=input_rule)
    if model.model_hash != model_hash:
        raise FailedPreconditionError(
            f"{config.model}: a Ray worker loaded model {model.model_hash[:12]}, the driver "
            f"{model_hash[:12]}; the model must be the same on every node"
        )
    if model.device.type == "cpu":
        configure_cpu_threads(config.num_threads or max(1, int(config.ray_cpus_per_actor)))
    return model


def _error_text(exc: LatentSearchError) -> str:
    """An actor's error as data (see :class:`_ShardEncoder`): JSON ``{"type", "field", "message"}``."""
    return json.dumps({"type": type(exc).__name__, "field": exc.field, "message": exc.message})


def _actor_error(text: str) -> LatentSearchError:
    """The error an actor reported (see :class:`_ShardEncoder`), as its own class when it is one of
    :mod:`latentsearch.errors`' (else a LatentSearchError)."""
    info = json.loads(text)
    cls = getattr(errors, str(info.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, LatentSearchError)) or cls is errors.RemoteError:
        cls = LatentSearchError
    return cls(str(info.get("message")), field=info.get("field"))


def ray_encode(
    model: LoadedModel, dataset: Dataset, directory: Path, config: IndexJobConfig
) -> EncodedPosteriors:
    """Encode ``dataset`` on Ray into ``directory/mu.npy`` and ``directory/logvar.npy`` (module docstring).

    ``model`` is the driver's copy: its hash, latent size and input rule are what every actor must
    load. Joins the cluster at ``config.ray_address`` (None: RAY_ADDRESS, else a new local instance,
    shut down at the end) unless this process is already connected.

    Raises:
        The LatentSearchError an actor raised (bad data, a model that differs on a node, ...);
        UnavailableError when Ray itself fails (a worker died, the cluster went away);
        CorruptIndexError when a shard is missing or overlaps another.
    """
    check_encodable(model, dataset)
    if config.data is None:
        raise InvalidArgumentError("--ray encodes a dataset: give --data", field="data")
    n, d = len(dataset), model.latent_dim
    shard_dir = Path(directory) / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ray_session(config.ray_address):
        log.info("Ray: %s; %d actors (%.3g CPU, %.3g GPU each)", ray.cluster_resources(), config.ray_actors,
                 config.ray_cpus_per_actor, config.ray_gpus_per_actor)
        if isinstance(dataset, ParquetDataset):
            encoded = _run_parquet(model, dataset, config, Path(directory))
        else:
            shards, seconds = _run_actors(model, dataset, config, shard_dir)
    if not isinstance(dataset, ParquetDataset):
        encoded = _assemble(shards, Path(directory), n, d, seconds)
    log.info("Ray encoded %d items in %.2f s (%.0f items/s; %.2f s with Ray start-up)",
             n, encoded.seconds, n / max(encoded.seconds, 1e-9), time.perf_counter() - t0)
    return encoded


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connected to the Ray cluster at ``address`` (None: RAY_ADDRESS, else a new local instance)
    for the block, unless this process already is; a session this call started is shut down at the
    end. The CLI holds one around the whole ``--ray`` job, so encode and build share it.

    Raises:
        UnavailableError: the cluster cannot be reached.
    """
    started = _connect(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Join (or start) a Ray cluster unless already connected; True when this call connected."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UnavailableError(f"cannot reach the Ray cluster {address or '(local)'}: {exc}") from exc
    return True


def _job_context() -> Any:
    """This job's Ray Data settings (a copy of the current DataContext): no Ray progress bars (the
    job's own bar counts items), no start-up banner."""
    context = ray.data.DataContext.get_current().copy()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return context


def _run_actors(
    model: LoadedModel, dataset: Dataset, config: IndexJobConfig, shard_dir: Path
) -> tuple[list[tuple[str, int]], float]:
    """Run the actor pool; the shards written (path, rows) and the seconds the pool ran."""
    n = len(dataset)
    starts = np.arange(0, n, config.batch_size, dtype=np.int64)  # (chunks,) first row of each chunk
    # At least two blocks per actor (so each has work), else blocks of _CHUNKS_PER_BLOCK chunks; never
    # more actors than blocks (an idle actor would only hold its CPU or GPU).
    blocks = min(len(starts), max(2 * config.ray_actors, -(-len(starts) // _CHUNKS_PER_BLOCK)))
    actors = min(config.ray_actors, blocks)
    with ray.data.DataContext.current(_job_context()):
        return _stream_shards(model, dataset, config, shard_dir, np.array_split(starts, blocks), actors)


def _run_parquet(
    model: LoadedModel, dataset: ParquetDataset, config: IndexJobConfig, directory: Path
) -> EncodedPosteriors:
    """The Parquet path: ``ray.data.read_parquet`` streams the item column in blocks to the actor
    pool (order preserved); the driver writes each encoded batch into the ``(N, d)`` memmaps at the
    next rows and checks that exactly N rows came back."""
    n, d = len(dataset), model.latent_dim
    mu = np.lib.format.open_memmap(directory / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    logvar = np.lib.format.open_memmap(directory / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    context = _job_context()
    context.execution_options.preserve_order = True  # rows come back in the files' order
    bar = Progress(n, desc="encode (ray)", unit="item", enabled=config.progress, logger=log, unit_scale=True)
    row = 0
    t0 = time.perf_counter()
    try:
        with ray.data.DataContext.current(context):
            blocks = ray.data.read_parquet(
                [str(f) for f in dataset.files],
                include_paths=True,
                file_extensions=None,  # the dataset's own list (*.parquet and *.pq)
                num_cpus=_READ_CPUS,  # reading is I/O: it must not wait for CPUs the actors hold
            ).select_columns([dataset.item_column.name, _PATH_COLUMN])  # only these are read
            encoded = blocks.map_batches(
                _ParquetEncoder,
                fn_constructor_kwargs={
                    "config": config,
                    "input_rule": model.input_rule,
                    "model_hash": model.model_hash,
                    "column": dataset.item_column,
                },
                batch_size=config.batch_size,
                batch_format="pyarrow",
                # Ray Data lists the files in a task that asks for a whole CPU: a pool holding every
                # CPU from the start would never get input, so one actor joins once reading began.
                compute=ray.data.ActorPoolStrategy(
                    min_size=max(1, config.ray_actors - 1), max_size=config.ray_actors
                ),
                num_cpus=config.ray_cpus_per_actor,
                num_gpus=config.ray_gpus_per_actor or None,
            )
            for out in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                failed = [e for e in out["error"].tolist() if e]
                if failed:
                    raise _actor_error(failed[0])
                k = len(out["mu"])
                if row + k > n:
                    raise CorruptIndexError(f"{dataset.path}: Ray read more than the {n} rows of the files")
                mu[row : row + k] = out["mu"]
                logvar[row : row + k] = out["logvar"]
                row += k
                bar.update(k)
    except ray.exceptions.RayError as exc:
        raise UnavailableError(f"the Ray encode failed: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    if row != n:
        raise CorruptIndexError(f"{dataset.path}: Ray read {row} rows, the files hold {n}")
    mu.flush()
    logvar.flush()
    del mu, logvar
    return _encoded(directory, time.perf_counter() - t0)


def _encoded(directory: Path, seconds: float) -> EncodedPosteriors:
    """The memmaps written in ``directory``, opened read-only."""
    return EncodedPosteriors(
        directory=directory,
        mu=np.load(directory / MU_FILE, mmap_mode="r"),
        logvar=np.load(directory / LOGVAR_FILE, mmap_mode="r"),
        seconds=seconds,
    )


def _stream_shards(
    model: LoadedModel,
    dataset: Dataset,
    config: IndexJobConfig,
    shard_dir: Path,
    blocks: list[np.ndarray],
    actors: int,
) -> tuple[list[tuple[str, int]], float]:
    """The pipeline of :func:`_run_actors` (``blocks``: the chunks' first rows, one array per Ray
    block) under its DataContext, streamed to the end."""
    n = len(dataset)
    encoded = ray.data.from_numpy(blocks).map_batches(
        _ShardEncoder,
        fn_constructor_kwargs={
            "config": config,
            "input_rule": model.input_rule,
            "model_hash": model.model_hash,
            "shape": dataset.shape,
            "dtype": dataset.dtype.str,
            "shard_dir": str(shard_dir),
        },
        batch_size=1,  # one chunk (one encoder forward pass, one shard) per call
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool: each actor loads the model once
        num_cpus=config.ray_cpus_per_actor,
        num_gpus=config.ray_gpus_per_actor or None,
    )
    shards: list[tuple[str, int]] = []
    bar = Progress(n, desc="encode (ray)", unit="item", enabled=config.progress, logger=log, unit_scale=True)
    t0 = time.perf_counter()
    try:
        for out in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            failed = [e for e in out["error"].tolist() if e]
            if failed:
                raise _actor_error(failed[0])
            shards.extend(zip(out["shard"].tolist(), out["rows"].tolist(), strict=True))
            bar.update(int(out["rows"].sum()))
    except ray.exceptions.RayError as exc:  # a worker died, the cluster went away, an unexpected bug
        raise UnavailableError(f"the Ray encode failed: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    return shards, time.perf_counter() - t0


def _assemble(
    shards: list[tuple[str, Any]], directory: Path, n: int, d: int, seconds: float
) -> EncodedPosteriors:
    """Copy the shards into ``(N, d)`` float32 memmaps, each row exactly once, and remove them."""
    mu = np.lib.format.open_memmap(directory / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    logvar = np.lib.format.open_memmap(directory / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    written = np.zeros(n, dtype=bool)  # (N,) rows copied so far
    for path, rows in shards:
        with np.load(path, allow_pickle=False) as z:
            start = int(z["start"][0])
            m, lv = z["mu"], z["logvar"]
        if m.shape != (rows, d) or lv.shape != m.shape or written[start : start + rows].any():
            raise CorruptIndexError(f"{path}: shard of {m.shape} at row {start} does not fit ({n}, {d})")
        mu[start : start + rows] = m
        logvar[start : start + rows] = lv
        written[start : start + rows] = True
        os.remove(path)
    if not written.all():
        raise CorruptIndexError(f"{directory}: rows from {int(np.argmin(written))} on have no Ray shard")
    mu.flush()
    logvar.flush()
    del mu, logvar
    return _encoded(directory, seconds)

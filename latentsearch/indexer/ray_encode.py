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
   (``start`` (1,) int64, ``mu`` and ``logvar`` (rows, d) float32, and the rows' payloads from the
   same items: ``hashes`` (rows, 16) uint8 (:func:`indexer.incremental.item_hashes`), ``ids``,
   ``labels``, ``thumbnails`` and the metadata ``records`` / ``lengths``
   (:func:`indexer.catalogue.item_payloads`)) under a temporary name, renamed when complete. It
   returns only the shard's path and row count.
3. The driver streams those small rows (the progress bar counts items), then merges the shards in row
   order, each row exactly once, into the ``(N, d)`` float32 memmaps and the catalogue's payload
   files (``payloads/``, a :class:`indexer.catalogue.PayloadWriter`), and removes them. The result's
   ``payloads`` (:class:`indexer.catalogue.StagedPayloads`) carry the hashes, ids and labels; the job
   builds, writes the catalogue and publishes from them exactly as after a local encode, reading no
   item itself.

:func:`ray_payloads` is the same pass without a model (hashes and payloads only): an incremental job
runs it first, because the hashes decide which items the encode pass gets.

Parquet data (:class:`latentsearch.data.readers.ParquetDataset`) takes another route, Ray Data's own
reader: ``ray.data.read_parquet`` streams the item column (and each row's file, for errors) in
blocks, order preserved, to a pool of :class:`_ParquetEncoder` actors that decode the images or
arrays (:func:`latentsearch.data.parquet.decode_items`), encode them and return the posteriors with
the rows' content hashes and thumbnails; the driver writes each returned batch into the memmaps and
payload files at the next rows (the metadata records, file and row, from the files' row counts) and
checks that exactly N rows came back. The pool
starts one actor short of ``ray_actors`` (Ray Data lists the files in a task that needs a CPU).

The shards live in the version's staging area, so ``--out`` must be on storage every node sees. A
killed driver or worker leaves only the staging area, which the next job removes
(:meth:`indexer.root.IndexRoot.clean_stale`); the current version is untouched until the publish.
"""

from __future__ import annotations

import dataclasses
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
from latentsearch.indexer.catalogue import (
    ItemPayloads,
    PayloadPlan,
    PayloadWriter,
    StagedPayloads,
    item_payloads,
    payload_plan,
)
from latentsearch.indexer.config import IndexJobConfig
from latentsearch.indexer.encode import (
    LOGVAR_FILE,
    MU_FILE,
    EncodedPosteriors,
    check_encodable,
    encode_posteriors,
)
from latentsearch.indexer.incremental import HASH_BYTES, item_hashes
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.loader import InputRule, LoadedModel, load_model
from latentsearch.progress import Progress

__all__ = ["PAYLOAD_DIR", "SHARD_DIR", "ray_encode", "ray_payloads", "ray_session"]

log = logging.getLogger(__name__)

# Sub-folder of the encode directory holding the shards while the actors run.
SHARD_DIR = "shards"
# Sub-folder of the encode directory where the driver merges the actors' catalogue payload files.
PAYLOAD_DIR = "payloads"
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
        model_hash: str | None,
        shape: tuple[int, ...],
        dtype: str,
        shard_dir: str,
        plan: PayloadPlan,
    ) -> None:
        self.config = config
        self.shard_dir = Path(shard_dir)
        self.plan = plan
        self.model: LoadedModel | None = None  # None: the payload pass (no model, no posteriors)
        self.error: LatentSearchError | None = None
        try:
            self.dataset = load_data(config.data, **config.data_options)
            if self.dataset.shape != shape or self.dataset.dtype.str != dtype:
                raise FailedPreconditionError(
                    f"{config.data}: a Ray worker reads {self.dataset.shape} {self.dataset.dtype}, the "
                    f"driver {shape} {dtype}; the data must be the same on every node"
                )
            if model_hash is not None:
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
        """Encode rows ``[start, start + batch_size)`` into a shard (with their payloads); its path."""
        stop = min(start + self.config.batch_size, len(self.dataset))
        items = self.dataset.read(start, stop)
        arrays = _chunk_payloads(self.dataset, start, stop, self.plan, items)
        if self.model is not None:
            mu, logvar = encode_posteriors(self.model, items, bf16=self.config.bf16)
            _check_encoded(mu, logvar, stop - start, self.model.latent_dim)
            arrays.update(mu=mu, logvar=logvar)
        path = self.shard_dir / f"{start:012d}-{stop - start}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            arrays["start"] = np.array([start], np.int64)
            np.savez(f, allow_pickle=False, **arrays)
        os.replace(tmp, path)  # a shard is either whole or absent
        return str(path)


def _chunk_payloads(
    dataset: Dataset, start: int, stop: int, plan: PayloadPlan, items: np.ndarray
) -> dict[str, np.ndarray]:
    """A shard's per-row payloads of rows ``[start, stop)`` (``items``: those rows): ``hashes``
    ``(k, 16)`` uint8, ``thumbnails`` ``(k, h, w, C)`` uint8 (when planned), ``records`` ``(bytes,)``
    uint8 and ``lengths`` ``(k,)`` int64 (the metadata lines), ``ids`` ``(k,)`` str, ``labels``
    ``(k,)`` int64 (when the data has labels)."""
    payloads = item_payloads(dataset, start, stop, plan, items)
    arrays = {
        "hashes": item_hashes(items, dataset.item_shape, dataset.dtype),
        "records": np.frombuffer(payloads.records, dtype=np.uint8),
        "lengths": payloads.lengths,
        "ids": dataset.batch_ids(start, stop),
    }
    if payloads.thumbnails is not None:
        arrays["thumbnails"] = payloads.thumbnails
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels[start:stop]
    return arrays


def _check_encoded(mu: np.ndarray, logvar: np.ndarray, k: int, d: int) -> None:
    """The encoder returned ``(k, d)`` mu and logvar (else InvalidArgumentError naming the model)."""
    if mu.shape != (k, d) or logvar.shape != mu.shape:
        raise InvalidArgumentError(
            f"encoder returned mu {mu.shape} / logvar {logvar.shape} for {k} items; expected ({k}, {d})",
            field="model",
        )


class _ParquetEncoder:
    """One Ray actor of the Parquet path: loads the model once, then decodes and encodes the blocks
    ``ray.data.read_parquet`` streams to it (errors returned as data, as in :class:`_ShardEncoder`)."""

    def __init__(
        self,
        *,
        config: IndexJobConfig,
        input_rule: InputRule,
        model_hash: str | None,
        column: ItemColumn,
        item_shape: tuple[int, ...],
        dtype: str,
        plan: PayloadPlan,
    ) -> None:
        self.config = config
        self.column = column
        self.item_shape, self.dtype = item_shape, np.dtype(dtype)
        self.plan = dataclasses.replace(plan, metadata=False)  # records: the driver's (no item read)
        self.model: LoadedModel | None = None  # None: the payload pass (no model, no posteriors)
        self.error: LatentSearchError | None = None
        try:
            if model_hash is not None:
                self.model = _actor_model(config, input_rule, model_hash)
        except LatentSearchError as exc:
            self.error = exc

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """``batch``: a pyarrow Table of ``k`` rows (the item column and Ray's ``path`` column) ->
        ``{"hashes": (k, 16) uint8, "thumbnails": (k, h, w, C) uint8 (when planned), "mu", "logvar":
        (k, d) float32 (unless the payload pass), "error": (k,) str}`` in the block's row order (on an
        error, one row whose ``error`` is set)."""
        d = 0 if self.model is None else self.model.latent_dim
        try:
            if self.error is not None:
                raise self.error
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
            out = {"hashes": item_hashes(items, self.item_shape, self.dtype)}
            thumbnails = item_payloads(None, 0, len(items), self.plan, items).thumbnails
            if thumbnails is not None:
                out["thumbnails"] = thumbnails
            if self.model is not None:
                mu, logvar = encode_posteriors(self.model, items, bf16=self.config.bf16)
                _check_encoded(mu, logvar, len(items), d)
                out.update(mu=mu, logvar=logvar)
        except LatentSearchError as exc:
            return self._failed(exc, d)
        out["error"] = np.array([""] * len(items))
        return out

    def _failed(self, exc: LatentSearchError, d: int) -> dict[str, np.ndarray]:
        """One row whose ``error`` is set, with every column of a good batch (one Ray schema)."""
        out = {"hashes": np.zeros((1, HASH_BYTES), np.uint8), "error": np.array([_error_text(exc)])}
        if self.plan.thumbnail_shape is not None:
            out["thumbnails"] = np.zeros((1, *self.plan.thumbnail_shape), np.uint8)
        if self.model is not None:
            out.update(mu=np.zeros((1, d), np.float32), logvar=np.zeros((1, d), np.float32))
        return out


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
    """Encode ``dataset`` on Ray into ``directory/mu.npy`` and ``directory/logvar.npy`` (module docstring),
    with every item's payloads (content hashes, ids, labels, catalogue files in
    ``directory/payloads/``) computed by the actors: the result's ``payloads``.

    ``model`` is the driver's copy: its hash, latent size and input rule are what every actor must
    load. Joins the cluster at ``config.ray_address`` (None: RAY_ADDRESS, else a new local instance,
    shut down at the end) unless this process is already connected.

    Raises:
        The LatentSearchError an actor raised (bad data, a model that differs on a node, ...);
        UnavailableError when Ray itself fails (a worker died, the cluster went away);
        CorruptIndexError when a shard is missing or overlaps another.
    """
    check_encodable(model, dataset)
    staged, seconds = _run(model, dataset, Path(directory), config)
    return _encoded(Path(directory), seconds, staged)


def ray_payloads(dataset: Dataset, directory: Path, config: IndexJobConfig) -> StagedPayloads:
    """The payload pass (no model): every item's content hashes, ids, labels and catalogue files
    (in ``directory/payloads/``) computed by the actors, as :func:`ray_encode` computes them. An
    incremental ``--ray`` job runs it first: the hashes decide which items the encode pass gets.

    Raises:
        As :func:`ray_encode`.
    """
    return _run(None, dataset, Path(directory), config)[0]


def _run(
    model: LoadedModel | None, dataset: Dataset, directory: Path, config: IndexJobConfig
) -> tuple[StagedPayloads, float]:
    """Run the actors over ``dataset`` (``model`` None: the payload pass); the merged payloads and the
    seconds the pool ran."""
    if config.data is None:
        raise InvalidArgumentError("--ray encodes a dataset: give --data", field="data")
    n = len(dataset)
    plan = payload_plan(dataset, thumbnails=config.thumbnails)
    shard_dir = directory / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ray_session(config.ray_address):
        log.info("Ray: %s; %d actors (%.3g CPU, %.3g GPU each)", ray.cluster_resources(), config.ray_actors,
                 config.ray_cpus_per_actor, config.ray_gpus_per_actor)
        if isinstance(dataset, ParquetDataset):
            staged, seconds = _run_parquet(model, dataset, config, directory, plan)
        else:
            shards, seconds = _run_actors(model, dataset, config, shard_dir, plan)
    if not isinstance(dataset, ParquetDataset):
        staged = _assemble(shards, directory, n, None if model is None else model.latent_dim, plan)
    log.info("Ray %s %d items in %.2f s (%.0f items/s; %.2f s with Ray start-up)",
             "hashed" if model is None else "encoded", n, seconds, n / max(seconds, 1e-9),
             time.perf_counter() - t0)
    return staged, seconds


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
    model: LoadedModel | None, dataset: Dataset, config: IndexJobConfig, shard_dir: Path, plan: PayloadPlan
) -> tuple[list[tuple[str, int]], float]:
    """Run the actor pool; the shards written (path, rows) and the seconds the pool ran."""
    n = len(dataset)
    starts = np.arange(0, n, config.batch_size, dtype=np.int64)  # (chunks,) first row of each chunk
    # At least two blocks per actor (so each has work), else blocks of _CHUNKS_PER_BLOCK chunks; never
    # more actors than blocks (an idle actor would only hold its CPU or GPU).
    blocks = min(len(starts), max(2 * config.ray_actors, -(-len(starts) // _CHUNKS_PER_BLOCK)))
    actors = min(config.ray_actors, blocks)
    with ray.data.DataContext.current(_job_context()):
        return _stream_shards(model, dataset, config, shard_dir, plan, np.array_split(starts, blocks), actors)


def _run_parquet(
    model: LoadedModel | None,
    dataset: ParquetDataset,
    config: IndexJobConfig,
    directory: Path,
    plan: PayloadPlan,
) -> tuple[StagedPayloads, float]:
    """The Parquet path: ``ray.data.read_parquet`` streams the item column in blocks to the actor
    pool (order preserved); the driver writes each returned batch (posteriors, content hashes,
    thumbnails) at the next rows, with the rows' metadata records (:meth:`ParquetDataset.item_metadata`:
    from the files' row counts, no item read) and checks that exactly N rows came back. Ids and
    labels are the columns the reader read when it opened the files."""
    n = len(dataset)
    mu = logvar = None
    if model is not None:
        d = model.latent_dim
        mu = np.lib.format.open_memmap(directory / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
        logvar = np.lib.format.open_memmap(directory / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    hashes = np.empty((n, HASH_BYTES), dtype=np.uint8)  # (N, 16)
    records = dataclasses.replace(plan, thumbnail_shape=None, source_shape=None)  # the driver's part
    context = _job_context()
    context.execution_options.preserve_order = True  # rows come back in the files' order
    bar = _bar(n, model, config)
    row = 0
    t0 = time.perf_counter()
    try:
        with ray.data.DataContext.current(context), PayloadWriter(directory / PAYLOAD_DIR, n, plan) as writer:
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
                    "input_rule": None if model is None else model.input_rule,
                    "model_hash": None if model is None else model.model_hash,
                    "column": dataset.item_column,
                    "item_shape": dataset.item_shape,
                    "dtype": dataset.dtype.str,
                    "plan": plan,
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
                k = len(out["hashes"])
                if row + k > n:
                    raise CorruptIndexError(f"{dataset.path}: Ray read more than the {n} rows of the files")
                if mu is not None and logvar is not None:
                    mu[row : row + k] = out["mu"]
                    logvar[row : row + k] = out["logvar"]
                hashes[row : row + k] = out["hashes"]
                meta = item_payloads(dataset, row, row + k, records)
                writer.append(ItemPayloads(out.get("thumbnails"), meta.records, meta.lengths))
                row += k
                bar.update(k)
            if row != n:
                raise CorruptIndexError(f"{dataset.path}: Ray read {row} rows, the files hold {n}")
    except ray.exceptions.RayError as exc:
        raise UnavailableError(f"the Ray encode failed: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    if mu is not None and logvar is not None:
        mu.flush()
        logvar.flush()
    del mu, logvar
    staged = StagedPayloads(directory / PAYLOAD_DIR, plan, hashes, dataset.labels, dataset.ids)
    return staged, time.perf_counter() - t0


def _bar(n: int, model: LoadedModel | None, config: IndexJobConfig) -> Progress:
    """The job's progress bar over the ``n`` items of an encode (or payload) pass on Ray."""
    desc = "hash (ray)" if model is None else "encode (ray)"
    return Progress(n, desc=desc, unit="item", enabled=config.progress, logger=log, unit_scale=True)


def _encoded(directory: Path, seconds: float, staged: StagedPayloads) -> EncodedPosteriors:
    """The memmaps written in ``directory``, opened read-only, and the actors' payloads."""
    return EncodedPosteriors(
        directory=directory,
        mu=np.load(directory / MU_FILE, mmap_mode="r"),
        logvar=np.load(directory / LOGVAR_FILE, mmap_mode="r"),
        seconds=seconds,
        payloads=staged,
    )


def _stream_shards(
    model: LoadedModel | None,
    dataset: Dataset,
    config: IndexJobConfig,
    shard_dir: Path,
    plan: PayloadPlan,
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
            "input_rule": None if model is None else model.input_rule,
            "model_hash": None if model is None else model.model_hash,
            "shape": dataset.shape,
            "dtype": dataset.dtype.str,
            "shard_dir": str(shard_dir),
            "plan": plan,
        },
        batch_size=1,  # one chunk (one encoder forward pass, one shard) per call
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool: each actor loads the model once
        num_cpus=config.ray_cpus_per_actor,
        num_gpus=config.ray_gpus_per_actor or None,
    )
    shards: list[tuple[str, int]] = []
    bar = _bar(n, model, config)
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
    shards: list[tuple[str, Any]], directory: Path, n: int, d: int | None, plan: PayloadPlan
) -> StagedPayloads:
    """Merge the shards in row order, each row exactly once, and remove them: the posteriors into
    ``(N, d)`` float32 memmaps (``d`` None: the payload pass, none), the payloads into
    ``directory/payloads/`` and the returned hashes, labels and ids."""
    mu = logvar = None
    if d is not None:
        mu = np.lib.format.open_memmap(directory / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
        logvar = np.lib.format.open_memmap(directory / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    hashes = np.empty((n, HASH_BYTES), dtype=np.uint8)  # (N, 16)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    row = 0  # rows merged so far: the next shard must start there
    with PayloadWriter(directory / PAYLOAD_DIR, n, plan) as writer:
        for path, rows in sorted(shards, key=lambda shard: Path(shard[0]).name):  # <start:012d>-<rows>
            with np.load(path, allow_pickle=False) as z:
                shard = {key: z[key] for key in z.files}
            start = int(shard["start"][0])
            if start != row or row + rows > n or shard["hashes"].shape != (rows, HASH_BYTES):
                raise CorruptIndexError(
                    f"{path}: shard of {rows} rows at row {start} does not fit: the next row is {row} of {n}"
                )
            if mu is not None and logvar is not None:
                m, lv = shard["mu"], shard["logvar"]
                if m.shape != (rows, d) or lv.shape != m.shape:
                    raise CorruptIndexError(f"{path}: posteriors of {m.shape}; expected ({rows}, {d})")
                mu[start : start + rows] = m
                logvar[start : start + rows] = lv
            hashes[start : start + rows] = shard["hashes"]
            thumbs = shard.get("thumbnails")
            writer.append(ItemPayloads(thumbs, shard["records"].tobytes(), shard["lengths"]))
            ids.append(shard["ids"])
            if "labels" in shard:
                labels.append(shard["labels"])
            row += rows
            os.remove(path)
        if row != n:
            raise CorruptIndexError(f"{directory}: rows from {row} on have no Ray shard")
    if labels and len(labels) != len(ids):
        raise CorruptIndexError(f"{directory}: some Ray shards have labels, others none")
    if mu is not None and logvar is not None:
        mu.flush()
        logvar.flush()
    del mu, logvar
    return StagedPayloads(
        directory / PAYLOAD_DIR,
        plan,
        hashes,
        np.concatenate(labels) if labels else None,
        np.concatenate(ids) if ids else np.empty(0, dtype=str),
    )

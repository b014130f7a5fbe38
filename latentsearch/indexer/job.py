"""Orchestration of an indexing job: source -> posteriors -> engine -> published version.

Two sources: a model + dataset (encoded in batches into memory-mapped float32 files, see
:mod:`indexer.encode`; the model is stored with the version, :mod:`indexer.models`; the posteriors
of items the current version already holds under the same model are reused, see
:mod:`indexer.incremental`) or a precomputed posteriors npz (:mod:`indexer.posteriors`). Both end
in the same publish step (:meth:`indexer.root.IndexRoot.publish_staged`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.data.builtin import load_data
from latentsearch.data.readers import Dataset
from latentsearch.engine.approx import AssignRows, default_nlist
from latentsearch.engine.engine import SearchEngine
from latentsearch.engine.storage import file_digest, saved_bytes
from latentsearch.errors import FailedPreconditionError
from latentsearch.indexer.catalogue import (
    StagedPayloads,
    catalogue_bytes,
    check_label_names,
    write_catalogue,
)
from latentsearch.indexer.config import IndexJobConfig
from latentsearch.indexer.encode import EncodedPosteriors, check_encodable, encode_dataset
from latentsearch.indexer.incremental import (
    HASH_BYTES,
    Previous,
    Reuse,
    ReusePlan,
    content_fingerprint,
    content_hashes,
    content_metadata,
    encode_with_reuse,
    full_plan,
    open_previous,
    plan_reuse,
    write_hashes,
)
from latentsearch.indexer.models import ModelRef, stage_entry
from latentsearch.indexer.posteriors import read_label_names, read_posteriors_npz
from latentsearch.indexer.root import IndexRoot, Staging, engine_bytes
from latentsearch.model.loader import LoadedModel, default_input_rule, load_model
from latentsearch.progress import Progress

__all__ = ["AssignStep", "EncodeStep", "JobResult", "PayloadStep", "local_encode", "run_index_job"]

log = logging.getLogger(__name__)

# The encode step of a model job: (loaded model, dataset, directory, config) -> the dataset's
# posteriors as (N, d) float32 memmaps mu.npy / logvar.npy in that directory (inside the version's
# staging area). :func:`local_encode` runs in this process; indexer.ray_encode.ray_encode on Ray Data.
EncodeStep = Callable[[LoadedModel, Dataset, Path, IndexJobConfig], EncodedPosteriors]
# The engine build's every-item k-means assignment elsewhere (a model job): (the encode step's
# directory, holding mu.npy / logvar.npy, config) -> the build's assign_rows hook
# (engine.approx.AssignRows); indexer.ray_build.ray_assigner runs it as Ray tasks. None: in process.
AssignStep = Callable[[Path, IndexJobConfig], AssignRows]
# The payload pass of an incremental ``--ray`` job, run before its encode step when a version may be
# reused: (dataset, directory, config) -> every item's content hashes, ids, labels and catalogue
# files, computed where the items are read (indexer.ray_encode.ray_payloads). A Ray encode step
# returns the same payloads with the posteriors (EncodedPosteriors.payloads), so the driver of a
# ``--ray`` job reads no item itself.
PayloadStep = Callable[[Dataset, Path, IndexJobConfig], StagedPayloads]


def local_encode(
    model: LoadedModel, dataset: Dataset, directory: Path, config: IndexJobConfig
) -> EncodedPosteriors:
    """The in-process encode step (:func:`indexer.encode.encode_dataset` with the job's options)."""
    return encode_dataset(
        model,
        dataset,
        directory,
        batch_size=config.batch_size,
        bf16=config.bf16,
        num_threads=config.num_threads,
        progress=config.progress,
    )


@dataclass(frozen=True)
class JobResult:
    """What a job published.

    ``timings``: seconds per stage (read, load, hash, reuse, encode, fingerprint, build, save,
    publish). ``reuse``: what a model job reused from the previous version (``None`` for posteriors).
    """

    version: str
    items: int
    latent_dim: int
    seconds: float
    bytes_on_disk: int
    timings: dict[str, float] = field(default_factory=dict)
    reuse: Reuse | None = None

    @property
    def items_per_second(self) -> float:
        return self.items / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """The one-line summary printed at the end of a job."""
        return (
            f"indexed {self.items} items (d={self.latent_dim}) in {self.seconds:.1f} s "
            f"({self.items_per_second:,.0f} items/s); version {self.version}, "
            f"{self.bytes_on_disk / 2**20:.1f} MiB on disk"
        )


class _Stages:
    """Progress over named stages (a bar on a terminal, else a periodic log line), and their timings."""

    def __init__(self, names: list[str], progress: bool) -> None:
        self.timings: dict[str, float] = {}
        self._bar = Progress(len(names), desc="index", unit="stage", enabled=progress, logger=log)
        self._name: str | None = None
        self._t0 = 0.0

    def start(self, name: str) -> None:
        self._finish()
        self._name, self._t0 = name, time.perf_counter()
        self._bar.set_postfix_str(name)
        log.debug("stage %s", name)

    def _finish(self) -> None:
        if self._name is not None:
            self.timings[self._name] = round(time.perf_counter() - self._t0, 3)
            self._bar.update(1)
            self._name = None

    def close(self) -> None:
        self._finish()
        self._bar.close()


def run_index_job(
    config: IndexJobConfig,
    *,
    encode: EncodeStep | None = None,
    assign: AssignStep | None = None,
    payloads: PayloadStep | None = None,
) -> JobResult:
    """Run one indexing job end to end and publish a new current version under ``config.out``.

    Nothing is published when any step fails (the previous current version stays current).
    ``encode``: the encode step of a model job (default :func:`local_encode`; ``config.ray`` needs
    ``indexer.ray_encode.ray_encode``, which the CLI passes for ``--ray``). ``assign``: where a model
    job's index build assigns every item to its k-means centroid (default: in this process; the CLI
    passes ``indexer.ray_build.ray_assigner`` for ``--ray``); the engine is the same either way.
    ``payloads``: under ``config.ray``, the payload pass an incremental job runs first (the CLI passes
    ``indexer.ray_encode.ray_payloads``; None: this process hashes the items of an incremental job).
    Under ``config.ray`` the content hashes, ids, labels and catalogue payloads come from the encode
    step's (or the payload pass's) ``payloads`` when it returns them: the same files, bit for bit.

    Raises:
        LatentSearchError subclasses: bad input (naming the file / npz key and row), missing model or
        data, corrupt model checkpoints; ResourceExhaustedError "no space left on ROOT (needed about
        X MiB, ...)" when the free space is short before encoding or saving (checked against an
        estimate) or the disk fills up on the way (nothing is left behind).
    """
    if config.ray and encode is None:
        raise FailedPreconditionError(
            "config.ray is set: pass encode=latentsearch.indexer.ray_encode.ray_encode to run_index_job"
        )
    t_start = time.perf_counter()
    root = IndexRoot(config.out, create=True)
    source = _catalogue_source(config)  # label names checked here, before any encoding
    reuse: Reuse | None = None
    with root.staging() as staging:
        if config.source_kind == "posteriors":
            stages = _Stages(["read", "build", "save", "publish"], config.progress)
            try:
                engine, metadata = _from_posteriors(config, stages)
                version = _save_and_publish(
                    root, staging, engine, metadata, config, stages, None, catalogue=source
                )
            finally:
                stages.close()
        else:
            assert source.dataset is not None
            engine, metadata, stages, model_ref, staged = _from_model(
                config, root, staging, encode or local_encode, assign, payloads, source.dataset
            )
            reuse = Reuse(**metadata["reuse"])
            try:
                version = _save_and_publish(
                    root, staging, engine, metadata, config, stages, model_ref,
                    catalogue=source, staged=staged,
                )
            finally:
                stages.close()
    seconds = time.perf_counter() - t_start
    if config.verify:
        root.verify(version)
    result = JobResult(
        version=version,
        items=len(engine),
        latent_dim=engine.dim,
        seconds=seconds,
        bytes_on_disk=root.disk_bytes(version),
        timings=dict(stages.timings),
        reuse=reuse,
    )
    log.info("%s", result.summary())
    return result


def _save_and_publish(
    root: IndexRoot,
    staging: Staging,
    engine: SearchEngine,
    metadata: dict[str, Any],
    config: IndexJobConfig,
    stages: _Stages,
    model_ref: ModelRef | None,
    *,
    catalogue: _CatalogueSource,
    staged: StagedPayloads | None = None,
) -> str:
    stages.start("save")
    extra = catalogue_bytes(len(engine), catalogue.dataset, thumbnails=config.thumbnails)
    needed = engine_bytes(engine) + extra
    root.require_space(needed)
    with root.disk_errors(needed):
        engine.save(staging.engine_dir, extra={k: v for k, v in metadata.items() if k != "timings"})
        diagnostics = write_catalogue(
            staging.catalogue_dir,
            engine.bank,
            label_names=catalogue.names(),
            dataset=catalogue.dataset,
            thumbnails=config.thumbnails,
            staged=staged,
        )
    metadata["active_dims"] = diagnostics.dim - len(diagnostics.collapsed)
    stages.start("publish")
    metadata["timings"] = dict(stages.timings)
    return root.publish_staged(staging, metadata, keep=config.keep, model=model_ref)


@dataclass(frozen=True)
class _CatalogueSource:
    """Where a version's catalogue comes from: the label-name table (``None``: none) and the
    dataset the posteriors are encoded from, row for row (``None``: posteriors read from a file)."""

    label_names: list[str] | None
    dataset: Dataset | None
    # the posteriors npz whose ``label_names`` key names the labels when label_names is None
    posteriors: Path | None = None

    def names(self) -> list[str] | None:
        if self.label_names is None and self.posteriors is not None:
            return read_label_names(self.posteriors)  # read after the npz itself was read and checked
        return self.label_names


def _catalogue_source(config: IndexJobConfig) -> _CatalogueSource:
    """The job's label names (``config.label_names``, else the data's own) and dataset. Names for a
    dataset are checked against its labels here, before encoding; a posteriors file's at write time."""
    names = None if config.label_names is None else list(config.label_names)
    if config.source_kind == "posteriors":
        assert config.posteriors is not None
        return _CatalogueSource(names, None, Path(config.posteriors))
    assert config.data is not None
    # a path (with its reader options), or a built-in name (with its class names)
    dataset = load_data(config.data, **config.data_options)
    if names is None:
        names = dataset.label_names
    check_label_names(names, dataset.labels)
    return _CatalogueSource(names, dataset)


def _reuse_plan(
    config: IndexJobConfig,
    root: IndexRoot,
    model: LoadedModel,
    dataset: Dataset,
    hashes: np.ndarray,
    bf16: bool,
) -> ReusePlan:
    """Which of ``dataset``'s rows (content ``hashes``, ``(N, 16)`` uint8) reuse the current
    version's posteriors (see :mod:`indexer.incremental`)."""
    if not config.reuse:
        return full_plan(len(dataset), "reuse is off (--full)")
    return plan_reuse(hashes, *_open_previous(root, model, dataset, bf16))


def _open_previous(
    root: IndexRoot, model: LoadedModel, dataset: Dataset, bf16: bool
) -> tuple[Previous | None, str | None]:
    """The current version open for reuse by this job, or ``(None, why not)`` (:func:`open_previous`)."""
    return open_previous(
        root,
        model_hash=model.model_hash,
        input_rule=model.input_rule,
        bf16=bf16,
        item_shape=dataset.item_shape,
        dtype=dataset.dtype,
    )


def _ray_plan(
    config: IndexJobConfig,
    root: IndexRoot,
    model: LoadedModel,
    dataset: Dataset,
    bf16: bool,
    payloads: PayloadStep | None,
    staging: Staging,
) -> tuple[StagedPayloads | None, np.ndarray | None, ReusePlan]:
    """The reuse plan of a ``--ray`` job, with the items' payloads and content hashes when they had
    to come first. With no version to reuse every item is encoded and the encode pass computes them
    (None, None here); with one, the hashes decide what is encoded, so the payload pass runs first
    (``payloads``; None: this process hashes the items)."""
    n = len(dataset)
    if not config.reuse:
        return None, None, full_plan(n, "reuse is off (--full)")
    previous, why = _open_previous(root, model, dataset, bf16)
    if previous is None:
        return None, None, full_plan(n, why or "nothing to reuse")
    if payloads is None:
        hashes = content_hashes(dataset, progress=config.progress)
        return None, hashes, plan_reuse(hashes, previous, why)
    staged = payloads(dataset, staging.path / "payloads", config)
    return staged, staged.hashes, plan_reuse(staged.hashes, previous, why)


def _from_posteriors(config: IndexJobConfig, stages: _Stages) -> tuple[SearchEngine, dict[str, Any]]:
    assert config.posteriors is not None
    stages.start("read")  # reading validates: the bank checks every value
    path = Path(config.posteriors)
    bank = read_posteriors_npz(path)
    fingerprint = file_digest(path)
    stages.start("build")
    engine = SearchEngine.from_bank(bank, config.engine)
    metadata = {
        "source": "posteriors",
        "posteriors_path": str(path.resolve()),
        "model_hash": None,
        "dataset_fingerprint": f"sha256-file:{fingerprint}",
        "job": config.to_dict(),
    }
    return engine, metadata


def _from_model(
    config: IndexJobConfig,
    root: IndexRoot,
    staging: Staging,
    encode: EncodeStep,
    assign: AssignStep | None,
    payloads: PayloadStep | None,
    dataset: Dataset,
) -> tuple[SearchEngine, dict[str, Any], _Stages, ModelRef, StagedPayloads | None]:
    """Encode ``dataset`` (the job's data, opened once by :func:`_catalogue_source`) with the model,
    reusing the current version's posteriors of unchanged items (:mod:`indexer.incremental`); the
    engine, the version's metadata, the stages so far, the model's store entry (staged in
    ``staging.model_dir``, stored by the publish) and, under ``--ray``, the items' payloads as the
    actors computed them (None: the catalogue reads them from the dataset)."""
    assert config.model is not None
    t0 = time.perf_counter()
    # The input rule (model.loader) follows the data: what Encode takes is what the indexer fed.
    rule = default_input_rule(dataset.dtype)
    model = load_model(config.model, input_shape=config.input_shape, device=config.device, input_rule=rule)
    log.info("encoding %s with %s", dataset, model)
    t_load = time.perf_counter() - t0
    check_encodable(model, dataset)  # before the data is read to hash it
    # The encoder writes float32 memory maps (a full disk there is a SIGBUS, not an error), then
    # the version is saved beside them: check the space for both first.
    n, d = len(dataset), model.latent_dim
    nlist = config.engine.approx_nlist or default_nlist(n)
    needed = 2 * n * d * 4 + saved_bytes(n, d, labels=dataset.labels is not None, nlist=nlist)
    needed += n * HASH_BYTES
    root.require_space(needed)
    bf16 = bool(config.bf16 and model.device.type == "cuda")
    t0 = time.perf_counter()
    staged: StagedPayloads | None = None
    hashes: np.ndarray | None = None
    if config.ray:  # hashes from the actors: a payload pass first only when a version may be reused
        staged, hashes, plan = _ray_plan(config, root, model, dataset, bf16, payloads, staging)
        t1 = time.perf_counter()
    else:
        hashes = content_hashes(dataset, progress=config.progress)
        t1 = time.perf_counter()
        plan = _reuse_plan(config, root, model, dataset, hashes, bf16)  # checks and opens the current version
    t_hash = t1 - t0
    todo = len(plan.encode_rows)
    if plan.previous is not None:
        log.info(
            "reuse: %d of %d posteriors from version %s; encoding %d new or changed items",
            n - todo, n, plan.previous.version, todo,
        )
        # the unmatched items' copy and their posteriors, besides the (N, d) memmaps
        needed += todo * (dataset.dtype.itemsize * int(np.prod(dataset.item_shape)) + 2 * d * 4)
        root.require_space(needed)
    else:
        log.info("reuse: none, encoding all %d items: %s", n, plan.reason)
    with root.disk_errors(needed):
        if hashes is not None:
            write_hashes(staging.content_dir, hashes)
        if plan.previous is None:
            encoded = encode(model, dataset, staging.path / "encode", config)
            staged = staged or encoded.payloads  # a Ray encode step's: hashes, ids, labels, catalogue
        else:

            def encode_items(items: Dataset, where: Path) -> EncodedPosteriors:
                assert items.path is not None  # the items' own file (a Ray actor opens config.data)
                return encode(model, items, where, config.for_items(items.path))

            encoded = encode_with_reuse(
                plan, dataset, staging.path / "encode", d, encode_items, batch_size=config.batch_size
            )
        if hashes is None:  # a --ray job without a version to reuse: hashed by the encode pass
            hashes = content_hashes(dataset, progress=config.progress) if staged is None else staged.hashes
            write_hashes(staging.content_dir, hashes)
    t_reuse = time.perf_counter() - t1 - encoded.seconds  # planning, copying, the hashes file
    reuse = plan.report()
    del plan  # closes the previous version's memory maps
    stages = _Stages(["fingerprint", "build", "save", "publish"], config.progress)
    stages.timings.update({"load": round(t_load, 3), "hash": round(t_hash, 3)})
    if reuse.previous_version is not None:
        stages.timings["reuse"] = round(t_reuse, 3)
    stages.timings["encode"] = round(encoded.seconds, 3)
    try:
        stages.start("fingerprint")
        # under --ray, from the actors' content hashes: this process reads no item
        fingerprint = (
            dataset.fingerprint()
            if staged is None
            else content_fingerprint(staged.hashes, staged.labels, dataset)
        )
        named = dataset.ids if staged is None else staged.ids
        labels = dataset.labels if staged is None else staged.labels
        # row numbers are the engine's default: no ids file
        ids = None if np.array_equal(named, np.arange(n).astype(str)) else named
        stages.start("build")
        engine = SearchEngine.build(
            encoded.mu,
            logvar=encoded.logvar,
            ids=ids,
            labels=labels,
            config=config.engine,
            assign_rows=None if assign is None else assign(encoded.directory, config),
        )
        with root.disk_errors(needed):
            model_ref = stage_entry(model, str(config.model), dataset.item_shape, staging.model_dir)
    except BaseException:
        stages.close()
        raise
    metadata = {
        "source": "model",
        "model": str(config.model),
        "model_hash": model.model_hash,
        "model_source": model.source,
        "input_rule": model.input_rule,
        "data_path": dataset.path,
        "dataset_fingerprint": fingerprint,
        "device": str(model.device),
        "bf16": bf16,
        "encode_items_per_s": round(reuse.encoded / max(encoded.seconds, 1e-9), 1) if reuse.encoded else None,
        "content_hashes": content_metadata(dataset),
        "reuse": reuse.to_dict(),
        "job": config.to_dict(),
    }
    return engine, metadata, stages, model_ref, staged

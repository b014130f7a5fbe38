"""The server's core, free of grpc: what is served, requests -> engine calls -> replies.

Requests are converted to the engine's arguments and checked by the engine itself (its rules for
points, k, labels and std live there, once); what is checked here belongs to the API alone (k = 0
meaning 10, the search-mode enum, batch sizes, Encode's layout, sigma > 0). Every method raises
only project errors (:mod:`latentsearch.errors`, each naming its request field); the servicer
translates them to status codes. A request captures one :class:`Snapshot` at its start and
is answered entirely by it, so a hot reload never mixes two versions in one answer: a snapshot
holds the version's index and its model (stored with the version, or the server's ``--model``
for a version published without one), so Encode and Decode switch with the index.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from latentsearch.bank import MAX_ID_LENGTH, PosteriorBank
from latentsearch.data.images import png_bytes
from latentsearch.diagnostics import LatentDiagnostics
from latentsearch.engine.config import SearchMode
from latentsearch.engine.engine import MAX_ABS_COORDINATE, SearchEngine, check_points
from latentsearch.engine.probability import DEFAULT_REL_TOL
from latentsearch.engine.results import BatchResult, SearchResult
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError, shorten
from latentsearch.indexer.catalogue import Catalogue, load_catalogue
from latentsearch.indexer.models import ModelRef
from latentsearch.indexer.root import IndexRoot
from latentsearch.model.loader import LoadedModel
from latentsearch.server.replies import check_batch_reply
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.wire import engine_mode, mode_enum

__all__ = [
    "DEFAULT_K",
    "MAX_ID_LENGTH",
    "MAX_NETWORK_INPUT",
    "EngineService",
    "NearestQuery",
    "QueryKey",
    "Snapshot",
    "check_model_hash",
    "is_plain",
    "load_snapshot",
    "measure_nearest_cost",
    "nearest_responses",
]

log = logging.getLogger(__name__)

DEFAULT_K = 10  # what a request's k = 0 (unset) means
# Largest |value| Encode takes in the units the encoder's first layer sees (LoadedModel.network_input):
# training data spans about [0, 1] there (pixels / 255) or a few units (standardised features), so
# +-1000 leaves room for any real input while float32 activations stay far from overflow.
MAX_NETWORK_INPUT = 1e3
# measure_nearest_cost: timed calls after one warm-up (their median), only one when it already
# took longer than _COST_SLOW_S (such a search is batched whatever its exact figure, and a large
# bank's load is not slowed by repeats).
_COST_CALLS = 5
_COST_SLOW_S = 0.002


@dataclass(frozen=True)
class Snapshot:
    """One loaded index version: what a request is answered by from start to end."""

    version: str
    engine: SearchEngine
    # Hash of the model the index was built with (version manifest), or "" when unknown.
    model_hash: str = ""
    # The model Encode/Decode use: the version's stored model, else the server's --model (None: none).
    model: LoadedModel | None = None
    # The model's store entry (indexer.models), "" when the model is not the version's stored one.
    model_entry: str = ""
    # The version's label names, thumbnails, metadata and latent diagnostics (None: the version
    # was published before catalogues existed); loaded and swapped with the engine.
    catalogue: Catalogue | None = None
    # Wall-clock seconds of one plain Nearest (is_plain) answered alone by this snapshot, reply
    # included, measured when it was loaded (measure_nearest_cost); inf: not measured. The servicer
    # answers plain calls on the event loop, without batching, when this is small enough.
    nearest_cost_s: float = math.inf


def load_snapshot(
    root: IndexRoot,
    *,
    version: str | None = None,
    verify: bool = False,
    num_threads: int | None = None,
    max_k: int | None = None,
    model: LoadedModel | None = None,
    models: dict[str, LoadedModel] | None = None,
) -> Snapshot:
    """Load ``version`` of the root (default: the current one; blocking: call from a thread).

    The snapshot's model is the version's stored model (:meth:`IndexRoot.load_model`; taken from
    ``models``, loaded models by store entry, when there and added to it when not), else ``model``
    (the server's ``--model``) for a version published without one (from posteriors, or before
    the model store).

    Raises:
        FailedPreconditionError: ``model`` is not the version's model (their hashes differ, both
            named) or does not have its latent dimension.

    ``verify``: check every file's sha256 against the version manifest first (a CorruptIndexError
    naming the file when one fails).

    ``num_threads``: FAISS/OpenMP threads each batched search may use (``None``: the engine's own
    setting). A server running several searches at once caps it so they do not oversubscribe the
    cores (OpenMP's spinning threads made batches of 8 over 3x slower per query in measurements).
    ``max_k``: the largest k served, when below the engine's own ``config.max_k`` (which the engine
    enforces on every search; ``None``: the engine's).
    """
    if version is None:
        version, engine = root.load_current(verify=verify)
    else:
        engine = root.load(version, verify=verify)
    if num_threads is not None:
        engine.config = dataclasses.replace(engine.config, num_threads=num_threads)
    if max_k is not None and max_k < engine.config.max_k:
        engine.config = dataclasses.replace(engine.config, max_k=max_k)
    manifest = root.manifest(version)
    model, entry = _version_model(root, manifest, engine.dim, model, models)
    snapshot = Snapshot(
        version=version,
        engine=engine,
        model_hash=str(manifest.get("model_hash") or ""),
        model=model,
        model_entry=entry,
        catalogue=load_catalogue(root.version_dir(version), manifest, engine.bank),
    )
    return dataclasses.replace(snapshot, nearest_cost_s=measure_nearest_cost(snapshot))


def is_plain(key: QueryKey, engine: SearchEngine) -> bool:
    """Whether calls of ``key`` are what :func:`measure_nearest_cost` measures: the engine's default
    mode, k <= DEFAULT_K, no label filter, no probabilities, no label names."""
    return (
        key.k <= DEFAULT_K
        and key.labels is None
        and key.rel_tol is None
        and not key.label_names
        and (key.mode is None or key.mode == engine.config.mode)
    )


def measure_nearest_cost(snapshot: Snapshot) -> float:
    """Wall-clock seconds of one plain Nearest answered alone by ``snapshot`` (blocking): the median
    of a few :meth:`EngineService.search_group` calls at k = DEFAULT_K on items' own means, after a
    warm-up call (which compiles or pages in what the first search needs). What the engine's
    cheapest single-query path costs, as the server would run it (:data:`_COST_CALLS`); inf when
    there is nothing to measure."""
    bank = snapshot.engine.bank
    n = len(bank)
    if n == 0:
        return math.inf
    rows = np.linspace(0, n - 1, _COST_CALLS + 1).astype(np.int64)
    points = np.asarray(bank.mu[rows], dtype=np.float64).tolist()  # (calls + 1, d)
    key = QueryKey(snapshot.version, DEFAULT_K, None, None)
    times = []
    try:
        EngineService.search_group(snapshot, key, [points[0]])  # the warm-up
        for z in points[1:]:
            start = time.perf_counter()
            EngineService.search_group(snapshot, key, [z])
            times.append(time.perf_counter() - start)
            if times[0] > _COST_SLOW_S:
                break
    except InvalidArgumentError:  # e.g. an engine whose max_k is below DEFAULT_K: never inline
        return math.inf
    return float(np.median(times))


def _version_model(
    root: IndexRoot,
    manifest: dict[str, Any],
    dim: int,
    model: LoadedModel | None,
    models: dict[str, LoadedModel] | None,
) -> tuple[LoadedModel | None, str]:
    """``(model, store entry)`` serving the version of ``manifest`` (see :func:`load_snapshot`);
    the entry is "" when the model is not the version's stored one."""
    version = manifest.get("version")
    ref = ModelRef.from_manifest(manifest)
    if model is not None:
        check_model_hash(manifest, model)
    entry = ""
    if ref is not None:
        cache: dict[str, LoadedModel] = {} if models is None else models
        if ref.entry not in cache:
            stored = root.load_model(str(version))
            assert stored is not None
            cache[ref.entry] = stored
        model, entry = cache[ref.entry], ref.entry
    if model is not None and model.latent_dim != dim:
        raise FailedPreconditionError(
            f"model {model.model_hash} has latent_dim {model.latent_dim}, index version {version} has {dim}",
            field="model",
        )
    return model, entry


def check_model_hash(manifest: dict[str, Any], model: LoadedModel) -> None:
    """Refuse ``model`` (the server's ``--model``) for the version of ``manifest`` when the version
    was built with another model: FailedPreconditionError naming both hashes."""
    version, model_hash = manifest.get("version"), str(manifest.get("model_hash") or "")
    if model_hash and model.model_hash != model_hash:
        stored = bool(manifest.get("model"))
        hint = "serve without --model: the version stores its model" if stored else "give that model"
        raise FailedPreconditionError(
            f"--model {model.name} is model {model.model_hash}, but index version {version} was "
            f"built with model {model_hash}; its Encode/Decode answers would not match the index ({hint})",
            field="model",
        )


class QueryKey(NamedTuple):
    """What concurrent Nearest calls must share to be answered by one ``search_batch``."""

    version: str
    k: int
    mode: SearchMode | None
    labels: tuple[int, ...] | None
    # the normaliser's relative tolerance when the request asked with_probability; None: it did not
    # (so calls with and without probabilities never share a search)
    rel_tol: float | None = None
    # the request asked with_label_names (its replies carry each neighbour's label name)
    label_names: bool = False


class NearestQuery(NamedTuple):
    """A Nearest request the engine has checked, bound to the snapshot that will answer it."""

    snapshot: Snapshot
    key: QueryKey
    # (d,) coordinates the engine accepted (a list: one array per batch, not per call)
    z: list[float]


class EngineService:
    """Answers requests from the current snapshot (its index and its model).

    Args:
        max_batch_queries: most queries in one NearestBatch request.
        max_reply_bytes: the largest message the server sends; a NearestBatch whose reply could be
            larger is refused before any search (:func:`~latentsearch.server.replies.check_batch_reply`).

    The largest k is the serving engine's ``config.max_k`` (see :func:`load_snapshot`).
    """

    def __init__(
        self,
        *,
        max_batch_queries: int = 1024,
        max_reply_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_batch_queries = max_batch_queries
        self.max_reply_bytes = max_reply_bytes
        self._snapshot: Snapshot | None = None
        # (version CURRENT names, why another version serves or ""): what Info reports
        self._status: tuple[str, str] = ("", "")

    # -- what is served -----------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        snap = self._snapshot
        return None if snap is None else snap.version

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` (index and model together) from now on: one reference assignment,
        atomic for every reader. :func:`load_snapshot` has checked that its model fits its index."""
        self._snapshot = snapshot

    def set_status(self, current_version: str | None, fallback_reason: str = "") -> None:
        """What Info reports besides the served version: the version ``CURRENT`` names and, when
        that is not the one served, why (one assignment: atomic for every reader)."""
        self._status = (current_version or "", fallback_reason)

    def snapshot(self) -> Snapshot:
        """The snapshot a new request is answered by. Raises UnavailableError before the first load."""
        snap = self._snapshot
        if snap is None:
            raise UnavailableError("no index version is loaded yet", field="index")
        return snap

    # -- Nearest ------------------------------------------------------------------------------
    def parse_nearest(self, request: pb.NearestRequest, snapshot: Snapshot | None = None) -> NearestQuery:
        """One Nearest request, checked by ``snapshot``'s engine (default: the current snapshot).

        Each request is checked on its own (:meth:`SearchEngine.check_query`, plain Python on the
        hot path) before it joins a batch, so a bad one fails alone; the batch becomes one array in
        :meth:`search_group`.
        """
        snap = snapshot or self.snapshot()
        z = list(request.z)
        k = request.k or DEFAULT_K
        labels = snap.engine.check_query(z, k, request.labels or None)
        key = QueryKey(
            snap.version, k, engine_mode(request.mode), labels, _rel_tol(request), request.with_label_names
        )
        return NearestQuery(snap, key, z)

    @staticmethod
    def search_group(
        snapshot: Snapshot, key: QueryKey, zs: Sequence[Sequence[float]]
    ) -> list[pb.NearestResponse]:
        """Answer several queries sharing ``key`` with one search (blocking); one reply per query."""
        engine = snapshot.engine
        batch = engine.search_batch_arrays(
            np.array(zs, dtype=np.float64),
            key.k,
            mode=key.mode,
            labels=key.labels,
            with_probability=key.rel_tol is not None,
            rel_tol=DEFAULT_REL_TOL if key.rel_tol is None else key.rel_tol,  # checked by the engine
        )
        names = _label_names(snapshot) if key.label_names else None
        return nearest_responses(batch, engine.bank, snapshot.version, names)

    def nearest(self, request: pb.NearestRequest) -> pb.NearestResponse:
        """One Nearest call answered alone (blocking)."""
        q = self.parse_nearest(request)
        return self.search_group(q.snapshot, q.key, [q.z])[0]

    def nearest_batch(self, request: pb.NearestBatchRequest) -> pb.NearestBatchResponse:
        """Every query of the batch answered by one snapshot, in order (blocking)."""
        snap, parsed = self.parse_batch(request)
        return pb.NearestBatchResponse(results=self.search_parsed(snap, parsed), index_version=snap.version)

    def parse_batch(self, request: pb.NearestBatchRequest) -> tuple[Snapshot, list[NearestQuery]]:
        """A NearestBatch's queries, each checked, bound to the snapshot answering them all.

        Refuses a batch whose reply could exceed ``max_reply_bytes`` before any search
        (InvalidArgumentError, field ``queries``; see :mod:`latentsearch.server.replies`).
        """
        n = len(request.queries)
        if n == 0:
            raise InvalidArgumentError("queries is empty", field="queries")
        if n > self.max_batch_queries:
            raise InvalidArgumentError(
                f"queries holds {n} queries; at most {self.max_batch_queries} per call", field="queries"
            )
        snap = self.snapshot()
        parsed = []
        for i, req in enumerate(request.queries):
            try:
                parsed.append(self.parse_nearest(req, snap))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"queries[{i}]: {exc.message}", field=f"queries[{i}].{exc.field}"
                ) from exc
        names = _label_names(snap) if any(q.key.label_names for q in parsed) else None
        check_batch_reply(
            [q.key.k for q in parsed], snap.engine.bank, snap.version, self.max_reply_bytes, label_names=names
        )
        return snap, parsed

    def search_parsed(
        self, snap: Snapshot, parsed: Sequence[NearestQuery], first: int = 0
    ) -> list[pb.NearestResponse]:
        """Replies to ``parsed`` (queries ``first``, ``first + 1``, ... of a batch), in order (blocking):
        one search per group of queries sharing a key."""
        groups: dict[QueryKey, list[int]] = {}
        for i, q in enumerate(parsed):
            groups.setdefault(q.key, []).append(i)
        results: list[pb.NearestResponse | None] = [None] * len(parsed)
        for key, idx in groups.items():
            try:
                replies = self.search_group(snap, key, [parsed[i].z for i in idx])
            except InvalidArgumentError as exc:  # the group's shared rel_tol: name its first query
                at = first + idx[0]
                raise InvalidArgumentError(
                    f"queries[{at}]: {exc.message}", field=f"queries[{at}].{exc.field}"
                ) from exc
            for i, res in zip(idx, replies, strict=True):
                results[i] = res
        return [r for r in results if r is not None]

    # -- NearestToDistribution ----------------------------------------------------------------
    def nearest_to_distribution(
        self, request: pb.NearestToDistributionRequest
    ) -> pb.NearestToDistributionResponse:
        snap = self.snapshot()
        rel_tol = _rel_tol(request)
        sigma = np.asarray(request.sigma, dtype=np.float64)
        if not (sigma > 0).all():  # the API's rule: the reply's KL needs it (the engine takes std >= 0)
            raise InvalidArgumentError("sigma must be > 0 in every coordinate", field="sigma")
        try:
            result = snap.engine.search_distribution(
                np.asarray(request.mean, dtype=np.float64),
                sigma,
                request.k or DEFAULT_K,
                mode=engine_mode(request.mode),
                labels=list(request.labels) or None,
                with_probability=rel_tol is not None,
                rel_tol=DEFAULT_REL_TOL if rel_tol is None else rel_tol,  # checked by the engine
            )
        except InvalidArgumentError as exc:
            if exc.field != "std":
                raise
            raise InvalidArgumentError(exc.message, field="sigma") from exc  # the engine's std
        assert result.kl is not None  # sigma > 0
        names = _label_names(snap) if request.with_label_names else None
        neighbors = [
            pb.DistributionNeighbor(
                id=n.id,
                expected_log_likelihood=n.score,
                kl=float(result.kl[n.rank]),
                label=n.label,
                rank=n.rank,
                probability=n.probability,
                label_name=None if names is None or n.label is None else names[n.label],
            )
            for n in result
        ]
        resp = pb.NearestToDistributionResponse(
            neighbors=neighbors,
            index_version=snap.version,
            mode=mode_enum(result.mode),
            certified=result.certified,
        )
        _set_probability_fields(resp, result)
        return resp

    # -- items and info -----------------------------------------------------------------------
    def get_item(self, request: pb.GetItemRequest) -> pb.GetItemResponse:
        if len(request.id) > MAX_ID_LENGTH:
            raise InvalidArgumentError(
                f"id has {len(request.id)} characters; ids are at most {MAX_ID_LENGTH}", field="id"
            )
        snap = self.snapshot()
        bank = snap.engine.bank
        row = bank.row_of(request.id)  # NotFoundError(field="id")
        label = None if bank.labels is None else int(bank.labels[row])
        cat = snap.catalogue
        return pb.GetItemResponse(
            id=bank.id_of(np.array([row]))[0],
            mean=np.asarray(bank.mu[row], dtype=np.float64).tolist(),
            sigma=np.exp(np.asarray(bank.log_sigma[row], dtype=np.float64)).tolist(),
            label=label,
            index_version=snap.version,
            label_name=None if cat is None else cat.label_name(label),
            thumbnail_png=b"" if cat is None else cat.thumbnail_png(row),
            metadata_json="" if cat is None else cat.metadata_json(row),
        )

    def info(self, request: pb.InfoRequest | None = None) -> pb.InfoResponse:
        snap = self.snapshot()
        current, reason = self._status
        return pb.InfoResponse(
            index_version=snap.version,
            item_count=len(snap.engine),
            latent_dim=snap.engine.dim,
            model_hash=snap.model_hash,
            served_model_hash="" if snap.model is None else snap.model.model_hash,
            engine_json=json.dumps(snap.engine.info(), sort_keys=True, default=str),
            current_version=current or snap.version,
            fallback_reason=reason,
            label_names=list(_label_names(snap) or ()),
            diagnostics=None if snap.catalogue is None else _diagnostics(snap.catalogue.diagnostics),
        )

    # -- model --------------------------------------------------------------------------------
    def encode(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        """One item -> its posterior under the snapshot's model (blocking).

        ``raw`` (uint8 bytes) and ``values`` (floats) follow the model's input rule, applied by
        :meth:`LoadedModel.prepare` alone (:mod:`model.loader`; the proto's EncodeRequest): pixels
        0..255 and the same pixels scaled to [0, 1] for models indexed from uint8 images, values in
        the data's own units (no raw) for models indexed from float data. Either must lie within
        +-:data:`MAX_NETWORK_INPUT` once normalised (:meth:`LoadedModel.network_input`), and the
        posterior must be one the engine searches with (:func:`_check_posterior`).
        """
        snap = self.snapshot()
        model = _model_of(snap)
        shape = tuple(int(s) for s in request.shape)
        if shape != model.input_shape:
            raise InvalidArgumentError(
                f"shape must be {list(model.input_shape)} (the model's input), "
                f"got {shorten(str(list(shape)))}",
                field="shape",
            )
        size = math.prod(shape)
        has_raw, has_values = len(request.raw) > 0, len(request.values) > 0
        if has_raw == has_values:
            raise InvalidArgumentError(
                "give exactly one of raw (uint8 bytes) or values (floats)", field="raw"
            )
        if has_raw:
            field = "raw"
            if len(request.raw) != size:
                raise InvalidArgumentError(
                    f"raw holds {len(request.raw)} bytes; shape {list(shape)} needs {size}", field="raw"
                )
            x: np.ndarray = np.frombuffer(request.raw, dtype=np.uint8).reshape(1, *shape)
        else:
            field = "values"
            if len(request.values) != size:
                raise InvalidArgumentError(
                    f"values holds {len(request.values)} numbers; shape {list(shape)} needs {size}",
                    field="values",
                )
            x = np.asarray(request.values, dtype=np.float32).reshape(1, *shape)  # the wire's float32
        units = model.network_input(x).abs()  # the input rule's InvalidArgumentError (raw / values)
        if not bool((units <= MAX_NETWORK_INPUT).all()):  # False for inf and NaN too
            raise InvalidArgumentError(
                f"{field} is out of range: normalised the way the model normalises its input, every "
                f"value must be within +-{MAX_NETWORK_INPUT:g} (got {float(units.max()):.3g})",
                field=field,
            )
        q = model.encode(x)[0].numpy()  # (d,) float64
        mean, std = _check_posterior(q.mean, q.std, field)
        return pb.EncodeResponse(
            mean=mean.tolist(), sigma=std.tolist(), model_hash=model.model_hash, index_version=snap.version
        )

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        """A latent point -> the snapshot's model's reconstruction (blocking)."""
        snap = self.snapshot()
        model = _model_of(snap)
        if not model.has_decoder:
            raise FailedPreconditionError("the served model has no decoder", field="model")
        z = check_points(request.z, model.latent_dim, "z")  # (1, d): the engine's rule for latents
        out = model.decode(z)[0].cpu().numpy().astype(np.float32)
        return pb.DecodeResponse(
            png=_png(out),
            values=out.ravel().tolist(),
            shape=list(out.shape),
            model_hash=model.model_hash,
            index_version=snap.version,
        )


def _model_of(snapshot: Snapshot) -> LoadedModel:
    """The snapshot's model; FailedPreconditionError when its version has none to serve."""
    if snapshot.model is None:
        raise FailedPreconditionError(
            f"index version {snapshot.version} stores no model (it was published from posteriors, or "
            "before index versions stored their model) and this server was started without --model: "
            "serve it with --model, or reindex it with `latentsearch index --model` to store the model",
            field="model",
        )
    return snapshot.model


def _check_posterior(mean: np.ndarray, std: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(d,)`` mean and std the model encoded an item to, when the engine can search with them:
    finite, ``|mean| <= MAX_ABS_COORDINATE`` and ``0 < std <= MAX_ABS_COORDINATE`` (what Nearest
    and NearestToDistribution accept). Raises InvalidArgumentError(field=``field``), the input's."""
    lim = MAX_ABS_COORDINATE
    if (np.abs(mean) <= lim).all() and ((std > 0) & (std <= lim)).all():  # False for NaN too
        return mean, std
    if np.isfinite(mean).all() and np.isfinite(std).all():
        got = f"|mean| up to {float(np.abs(mean).max()):.3g}, sigma in [{std.min():.3g}, {std.max():.3g}]"
    else:
        got = "NaN or inf"
    raise InvalidArgumentError(
        f"the model encodes this {field} to a posterior the engine cannot search with (mean within "
        f"+-{lim:g}, sigma in (0, {lim:g}]; got {got})",
        field=field,
    )


def _label_names(snapshot: Snapshot) -> tuple[str, ...] | None:
    """The snapshot's label-name table (``names[label]``; it names every label of the version)."""
    return None if snapshot.catalogue is None else snapshot.catalogue.label_names


def _diagnostics(d: LatentDiagnostics) -> pb.LatentDiagnostics:
    return pb.LatentDiagnostics(
        kl=d.kl.tolist(),
        active=d.active.tolist(),
        threshold=d.threshold,
        mean_p01=d.mean_p01.tolist(),
        mean_p99=d.mean_p99.tolist(),
        mean_min=d.mean_min.tolist(),
        mean_max=d.mean_max.tolist(),
    )


def _rel_tol(request: pb.NearestRequest | pb.NearestToDistributionRequest) -> float | None:
    """The normaliser tolerance a request asks for (unset: the engine's default), ``None`` when it
    asks for no probabilities. The engine checks the value (InvalidArgumentError field rel_tol)."""
    if not request.with_probability:
        return None
    return request.rel_tol if request.HasField("rel_tol") else DEFAULT_REL_TOL


def _set_probability_fields(
    resp: pb.NearestResponse | pb.NearestToDistributionResponse,
    result: SearchResult | BatchResult,
    b: int | None = None,
) -> None:
    """Set the response's log q(z), its certified bounds and typicality from ``result`` (query ``b``
    of a batch); none without probabilities, and typicality stays absent where it is NaN."""
    for name in ("log_qz", "log_qz_lower", "log_qz_upper", "typicality"):
        value = getattr(result, name)
        if value is not None:
            v = float(value if b is None else value[b])
            if not math.isnan(v):
                setattr(resp, name, v)


def nearest_responses(
    batch: BatchResult, bank: PosteriorBank, version: str, label_names: Sequence[str] | None = None
) -> list[pb.NearestResponse]:
    """One NearestResponse per query of ``batch`` (answered by ``version``), built from whole arrays:
    ids, scores and labels are gathered once for the batch, not per neighbour. ``label_names``
    (``names[label]``): also set each neighbour's label name."""
    valid = batch.rows >= 0  # (B, k); the valid entries of each row are a prefix
    counts = valid.sum(axis=1).tolist()
    rows = batch.rows[valid]  # (M,) row-major: query 0's results, then query 1's, ...
    ids = bank.id_of(rows)
    scores = batch.scores[valid].tolist()
    labels = None if bank.labels is None else bank.labels[rows].tolist()
    mode = mode_enum(batch.mode)
    certified = batch.certified.tolist()
    probability = None if batch.probability is None else batch.probability[valid].tolist()
    out = []
    start = 0
    for b, n in enumerate(counts):
        resp = pb.NearestResponse(index_version=version, mode=mode, certified=certified[b])
        _set_probability_fields(resp, batch, b)
        add = resp.neighbors.add
        if labels is None:
            for j in range(n):
                add(id=ids[start + j], log_likelihood=scores[start + j], rank=j)
        else:
            for j in range(n):
                add(id=ids[start + j], log_likelihood=scores[start + j], label=labels[start + j], rank=j)
        if probability is not None:
            for j, neighbor in enumerate(resp.neighbors):
                neighbor.probability = probability[start + j]
        if label_names is not None and labels is not None:
            for j, neighbor in enumerate(resp.neighbors):
                neighbor.label_name = label_names[labels[start + j]]
        start += n
        out.append(resp)
    return out


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, C)`` image in [0, 1] with C in 1, 3, 4; ``b""`` for anything else."""
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        return b""
    return png_bytes(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))

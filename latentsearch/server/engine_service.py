"""The server's core, free of grpc: what is served, requests -> engine calls -> replies.

Requests are converted to the engine's arguments and checked by the engine itself (its rules for
points, k, labels and std live there, once); what is checked here belongs to the API alone (k = 0
meaning 10, the search-mode enum, batch sizes, Encode's layout, sigma > 0). Every method raises
only project errors (:mod:`latentsearch.errors`, each naming its request field); the servicer
translates them to status codes. A request captures one :class:`Snapshot` at its start and
is answered entirely by it, so a hot reload never mixes two versions in one answer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from latentsearch.bank import MAX_ID_LENGTH, PosteriorBank
from latentsearch.engine.config import SearchMode
from latentsearch.engine.engine import MAX_ABS_COORDINATE, SearchEngine, check_points
from latentsearch.engine.probability import DEFAULT_REL_TOL
from latentsearch.engine.results import BatchResult, SearchResult
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError, shorten
from latentsearch.indexer.root import IndexRoot
from latentsearch.model.loader import LoadedModel
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
    "load_snapshot",
    "nearest_responses",
]

log = logging.getLogger(__name__)

DEFAULT_K = 10  # what a request's k = 0 (unset) means
# Largest |value| Encode takes in the units the encoder's first layer sees (LoadedModel.network_input):
# training data spans about [0, 1] there (pixels / 255) or a few units (standardised features), so
# +-1000 leaves room for any real input while float32 activations stay far from overflow.
MAX_NETWORK_INPUT = 1e3


@dataclass(frozen=True)
class Snapshot:
    """One loaded index version: what a request is answered by from start to end."""

    version: str
    engine: SearchEngine
    # Hash of the model the index was built with (version manifest), or "" when unknown.
    model_hash: str = ""


def load_snapshot(
    root: IndexRoot,
    *,
    version: str | None = None,
    verify: bool = False,
    num_threads: int | None = None,
    max_k: int | None = None,
) -> Snapshot:
    """Load ``version`` of the root (default: the current one; blocking: call from a thread).

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
    return Snapshot(version=version, engine=engine, model_hash=str(manifest.get("model_hash") or ""))


class QueryKey(NamedTuple):
    """What concurrent Nearest calls must share to be answered by one ``search_batch``."""

    version: str
    k: int
    mode: SearchMode | None
    labels: tuple[int, ...] | None
    # the normaliser's relative tolerance when the request asked with_probability; None: it did not
    # (so calls with and without probabilities never share a search)
    rel_tol: float | None = None


class NearestQuery(NamedTuple):
    """A Nearest request the engine has checked, bound to the snapshot that will answer it."""

    snapshot: Snapshot
    key: QueryKey
    # (d,) coordinates the engine accepted (a list: one array per batch, not per call)
    z: list[float]


class EngineService:
    """Answers requests from the current snapshot and the optional model.

    Args:
        model: the model for Encode/Decode (``None``: those calls fail with FAILED_PRECONDITION).
        max_batch_queries: most queries in one NearestBatch request.

    The largest k is the serving engine's ``config.max_k`` (see :func:`load_snapshot`).
    """

    def __init__(self, *, model: LoadedModel | None = None, max_batch_queries: int = 1024) -> None:
        self.model = model
        self.max_batch_queries = max_batch_queries
        self._snapshot: Snapshot | None = None
        # (version CURRENT names, why another version serves or ""): what Info reports
        self._status: tuple[str, str] = ("", "")

    # -- what is served -----------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        snap = self._snapshot
        return None if snap is None else snap.version

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (one reference assignment: atomic for every reader)."""
        if self.model is not None:
            if snapshot.engine.dim != self.model.latent_dim:
                log.warning(
                    "index %s has latent_dim %d but the model has %d; Encode/Decode results will not "
                    "match the index",
                    snapshot.version,
                    snapshot.engine.dim,
                    self.model.latent_dim,
                )
            elif snapshot.model_hash and snapshot.model_hash != self.model.model_hash:
                log.warning(
                    "index %s was built with model %s, serving model %s",
                    snapshot.version,
                    snapshot.model_hash[:12],
                    self.model.model_hash[:12],
                )
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
        key = QueryKey(snap.version, k, engine_mode(request.mode), labels, _rel_tol(request))
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
        return nearest_responses(batch, engine.bank, snapshot.version)

    def nearest(self, request: pb.NearestRequest) -> pb.NearestResponse:
        """One Nearest call answered alone (blocking)."""
        q = self.parse_nearest(request)
        return self.search_group(q.snapshot, q.key, [q.z])[0]

    def nearest_batch(self, request: pb.NearestBatchRequest) -> pb.NearestBatchResponse:
        """Every query of the batch answered by one snapshot, in order (blocking)."""
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
        groups: dict[QueryKey, list[int]] = {}
        for i, q in enumerate(parsed):
            groups.setdefault(q.key, []).append(i)
        results: list[pb.NearestResponse | None] = [None] * n
        for key, idx in groups.items():
            try:
                replies = self.search_group(snap, key, [parsed[i].z for i in idx])
            except InvalidArgumentError as exc:  # the group's shared rel_tol: name its first query
                raise InvalidArgumentError(
                    f"queries[{idx[0]}]: {exc.message}", field=f"queries[{idx[0]}].{exc.field}"
                ) from exc
            for i, res in zip(idx, replies, strict=True):
                results[i] = res
        return pb.NearestBatchResponse(
            results=[r for r in results if r is not None], index_version=snap.version
        )

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
        neighbors = [
            pb.DistributionNeighbor(
                id=n.id,
                expected_log_likelihood=n.score,
                kl=float(result.kl[n.rank]),
                label=n.label,
                rank=n.rank,
                probability=n.probability,
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
        return pb.GetItemResponse(
            id=bank.id_of(np.array([row]))[0],
            mean=np.asarray(bank.mu[row], dtype=np.float64).tolist(),
            sigma=np.exp(np.asarray(bank.log_sigma[row], dtype=np.float64)).tolist(),
            label=label,
            index_version=snap.version,
        )

    def info(self, request: pb.InfoRequest | None = None) -> pb.InfoResponse:
        snap = self.snapshot()
        current, reason = self._status
        return pb.InfoResponse(
            index_version=snap.version,
            item_count=len(snap.engine),
            latent_dim=snap.engine.dim,
            model_hash=snap.model_hash,
            served_model_hash="" if self.model is None else self.model.model_hash,
            engine_json=json.dumps(snap.engine.info(), sort_keys=True, default=str),
            current_version=current or snap.version,
            fallback_reason=reason,
        )

    # -- model --------------------------------------------------------------------------------
    def encode(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        """One item -> its posterior (blocking).

        ``raw`` holds uint8 units (pixels 0..255); ``values`` floats in the same units as ``raw``
        for our VAEs (they normalise raw units themselves) and the model's own input units for a
        TorchScript or factory model. Either must lie within +-:data:`MAX_NETWORK_INPUT` once
        normalised (:meth:`LoadedModel.network_input`), and the posterior must be one the engine
        searches with (:func:`_check_posterior`).
        """
        model = self._model()
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
            x = np.frombuffer(request.raw, dtype=np.uint8).reshape(1, *shape).astype(np.float32)
        else:
            field = "values"
            if len(request.values) != size:
                raise InvalidArgumentError(
                    f"values holds {len(request.values)} numbers; shape {list(shape)} needs {size}",
                    field="values",
                )
            values = np.asarray(request.values, dtype=np.float64)
            if not np.isfinite(values).all():
                raise InvalidArgumentError("values contains NaN or inf", field="values")
            x = values.astype(np.float32).reshape(1, *shape)  # beyond float32's range: inf (refused below)
        units = model.network_input(x).abs()
        if not bool((units <= MAX_NETWORK_INPUT).all()):  # False for inf and NaN too
            raise InvalidArgumentError(
                f"{field} is out of range: normalised the way the model normalises its input, every "
                f"value must be within +-{MAX_NETWORK_INPUT:g} (got {float(units.max()):.3g})",
                field=field,
            )
        q = model.encode(x)[0].numpy()  # (d,) float64
        mean, std = _check_posterior(q.mean, q.std, field)
        return pb.EncodeResponse(mean=mean.tolist(), sigma=std.tolist(), model_hash=model.model_hash)

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        model = self._model()
        if not model.has_decoder:
            raise FailedPreconditionError("the served model has no decoder", field="model")
        z = check_points(request.z, model.latent_dim, "z")  # (1, d): the engine's rule for latents
        out = model.decode(z)[0].cpu().numpy().astype(np.float32)
        return pb.DecodeResponse(
            png=_png(out),
            values=out.ravel().tolist(),
            shape=list(out.shape),
            model_hash=model.model_hash,
        )

    # -- helpers ------------------------------------------------------------------------------
    def _model(self) -> LoadedModel:
        if self.model is None:
            raise FailedPreconditionError("this server was started without a model (--model)", field="model")
        return self.model


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


def nearest_responses(batch: BatchResult, bank: PosteriorBank, version: str) -> list[pb.NearestResponse]:
    """One NearestResponse per query of ``batch`` (answered by ``version``), built from whole arrays:
    ids, scores and labels are gathered once for the batch, not per neighbour."""
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
        start += n
        out.append(resp)
    return out


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, C)`` image in [0, 1] with C in 1, 3, 4; ``b""`` for anything else."""
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        return b""
    from PIL import Image

    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels[:, :, 0] if image.shape[2] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

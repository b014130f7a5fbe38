"""A blocking Python client returning plain Python / numpy results.

A failed call raises the project's error for its status code (:func:`error_from_rpc`):
``InvalidArgumentError`` for INVALID_ARGUMENT, ``NotFoundError`` for NOT_FOUND, ``UnavailableError``
when the server cannot be reached, and so on, each with the code in ``grpc_code``, the request field
in ``field`` and the ``grpc.RpcError`` as ``__cause__``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from latentsearch.diagnostics import LatentDiagnostics
from latentsearch.errors import FIELD_METADATA_KEY, LatentSearchError, error_for_status
from latentsearch.posterior import DiagonalGaussian
from latentsearch.tls import read_pem
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc
from latentsearch.wire import mode_enum, mode_name

__all__ = [
    "DecodedImage",
    "Encoding",
    "Hit",
    "ItemPosterior",
    "LatentSearchClient",
    "SearchAnswer",
    "error_from_rpc",
]


@dataclass(frozen=True)
class Hit:
    """One ranked item; ``score`` is log q(z|x) (distribution queries: the expected value)."""

    rank: int
    id: str
    score: float
    label: int | None
    kl: float | None = None
    # match probability p(i | z) among the items passing the label filter (asked with_probability)
    probability: float | None = None
    # the label's name (asked with_label_names, and the index version names its labels)
    label_name: str | None = None


@dataclass(frozen=True)
class SearchAnswer:
    """One query's answer. With ``with_probability`` (else ``None``): ``log_qz`` is the
    aggregate-posterior log density log q(z), ``log_qz_interval`` its certified ``(lower, upper)``
    bounds, and ``typicality`` the fraction in [0, 1] of the index's reference log densities
    ``<= log_qz`` (also ``None`` when the server has none for this query: no reference sample, or a
    label filter)."""

    hits: list[Hit]
    index_version: str
    mode: str
    certified: bool
    log_qz: float | None = None
    log_qz_interval: tuple[float, float] | None = None
    typicality: float | None = None

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]

    @property
    def scores(self) -> np.ndarray:
        return np.array([h.score for h in self.hits], dtype=np.float64)


@dataclass(frozen=True)
class Encoding:
    """What Encode returns: the served model's posterior of one item, that model's hash and the index
    version whose model it is (the server answers each call from one version: index and model)."""

    posterior: DiagonalGaussian  # (d,) float64: .mean, .std, .log_prob(z), ...
    model_hash: str
    index_version: str = ""


@dataclass(frozen=True)
class ItemPosterior:
    """GetItem's answer: the stored posterior and, when the version has them, the item's payloads."""

    id: str
    mean: np.ndarray
    sigma: np.ndarray
    label: int | None
    index_version: str
    label_name: str | None = None
    # PNG of the item's stored pixels (b"": none stored)
    thumbnail_png: bytes = b""
    # the item's metadata record, e.g. {"source": path} (None: none stored)
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class DecodedImage:
    values: np.ndarray  # the reconstruction, shaped as the model's items
    png: bytes  # b"" when the reconstruction is not an image
    model_hash: str
    index_version: str = ""  # the version whose model decoded it


class LatentSearchClient:
    """Client of ``latentsearch.v1.LatentSearch``.

    Args:
        target: ``host:port``.
        token: bearer token sent as ``authorization`` metadata.
        tls_ca: PEM file of the CA that signed the server certificate (enables TLS); a missing,
            unreadable or non-PEM file raises InvalidArgumentError(field="tls_ca") here.
        timeout: default per-call deadline in seconds (``None``: none).
        max_message_bytes: largest message sent or received (grpc's own default is 4 MiB; the
            server's default, 64 MiB, lets a large NearestBatch reply through).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca, field="tls_ca"))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.LatentSearchStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LatentSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------
    def nearest(
        self,
        z: Any,
        k: int = 10,
        *,
        labels: Iterable[int] | None = None,
        mode: str | None = None,
        with_probability: bool = False,
        rel_tol: float | None = None,
        with_label_names: bool = False,
    ) -> SearchAnswer:
        """Top-k items for ``z (d,)``; ``with_probability`` also fills each hit's ``probability`` and
        the answer's ``log_qz``, ``log_qz_interval`` and ``typicality`` (``rel_tol``: the certified
        relative width of the normaliser interval; ``None``: the server's default, 1e-6);
        ``with_label_names`` each hit's ``label_name`` (when the version names its labels)."""
        req = _nearest_request(z, k, labels, mode, with_probability, rel_tol, with_label_names)
        return _answer(self._call(self.stub.Nearest, req))

    def nearest_batch(
        self,
        z: Any,
        k: int = 10,
        *,
        labels: Iterable[int] | None = None,
        mode: str | None = None,
        with_probability: bool = False,
        rel_tol: float | None = None,
        with_label_names: bool = False,
    ) -> list[SearchAnswer]:
        """One query per row of ``z (B, d)``; all answered by one index version."""
        rows = np.asarray(z, dtype=np.float64)
        queries = [
            _nearest_request(r, k, labels, mode, with_probability, rel_tol, with_label_names) for r in rows
        ]
        req = pb.NearestBatchRequest(queries=queries)
        return [_answer(r) for r in self._call(self.stub.NearestBatch, req).results]

    def nearest_to_distribution(
        self,
        mean: Any,
        sigma: Any,
        k: int = 10,
        *,
        labels: Iterable[int] | None = None,
        mode: str | None = None,
        with_probability: bool = False,
        rel_tol: float | None = None,
        with_label_names: bool = False,
    ) -> SearchAnswer:
        """Top-k items for the query Gaussian ``N(mean, diag(sigma^2))``; probabilities and label
        names as in :meth:`nearest`, from each item's expected log-likelihood."""
        req = pb.NearestToDistributionRequest(
            mean=_floats(mean),
            sigma=_floats(sigma),
            k=k,
            labels=list(labels or ()),
            mode=mode_enum(mode),
            with_probability=with_probability,
            rel_tol=rel_tol,
            with_label_names=with_label_names,
        )
        resp = self._call(self.stub.NearestToDistribution, req)
        hits = [
            Hit(
                n.rank,
                n.id,
                n.expected_log_likelihood,
                n.label if n.HasField("label") else None,
                n.kl,
                n.probability if n.HasField("probability") else None,
                n.label_name if n.HasField("label_name") else None,
            )
            for n in resp.neighbors
        ]
        return _search_answer(hits, resp)

    def encode(self, image: Any) -> Encoding:
        """Posterior q(z|x) of one item: uint8 arrays go as raw bytes, anything else as float values.

        The served model's input rule applies (proto EncodeRequest): for a model indexed from uint8
        images send uint8 pixels or floats in [0, 1] (byte / 255); for one indexed from float data,
        floats in the data's own units."""
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            req = pb.EncodeRequest(shape=list(arr.shape), raw=arr.tobytes())
        else:
            req = pb.EncodeRequest(shape=list(arr.shape), values=arr.astype(np.float32).ravel().tolist())
        resp = self._call(self.stub.Encode, req)
        posterior = DiagonalGaussian.from_std(np.array(resp.mean), np.array(resp.sigma))
        return Encoding(posterior, resp.model_hash, resp.index_version)

    def decode(self, z: Any) -> DecodedImage:
        resp = self._call(self.stub.Decode, pb.DecodeRequest(z=_floats(z)))
        values = np.array(resp.values, dtype=np.float32).reshape(tuple(resp.shape))
        return DecodedImage(values, resp.png, resp.model_hash, resp.index_version)

    def get_item(self, item_id: str) -> ItemPosterior:
        resp = self._call(self.stub.GetItem, pb.GetItemRequest(id=str(item_id)))
        return ItemPosterior(
            resp.id,
            np.array(resp.mean),
            np.array(resp.sigma),
            resp.label if resp.HasField("label") else None,
            resp.index_version,
            label_name=resp.label_name if resp.HasField("label_name") else None,
            thumbnail_png=resp.thumbnail_png,
            metadata=json.loads(resp.metadata_json) if resp.metadata_json else None,
        )

    def info(self) -> dict[str, Any]:
        """What is served: index_version, item_count, latent_dim, model hashes, engine (dict),
        current_version, fallback_reason, label_names (list, ``names[label]``; empty: none) and
        diagnostics (:class:`~latentsearch.diagnostics.LatentDiagnostics`; ``None`` for versions
        indexed before diagnostics existed)."""
        resp = self._call(self.stub.Info, pb.InfoRequest())
        return {
            "index_version": resp.index_version,
            "item_count": resp.item_count,
            "latent_dim": resp.latent_dim,
            "model_hash": resp.model_hash,
            "served_model_hash": resp.served_model_hash,
            "engine": json.loads(resp.engine_json) if resp.engine_json else {},
            "current_version": resp.current_version,
            "fallback_reason": resp.fallback_reason,
            "label_names": list(resp.label_names),
            "diagnostics": _diagnostics(resp.diagnostics) if resp.HasField("diagnostics") else None,
        }

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc


def error_from_rpc(exc: grpc.RpcError) -> LatentSearchError:
    """The project error for a failed call, blocking or ``grpc.aio``: what
    :func:`latentsearch.errors.error_for_status` makes of its status code, details and the field
    named in its trailing metadata. Raise it ``from exc``."""
    status = _called(exc, "code")
    field = None
    for key, value in _called(exc, "trailing_metadata") or ():
        if key == FIELD_METADATA_KEY:
            field = value.decode() if isinstance(value, bytes) else str(value)
    return error_for_status(
        "UNKNOWN" if status is None else status.name, _called(exc, "details") or str(exc), field=field
    )


def _called(exc: grpc.RpcError, name: str) -> Any:
    """``exc.<name>()``, or ``None`` for an RpcError that is no call (grpc.Call's methods)."""
    method = getattr(exc, name, None)
    return method() if callable(method) else None


def _floats(values: Any) -> list[float]:
    return np.asarray(values, dtype=np.float64).ravel().tolist()


def _nearest_request(
    z: Any,
    k: int,
    labels: Iterable[int] | None,
    mode: str | None,
    with_probability: bool = False,
    rel_tol: float | None = None,
    with_label_names: bool = False,
) -> pb.NearestRequest:
    return pb.NearestRequest(
        z=_floats(z),
        k=k,
        labels=list(labels or ()),
        mode=mode_enum(mode),
        with_probability=with_probability,
        rel_tol=rel_tol,
        with_label_names=with_label_names,
    )


def _diagnostics(d: pb.LatentDiagnostics) -> LatentDiagnostics:
    """The typed diagnostics of Info (checked: every list has the same length, finite values)."""
    return LatentDiagnostics.from_arrays(
        threshold=d.threshold,
        kl=list(d.kl),
        mean_p01=list(d.mean_p01),
        mean_p99=list(d.mean_p99),
        mean_min=list(d.mean_min),
        mean_max=list(d.mean_max),
    )


def _answer(resp: pb.NearestResponse) -> SearchAnswer:
    hits = [
        Hit(
            n.rank,
            n.id,
            n.log_likelihood,
            n.label if n.HasField("label") else None,
            probability=n.probability if n.HasField("probability") else None,
            label_name=n.label_name if n.HasField("label_name") else None,
        )
        for n in resp.neighbors
    ]
    return _search_answer(hits, resp)


def _search_answer(
    hits: list[Hit], resp: pb.NearestResponse | pb.NearestToDistributionResponse
) -> SearchAnswer:
    """The answer of ``resp`` with ``hits``; its probability fields where the server set them."""
    has_qz = resp.HasField("log_qz")
    return SearchAnswer(
        hits,
        resp.index_version,
        mode_name(resp.mode),
        resp.certified,
        log_qz=resp.log_qz if has_qz else None,
        log_qz_interval=(resp.log_qz_lower, resp.log_qz_upper) if has_qz else None,
        typicality=resp.typicality if resp.HasField("typicality") else None,
    )

"""An asyncio gRPC load generator for ``latentsearch.v1.LatentSearch/Nearest`` with ghz-shaped reports.

``concurrency`` workers share one grpc.aio channel (like ghz's default single connection) and send
Nearest calls until ``duration`` seconds have passed and/or ``total`` calls were sent, optionally
paced to ``rps`` calls per second overall. Queries cycle through a pre-built pool mixing the query
families: ``box`` (z uniform in [-5, 5]^d), ``prior`` (z ~ N(0, I)) and ``data`` (rows of a
``.npy`` / ``.json`` file). Targets must be loopback addresses unless ``allow_remote=True``.

Usage::

    from latentsearch.loadgen import LoadConfig, run_load_sync

    report = run_load_sync(LoadConfig(target="127.0.0.1:50051", concurrency=64, duration=10))
    print(report.summary())          # ghz's text summary
    json.dumps(report.to_ghz_json())  # ghz's JSON output

    latentsearch loadtest --target 127.0.0.1:50051 --concurrency 64 --duration 10 -O json
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc import aio

from latentsearch.errors import InvalidArgumentError, NotFoundError, error_for_status
from latentsearch.tls import read_pem
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc
from latentsearch.wire import mode_enum

__all__ = [
    "FAMILIES",
    "LoadConfig",
    "LoadReport",
    "check_target",
    "load_queries",
    "run_load",
    "run_load_sync",
]

log = logging.getLogger(__name__)

FAMILIES = ("box", "prior", "data")
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
DEFAULT_TOTAL = 200  # ghz's default when neither a duration nor a count is given
# grpc-go's names of the status codes (what ghz's statusCodeDistribution uses).
_GO_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
CALL = "latentsearch.v1.LatentSearch.Nearest"


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """One load run. At least one of ``duration`` / ``total`` bounds it (neither: ``total=200``)."""

    # host:port of the server ([v6]:port for IPv6); loopback only unless allow_remote.
    target: str
    allow_remote: bool = False
    # Concurrent workers (calls in flight at most).
    concurrency: int = 50
    # Seconds to run (None: until total), and most calls to send (None: until duration).
    duration: float | None = None
    total: int | None = None
    # Overall calls per second (None: as fast as the server answers).
    rps: float | None = None
    # Nearest's k, mode ("exact", "approx", None/"auto") and optional label filter.
    k: int = 10
    mode: str | None = None
    labels: tuple[int, ...] = ()
    # Query families mixed round-robin ("data" needs data); the pool is cycled.
    families: tuple[str, ...] = ("box", "prior")
    data: np.ndarray | None = field(default=None, repr=False)  # (n, d) float64
    pool_size: int = 1024
    seed: int = 0
    # Latent dimension (None: asked of the server's Info).
    dim: int | None = None
    # Bearer token, PEM CA file (enables TLS), per-call deadline in seconds.
    token: str | None = None
    tls_ca: str | os.PathLike[str] | None = None
    timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InvalidArgumentError("concurrency must be >= 1", field="concurrency")
        if self.duration is not None and not self.duration > 0:
            raise InvalidArgumentError("duration must be > 0", field="duration")
        if self.total is not None and self.total < 1:
            raise InvalidArgumentError("total must be >= 1", field="total")
        if self.rps is not None and not self.rps > 0:
            raise InvalidArgumentError("rps must be > 0", field="rps")
        mode_enum(self.mode)  # raises InvalidArgumentError(field="mode") for an unknown mode
        unknown = set(self.families) - set(FAMILIES)
        if not self.families or unknown:
            raise InvalidArgumentError(
                f"families must be among {FAMILIES}, got {self.families}", field="families"
            )
        if "data" in self.families and self.data is None:
            raise InvalidArgumentError("the data family needs data (a query file)", field="data")
        if self.pool_size < 1:
            raise InvalidArgumentError("pool_size must be >= 1", field="pool_size")
        check_target(self.target, allow_remote=self.allow_remote)

    @property
    def bounded_total(self) -> int | None:
        """``total``, or ghz's default 200 when neither bound is given."""
        return DEFAULT_TOTAL if self.total is None and self.duration is None else self.total


@dataclass
class LoadReport:
    """What a run measured; times in nanoseconds (ghz's units).

    ``latencies`` holds one entry per completed call (OK or not), in completion order.
    """

    date: str
    total_ns: int
    latencies_ns: np.ndarray = field(repr=False)  # (count,) int64
    status_codes: dict[str, int]
    errors: dict[str, int]
    options: dict[str, Any]

    # -- ghz's figures ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def average(self) -> int:
        return int(self.latencies_ns.mean()) if self.count else 0

    @property
    def fastest(self) -> int:
        return int(self.latencies_ns.min()) if self.count else 0

    @property
    def slowest(self) -> int:
        return int(self.latencies_ns.max()) if self.count else 0

    @property
    def rps(self) -> float:
        return self.count / (self.total_ns / 1e9) if self.total_ns > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, p: float) -> int:
        """Latency (ns) below which ``p`` % of calls completed (nearest rank, as ghz)."""
        if not self.count:
            return 0
        ordered = np.sort(self.latencies_ns)
        idx = max(0, min(self.count - 1, math.ceil(p / 100.0 * self.count) - 1))
        return int(ordered[idx])

    @property
    def latency_distribution(self) -> list[dict[str, Any]]:
        return [{"percentage": p, "latency": self.percentile(p)} for p in PERCENTILES]

    @property
    def histogram(self) -> list[dict[str, Any]]:
        """ghz's histogram: ``HISTOGRAM_BUCKETS + 1`` marks (seconds) from fastest to slowest."""
        if not self.count:
            return []
        lat = self.latencies_ns / 1e9
        lo, hi = float(lat.min()), float(lat.max())
        step = (hi - lo) / HISTOGRAM_BUCKETS
        marks = [lo + step * i for i in range(HISTOGRAM_BUCKETS + 1)]
        counts = [0] * len(marks)
        idx = np.searchsorted(np.array(marks), lat, side="left")  # first mark >= latency
        for i, c in zip(*np.unique(np.minimum(idx, len(marks) - 1), return_counts=True), strict=True):
            counts[int(i)] = int(c)
        return [
            {"mark": m, "count": c, "frequency": c / self.count} for m, c in zip(marks, counts, strict=True)
        ]

    def to_ghz_json(self) -> dict[str, Any]:
        """The report shaped like ``ghz --format json`` output (durations in ns, marks in s)."""
        return {
            "date": self.date,
            "options": self.options,
            "count": self.count,
            "total": self.total_ns,
            "average": self.average,
            "fastest": self.fastest,
            "slowest": self.slowest,
            "rps": self.rps,
            "errorDistribution": dict(self.errors),
            "statusCodeDistribution": dict(self.status_codes),
            "latencyDistribution": self.latency_distribution,
            "histogram": self.histogram,
        }

    def summary(self) -> str:
        """ghz's text summary."""
        lines = [
            "",
            "Summary:",
            f"  Count:\t{self.count}",
            f"  Total:\t{_fmt(self.total_ns)}",
            f"  Slowest:\t{_fmt(self.slowest)}",
            f"  Fastest:\t{_fmt(self.fastest)}",
            f"  Average:\t{_fmt(self.average)}",
            f"  Requests/sec:\t{self.rps:.2f}",
            "",
            "Response time histogram:",
        ]
        hist = self.histogram
        top = max((b["count"] for b in hist), default=0)
        for b in hist:
            bar = "∎" * (round(40 * b["count"] / top) if top else 0)
            lines.append(f"  {b['mark'] * 1000:.3f} [{b['count']}]\t|{bar}")
        lines += ["", "Latency distribution:"]
        lines += [f"  {d['percentage']} % in {_fmt(d['latency'])} " for d in self.latency_distribution]
        lines += ["", "Status code distribution:"]
        lines += [f"  [{code}]   {n} responses" for code, n in sorted(self.status_codes.items())]
        if self.errors:
            lines += ["", "Error distribution:"]
            lines += [f"  [{n}]   {msg}" for msg, n in sorted(self.errors.items(), key=lambda e: -e[1])]
        return "\n".join(lines) + "\n"


def _fmt(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.2f} µs"


# -- targets and queries ------------------------------------------------------------------------
def check_target(target: str, *, allow_remote: bool = False) -> str:
    """Return the host of ``host:port``; raise InvalidArgumentError unless it is loopback.

    Host names other than ``localhost`` are refused without a DNS lookup.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError(f"target must be host:port, got {target!r}", field="target")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if allow_remote:
        return host
    if host.lower() in _LOOPBACK_NAMES:
        return host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidArgumentError(
            f"refusing to load-test non-loopback target {target!r} (pass allow_remote=True / "
            "--allow-remote for a server you own)",
            field="target",
        )
    return host


def load_queries(path: str | os.PathLike[str]) -> np.ndarray:
    """Query points from a ``.npy`` or ``.json`` file; returns ``(n, d)`` float64.

    ``.npy``: ``(n, d)`` or ``(d,)``. ``.json``: a point, a list of points, ghz's request data (one
    NearestRequest in protobuf's JSON mapping, ``{"z": [...], "k": 10, "mode": "MODE_EXACT"}``, or a
    list of them), or a whole ghz config holding such ``data`` (``deploy/ghz.json``). Only the
    requests' ``z`` is used: k, mode and labels are the load run's.

    Raises:
        NotFoundError: no such file (``field="data_file"``).
        InvalidArgumentError: anything else the file holds (the message names it; ``field="data_file"``).
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"no query file {p}", field="data_file")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".json":
        try:
            doc = json.loads(p.read_text())
        except ValueError as exc:
            raise InvalidArgumentError(f"query file {p} is not JSON: {exc}", field="data_file") from exc
        arr = _json_points(doc, p)
    else:
        raise InvalidArgumentError(f"query file must be .npy or .json, got {p.name}", field="data_file")
    try:
        arr = np.atleast_2d(np.asarray(arr, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        message = f"query file {p} holds no array of numbers: {exc}"
        raise InvalidArgumentError(message, field="data_file") from exc
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0 or not np.isfinite(arr).all():
        raise InvalidArgumentError(
            f"query file {p} must hold finite points shaped (n, d), got {arr.shape}", field="data_file"
        )
    return arr


def _json_points(doc: Any, path: Path) -> Any:
    """The points (nested lists) of a JSON query file's document ``doc``."""
    if isinstance(doc, dict) and "data" in doc and "z" not in doc:  # a ghz config: its request data
        doc = doc["data"]
    if isinstance(doc, dict) and "queries" in doc:
        return doc["queries"]
    requests = [doc] if isinstance(doc, dict) else doc
    if not (isinstance(requests, list) and requests and all(isinstance(r, dict) for r in requests)):
        return doc  # a point or a list of points (checked by the caller)
    points = []
    for i, item in enumerate(requests):
        try:
            request = json_format.ParseDict(item, pb.NearestRequest())
        except json_format.ParseError as exc:
            raise InvalidArgumentError(
                f"query file {path}: request {i} is no NearestRequest: {exc}", field="data_file"
            ) from exc
        if not request.z:
            raise InvalidArgumentError(f"query file {path}: request {i} has no z", field="data_file")
        points.append(list(request.z))
    return points


def _request_pool(config: LoadConfig, dim: int) -> list[pb.NearestRequest]:
    """``pool_size`` requests, families interleaved round-robin."""
    if config.data is not None and config.data.shape[1] != dim:
        raise InvalidArgumentError(
            f"query file points have d={config.data.shape[1]}, the server's latent_dim is {dim}",
            field="data_file",
        )
    rng = np.random.default_rng(config.seed)
    n = config.pool_size
    fams = config.families
    zs = np.empty((n, dim))
    for j, fam in enumerate(fams):
        rows = np.arange(j, n, len(fams))
        if fam == "box":
            zs[rows] = rng.uniform(-5.0, 5.0, size=(len(rows), dim))
        elif fam == "prior":
            zs[rows] = rng.standard_normal((len(rows), dim))
        else:
            assert config.data is not None
            zs[rows] = config.data[np.arange(len(rows)) % len(config.data)]
    mode = mode_enum(config.mode)
    return [pb.NearestRequest(z=z.tolist(), k=config.k, mode=mode, labels=list(config.labels)) for z in zs]


# -- the run ------------------------------------------------------------------------------------
def _channel(config: LoadConfig) -> aio.Channel:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if config.tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=read_pem(config.tls_ca, field="tls_ca"))
        return aio.secure_channel(config.target, creds, options=options)
    return aio.insecure_channel(config.target, options=options)


async def run_load(config: LoadConfig) -> LoadReport:
    """Drive Nearest per ``config`` and return the report (asks Info for the dim when not given)."""
    metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None
    total = config.bounded_total
    async with _channel(config) as channel:
        stub = pb_grpc.LatentSearchStub(channel)
        dim = config.dim
        if dim is None:
            try:
                info = await stub.Info(pb.InfoRequest(), timeout=config.timeout, metadata=metadata)
            except aio.AioRpcError as exc:  # the error of its status code, e.g. UnavailableError
                message = f"cannot ask {config.target} for its latent dim: {exc.details()}"
                raise error_for_status(exc.code().name, message, field="target") from exc
            dim = int(info.latent_dim)
        pool = _request_pool(config, dim)
        latencies: list[int] = []
        codes: dict[str, int] = {}
        errors: dict[str, int] = {}
        issued = 0
        start = time.perf_counter()
        end = None if config.duration is None else start + config.duration
        interval = None if config.rps is None else 1.0 / config.rps
        call = stub.Nearest

        async def worker() -> None:
            nonlocal issued
            while True:
                if total is not None and issued >= total:
                    return
                i = issued
                issued += 1
                if interval is not None:  # pace: call i is sent no earlier than start + i / rps
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if end is not None and time.perf_counter() >= end:
                    return
                t0 = time.perf_counter_ns()
                try:
                    await call(pool[i % len(pool)], timeout=config.timeout, metadata=metadata)
                    code = "OK"
                except aio.AioRpcError as exc:
                    code = _GO_CODE_NAMES.get(exc.code().name, exc.code().name)
                    msg = f"rpc error: code = {code} desc = {exc.details()}"
                    errors[msg] = errors.get(msg, 0) + 1
                latencies.append(time.perf_counter_ns() - t0)
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        total_ns = int((time.perf_counter() - start) * 1e9)
    options = {k: v for k, v in asdict(config).items() if k not in ("data", "token")}
    options.update(
        call=CALL,
        host=config.target,
        dim=dim,
        insecure=config.tls_ca is None,
        tls_ca=None if config.tls_ca is None else str(config.tls_ca),
        total=total,
        labels=list(config.labels),
        families=list(config.families),
        data_rows=0 if config.data is None else len(config.data),
    )
    report = LoadReport(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        total_ns=total_ns,
        latencies_ns=np.asarray(latencies, dtype=np.int64),
        status_codes=codes,
        errors=errors,
        options=options,
    )
    log.debug("load run on %s: %d calls, %.1f rps", config.target, report.count, report.rps)
    return report


def run_load_sync(config: LoadConfig) -> LoadReport:
    """:func:`run_load` on a fresh event loop (call from a thread without a running loop)."""
    return asyncio.run(run_load(config))

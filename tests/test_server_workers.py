"""`serve --workers 2`: real worker processes on one port (SO_REUSEPORT) under a supervisor.

Workers share the port and answer identically; /metrics sums every worker's counters and shows
each worker's gauges; every worker hot-reloads on its own; a killed worker is replaced while the
other keeps answering; SIGTERM drains every worker; ``--workers 1`` binds the port exclusively.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from reference import log_q, top_k

from latentsearch.indexer import IndexRoot
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    pids: list[int]
    lines: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def worker_pids(self) -> list[int]:
        """The live worker processes (the supervisor's children running a server)."""
        pids = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if "spawn_main" in " ".join(child.cmdline()):
                        pids.append(child.pid)
        return sorted(pids)

    def inflight(self) -> dict[int, float]:
        """Each worker's calls in flight outside the batcher (its ``latentsearch_inflight`` gauge)."""
        text = self.metrics()
        return {pid: _sample(text, "latentsearch_inflight", {"pid": str(pid)}) or 0.0 for pid in self.pids}


@pytest.fixture
def serve_workers() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []
    readers: list[threading.Thread] = []

    def start(root: Path, *extra: str, workers: int = 2) -> Served:
        metrics_port = _free_port()
        cmd = [sys.executable, "-m", "latentsearch", "serve", "--index", str(root), "--port", "0"]
        cmd += ["--metrics-port", str(metrics_port), "--workers", str(workers), *extra]
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
        served = Served(proc, 0, metrics_port, [])
        found = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            # the teardown closes the pipe once the processes are gone (a worker may still hold
            # its write end): reading a closed file ends the loop like EOF
            with contextlib.suppress(ValueError, OSError):
                for line in proc.stderr:
                    served.lines.append(line)
                    m = re.search(r"on 127\.0\.0\.1:(\d+) with \d+ worker processes \(pids ([\d, ]+)\)", line)
                    if m:
                        served.port = int(m.group(1))
                        served.pids = [int(p) for p in m.group(2).split(", ")]
                        found.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        readers.append(reader)
        started.append(served)
        end = time.monotonic() + 180
        while not found.wait(0.1):
            assert proc.poll() is None and time.monotonic() < end, "".join(served.lines)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            for pid in served.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            served.proc.kill()
            served.proc.wait(30)
    for reader in readers:
        reader.join(10)  # EOF once every process holding the pipe is gone
    for served in started:
        if served.proc.stderr is not None:
            served.proc.stderr.close()


def _channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own (channels of one process share them by default)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _nearest(target: str, z: np.ndarray, k: int = 5) -> pb.NearestResponse:
    """One call on a new connection (so the kernel picks a worker for it)."""
    with _channel(target) as ch:
        reply: pb.NearestResponse = pb_grpc.LatentSearchStub(ch).Nearest(
            pb.NearestRequest(z=z.tolist(), k=k), timeout=30, wait_for_ready=True
        )
        return reply


def _connections(pid: int, port: int) -> int:
    """Established connections process ``pid`` holds on local port ``port``."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def _sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    """The value of ``name{labels}`` in a Prometheus text exposition (labels: a subset)."""
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_workers_share_the_port_answer_identically_reload_and_drain(
    tmp_path: Path, serve_workers, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, make_engine(400, seed=1))
    served = serve_workers(root, "--reload-interval", "0.2", "--grace", "120")
    assert len(served.pids) == 2 and served.worker_pids() == sorted(served.pids)
    engine = IndexRoot(root).load(v1)
    z = np.random.default_rng(0).normal(size=DIM)
    expected = engine.search(z, 5)

    # Both workers accept connections on the one port, and answer alike.
    channels = [_channel(served.target) for _ in range(16)]
    try:
        replies = [
            pb_grpc.LatentSearchStub(ch).Nearest(pb.NearestRequest(z=z.tolist(), k=5), timeout=30)
            for ch in channels
        ]
        per_worker = {pid: _connections(pid, served.port) for pid in served.pids}
        assert all(n >= 1 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) == len(channels)
    finally:
        for ch in channels:
            ch.close()
    for r in replies:
        assert r.index_version == v1
        assert [n.id for n in r.neighbors] == expected.ids
        np.testing.assert_array_equal([n.log_likelihood for n in r.neighbors], expected.scores)

    # One /metrics for both: counters summed over workers, gauges per worker (pid label).
    text = served.metrics()
    assert _sample(text, "latentsearch_requests_total", {"method": "Nearest", "code": "OK"}) == len(channels)
    for pid in served.pids:
        assert _sample(text, "latentsearch_index_version", {"pid": str(pid), "version": v1}) == 1
        assert _sample(text, "latentsearch_queue_depth", {"pid": str(pid)}) is not None

    # Every worker hot-reloads on its own; a reply is never a mix of two versions.
    v2 = publish(root, make_engine(400, seed=2))
    engines = {v1: engine, v2: IndexRoot(root).load(v2)}
    seen: set[str] = set()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        r = _nearest(served.target, z)
        assert [n.id for n in r.neighbors] == engines[r.index_version].search(z, 5).ids
        seen.add(r.index_version)
        text = served.metrics()
        labels = [{"pid": str(p), "version": v2} for p in served.pids]
        if all(_sample(text, "latentsearch_index_version", x) for x in labels):
            break
    else:
        raise AssertionError("not every worker reloaded within 60 s")
    assert _nearest(served.target, z).index_version == v2

    # SIGTERM drains every worker: every call in flight on either worker when the signal comes
    # finishes OK (one the server had not received yet may be refused: UNAVAILABLE or CANCELLED,
    # as grpc reports a stream the server reset), then all processes exit 0.
    queries = np.random.default_rng(1).normal(size=(512, DIM))
    big = pb.NearestBatchRequest(queries=[pb.NearestRequest(z=q.tolist(), k=300) for q in queries])
    channels = [_channel(served.target) for _ in range(8)]
    try:
        futures = [pb_grpc.LatentSearchStub(ch).NearestBatch.future(big, timeout=240) for ch in channels]
        inflight = wait_until(lambda: (f := served.inflight()) and all(f.values()) and f, timeout=60)
        served.proc.send_signal(signal.SIGTERM)
        codes = [f.code() for f in futures]  # waits for each call
    finally:
        for ch in channels:
            ch.close()
    assert sum(inflight.values()) >= 2  # calls in flight on both workers at the signal
    failed = [(f.code(), f.details()) for f in futures if f.code() != grpc.StatusCode.OK]
    assert codes.count(grpc.StatusCode.OK) >= sum(inflight.values()), (inflight, failed)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert all(len(f.result().results) == 512 for f in futures if f.code() == grpc.StatusCode.OK)
    assert served.proc.wait(240) == 0, "".join(served.lines)
    log = "".join(served.lines)
    assert log.count("shutting down (grace 120.0 s)") == 2  # each worker drained
    assert not [p for p in served.pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_a_killed_worker_is_replaced_and_calls_keep_succeeding(
    tmp_path: Path, serve_workers, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    version = publish(root, make_engine(300, seed=3))
    served = serve_workers(root, "--reload-interval", "0")
    z = np.random.default_rng(2).normal(size=DIM)
    expected = IndexRoot(root).load(version).search(z, 5).ids
    victim, survivor = served.pids
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # new connections while the worker is gone: the survivor answers
        assert [n.id for n in _nearest(served.target, z).neighbors] == expected
    replaced = wait_until(
        lambda: [p for p in served.worker_pids() if p not in (victim, survivor)], timeout=120
    )
    wait_until(lambda: "".join(served.lines).count("[worker 0]: serving ") == 2, timeout=120)  # restarted
    # The replacement serves on the same port: some of many new connections reach it.
    channels = [_channel(served.target) for _ in range(16)]
    try:
        for ch in channels:
            reply = pb_grpc.LatentSearchStub(ch).Nearest(
                pb.NearestRequest(z=z.tolist(), k=5), timeout=30, wait_for_ready=True
            )
            assert [n.id for n in reply.neighbors] == expected
        assert _connections(replaced[0], served.port) >= 1
    finally:
        for ch in channels:
            ch.close()
    assert "died (exit code -9); restarting it" in "".join(served.lines)
    text = served.metrics()
    assert _sample(text, "latentsearch_queue_depth", {"pid": str(victim)}) is None  # its live gauges gone
    assert _sample(text, "latentsearch_queue_depth", {"pid": str(replaced[0])}) is not None


def test_one_worker_binds_the_port_exclusively(tmp_path: Path, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    with socket.socket() as sock:  # another program sharing the port on purpose (SO_REUSEPORT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        for workers in ("1", "2"):
            done = subprocess.run(
                [
                    *(sys.executable, "-m", "latentsearch", "-q", "serve", "--index", str(tmp_path / "idx")),
                    *("--port", str(port), "--metrics-port", "0", "--workers", workers),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: port {port} is in use"), done.stderr


def test_hot_reload_under_load_across_workers_fails_no_call_and_mixes_no_versions(
    tmp_path: Path, serve_workers, make_engine, publish, wait_until
) -> None:
    """Clients call both workers without pause while a new version is published: no call fails,
    every reply is one version's float64 brute-force answer, and a connection (one worker) never
    goes back to the old version once it has answered with the new one."""
    root = tmp_path / "idx"
    engines = {"v1-": make_engine(400, seed=11, prefix="v1-"), "v2-": make_engine(400, seed=12, prefix="v2-")}
    v1 = publish(root, engines["v1-"])
    served = serve_workers(root, "--reload-interval", "0.2")
    queries = np.random.default_rng(5).normal(size=(6, DIM))

    # Connections on both workers (the kernel picks one per connection): open until each has two.
    channels: list[grpc.Channel] = []
    try:
        while len(channels) < 64:
            ch = _channel(served.target)
            channels.append(ch)
            pb_grpc.LatentSearchStub(ch).Info(pb.InfoRequest(), timeout=60, wait_for_ready=True)
            if len(channels) >= 4 and all(_connections(p, served.port) >= 2 for p in served.pids):
                break
        assert all(_connections(p, served.port) >= 1 for p in served.pids), "a worker got no connection"

        replies: list[list[tuple[int, pb.NearestResponse]]] = [[] for _ in channels]
        failures: list[BaseException] = []
        stop = threading.Event()

        def client(i: int) -> None:
            stub = pb_grpc.LatentSearchStub(channels[i])
            n = 0
            while not stop.is_set():
                q = (i + n) % len(queries)
                try:
                    reply = stub.Nearest(pb.NearestRequest(z=queries[q].tolist(), k=5), timeout=60)
                except grpc.RpcError as exc:
                    failures.append(exc)
                    return
                replies[i].append((q, reply))
                n += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(channels))]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: failures or all(len(r) >= 3 for r in replies), timeout=120)  # v1 under load
            v2 = publish(root, engines["v2-"])

            def reloaded() -> bool:
                text = served.metrics()
                every_worker = all(
                    _sample(text, "latentsearch_index_version", {"pid": str(p), "version": v2}) == 1
                    for p in served.pids
                )
                # and every connection has answered with it since (each stays on its worker)
                return bool(failures) or (
                    every_worker and all(r and r[-1][1].index_version == v2 for r in replies)
                )

            wait_until(reloaded, timeout=120, interval=0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(90)
    finally:
        for ch in channels:
            ch.close()

    assert not failures, failures[:3]
    prefix = {v1: "v1-", v2: "v2-"}
    expected = {}
    for version, p in prefix.items():
        bank = engines[p].bank
        scores = log_q(
            queries, np.asarray(bank.mu, dtype=np.float64), np.asarray(bank.log_sigma, dtype=np.float64)
        )
        rows = top_k(scores, 5)
        expected[version] = (
            [[f"{p}{r}" for r in row] for row in rows],
            np.take_along_axis(scores, rows, axis=1),
        )
    seen = set()
    for per_channel in replies:
        versions = [reply.index_version for _, reply in per_channel]
        assert set(versions) <= {v1, v2}, set(versions)
        # a worker never answers with the old version again once it served the new one
        assert versions == sorted(versions, key=lambda v: v == v2), versions
        seen.update(versions)
        for q, reply in per_channel:
            ids, scores = expected[reply.index_version]
            assert [n.id for n in reply.neighbors] == ids[q]  # ids of one version only
            np.testing.assert_allclose([n.log_likelihood for n in reply.neighbors], scores[q], rtol=1e-12)
    assert seen == {v1, v2}

"""Health transitions, hot reload under load, failed reloads, graceful shutdown with in-flight calls."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentsearch.client import LatentSearchClient
from latentsearch.errors import LatentSearchError
from latentsearch.indexer import IndexRoot
from latentsearch.indexer.root import remove_tree
from latentsearch.server import app
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)

SERVING, NOT_SERVING = 1, 2


def test_health_not_serving_until_index_then_serving_then_not_at_shutdown(
    tmp_path: Path, start_server, make_engine, publish, wait_until, health_rpc
) -> None:
    root = tmp_path / "idx"
    IndexRoot(root, create=True)
    srv = start_server(index=root, reload_interval=0.05)
    assert health_rpc(srv.target) == NOT_SERVING
    assert health_rpc(srv.target, "latentsearch.v1.LatentSearch") == NOT_SERVING
    version = publish(root, make_engine(30, seed=1))
    wait_until(lambda: health_rpc(srv.target) == SERVING)
    assert health_rpc(srv.target, "latentsearch.v1.LatentSearch") == SERVING
    with LatentSearchClient(srv.target) as client:
        assert client.info()["index_version"] == version
    srv.run(srv.server.stop(1.0))
    assert srv.health_status() == NOT_SERVING
    assert srv.health_status("latentsearch.v1.LatentSearch") == NOT_SERVING


def test_hot_reload_under_load(tmp_path: Path, start_server, make_engine, publish, wait_until) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, make_engine(400, seed=1, prefix="a"))
    srv = start_server(index=root, reload_interval=0.02, max_wait_ms=1.0)
    engines = {v1: IndexRoot(root).load(v1)}
    stop = threading.Event()
    records: list[tuple[str, np.ndarray, int, list[str], list[float]]] = []
    errors: list[BaseException] = []

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with LatentSearchClient(srv.target) as client:
            while not stop.is_set():
                z, k = rng.normal(size=DIM), int(rng.integers(1, 12))
                try:
                    ans = client.nearest(z, k)
                except LatentSearchError as exc:  # pragma: no cover - the assertion below reports it
                    errors.append(exc)
                    return
                records.append((ans.index_version, z, k, ans.ids, ans.scores.tolist()))

    threads = [threading.Thread(target=load, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(records) > 20)
        v2 = publish(root, make_engine(500, seed=2, prefix="b"))
        engines[v2] = IndexRoot(root).load(v2)
        wait_until(lambda: sum(r[0] == v2 for r in records) > 20)
        v3 = publish(root, make_engine(350, seed=3, prefix="c"))
        engines[v3] = IndexRoot(root).load(v3)
        wait_until(lambda: sum(r[0] == v3 for r in records) > 20)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    seen = {r[0] for r in records}
    assert seen == {v1, v2, v3}
    for version, z, k, ids, scores in records:
        expected = engines[version].search(z, k)
        assert ids == expected.ids
        np.testing.assert_array_equal(scores, expected.scores)


def test_failed_version_keeps_serving_old(tmp_path: Path, start_server, caplog, make_engine, publish) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, make_engine(60, seed=1))
    srv = start_server(index=root)
    v2 = publish(root, make_engine(70, seed=2))
    vdir = root / "versions" / v2
    vdir.chmod(0o755)  # published versions are read-only (0555 directories, 0444 files)
    remove_tree(vdir / "engine")
    assert not (vdir / "engine").exists()
    assert srv.run(srv.server.reload_now()) is False
    assert srv.server.version == v1
    assert "failed to load index version" in caplog.text
    with LatentSearchClient(srv.target) as client:
        assert client.info()["index_version"] == v1
        assert len(client.nearest([0.0] * DIM, 5).hits) == 5
    v3 = publish(root, make_engine(80, seed=3))  # a good version replaces it
    assert srv.run(srv.server.reload_now()) is True
    assert srv.server.version == v3


def test_shutdown_lets_in_flight_calls_finish(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    version = publish(root, make_engine(100, seed=1))
    srv = start_server(index=root, search_threads=1, max_wait_ms=0, max_batch=1)
    service = srv.server.service
    release, entered = threading.Event(), threading.Event()
    original = service.search_group

    def blocking(snapshot, key, zs):
        entered.set()
        assert release.wait(30)
        return original(snapshot, key, zs)

    service.search_group = blocking
    engine = IndexRoot(root).load(version)
    zs = [np.array([random.Random(i).uniform(-1, 1) for _ in range(DIM)]) for i in range(3)]
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        futures = [stub.Nearest.future(pb.NearestRequest(z=z.tolist(), k=4), timeout=30) for z in zs]
        assert entered.wait(10)
        wait_until(lambda: srv.server._batcher is not None and srv.server._batcher.depth >= 1)
        stopping = srv.submit(srv.server.stop(20))
        wait_until(lambda: srv.health_status() == NOT_SERVING)
        assert not stopping.done()
        release.set()
        for z, fut in zip(zs, futures, strict=True):
            resp = fut.result(timeout=30)
            assert resp.index_version == version
            assert [n.id for n in resp.neighbors] == engine.search(z, 4).ids
        stopping.result(30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Nearest(pb.NearestRequest(z=[0.0] * DIM), timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_drain_serves_new_calls_until_the_calls_in_flight_have_replied(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    """The drain keeps the connections open (no GOAWAY yet) while an earlier call runs: a call
    arriving then is answered, then the earlier one, then the server stops."""
    root = tmp_path / "idx"
    version = publish(root, make_engine(100, seed=2))
    srv = start_server(index=root, search_threads=2, batching=False)
    service = srv.server.service
    release, entered = threading.Event(), threading.Event()
    original = service.search_group
    held = [True]

    def blocking(snapshot, key, zs):
        if held[0]:  # the first call only
            held[0] = False
            entered.set()
            assert release.wait(30)
        return original(snapshot, key, zs)

    service.search_group = blocking
    z = np.array([0.1, -0.2, 0.3, 0.0])
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        first = stub.Nearest.future(pb.NearestRequest(z=z.tolist(), k=3), timeout=30)
        assert entered.wait(10)
        stopping = srv.submit(srv.server.stop(20))
        wait_until(lambda: srv.health_status() == NOT_SERVING)
        late = stub.Nearest(pb.NearestRequest(z=z.tolist(), k=3), timeout=10)  # answered, not refused
        assert late.index_version == version and not first.done() and not stopping.done()
        release.set()
        assert [n.id for n in first.result(timeout=30).neighbors] == [n.id for n in late.neighbors]
        stopping.result(30)


def test_finish_calls_waits_for_the_calls_then_lingers_within_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "DRAIN_LINGER_S", 0.2)

    async def scenario() -> tuple[float, float, bool, float]:
        short = asyncio.ensure_future(asyncio.sleep(0.05))
        left = await app._finish_calls({short}, 10.0)  # 0.05 s for the call, 0.2 s of linger
        long = asyncio.ensure_future(asyncio.sleep(5))
        cut = await app._finish_calls({long}, 0.1)  # the grace ends first: nothing left, no linger
        done = long.done()
        long.cancel()
        return left, cut, done, await app._finish_calls(set(), 3.0)

    left, cut, done, idle = asyncio.run(scenario())
    assert 9.0 < left <= 10.0 - 0.25 and cut == 0.0 and not done
    assert idle == 3.0  # no calls in flight: no wait at all

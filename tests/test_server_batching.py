"""Micro-batching: batched answers equal single answers; bad calls fail alone; full queue; expired
deadlines; settings."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from latentsearch.errors import InvalidArgumentError
from latentsearch.indexer import IndexRoot
from latentsearch.server.batcher import MicroBatcher
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


def _block(srv):
    """Make every search wait for ``release``; record each group's queries."""
    service = srv.server.service
    original = service.search_group
    release, groups = threading.Event(), []

    def blocking(snapshot, key, zs):
        groups.append((key, [z.copy() for z in zs]))
        assert release.wait(30)
        return original(snapshot, key, zs)

    service.search_group = blocking
    return release, groups


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_calls_equal_single_answers(
    tmp_path: Path, start_server, batching: bool, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    version = publish(root, make_engine(500, seed=4))
    engine = IndexRoot(root).load(version)
    srv = start_server(index=root, batching=batching, search_threads=1, max_batch=64, max_wait_ms=5)
    release, groups = _block(srv)
    rng = np.random.default_rng(0)
    specs = []
    for i in range(48):
        k = (5, 10, 20)[i % 3]
        labels = (None, [1], [0, 2])[i % 3 if i % 2 else 0]
        specs.append((rng.normal(size=DIM), k, labels))
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        futures = [
            stub.Nearest.future(pb.NearestRequest(z=z.tolist(), k=k, labels=labels or []), timeout=60)
            for z, k, labels in specs
        ]
        wait_until(lambda: groups)
        if batching:  # every call is in the batcher (queued, or collected behind the blocked search)
            wait_until(lambda: srv.server._batcher.pending == len(specs))
        release.set()
        for (z, k, labels), fut in zip(specs, futures, strict=True):
            resp = fut.result(timeout=60)
            expected = engine.search(z, k, labels=labels)
            assert resp.index_version == version
            assert [n.id for n in resp.neighbors] == expected.ids
            np.testing.assert_array_equal([n.log_likelihood for n in resp.neighbors], expected.scores)
    sizes = [len(zs) for _, zs in groups]
    assert sum(sizes) == len(specs)
    if batching:
        assert max(sizes) > 1
        for key, _ in groups:  # a group shares k, mode and labels
            assert key.version == version
    else:
        assert max(sizes) == 1


def test_full_queue_is_resource_exhausted(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    publish(root, make_engine(100, seed=5))
    srv = start_server(index=root, search_threads=1, max_batch=1, queue_size=1, max_wait_ms=0)
    release, groups = _block(srv)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        req = pb.NearestRequest(z=[0.0] * DIM, k=3)
        running = stub.Nearest.future(req, timeout=60)
        wait_until(lambda: groups)
        waiting_slot = stub.Nearest.future(req, timeout=60)  # taken by the collector, waits for a slot
        # taken: submitted (pending counts it) and out of the queue; depth 0 alone also held before
        # it arrived, and a queued waiting_slot then made the next call RESOURCE_EXHAUSTED instead
        batcher = srv.server._batcher
        wait_until(lambda: batcher.pending == 2 and batcher.depth == 0 and not waiting_slot.done())
        queued = stub.Nearest.future(req, timeout=60)
        wait_until(lambda: batcher.depth == 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Nearest(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = err.value.details()
        assert details is not None and details.startswith("queue:")
        release.set()
        for fut in (running, waiting_slot, queued):
            assert len(fut.result(timeout=30).neighbors) == 3


def test_expired_deadline_is_not_computed(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    publish(root, make_engine(100, seed=6))
    srv = start_server(index=root, search_threads=1, max_batch=1, max_wait_ms=0)
    release, groups = _block(srv)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        first = stub.Nearest.future(pb.NearestRequest(z=[0.0] * DIM), timeout=60)
        wait_until(lambda: groups)
        doomed_z = [9.0, 9.0, 9.0, 9.0]
        doomed = stub.Nearest.future(pb.NearestRequest(z=doomed_z), timeout=0.2)
        with pytest.raises(grpc.RpcError) as err:
            doomed.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert len(first.result(timeout=30).neighbors) == 10
        # The server answers again, and never searched the expired request.
        assert len(stub.Nearest(pb.NearestRequest(z=[0.0] * DIM, k=2), timeout=10).neighbors) == 2
    searched = [z for _, zs in groups for z in zs]
    assert not any(np.array_equal(z, doomed_z) for z in searched)


def test_a_bad_call_fails_alone_beside_a_batch(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    """Each call is checked by the engine before it joins a batch: bad ones fail at once, and the
    good calls queued beside them are answered by one search, correctly."""
    root = tmp_path / "idx"
    version = publish(root, make_engine(200, seed=6))
    engine = IndexRoot(root).load(version)
    srv = start_server(index=root, search_threads=1, max_batch=64, max_wait_ms=5)
    release, groups = _block(srv)
    good = list(np.random.default_rng(3).normal(size=(12, DIM)))
    bad = [
        (pb.NearestRequest(z=[0.0] * 3, k=5), "z: z must have shape (4,), got (3,)"),
        (pb.NearestRequest(z=[0.0, float("nan"), 0.0, 0.0], k=5), "z: z contains NaN or inf"),
        (pb.NearestRequest(z=[0.0] * DIM, k=5, labels=[99]), "labels: unknown label(s) [99]"),
        (pb.NearestRequest(z=[0.0] * DIM, k=1001), "k: k must be in [1, 1000], got 1001"),
    ]
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        first = stub.Nearest.future(pb.NearestRequest(z=[0.0] * DIM, k=5), timeout=60)
        wait_until(lambda: groups)  # the only search thread is held
        futures = [stub.Nearest.future(pb.NearestRequest(z=z.tolist(), k=5), timeout=60) for z in good]
        wait_until(lambda: srv.server._batcher.pending == 1 + len(good))
        for request, details in bad:  # answered while the good calls still wait for their batch
            with pytest.raises(grpc.RpcError) as err:
                stub.Nearest(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == details
        assert srv.server._batcher.pending == 1 + len(good)
        release.set()
        assert len(first.result(timeout=30).neighbors) == 5
        for z, fut in zip(good, futures, strict=True):
            resp = fut.result(timeout=30)
            expected = engine.search(z, 5)
            assert [n.id for n in resp.neighbors] == expected.ids
            np.testing.assert_array_equal([n.log_likelihood for n in resp.neighbors], expected.scores)
    assert [len(zs) for _, zs in groups] == [1, len(good)]  # one search for all the good calls


def test_bad_settings_name_their_field() -> None:
    executor = ThreadPoolExecutor(1)
    try:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"max_batch": 0}, "max_batch"),
            ({"queue_size": 0}, "queue_size"),
            ({"max_concurrent": 0}, "max_concurrent"),
            ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ]
        for settings, field in cases:
            with pytest.raises(InvalidArgumentError) as err:
                MicroBatcher(lambda key, items: items, executor=executor, **settings)
            assert err.value.field == field and field in err.value.message
    finally:
        executor.shutdown()

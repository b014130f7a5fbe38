"""Fair scheduling: big NearestBatch calls run as bounded chunks of bulk work, small calls go first
between chunks, bulk work never takes every search thread, and chunked answers equal the engine's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentsearch.indexer import IndexRoot
from latentsearch.server.scheduler import SearchThreads, batch_chunks
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


def test_batch_chunks_bound_queries_and_neighbours() -> None:
    assert batch_chunks([10] * 5, max_queries=2) == [range(0, 2), range(2, 4), range(4, 5)]
    # sum(k) <= 100 per chunk; a query above it alone
    assert batch_chunks([60, 30, 20, 150, 5], max_queries=10, max_neighbours=100) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 5),
    ]
    assert batch_chunks([], max_queries=4) == []
    ks = np.random.default_rng(0).integers(1, 300, size=500).tolist()
    chunks = batch_chunks(ks, max_queries=64, max_neighbours=1000)
    assert [i for c in chunks for i in c] == list(range(500))  # every query once, in order
    for c in chunks:
        assert len(c) <= 64 and (len(c) == 1 or sum(ks[i] for i in c) <= 1000)


def _ordered_run(pool: SearchThreads, kinds: str) -> list[str]:
    """Queue tasks named by ``kinds`` ("i": interactive, "b": bulk) behind a blocker on a one-thread
    pool; the order they ran in."""
    ran: list[str] = []
    running, gate = threading.Event(), threading.Event()

    def block() -> None:
        running.set()
        gate.wait(10)

    blocker = pool.submit(block)
    assert running.wait(10)  # taken before anything else is queued
    futures = []
    for n, kind in enumerate(kinds):
        submit = pool.submit if kind == "i" else pool.submit_bulk
        futures.append(submit(ran.append, f"{kind}{n}"))
    gate.set()
    blocker.result(10)
    for f in futures:
        f.result(10)
    return ran


def test_interactive_work_goes_first_and_bulk_work_is_never_starved() -> None:
    pool = SearchThreads(1, bulk_every=2)
    try:
        # Interactive first; after 2 interactive tasks in a row while bulk waits, one bulk task.
        assert _ordered_run(pool, "bbiiiii") == ["i2", "i3", "b0", "i4", "i5", "b1", "i6"]
        assert _ordered_run(pool, "bib") == ["i1", "b0", "b2"]
    finally:
        pool.shutdown()


def test_bulk_work_leaves_a_thread_for_small_calls(wait_until) -> None:
    pool = SearchThreads(2)
    release = threading.Event()
    started: list[int] = []
    try:

        def hold(n: int) -> None:
            started.append(n)
            release.wait(10)

        bulk = [pool.submit_bulk(hold, n) for n in range(3)]
        wait_until(lambda: started)
        time.sleep(0.05)  # give the second thread the chance to (wrongly) start bulk work too
        assert pool.submit(lambda: "small").result(10) == "small"  # while a bulk task blocks
        assert started == [0] and pool.waiting == (0, 2)
        release.set()
        for f in bulk:
            f.result(10)
        assert started == [0, 1, 2]
    finally:
        release.set()
        pool.shutdown()
    with pytest.raises(Exception, match="shut down"):
        pool.submit(print)


@pytest.mark.parametrize("batching", [True, False])
def test_a_small_nearest_is_answered_while_a_big_batch_runs(
    tmp_path: Path, start_server, make_engine, publish, wait_until, batching: bool
) -> None:
    root = tmp_path / "idx"
    version = publish(root, make_engine(2000, seed=5))
    engine = IndexRoot(root).load(version)
    # One search thread: without chunks the Nearest would wait for the whole batch.
    srv = start_server(index=root, search_threads=1, batching=batching, max_batch=8)
    service, pool = srv.server.service, srv.server._executor
    original = service.search_group
    events: list[str] = []
    big_k, small_k = 50, 3

    def recording(snapshot, key, zs):
        if key.k == big_k:
            events.append("chunk")
            if len(events) == 1:  # the first chunk runs: wait until the Nearest is queued behind it
                wait_until(lambda: pool.waiting[0] >= 1, timeout=30)
        else:
            events.append("nearest")
        return original(snapshot, key, zs)

    service.search_group = recording
    rng = np.random.default_rng(2)
    zs = rng.normal(size=(64, DIM))
    batch = pb.NearestBatchRequest(queries=[pb.NearestRequest(z=z.tolist(), k=big_k) for z in zs])
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        big = stub.NearestBatch.future(batch, timeout=60)
        wait_until(lambda: events)  # the batch's first chunk is on the thread
        small = stub.Nearest(pb.NearestRequest(z=zs[0].tolist(), k=small_k), timeout=60)
        reply = big.result(timeout=60)
    assert events.count("chunk") == 8  # 64 queries, 8 per chunk
    assert events.index("nearest") == 1  # answered right after the chunk it waited behind
    assert [n.id for n in small.neighbors] == engine.search(zs[0], small_k).ids
    assert reply.index_version == version and len(reply.results) == len(zs)
    for z, res in zip(zs, reply.results, strict=True):  # chunked answers equal the engine's
        expected = engine.search(z, big_k)
        assert [n.id for n in res.neighbors] == expected.ids
        np.testing.assert_array_equal([n.log_likelihood for n in res.neighbors], expected.scores)

"""Admission control without the batcher (bounded in-flight, expired deadlines) and auth metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from latentsearch.errors import InvalidArgumentError
from latentsearch.server.admission import AdmissionControl
from latentsearch.server.auth import BearerTokenInterceptor
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


def _block(srv, name: str):
    """Make ``service.<name>`` wait for ``release``; record each call."""
    service = srv.server.service
    original = getattr(service, name)
    release, calls = threading.Event(), []

    def blocking(*args):
        calls.append(args)
        assert release.wait(30)
        return original(*args)

    setattr(service, name, blocking)
    return release, calls


def _requests(dim: int = DIM):
    return [
        ("Nearest", pb.NearestRequest(z=[0.0] * dim, k=3)),
        ("NearestBatch", pb.NearestBatchRequest(queries=[pb.NearestRequest(z=[0.0] * dim, k=3)])),
        ("NearestToDistribution", pb.NearestToDistributionRequest(mean=[0.0] * dim, sigma=[1.0] * dim, k=3)),
        ("GetItem", pb.GetItemRequest(id="item1")),
        ("Info", pb.InfoRequest()),
    ]


def _sample(srv, method: str, code: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(
        "latentsearch_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


def test_unbatched_calls_share_a_bounded_inflight_counter(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    publish(tmp_path / "idx", make_engine(200, seed=2))
    srv = start_server(index=tmp_path / "idx", batching=False, queue_size=2, search_threads=1)
    release, calls = _block(srv, "search_group")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        first = stub.Nearest.future(pb.NearestRequest(z=[0.0] * DIM, k=3), timeout=30)
        second = stub.Nearest.future(pb.NearestRequest(z=[1.0] * DIM, k=3), timeout=30)
        wait_until(lambda: srv.server._admission.inflight == 2)
        for method, request in _requests():
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, method
            details = err.value.details()
            assert details is not None and "queue:" in details
            wait_until(lambda m=method: _sample(srv, m, "RESOURCE_EXHAUSTED") == 1)
        release.set()
        assert len(first.result().neighbors) == 3 and len(second.result().neighbors) == 3
        for method, request in _requests():  # admitted again once the counter drains
            getattr(stub, method)(request, timeout=10)
    assert len(calls) == 4  # 2 blocked + Nearest + NearestBatch (grouped by key)
    assert srv.server._admission.inflight == 0


@pytest.mark.parametrize("method", ["Nearest", "NearestBatch", "GetItem"])
def test_expired_deadline_is_not_computed(
    tmp_path: Path, start_server, method: str, make_engine, publish, wait_until
) -> None:
    publish(tmp_path / "idx", make_engine(200, seed=2))
    srv = start_server(index=tmp_path / "idx", batching=False, search_threads=1)
    release, calls = _block(srv, "search_group")
    service = srv.server.service
    ran: list[str] = []
    for name in ("nearest_batch", "get_item"):
        original = getattr(service, name)

        def wrapped(request, _original=original, _name=name):
            ran.append(_name)
            return _original(request)

        setattr(service, name, wrapped)
    requests = dict(_requests())
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        blocker = stub.Nearest.future(pb.NearestRequest(z=[0.0] * DIM, k=3), timeout=30)
        wait_until(lambda: len(calls) == 1)  # the only search thread is busy
        late = getattr(stub, method).future(requests[method], timeout=0.3)
        with pytest.raises(grpc.RpcError) as err:
            late.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert len(blocker.result().neighbors) == 3
        wait_until(lambda: srv.server._admission.inflight == 0)
    assert len(calls) == 1  # the expired Nearest never reached search_group
    assert ran == []  # nor did an expired NearestBatch / GetItem reach the service


def test_rejected_by_auth_are_counted(tmp_path: Path, start_server, make_engine, publish, wait_until) -> None:
    publish(tmp_path / "idx", make_engine(40, seed=3))
    srv = start_server(index=tmp_path / "idx", token="s3cret")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            for method, request in _requests()[:2]:
                with pytest.raises(grpc.RpcError) as err:
                    getattr(stub, method)(request, timeout=10, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
    wait_until(lambda: _sample(srv, "Nearest", "UNAUTHENTICATED") == 2)
    wait_until(lambda: _sample(srv, "NearestBatch", "UNAUTHENTICATED") == 2)
    wait_until(lambda: _sample(srv, "Info", "OK") == 1)
    assert _sample(srv, "Info", "UNAUTHENTICATED") == 0


@pytest.mark.parametrize(("faiss_threads", "expected"), [(None, 1), (3, 3)])
def test_faiss_threads_capped_per_search(
    tmp_path: Path, start_server, faiss_threads, expected, make_engine, publish
) -> None:
    publish(tmp_path / "idx", make_engine(50, seed=3))
    srv = start_server(index=tmp_path / "idx", search_threads=2, faiss_threads=faiss_threads)
    assert srv.server.faiss_threads == expected
    assert srv.server.service.snapshot().engine.config.num_threads == expected


def test_bad_settings_name_their_field() -> None:
    executor = ThreadPoolExecutor(1)
    try:
        with pytest.raises(InvalidArgumentError) as err:
            AdmissionControl(executor=executor, limit=0)
        assert err.value.field == "limit"
    finally:
        executor.shutdown()
    with pytest.raises(InvalidArgumentError) as err:
        BearerTokenInterceptor("")
    assert err.value.field == "token"

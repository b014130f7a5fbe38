"""The Nearest hot path: replies built from batch arrays, plain-Python validation, server settings.

Replies are checked against the engine's per-query results (themselves checked against a float64
brute force in the engine tests); the per-request check against what the engine's search raises.
"""

from __future__ import annotations

import argparse
import gc
import math
from typing import Any

import grpc
import numpy as np
import pytest

from latentsearch.cli.serve import DEFAULT_METRICS_PORT, register_cli, serve_config
from latentsearch.engine import SearchEngine
from latentsearch.errors import InvalidArgumentError
from latentsearch.server import ServerConfig
from latentsearch.server.engine_service import (
    EngineService,
    QueryKey,
    Snapshot,
    is_plain,
    measure_nearest_cost,
    nearest_responses,
)
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


def _expected(engine: SearchEngine, z: np.ndarray, k: int, **kwargs) -> list[pb.NearestResponse]:
    """Replies built the slow, obvious way: one SearchResult per query, one Neighbor per item."""
    out = []
    for res in engine.search_batch(z, k, **kwargs):
        out.append(
            pb.NearestResponse(
                neighbors=[
                    pb.Neighbor(id=n.id, log_likelihood=n.score, label=n.label, rank=n.rank) for n in res
                ],
                index_version="v1",
                mode=pb.MODE_EXACT if res.mode == "exact" else pb.MODE_APPROX,
                certified=res.certified,
            )
        )
    return out


@pytest.mark.parametrize("labels", [None, [0, 2]])
@pytest.mark.parametrize("k", [1, 10, 500])  # 500: more than the bank (and the filtered subset) holds
def test_replies_equal_per_result_replies(labels, k: int, make_engine) -> None:
    engine = make_engine(300, seed=7)
    z = np.random.default_rng(1).normal(size=(9, DIM))
    batch = engine.search_batch_arrays(z, k, labels=labels)
    got = nearest_responses(batch, engine.bank, "v1")
    assert got == _expected(engine, z, k, labels=labels)
    if k == 500:
        want = 300 if labels is None else int(np.isin(engine.bank.labels, labels).sum())
        assert [len(r.neighbors) for r in got] == [want] * 9


def test_replies_without_labels_leave_label_unset() -> None:
    rng = np.random.default_rng(2)
    engine = SearchEngine.build(rng.normal(size=(50, DIM)), log_sigma=rng.uniform(-1, 0, size=(50, DIM)))
    z = rng.normal(size=(3, DIM))
    got = nearest_responses(engine.search_batch_arrays(z, 5), engine.bank, "v1")
    assert got == _expected(engine, z, 5)
    assert not any(n.HasField("label") for r in got for n in r.neighbors)
    assert [n.id for n in got[0].neighbors] == engine.search(z[0], 5).ids  # row numbers as ids


@pytest.fixture
def service(make_engine) -> EngineService:
    service = EngineService()
    service.set_snapshot(Snapshot(version="v1", engine=make_engine(40, seed=3)))
    return service


@pytest.mark.parametrize(
    ("z", "message"),
    [
        ([0.0, 1.0, 2.0], "z must have shape (4,), got (3,)"),
        ([0.0, math.nan, 0.0, 0.0], "z contains NaN or inf"),
        ([0.0, -math.inf, 0.0, 0.0], "z contains NaN or inf"),
        ([0.0, 0.0, 2e6, 0.0], "z coordinates must be within +-1e+06"),
    ],
)
def test_parse_nearest_rejects_bad_points(service: EngineService, z, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        service.parse_nearest(pb.NearestRequest(z=z))
    assert err.value.field == "z" and err.value.message == message


def _outcome(call) -> tuple[str | None, str] | None:
    """``(field, message)`` of the InvalidArgumentError ``call()`` raises, ``None`` when it passes."""
    try:
        call()
    except InvalidArgumentError as exc:
        return exc.field, exc.message
    return None


Z_OK = [0.25, -1.0, 0.5, 3.0]
CHECK_CASES = [  # (z, k, labels): the plain-Python path, and everything it leaves to the array rule
    (Z_OK, 3, None),
    ([0, 1, 2, 3], 3, None),  # ints: valid, though not plain floats
    (np.array(Z_OK), 3, None),
    ([0.0, -1e6, 1e6, 3.0], 3, None),  # the coordinate limit itself
    ([0.0, -1e6 * (1 + 1e-15), 0.0, 0.0], 3, None),
    ([True, False, True, True], 3, None),
    ([[0.0]] * 4, 3, None),
    (["a"] * 4, 3, None),
    (None, 3, None),
    ([0.0] * 5, 3, None),
    ([], 3, None),
    ([0.0, math.nan, 0.0, 0.0], 3, None),
    ([math.inf, 0.0, 0.0, 0.0], 3, None),
    (Z_OK, 0, None),
    (Z_OK, -1, None),
    (Z_OK, 1000, None),
    (Z_OK, 1001, None),
    (Z_OK, 2.0, None),
    (Z_OK, True, None),
    (Z_OK, np.int64(5), None),
    (Z_OK, 3, [2, 1, 2]),
    (Z_OK, 3, [1.0]),
    (Z_OK, 3, (np.int64(3),)),
    (Z_OK, 3, []),
    (Z_OK, 3, [99]),
    (Z_OK, 3, ["a"]),
    (Z_OK, 3, [1.5]),
]


@pytest.mark.parametrize(("z", "k", "labels"), CHECK_CASES)
def test_check_query_raises_what_search_raises(make_engine, z, k, labels) -> None:
    engine = make_engine(40, seed=3)  # labels 0..3, config.max_k 1000
    expected = _outcome(lambda: engine.search(z, k, labels=labels))
    assert _outcome(lambda: engine.check_query(z, k, labels)) == expected
    if expected is None:
        assert engine.check_query(z, k, labels) == (None if labels is None else tuple(sorted(set(labels))))


def test_check_query_without_labels_in_the_bank() -> None:
    rng = np.random.default_rng(2)
    engine = SearchEngine.build(rng.normal(size=(20, DIM)), log_sigma=rng.uniform(-1, 0, size=(20, DIM)))
    expected = _outcome(lambda: engine.search(Z_OK, 3, labels=[1]))
    assert expected is not None and expected[0] == "labels"
    assert _outcome(lambda: engine.check_query(Z_OK, 3, [1])) == expected


def test_parse_nearest_keeps_the_point_and_the_defaults(service: EngineService) -> None:
    z = [0.25, -1e6, 1e6, 3.0]  # the coordinate limit itself is allowed
    query = service.parse_nearest(pb.NearestRequest(z=z, labels=[2, 1, 2]))
    assert query.z == z and all(isinstance(v, float) for v in query.z)
    assert query.key.k == 10 and query.key.labels == (1, 2)
    assert query.key == ("v1", 10, None, (1, 2), None, False)  # no probabilities, no label names


def test_batch_concurrency_is_bounded_by_search_threads() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        ServerConfig(index="x", search_threads=2, batch_concurrency=3)
    assert err.value.field == "batch_concurrency"
    with pytest.raises(InvalidArgumentError):
        ServerConfig(index="x", batch_concurrency=0)
    for name in ("max_k", "max_batch_queries"):
        zero: dict[str, Any] = {name: 0}
        with pytest.raises(InvalidArgumentError) as err:
            ServerConfig(index="x", **zero)
        assert err.value.field == name


@pytest.mark.parametrize("freeze", [False, True])
def test_gc_freeze_after_load(tmp_path, start_server, freeze: bool, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=4))
    gc.unfreeze()
    try:
        start_server(index=tmp_path / "idx", gc_freeze=freeze)
        assert (gc.get_freeze_count() > 0) is freeze
    finally:
        gc.unfreeze()


def test_metrics_count_calls_and_batched_rounds(
    tmp_path, start_server, make_engine, publish, wait_until
) -> None:
    publish(tmp_path / "idx", make_engine(100, seed=5))
    srv = start_server(index=tmp_path / "idx", max_wait_ms=20, inline_search_us=0)  # every call batched
    reg = srv.server.metrics.registry
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        futures = [
            stub.Nearest.future(pb.NearestRequest(z=[0.1 * i] * DIM, k=3), timeout=30) for i in range(12)
        ]
        assert all(len(f.result().neighbors) == 3 for f in futures)
        with pytest.raises(grpc.RpcError):
            stub.Nearest(pb.NearestRequest(z=[0.0]), timeout=10)
    # A call is counted once its handler returns, which can be just after the client has the answer.
    ok, bad = {"method": "Nearest", "code": "OK"}, {"method": "Nearest", "code": "INVALID_ARGUMENT"}
    wait_until(lambda: reg.get_sample_value("latentsearch_requests_total", bad) == 1)
    assert reg.get_sample_value("latentsearch_requests_total", ok) == 12
    rounds = reg.get_sample_value("latentsearch_batch_search_seconds_count")
    assert 1 <= rounds <= 12
    assert rounds == reg.get_sample_value("latentsearch_batch_size_count")
    assert reg.get_sample_value("latentsearch_batch_size_sum") == 12
    assert reg.get_sample_value("latentsearch_batch_search_seconds_sum") > 0


def test_serve_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    flags = "serve --index /srv/idx --max-batch 32 --max-wait-ms 0.5 --threads 3 --batch-concurrency 2"
    config = serve_config(parser.parse_args([*flags.split(), "--faiss-threads", "2", "--metrics-port", "0"]))
    assert (config.max_batch, config.max_wait_ms, config.search_threads) == (32, 0.5, 3)
    assert (config.batch_concurrency, config.faiss_threads, config.metrics_port) == (2, 2, None)
    defaults = serve_config(parser.parse_args(["serve", "--index", "x"]))
    assert defaults.batch_concurrency == ServerConfig(index="x").batch_concurrency == 1
    assert defaults.search_threads == 2 and defaults.metrics_port == DEFAULT_METRICS_PORT == 20051
    with pytest.raises(InvalidArgumentError):
        serve_config(parser.parse_args(["serve", "--index", "x", "--batch-concurrency", "3"]))


def test_cheap_plain_calls_are_answered_inline_and_the_rest_batched(
    tmp_path, start_server, make_engine, publish, wait_until
) -> None:
    """A snapshot whose measured single-query cost is below the inline bound answers plain Nearest
    calls on the event loop (no batched round), with the same replies; filtered calls are batched."""
    engine = make_engine(200, seed=6)
    publish(tmp_path / "idx", engine)
    srv = start_server(index=tmp_path / "idx", max_wait_ms=1, inline_search_us=1e9)  # everything cheap
    snap = srv.server.service.snapshot()
    assert 0 < snap.nearest_cost_s < math.inf
    reg = srv.server.metrics.registry
    z = np.random.default_rng(7).normal(size=(6, DIM))
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        for _ in range(2):
            futures = [stub.Nearest.future(pb.NearestRequest(z=q.tolist(), k=4)) for q in z]
            for f, want in zip(futures, _expected(engine, z, 4), strict=True):
                got = f.result(timeout=30)
                assert list(got.neighbors) == list(want.neighbors)
                assert got.index_version == snap.version
        assert reg.get_sample_value("latentsearch_batch_size_count") in (None, 0.0)  # no round ran
        exact = stub.Nearest(pb.NearestRequest(z=z[0].tolist(), k=4, mode=pb.MODE_EXACT), timeout=30)
        assert [n.id for n in exact.neighbors] == engine.search(z[0], 4, mode="exact").ids
        filtered = stub.Nearest(pb.NearestRequest(z=z[0].tolist(), k=4, labels=[1]), timeout=30)
        assert [n.id for n in filtered.neighbors] == engine.search(z[0], 4, labels=[1]).ids
        big_k = stub.Nearest(pb.NearestRequest(z=z[0].tolist(), k=50), timeout=30)
        assert [n.id for n in big_k.neighbors] == engine.search(z[0], 50).ids
    assert reg.get_sample_value("latentsearch_batch_size_count") == 3  # the three not plain
    ok = {"method": "Nearest", "code": "OK"}
    wait_until(lambda: reg.get_sample_value("latentsearch_requests_total", ok) == 15)


def test_is_plain_names_the_calls_the_cost_is_measured_for(make_engine) -> None:
    engine = make_engine(30, seed=1)
    assert engine.config.mode == "auto"
    plain = QueryKey("v", 10, None, None)
    assert is_plain(plain, engine) and is_plain(plain._replace(mode="auto"), engine)
    for other in (
        plain._replace(k=11),
        plain._replace(mode="exact"),
        plain._replace(labels=(1,)),
        plain._replace(rel_tol=1e-6),
        plain._replace(label_names=True),
    ):
        assert not is_plain(other, engine), other
    assert Snapshot(version="v", engine=engine).nearest_cost_s == math.inf  # not measured: never inline
    assert 0 < measure_nearest_cost(Snapshot(version="v", engine=engine)) < 10

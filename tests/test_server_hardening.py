"""The serving defects of the hardening issue: ports shared or in use, unbounded ids, malformed request
bytes, out-of-range Encode input, and reflection over both of its API versions."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from latentsearch.bank import PosteriorBank
from latentsearch.cli.serve import DEFAULT_METRICS_PORT
from latentsearch.engine.engine import MAX_ABS_COORDINATE, SearchEngine
from latentsearch.errors import (
    FIELD_METADATA_KEY,
    QUOTE_LIMIT,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from latentsearch.model.loader import InputRule, LoadedModel
from latentsearch.model.vae import build_vae
from latentsearch.server import LatentSearchServer, ServerConfig
from latentsearch.server.engine_service import MAX_ID_LENGTH, MAX_NETWORK_INPUT, EngineService, Snapshot
from latentsearch.server.malformed import LOG_INTERVAL, LogThrottle
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

DIM = 4  # latent dimension of conftest's make_engine banks
SHAPE = (8, 8, 1)  # the tiny model's input


@contextlib.contextmanager
def _listening() -> Iterator[int]:
    """A plain TCP socket listening on a free 127.0.0.1 port (no SO_REUSEPORT): the port is in use."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _failed_start(srv, **config) -> UnavailableError:
    """Start a second server on ``srv``'s event loop; the UnavailableError it must fail with."""
    second = LatentSearchServer(ServerConfig(reload_interval=0, gc_freeze=False, **config))
    with pytest.raises(UnavailableError) as err:
        srv.run(second.start())
    return err.value


def _rpc_error(call: Any, request: Any, **kwargs: Any) -> Any:
    """The grpc.RpcError (a grpc.Call too: code(), details(), trailing_metadata()) ``call`` raises."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10, **kwargs)
    return err.value


def _field(error: Any) -> str | None:
    """The request field a failed call's trailing metadata names."""
    for key, value in error.trailing_metadata() or ():
        if key == FIELD_METADATA_KEY:
            return str(value)
    return None


# -- 1, 2: ports --------------------------------------------------------------------------------
def test_second_server_on_the_same_port_fails_and_the_first_keeps_its_index(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    publish(tmp_path / "a", make_engine(30, seed=1))
    publish(tmp_path / "b", make_engine(40, seed=2))
    first = start_server(index=tmp_path / "a")
    metrics_port = _free_port()
    error = _failed_start(first, index=tmp_path / "b", port=first.port, metrics_port=metrics_port)
    assert error.field == "port"
    assert f"port {first.port} is in use" in str(error)
    # Nothing of the failed server stays bound, and every new connection reaches the first one.
    assert _bindable(metrics_port)
    for _ in range(10):
        with grpc.insecure_channel(first.target) as ch:
            assert pb_grpc.LatentSearchStub(ch).Info(pb.InfoRequest(), timeout=10).item_count == 30


def test_reuse_port_lets_workers_share_the_port_on_purpose(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    first = start_server(index=tmp_path / "idx", reuse_port=True)
    second = start_server(index=tmp_path / "idx", reuse_port=True, port=first.port)
    assert second.port == first.port
    # A server that is not meant to share cannot join them.
    assert _failed_start(first, index=tmp_path / "idx", port=first.port).field == "port"


def test_metrics_port_in_use_fails_before_grpc_serves(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    srv = start_server(index=tmp_path / "idx")
    grpc_port = _free_port()
    with _listening() as taken:
        error = _failed_start(srv, index=tmp_path / "idx", port=grpc_port, metrics_port=taken)
    assert error.field == "metrics_port"
    assert f"metrics port {taken} is in use" in str(error)
    assert _bindable(grpc_port)  # the gRPC port was released, never served


def _serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "latentsearch", "-q", "serve", *args],  # -q: warnings and errors only
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_cli_reports_a_port_in_use_in_one_line(tmp_path: Path, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    index = str(tmp_path / "idx")
    with _listening() as taken:
        grpc_taken = _serve_cli("--index", index, "--port", str(taken), "--metrics-port", "0")
        metrics_taken = _serve_cli("--index", index, "--port", "0", "--metrics-port", str(taken))
    for result, message in [
        (grpc_taken, f"error: port {taken} is in use"),
        (metrics_taken, f"error: metrics port {taken} is in use"),
    ]:
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr


# -- 3: GetItem ids -----------------------------------------------------------------------------
def test_row_of_never_raises_for_digit_strings() -> None:
    bank = PosteriorBank(np.zeros((12, 2)), np.zeros((12, 2)))  # no ids: row i is "i"
    assert [bank.row_of(str(i)) for i in range(12)] == list(range(12))
    assert bank.row_of(7) == 7
    keys: list[str | int] = ["12", "05", "00", "-1", " 1", "", "\u00b2", "\u0663"]  # superscript 2, Arabic 3
    for key in [*keys, "9" * 5000, "1" + "0" * 4400, 10**5000]:
        with pytest.raises(NotFoundError) as err:
            bank.row_of(key)
        assert err.value.field == "id"
        assert len(str(err.value)) < 200


@pytest.fixture
def id_banks(tmp_path: Path, start_server, publish, make_engine):
    """Two servers: one over a bank without ids (rows are "0".."N-1"), one over named ids including
    one of exactly MAX_ID_LENGTH characters."""
    rng = np.random.default_rng(3)
    plain = SearchEngine.build(rng.normal(size=(20, DIM)), log_sigma=np.zeros((20, DIM)))
    publish(tmp_path / "plain", plain)
    longest = "x" * MAX_ID_LENGTH
    named = SearchEngine.build(
        rng.normal(size=(3, DIM)), log_sigma=np.zeros((3, DIM)), ids=["a", "b", longest]
    )
    publish(tmp_path / "named", named)
    return start_server(index=tmp_path / "plain"), start_server(index=tmp_path / "named"), named


def test_get_item_bounds_ids_and_never_echoes_them(id_banks) -> None:
    plain, named, engine = id_banks
    with grpc.insecure_channel(plain.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        assert stub.GetItem(pb.GetItemRequest(id="19"), timeout=10).id == "19"
        for digits in (4301, 5000):  # Python refuses int() of these: INTERNAL before
            error = _rpc_error(stub.GetItem, pb.GetItemRequest(id="9" * digits))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "id"
        error = _rpc_error(stub.GetItem, pb.GetItemRequest(id="9" * MAX_ID_LENGTH))
        assert error.code() == grpc.StatusCode.NOT_FOUND and _field(error) == "id"
        assert f"({MAX_ID_LENGTH} characters)" in error.details() and len(error.details()) < 200
    with grpc.insecure_channel(named.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        longest = engine.bank.ids[2]
        got = stub.GetItem(pb.GetItemRequest(id=longest), timeout=10)  # the longest id is served
        assert got.id == longest and list(got.mean) == engine.bank.mu[2].tolist()
        # 17 KB: the client received RESOURCE_EXHAUSTED (metadata size) for the echoed id before.
        error = _rpc_error(stub.GetItem, pb.GetItemRequest(id="y" * 17_000))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "id"
        assert error.details() == f"id: id has 17000 characters; ids are at most {MAX_ID_LENGTH}"


# -- 4: malformed request bytes -----------------------------------------------------------------
def _raw(channel: grpc.Channel, path: str):
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


_TRUNCATED = pb.NearestRequest(z=[0.5] * DIM, k=3).SerializeToString()[:-5]
_GARBAGE = [b"\xff\xff\xff\xff", _TRUNCATED, bytes(range(256)) * 4]


def test_malformed_bytes_answer_invalid_argument_counted_and_logged_briefly(
    tmp_path: Path, start_server, make_engine, publish, caplog
) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    srv = start_server(index=tmp_path / "idx")
    registry = srv.server.metrics.registry
    methods = ["Nearest", "GetItem", "Encode", "NearestBatch"]
    rounds = 25
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    with grpc.insecure_channel(srv.target) as ch:
        for _ in range(rounds):
            for method in methods:
                for data in _GARBAGE:
                    error = _rpc_error(_raw(ch, f"/latentsearch.v1.LatentSearch/{method}"), data)
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
                    assert _field(error) == "request" and error.details().startswith("request: ")
        # The open health service too (it parses first as well).
        error = _rpc_error(_raw(ch, "/grpc.health.v1.Health/Check"), b"\xff\xff")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A well-formed call still works.
        assert pb_grpc.LatentSearchStub(ch).Info(pb.InfoRequest(), timeout=10).item_count == 30
    elapsed = time.monotonic() - start
    for method in methods:
        calls = rounds * len(_GARBAGE)
        assert registry.get_sample_value("latentsearch_malformed_requests_total", {"method": method}) == calls
        labels = {"method": method, "code": "INVALID_ARGUMENT"}
        assert registry.get_sample_value("latentsearch_requests_total", labels) == calls
    # 301 malformed calls: a line per 10 s at most, none with a traceback, nothing from grpc itself.
    records = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(records) <= 1 + elapsed / 10
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith("grpc")]


def test_malformed_bytes_without_the_token_are_unauthenticated(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    srv = start_server(index=tmp_path / "idx", token="s3cret")
    registry = srv.server.metrics.registry
    with grpc.insecure_channel(srv.target) as ch:
        call = _raw(ch, "/latentsearch.v1.LatentSearch/Nearest")
        for data in _GARBAGE:
            assert _rpc_error(call, data).code() == grpc.StatusCode.UNAUTHENTICATED
            error = _rpc_error(call, data, metadata=(("authorization", "Bearer s3cret"),))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    unauthenticated = {"method": "Nearest", "code": "UNAUTHENTICATED"}
    assert registry.get_sample_value("latentsearch_requests_total", unauthenticated) == len(_GARBAGE)
    assert registry.get_sample_value("latentsearch_malformed_requests_total", {"method": "Nearest"}) == len(
        _GARBAGE
    )


def test_log_throttle_counts_what_it_leaves_out(caplog) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("test.throttle"), 10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.throttle")
    logged = []
    for t in [100.0, 101.0, 105.0, 109.9, 110.0, 110.5, 125.0]:
        now[0] = t
        logged.append(throttle.warning("bad %s", t))
    assert logged == [True, False, False, False, True, False, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad 100.0",
        "bad 110.0 (and 3 more since the last such line, not logged)",
        "bad 125.0 (and 1 more since the last such line, not logged)",
    ]


# -- 5: Encode input range ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae(input_shape=SHAPE, latent_dim=DIM, channels=(4,), hidden=16)


def _loaded(vae, input_rule: InputRule = "pixels") -> LoadedModel:
    return LoadedModel(
        vae,
        input_shape=SHAPE,
        latent_dim=DIM,
        model_hash="test",
        config={},
        device=torch.device("cpu"),
        source="checkpoint",
        input_rule=input_rule,
    )


def test_encode_refuses_out_of_range_values_and_nearest_takes_what_it_returns(
    tmp_path: Path, start_server, make_engine, publish, tiny_vae
) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    scale = tiny_vae.config.normalization.scale  # raw pixels / 255: the network sees [0, 1]
    assert scale == pytest.approx(1 / 255)
    size = int(np.prod(SHAPE))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    # values is a repeated float (float32) field: 3e38 is the largest magnitude it carries.
    # "pixels": floats are byte / 255 in [0, 1]; "float": as they are, within +-MAX_NETWORK_INPUT
    # once the model normalises them.
    cases: dict[InputRule, tuple[list[float], list[tuple[float, float]], bool]] = {
        "pixels": ([3e38, -3e38, 1.001, -0.001], [(0, 1), (0, 0.01)], True),
        "float": (
            [3e38, -3e38, 10 * MAX_NETWORK_INPUT / scale],
            [(0, 255), (-255, 510), (0, 0.1 * MAX_NETWORK_INPUT / scale)],
            False,
        ),
    }
    for rule, (bad, good, takes_raw) in cases.items():
        srv = start_server(index=tmp_path / "idx", model=_loaded(tiny_vae, rule))
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LatentSearchStub(ch)
            for value in bad:
                error = _rpc_error(stub.Encode, pb.EncodeRequest(shape=list(SHAPE), values=[value] * size))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "values", value
                assert "out of range" in error.details()
            inputs = [
                pb.EncodeRequest(shape=list(SHAPE), values=rng.uniform(lo, hi, size).tolist())
                for lo, hi in good
            ]
            raw = pb.EncodeRequest(shape=list(SHAPE), raw=pixels)
            if takes_raw:
                inputs.append(raw)
            else:
                error = _rpc_error(stub.Encode, raw)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "raw"
            for request in inputs:
                posterior = stub.Encode(request, timeout=10)
                assert np.isfinite(posterior.mean).all() and (np.asarray(posterior.sigma) > 0).all()
                neighbors = stub.Nearest(pb.NearestRequest(z=posterior.mean, k=3), timeout=10).neighbors
                assert len(neighbors) == 3
        srv.close()


def test_encode_refuses_a_posterior_the_engine_cannot_search(tiny_vae, make_engine) -> None:
    raw = pb.EncodeRequest(shape=list(SHAPE), raw=bytes(range(64)))
    for factor, expected in [(1e12, "|mean| up to"), (float("nan"), "NaN or inf")]:
        vae = build_vae(input_shape=SHAPE, latent_dim=DIM, channels=(4,), hidden=16)
        vae.load_state_dict(tiny_vae.state_dict())
        with torch.no_grad():
            for p in vae.enc_head.parameters():
                p.mul_(factor)
        service = EngineService()
        service.set_snapshot(Snapshot(version="v", engine=make_engine(30, dim=DIM), model=_loaded(vae)))
        mean = _loaded(vae).encode(np.frombuffer(raw.raw, np.uint8).reshape(1, *SHAPE))[0].numpy().mean
        assert not (np.abs(mean) <= MAX_ABS_COORDINATE).all()  # what Nearest would refuse
        with pytest.raises(InvalidArgumentError) as err:
            service.encode(raw)
        assert err.value.field == "raw" and expected in err.value.message


# -- 14: reflection v1 and v1alpha --------------------------------------------------------------
def _reflect(channel: grpc.Channel, version: str, request: reflection_pb2.ServerReflectionRequest):
    # v1 and v1alpha messages are field for field the same (grpc's reflection.proto files), so the
    # v1alpha classes encode a v1 call's messages too.
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=10))
    return response


def test_reflection_answers_v1_and_v1alpha(tmp_path: Path, start_server, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=1))
    srv = start_server(index=tmp_path / "idx")
    expected = {
        "latentsearch.v1.LatentSearch",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    with grpc.insecure_channel(srv.target) as ch:
        for version in ("v1", "v1alpha"):
            listed = _reflect(ch, version, reflection_pb2.ServerReflectionRequest(list_services=""))
            assert {s.name for s in listed.list_services_response.service} == expected, version
            for symbol, package in [
                ("latentsearch.v1.LatentSearch", "latentsearch.v1"),
                ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1"),
            ]:
                request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
                answer = _reflect(ch, version, request)
                files = [
                    descriptor_pb2.FileDescriptorProto.FromString(b)
                    for b in answer.file_descriptor_response.file_descriptor_proto
                ]
                assert files and files[0].package == package, (version, symbol)
            v1 = files[0].service[0].method[0]
            assert v1.name == "ServerReflectionInfo"
            assert v1.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
        # Garbage on the reflection stream is refused like any other request.
        call: Any = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([b"\xff\xff\xff"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Health answers as before through its guarded handler.
        check = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        status = check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_readme_states_the_limits_the_code_has() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert f"port {DEFAULT_METRICS_PORT}" in section
    assert f"at most {MAX_ID_LENGTH} characters (`MAX_ID_LENGTH`" in section
    assert f"more than {QUOTE_LIMIT} characters" in section
    assert f"within +-{MAX_NETWORK_INPUT:g} (`MAX_NETWORK_INPUT`" in section
    assert f"+-{MAX_ABS_COORDINATE:.0e} coordinate limit".replace("e+0", "e") in section  # +-1e6
    assert f"one line per {LOG_INTERVAL:g} s" in section

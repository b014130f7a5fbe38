"""The HTTP/JSON API against the gRPC service of the same server (and the engine) for the same input;
every bad input with its HTTP status and the gRPC message; the OpenAPI document against the routes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from latentsearch.errors import InvalidArgumentError, UnavailableError
from latentsearch.indexer import IndexRoot
from latentsearch.server import LatentSearchServer, ServerConfig
from latentsearch.server.jsonpb import message_from_json, message_to_json
from latentsearch.server.openapi import OPERATIONS
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of conftest's make_engine banks (its default)
OCTETS = "application/octet-stream"

pytestmark = pytest.mark.timeout(120)


class Reply:
    """One HTTP answer: status, headers, body."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    base: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """GET ``path`` (POST when there is a body: ``body`` as JSON, or ``raw`` bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


@pytest.fixture
def served(tmp_path: Path, start_server, tiny_model, make_engine, publish):
    version = publish(tmp_path / "idx", make_engine(300, seed=1), model_hash=tiny_model.model_hash)
    engine = IndexRoot(tmp_path / "idx").load(version)
    srv = start_server(index=tmp_path / "idx", model=tiny_model, http_port=0, max_batch_queries=8)
    with grpc.insecure_channel(srv.target) as channel:
        yield srv, f"http://127.0.0.1:{srv.server.http_port}", pb_grpc.LatentSearchStub(channel), engine


def test_nearest_and_distribution_match_grpc_and_engine(served) -> None:
    _, base, stub, engine = served
    rng = np.random.default_rng(5)
    cases = [
        (10, [], pb.MODE_UNSPECIFIED, None, False),
        (3, [1, 2], pb.MODE_EXACT, "exact", True),
        (50, [], pb.MODE_APPROX, "approx", True),
        (0, [0], pb.MODE_UNSPECIFIED, None, False),
    ]
    for k, labels, mode, mode_name, prob in cases:
        z = rng.normal(size=DIM).tolist()
        body = {"z": z, "k": k, "labels": labels, "mode": pb.SearchMode.Name(mode), "with_probability": prob}
        got = http(base, "/api/v1/nearest", body)
        assert got.status == 200, got.body
        expected = stub.Nearest(pb.NearestRequest(z=z, k=k, labels=labels, mode=mode, with_probability=prob))
        assert got.json() == message_to_json(expected)
        result = engine.search(np.array(z), k or 10, labels=labels or None, mode=mode_name)
        assert [n["id"] for n in got.json()["neighbors"]] == result.ids
        np.testing.assert_array_equal([n["log_likelihood"] for n in got.json()["neighbors"]], result.scores)
        assert ("log_qz" in got.json()) == prob

    zs = rng.normal(size=(3, DIM)).tolist()
    got = http(base, "/api/v1/nearest_batch", {"queries": [{"z": z, "k": 4} for z in zs]})
    expected = stub.NearestBatch(pb.NearestBatchRequest(queries=[pb.NearestRequest(z=z, k=4) for z in zs]))
    assert got.status == 200 and got.json() == message_to_json(expected)

    mean, sigma = rng.normal(size=DIM).tolist(), rng.uniform(0.1, 1.0, size=DIM).tolist()
    body = {"mean": mean, "sigma": sigma, "k": 6, "labels": [0, 3], "with_probability": True}
    got = http(base, "/api/v1/nearest_to_distribution", body)
    expected_d = stub.NearestToDistribution(
        pb.NearestToDistributionRequest(mean=mean, sigma=sigma, k=6, labels=[0, 3], with_probability=True)
    )
    assert got.status == 200 and got.json() == message_to_json(expected_d)
    ref = engine.search_distribution(np.array(mean), np.array(sigma), 6, labels=[0, 3])
    assert [n["id"] for n in got.json()["neighbors"]] == ref.ids


def test_item_info_health_match_grpc(served) -> None:
    srv, base, stub, engine = served

    def answered(method: str, code: str = "OK") -> float:
        labels = {"method": method, "code": code}
        return srv.server.metrics.registry.get_sample_value("latentsearch_requests_total", labels) or 0.0

    before = answered("GetItem"), answered("GetItem", "NOT_FOUND")
    http(base, "/api/v1/item?id=item3")
    http(base, "/api/v1/item?id=nope")
    # HTTP calls go through the gRPC servicer's methods: counted there like gRPC calls.
    assert (answered("GetItem"), answered("GetItem", "NOT_FOUND")) == (before[0] + 1, before[1] + 1)
    got = http(base, "/api/v1/item?id=item17")
    assert got.status == 200 and got.json() == message_to_json(stub.GetItem(pb.GetItemRequest(id="item17")))
    row = engine.bank.row_of("item17")
    np.testing.assert_array_equal(got.json()["mean"], engine.bank.mu[row])
    got = http(base, "/api/v1/info")
    assert got.status == 200 and got.json() == message_to_json(stub.Info(pb.InfoRequest()))
    assert got.json()["item_count"] == 300 and got.json()["latent_dim"] == DIM
    health = http(base, "/api/v1/health")
    assert health.status == 200
    assert health.json() == {"status": "SERVING", "index_version": got.json()["index_version"]}
    labels = np.asarray(engine.bank.labels)
    seen = set()
    for _ in range(30):
        item = http(base, "/api/v1/item/random?labels=1,3").json()
        assert item == message_to_json(stub.GetItem(pb.GetItemRequest(id=item["id"])))
        assert labels[engine.bank.row_of(item["id"])] in (1, 3)
        seen.add(item["id"])
    assert len(seen) > 5  # random, not one item


def test_encode_decode_match_grpc(served, tiny_model) -> None:
    _, base, stub, _ = served
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
    expected = message_to_json(stub.Encode(pb.EncodeRequest(shape=[8, 8, 1], raw=image.tobytes())))
    raw64 = base64.b64encode(image.tobytes()).decode()
    png = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(png, format="PNG")
    for reply in (
        http(base, "/api/v1/encode", {"shape": [8, 8, 1], "raw": raw64}),
        http(base, "/api/v1/encode", raw=png.getvalue(), content_type="image/png"),
        http(base, "/api/v1/encode?shape=8,8,1", raw=image.tobytes(), content_type=OCTETS),
    ):
        assert reply.status == 200, reply.body
        assert reply.json() == expected
    mu, _ = tiny_model.encode_params(image[None])
    np.testing.assert_allclose(expected["mean"], mu[0].double().numpy(), rtol=1e-6, atol=1e-6)
    floats = (image.ravel() / 255.0).tolist()  # the input rule for float values (the proto's EncodeRequest)
    values = http(base, "/api/v1/encode", {"shape": [8, 8, 1], "values": floats})
    assert values.status == 200, values.body
    assert values.json() == message_to_json(stub.Encode(pb.EncodeRequest(shape=[8, 8, 1], values=floats)))

    z = [0.5, -0.2, 0.1, 1.0]
    grpc_reply = stub.Decode(pb.DecodeRequest(z=z))
    got = http(base, "/api/v1/decode", {"z": z})
    assert got.status == 200 and got.json() == message_to_json(grpc_reply)
    assert base64.b64decode(got.json()["png"]) == grpc_reply.png
    for reply in (
        http(base, "/api/v1/decode?format=png", {"z": z}),
        http(base, "/api/v1/decode", {"z": z}, headers={"Accept": "image/png"}),
    ):
        assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
        assert reply.body == grpc_reply.png
    pixels = np.asarray(Image.open(io.BytesIO(grpc_reply.png)))
    expected_px = np.rint(tiny_model.decode(np.array(z)[None])[0].numpy()[:, :, 0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected_px)


def test_catalogue_thumbnail_diagnostics_and_names(catalogue_index: Path, start_server) -> None:
    srv = start_server(index=catalogue_index, http_port=0)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LatentSearchStub(channel)
        info = stub.Info(pb.InfoRequest())
        got = http(base, "/api/v1/info").json()
        assert got == message_to_json(info)
        assert got["label_names"] == ["disc", "ring", "bar"] and len(got["diagnostics"]["kl"]) == DIM
        item = stub.GetItem(pb.GetItemRequest(id="img007"))
        assert item.thumbnail_png and item.label_name == "ring"
        thumb = http(base, "/api/v1/item/thumbnail?id=img007")
        assert thumb.status == 200 and thumb.headers["Content-Type"] == "image/png"
        assert thumb.body == item.thumbnail_png
        assert http(base, "/api/v1/item?id=img007").json() == message_to_json(item)
        body = {"z": [0.0] * DIM, "k": 4, "with_label_names": True}
        near = stub.Nearest(pb.NearestRequest(z=[0.0] * DIM, k=4, with_label_names=True))
        assert http(base, "/api/v1/nearest", body).json() == message_to_json(near)
        assert all(n.label_name in ("disc", "ring", "bar") for n in near.neighbors)


# (path, JSON body, gRPC method, the same request as a message, HTTP status)
SAME_AS_GRPC: list[tuple[str, Any, str, Any, int]] = [
    ("/api/v1/nearest", {"z": [0.0] * 3}, "Nearest", pb.NearestRequest(z=[0.0] * 3), 400),
    ("/api/v1/nearest", {"z": [0, "NaN", 0, 0]}, "Nearest", pb.NearestRequest(z=[0, math.nan, 0, 0]), 400),
    ("/api/v1/nearest", {"z": [0, 0, -2e6, 0]}, "Nearest", pb.NearestRequest(z=[0, 0, -2e6, 0]), 400),
    ("/api/v1/nearest", {"z": [0.0] * 4, "k": 1001}, "Nearest", pb.NearestRequest(z=[0.0] * 4, k=1001), 400),
    ("/api/v1/nearest", {"z": [0.0] * 4, "labels": [99]}, "Nearest",
     pb.NearestRequest(z=[0.0] * 4, labels=[99]), 400),
    ("/api/v1/nearest", {"z": [0.0] * 4, "mode": 7}, "Nearest",
     pb.NearestRequest(z=[0.0] * 4, mode=pb.SearchMode.ValueType(7)), 400),
    ("/api/v1/nearest", {"z": [0.0] * 4, "with_probability": True, "rel_tol": 2.0}, "Nearest",
     pb.NearestRequest(z=[0.0] * 4, with_probability=True, rel_tol=2.0), 400),
    ("/api/v1/nearest_batch", {}, "NearestBatch", pb.NearestBatchRequest(), 400),
    ("/api/v1/nearest_batch", {"queries": [{"z": [0.0] * 4}] * 9}, "NearestBatch",
     pb.NearestBatchRequest(queries=[pb.NearestRequest(z=[0.0] * 4)] * 9), 400),
    ("/api/v1/nearest_batch", {"queries": [{"z": [0.0] * 4}, {"z": [1.0]}]}, "NearestBatch",
     pb.NearestBatchRequest(queries=[pb.NearestRequest(z=[0.0] * 4), pb.NearestRequest(z=[1.0])]), 400),
    ("/api/v1/nearest_to_distribution", {"mean": [0.0] * 4, "sigma": [1, 0, 1, 1]}, "NearestToDistribution",
     pb.NearestToDistributionRequest(mean=[0.0] * 4, sigma=[1, 0, 1, 1]), 400),
    ("/api/v1/nearest_to_distribution", {"mean": [0.0] * 4, "sigma": [1.0] * 3}, "NearestToDistribution",
     pb.NearestToDistributionRequest(mean=[0.0] * 4, sigma=[1.0] * 3), 400),
    ("/api/v1/encode", {"shape": [8, 8, 3], "raw": base64.b64encode(bytes(192)).decode()}, "Encode",
     pb.EncodeRequest(shape=[8, 8, 3], raw=bytes(192)), 400),
    ("/api/v1/encode", {"shape": [8, 8, 1], "raw": base64.b64encode(bytes(10)).decode()}, "Encode",
     pb.EncodeRequest(shape=[8, 8, 1], raw=bytes(10)), 400),
    ("/api/v1/encode", {"shape": [8, 8, 1]}, "Encode", pb.EncodeRequest(shape=[8, 8, 1]), 400),
    ("/api/v1/encode", {"shape": [8, 8, 1], "values": [1e9] * 64}, "Encode",
     pb.EncodeRequest(shape=[8, 8, 1], values=[1e9] * 64), 400),
    ("/api/v1/decode", {"z": [0.0] * 5}, "Decode", pb.DecodeRequest(z=[0.0] * 5), 400),
    ("/api/v1/item?id=nope", None, "GetItem", pb.GetItemRequest(id="nope"), 404),
    (f"/api/v1/item?id={'x' * 2000}", None, "GetItem", pb.GetItemRequest(id="x" * 2000), 400),
]


def _grpc_error(stub: Any, method: str, request: Any) -> tuple[str, str, str | None]:
    """(status code name, details, field metadata) of a failing gRPC call."""
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=10)
    metadata: Any = err.value.trailing_metadata() or ()
    field = dict(metadata).get("latentsearch-field")
    return err.value.code().name, str(err.value.details()), field


def test_bad_inputs_answer_the_grpc_message_with_an_http_status(served) -> None:
    _, base, stub, _ = served
    for path, body, method, request, status in SAME_AS_GRPC:
        got = http(base, path, body)
        code, details, field = _grpc_error(stub, method, request)
        assert got.status == status, (path, body, got.body)
        assert got.json() == {"error": {"code": code, "message": details, "field": field}}, path
        assert field and details.startswith(f"{field}:")


# Refused by the HTTP layer before any message exists: (path, body, raw content type or None, field)
HTTP_ONLY: list[tuple[str, Any, str | None, str, str]] = [
    ("/api/v1/nearest", b"{not json", "application/json", "body", "not JSON"),
    ("/api/v1/nearest", [1, 2], None, "body", "must be a JSON object"),
    ("/api/v1/nearest", {"zz": [0.0]}, None, "zz", "unknown field 'zz'"),
    ("/api/v1/nearest", {"z": "0,0,0,0"}, None, "z", "must be a JSON array"),
    ("/api/v1/nearest", {"z": [0, "a", 0, 0]}, None, "z[1]", "must be a number"),
    ("/api/v1/nearest", {"z": [0, True, 0, 0]}, None, "z[1]", "must be a number"),
    ("/api/v1/nearest", {"z": [0.0] * 4, "k": -1}, None, "k", "must be an integer in [0, 4294967295]"),
    ("/api/v1/nearest", {"z": [0.0] * 4, "k": 2.5}, None, "k", "must be an integer"),
    ("/api/v1/nearest", {"z": [0.0] * 4, "mode": "fast"}, None, "mode", "must be one of MODE_UNSPECIFIED"),
    ("/api/v1/nearest", {"z": [0.0] * 4, "with_probability": 1}, None, "with_probability", "true or false"),
    ("/api/v1/nearest_batch", {"queries": [{"z": [0.0] * 4}, {"k": "x"}]}, None, "queries[1].k", "integer"),
    ("/api/v1/encode", {"shape": [8, 8, 1], "raw": "%%%"}, None, "raw", "not valid base64"),
    ("/api/v1/encode", b"not a png", "image/png", "body", "not an image"),
    ("/api/v1/encode", bytes(64), "application/octet-stream", "shape", "needs the shape query parameter"),
    ("/api/v1/encode?shape=8,x", bytes(64), "application/octet-stream", "shape", "integers separated"),
    ("/api/v1/item", None, None, "id", "the id query parameter is required"),
    ("/api/v1/item/thumbnail", None, None, "id", "the id query parameter is required"),
    ("/api/v1/item/random?labels=a", None, None, "labels", "integers separated by commas"),
]


def test_bad_inputs_of_the_http_layer_name_the_field(served) -> None:
    _, base, _, _ = served
    for path, body, kind, field, text in HTTP_ONLY:
        got = http(base, path, body) if kind is None else http(base, path, raw=body, content_type=kind)
        assert got.status == 400, (path, got.body)
        error = got.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field, (path, error)
        assert error["message"].startswith(f"{field}: ") and text in error["message"], (path, error)
    got = http(base, "/api/v1/item/random?labels=77")
    assert got.status == 404 and got.json()["error"]["field"] == "labels"
    # The server still answers.
    assert http(base, "/api/v1/nearest", {"z": [0.0] * 4, "k": 2}).status == 200


def test_no_index_no_model_no_thumbnail(tmp_path: Path, start_server, make_engine, publish) -> None:
    IndexRoot(tmp_path / "empty", create=True)
    srv = start_server(index=tmp_path / "empty", http_port=0)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LatentSearchStub(channel)
        for path, body, method, request in [
            ("/api/v1/nearest", {"z": [0.0] * 4}, "Nearest", pb.NearestRequest(z=[0.0] * 4)),
            ("/api/v1/info", None, "Info", pb.InfoRequest()),
            ("/api/v1/item?id=0", None, "GetItem", pb.GetItemRequest(id="0")),
        ]:
            got = http(base, path, body)
            code, details, field = _grpc_error(stub, method, request)
            assert got.status == 503 and code == "UNAVAILABLE", got.body
            assert got.json()["error"] == {"code": code, "message": details, "field": field}
    health = http(base, "/api/v1/health")
    assert health.status == 503 and health.json() == {"status": "NOT_SERVING", "index_version": None}

    publish(tmp_path / "idx", make_engine(30, seed=4))
    srv = start_server(index=tmp_path / "idx", http_port=0)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LatentSearchStub(channel)
        got = http(base, "/api/v1/decode", {"z": [0.0] * 4})
        code, details, field = _grpc_error(stub, "Decode", pb.DecodeRequest(z=[0.0] * 4))
        assert got.status == 409 and code == "FAILED_PRECONDITION"
        assert got.json()["error"] == {"code": code, "message": details, "field": field}
    got = http(base, "/api/v1/item/thumbnail?id=item3")  # posteriors only: no pixels stored
    assert got.status == 404 and got.json()["error"]["field"] == "id"
    assert "no thumbnail" in got.json()["error"]["message"]


def test_full_queue_answers_429(tmp_path: Path, start_server, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=4))
    srv = start_server(index=tmp_path / "idx", http_port=0, queue_size=1, batching=False)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    release = threading.Event()
    admission = srv.server._admission
    assert admission is not None
    holder = srv.submit(admission.run(release.wait, 30))  # takes the one place in the queue
    try:
        srv.run(_until(lambda: admission.inflight == 1))
        got = http(base, "/api/v1/info")
        with grpc.insecure_channel(srv.target) as channel:
            code, details, field = _grpc_error(pb_grpc.LatentSearchStub(channel), "Info", pb.InfoRequest())
        assert got.status == 429 and got.headers["Retry-After"] == "1"
        assert got.json()["error"] == {"code": code, "message": details, "field": field}
        assert code == "RESOURCE_EXHAUSTED"
    finally:
        release.set()
        holder.result(10)
    assert http(base, "/api/v1/info").status == 200


async def _until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


def test_bearer_token_and_open_routes(tmp_path: Path, start_server, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(30, seed=4))
    srv = start_server(index=tmp_path / "idx", http_port=0, token="s3cret")
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with grpc.insecure_channel(srv.target) as channel:
        code, details, _ = _grpc_error(pb_grpc.LatentSearchStub(channel), "Info", pb.InfoRequest())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for path, body in (("/api/v1/info", None), ("/api/v1/nearest", {"z": [0.0] * 4})):
            got = http(base, path, body, headers=headers)
            assert got.status == 401 and got.headers["WWW-Authenticate"] == "Bearer"
            assert got.json()["error"]["message"] == details and got.json()["error"]["code"] == code
    ok = {"Authorization": "Bearer s3cret"}
    assert http(base, "/api/v1/info", headers=ok).json()["item_count"] == 30
    for path in ("/api/v1/health", "/openapi.json", "/", "/static/explorer.js"):
        assert http(base, path).status == 200, path  # open, as gRPC health is


def test_tls_uses_the_grpc_certificate(
    tmp_path: Path, start_server, make_engine, publish, self_signed
) -> None:
    cert, key = self_signed
    version = publish(tmp_path / "idx", make_engine(30, seed=4))
    srv = start_server(index=tmp_path / "idx", http_port=0, tls_cert=cert, tls_key=key)
    port = srv.server.http_port
    context = ssl.create_default_context(cafile=str(cert))
    got = http(f"https://localhost:{port}", "/api/v1/info", context=context)
    assert got.status == 200 and got.json()["index_version"] == version
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to a TLS port: no answer
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5).read()


def test_http_port_in_use_and_bad_key_fail_before_serving(tmp_path: Path, self_signed) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        server = LatentSearchServer(ServerConfig(index=tmp_path, port=0, http_port=busy, reload_interval=0))
        with pytest.raises(UnavailableError) as err:
            asyncio.run(server.start())
    assert err.value.field == "http_port" and f"HTTP port {busy} is in use" in err.value.message
    cert, _ = self_signed
    wrong = tmp_path / "other.pem"
    wrong.write_text(cert.read_text())  # a certificate where the key belongs
    config = ServerConfig(index=tmp_path, port=0, http_port=0, tls_cert=cert, tls_key=wrong)
    server = LatentSearchServer(config)
    with pytest.raises(InvalidArgumentError) as bad:
        asyncio.run(server.start())
    assert bad.value.field == "tls_cert"


def test_serve_flag() -> None:
    from latentsearch.cli import build_parser
    from latentsearch.cli.serve import serve_config

    parse = build_parser().parse_args
    assert serve_config(parse(["serve", "--index", "IDX"])).http_port is None  # off by default
    assert serve_config(parse(["serve", "--index", "IDX", "--http-port", "20080"])).http_port == 20080


def test_openapi_documents_every_route(served) -> None:
    srv, base, _, _ = served
    doc = http(base, "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    api = srv.server._http
    assert api is not None
    routes = {(r.method, r.resource.canonical) for r in api.app.router.routes() if r.method != "HEAD"}
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    assert len(routes) == len(OPERATIONS)
    # Request schemas hold every proto field, so a new field is documented without an edit.
    for name, message in (("NearestRequest", pb.NearestRequest), ("InfoResponse", pb.InfoResponse)):
        props = doc["components"]["schemas"][name]["properties"]
        assert set(props) == {f.name for f in message.DESCRIPTOR.fields}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["security"] == ([] if path in ("/api/v1/health", "/openapi.json", "/", "/static/{name}")
                                      else [{"bearer": []}])


def test_json_mapping_round_trips_every_field_kind() -> None:
    msg = pb.NearestBatchRequest(
        queries=[pb.NearestRequest(z=[1.5, float("inf")], k=3, labels=[2**40], mode=pb.MODE_APPROX,
                                   with_probability=True, rel_tol=0.0)]
    )
    obj = message_to_json(msg)
    assert obj["queries"][0]["z"] == [1.5, "Infinity"] and obj["queries"][0]["labels"] == [2**40]
    assert obj["queries"][0]["mode"] == "MODE_APPROX" and obj["queries"][0]["rel_tol"] == 0.0
    assert message_from_json(pb.NearestBatchRequest, json.loads(json.dumps(obj))) == msg
    assert "rel_tol" not in message_to_json(pb.NearestRequest())  # optional and unset: absent
    assert message_to_json(pb.NearestRequest())["k"] == 0  # implicit presence: always there
    enc = pb.EncodeRequest(shape=[2], raw=b"\x00\xff")
    assert message_from_json(pb.EncodeRequest, message_to_json(enc)) == enc

"""Every RPC against a real server, checked against the engine called directly; every bad input."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from latentsearch.client import LatentSearchClient
from latentsearch.errors import UnauthenticatedError
from latentsearch.indexer import IndexRoot
from latentsearch.posterior import DiagonalGaussian
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def served(tmp_path: Path, start_server, tiny_model, make_engine, publish):
    version = publish(tmp_path / "idx", make_engine(300, seed=1), model_hash=tiny_model.model_hash)
    engine = IndexRoot(tmp_path / "idx").load(version)
    srv = start_server(index=tmp_path / "idx", model=tiny_model, metrics_port=0)
    client = LatentSearchClient(srv.target)
    yield srv, client, engine, version
    client.close()


def _same(answer, result) -> None:
    assert answer.ids == result.ids
    np.testing.assert_array_equal(answer.scores, result.scores)
    assert [h.label for h in answer.hits] == result.labels.tolist()
    assert [h.rank for h in answer.hits] == list(range(len(result)))


def test_nearest_matches_engine(served) -> None:
    _, client, engine, version = served
    rng = np.random.default_rng(5)
    for k, labels, mode in [(10, None, None), (3, [1, 2], "exact"), (500, None, "approx"), (1, [0], None)]:
        z = rng.normal(size=DIM)
        answer = client.nearest(z, k, labels=labels, mode=mode)
        assert answer.index_version == version
        _same(answer, engine.search(z, k, labels=labels, mode=mode))
    # k = 0 means the default 10
    z = rng.normal(size=DIM)
    resp = client.stub.Nearest(pb.NearestRequest(z=z.tolist()))
    assert [n.id for n in resp.neighbors] == engine.search(z, 10).ids
    assert resp.mode == pb.MODE_EXACT and resp.certified


def test_nearest_batch_and_distribution_match_engine(served) -> None:
    _, client, engine, version = served
    rng = np.random.default_rng(6)
    zs = rng.normal(size=(7, DIM))
    answers = client.nearest_batch(zs, 5, labels=[3])
    assert len(answers) == 7
    for z, answer in zip(zs, answers, strict=True):
        assert answer.index_version == version
        _same(answer, engine.search(z, 5, labels=[3]))
    mean, sigma = rng.normal(size=DIM), rng.uniform(0.1, 1.0, size=DIM)
    answer = client.nearest_to_distribution(mean, sigma, 8, labels=[0, 1])
    expected = engine.search_distribution(mean, sigma, 8, labels=[0, 1])
    _same(answer, expected)
    np.testing.assert_array_equal([h.kl for h in answer.hits], expected.kl)
    assert answer.index_version == version


def test_get_item_info_encode_decode(served, tiny_model) -> None:
    srv, client, engine, version = served
    row = engine.bank.row_of("item17")
    item = client.get_item("item17")
    np.testing.assert_array_equal(item.mean, engine.bank.mu[row])
    np.testing.assert_array_equal(item.sigma, np.exp(engine.bank.log_sigma[row]))
    assert item.label == int(engine.bank.labels[row]) and item.index_version == version

    info = client.info()
    assert info["index_version"] == version and info["item_count"] == 300 and info["latent_dim"] == DIM
    assert info["model_hash"] == tiny_model.model_hash == info["served_model_hash"]
    assert info["engine"]["items"] == 300 and info["engine"]["config"]["max_k"] == engine.config.max_k

    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
    mu, logvar = tiny_model.encode_params(image[None])
    for sent in (image, image.astype(np.float32) / 255):  # the input rule: floats are byte / 255
        enc = client.encode(sent)
        post = enc.posterior
        assert isinstance(post, DiagonalGaussian) and post.batch_shape == () and post.dim == DIM
        np.testing.assert_allclose(post.mean, mu[0].double().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(post.std, np.exp(0.5 * logvar[0].double().numpy()), rtol=1e-6)
        assert enc.model_hash == tiny_model.model_hash and enc.index_version == version

    z = np.array([0.5, -0.2, 0.1, 1.0])
    decoded = client.decode(z)
    assert decoded.index_version == version
    expected = tiny_model.decode(z[None])[0].numpy()
    assert decoded.values.shape == (8, 8, 1)
    np.testing.assert_allclose(decoded.values, expected, rtol=1e-6, atol=1e-7)
    png = np.asarray(Image.open(io.BytesIO(decoded.png)))
    assert png.shape == (8, 8)
    np.testing.assert_array_equal(png, np.rint(expected[:, :, 0] * 255).astype(np.uint8))

    # Metrics: requests by method and code, index version and size.
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5).read()
    text = text.decode()
    assert 'latentsearch_requests_total{code="OK",method="Info"} 1.0' in text
    assert f'latentsearch_index_info{{version="{version}"}} 1.0' in text
    assert "latentsearch_index_items 300.0" in text
    assert "latentsearch_request_seconds_bucket" in text


def _code_and_details(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    details = err.value.details()
    assert details is not None, "the server sent no details"
    return err.value.code(), details


BAD = [
    ("Nearest", pb.NearestRequest(z=[0.0] * 3), "INVALID_ARGUMENT", "z"),
    ("Nearest", pb.NearestRequest(z=[0.0, float("nan"), 0.0, 0.0]), "INVALID_ARGUMENT", "z"),
    ("Nearest", pb.NearestRequest(z=[0.0, float("inf"), 0.0, 0.0]), "INVALID_ARGUMENT", "z"),
    ("Nearest", pb.NearestRequest(z=[0.0, 0.0, -2e6, 0.0]), "INVALID_ARGUMENT", "z"),
    ("Nearest", pb.NearestRequest(z=[0.0] * 4, k=1001), "INVALID_ARGUMENT", "k"),
    ("Nearest", pb.NearestRequest(z=[0.0] * 4, labels=[99]), "INVALID_ARGUMENT", "labels"),
    ("Nearest", pb.NearestRequest(z=[0.0] * 4, mode=pb.SearchMode.ValueType(7)), "INVALID_ARGUMENT", "mode"),
    ("NearestBatch", pb.NearestBatchRequest(), "INVALID_ARGUMENT", "queries"),
    (
        "NearestBatch",
        pb.NearestBatchRequest(queries=[pb.NearestRequest(z=[0.0] * 4)] * 9),
        "INVALID_ARGUMENT",
        "queries",
    ),
    (
        "NearestBatch",
        pb.NearestBatchRequest(queries=[pb.NearestRequest(z=[0.0] * 4), pb.NearestRequest(z=[1.0])]),
        "INVALID_ARGUMENT",
        "queries[1].z",
    ),
    (
        "NearestToDistribution",
        pb.NearestToDistributionRequest(mean=[0.0] * 4, sigma=[1.0, 0.0, 1.0, 1.0]),
        "INVALID_ARGUMENT",
        "sigma",
    ),
    (
        "NearestToDistribution",
        pb.NearestToDistributionRequest(mean=[0.0] * 4, sigma=[1.0, -1.0, 1.0, 1.0]),
        "INVALID_ARGUMENT",
        "sigma",
    ),
    (
        "NearestToDistribution",
        pb.NearestToDistributionRequest(mean=[0.0] * 4, sigma=[1.0] * 3),
        "INVALID_ARGUMENT",
        "sigma",
    ),
    (
        "NearestToDistribution",
        pb.NearestToDistributionRequest(mean=[float("nan")] * 4, sigma=[1.0] * 4),
        "INVALID_ARGUMENT",
        "mean",
    ),
    ("GetItem", pb.GetItemRequest(id="nope"), "NOT_FOUND", "id"),
    ("Encode", pb.EncodeRequest(shape=[8, 8, 3], raw=bytes(192)), "INVALID_ARGUMENT", "shape"),
    ("Encode", pb.EncodeRequest(shape=[8, 8, 1], raw=bytes(10)), "INVALID_ARGUMENT", "raw"),
    ("Encode", pb.EncodeRequest(shape=[8, 8, 1]), "INVALID_ARGUMENT", "raw"),
    ("Encode", pb.EncodeRequest(shape=[8, 8, 1], values=[float("nan")] * 64), "INVALID_ARGUMENT", "values"),
    ("Decode", pb.DecodeRequest(z=[0.0] * 5), "INVALID_ARGUMENT", "z"),
]


def test_invalid_inputs(tmp_path: Path, start_server, tiny_model, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(50, seed=2))
    srv = start_server(index=tmp_path / "idx", model=tiny_model, max_batch_queries=8)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        for method, request, code, field in BAD:
            got, details = _code_and_details(getattr(stub, method), request)
            assert got.name == code, (method, request, details)
            assert details.startswith(f"{field}:"), (method, details)
        # The server still answers after all that.
        assert len(stub.Nearest(pb.NearestRequest(z=[0.0] * 4, k=3), timeout=10).neighbors) == 3


def test_no_model_and_no_index(tmp_path: Path, start_server, make_engine, publish) -> None:
    IndexRoot(tmp_path / "empty", create=True)
    srv = start_server(index=tmp_path / "empty")
    requests = [
        ("Nearest", pb.NearestRequest(z=[0.0] * 4)),
        ("Info", pb.InfoRequest()),
        ("GetItem", pb.GetItemRequest(id="0")),
        # the model is the served version's: none before a version loads
        ("Encode", pb.EncodeRequest(shape=[8, 8, 1], raw=bytes(64))),
        ("Decode", pb.DecodeRequest(z=[0.0] * 4)),
    ]
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        for method, request in requests:
            code, details = _code_and_details(getattr(stub, method), request)
            assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("index:"), details
    # A version published from posteriors stores no model: without --model, Encode/Decode fail.
    version = publish(tmp_path / "empty", make_engine(20, seed=1))
    assert srv.run(srv.server.reload_now())
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        for method, request in requests[3:]:
            code, details = _code_and_details(getattr(stub, method), request)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("model:"), details
            assert f"index version {version} stores no model" in details and "--model" in details


def test_bearer_token(tmp_path: Path, start_server, make_engine, publish, health_rpc) -> None:
    version = publish(tmp_path / "idx", make_engine(40, seed=3))
    srv = start_server(index=tmp_path / "idx", token="s3cret")
    for token in (None, "wrong"):
        with (
            LatentSearchClient(srv.target, token=token) as client,
            pytest.raises(UnauthenticatedError) as err,
        ):
            client.info()
        assert err.value.grpc_code == "UNAUTHENTICATED"
        assert isinstance(err.value.__cause__, grpc.RpcError)
        assert err.value.__cause__.code() == grpc.StatusCode.UNAUTHENTICATED
    with LatentSearchClient(srv.target, token="s3cret") as client:
        assert client.info()["index_version"] == version
        assert len(client.nearest([0.0] * 4, 2).hits) == 2
    assert health_rpc(srv.target) == 1  # SERVING, no token needed


def test_no_token_configured_accepts_any_metadata(tmp_path: Path, start_server, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(40, seed=3))
    srv = start_server(index=tmp_path / "idx")
    with LatentSearchClient(srv.target, token="anything") as client:
        assert client.info()["item_count"] == 40

"""Match probabilities, log q(z) and typicality over gRPC, against an independent float64 brute force.

The reference (tests/reference.py) scores every item of the served bank in float64:
``log q(z) = logsumexp_n log q(z|x_n) - log N`` and ``p(n | z) = exp(log q(z|x_n) - logsumexp)`` over
the N items passing the label filter (distribution queries: the expected log-likelihood). The
server's certified interval must contain the reference log q(z).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from reference import expected_log_q, leave_one_out_log_qz, log_q, log_qz, logsumexp

from latentsearch.cli import main
from latentsearch.client import LatentSearchClient, SearchAnswer
from latentsearch.engine.engine import SearchEngine
from latentsearch.engine.typicality import reference_points
from latentsearch.errors import InvalidArgumentError
from latentsearch.indexer import IndexRoot
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4  # latent dimension of conftest's make_engine banks (its default)
REL_TOL = 1e-6  # the server's default tolerance

pytestmark = pytest.mark.timeout(120)


def _served(
    tmp_path: Path, start_server: Any, make_engine: Any, publish: Any, **config: Any
) -> tuple[Any, SearchEngine]:
    """A server on a 400-item labelled bank, and the engine it serves loaded from the same version."""
    root = tmp_path / "idx"
    version = publish(root, make_engine(400, seed=3))
    return start_server(index=root, **config), IndexRoot(root).load(version)


def _bank(engine: SearchEngine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bank = engine.bank
    assert bank.labels is not None
    mu = np.asarray(bank.mu, dtype=np.float64)
    return mu, np.asarray(bank.log_sigma, dtype=np.float64), np.asarray(bank.labels)


def _queries(mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """Box points, a posterior sample of one item, and a box corner far from every item."""
    rng = np.random.default_rng(7)
    near = mu[:1] + np.exp(log_sigma[:1]) * rng.standard_normal((1, DIM))
    return np.concatenate([rng.uniform(-2.0, 2.0, (3, DIM)), near, np.full((1, DIM), 5.0)])


def _check(
    answer: SearchAnswer, scores: np.ndarray, engine: SearchEngine, allowed: np.ndarray | None
) -> None:
    """``answer`` against the reference ``(N,)`` scores of its query over the ``allowed`` rows."""
    assert answer.log_qz is not None and answer.log_qz_interval is not None
    want = float(log_qz(scores, allowed)[0])
    lo, hi = answer.log_qz_interval
    assert lo <= want <= hi
    assert lo <= answer.log_qz <= hi
    assert math.expm1(hi - lo) <= REL_TOL + 1e-12
    norm = float(logsumexp(scores if allowed is None else scores[allowed])[0])
    rows = np.array([engine.bank.row_of(h.id) for h in answer.hits])
    probs = np.array([h.probability for h in answer.hits], dtype=np.float64)
    np.testing.assert_allclose(probs, np.exp(scores[rows] - norm), rtol=REL_TOL + 1e-9, atol=0)
    assert probs.sum() <= 1.0 + 1e-9
    assert np.all(np.diff(probs) <= 0)  # ranked by score, so by probability


def test_nearest_probabilities_match_brute_force(tmp_path: Path, start_server, make_engine, publish) -> None:
    srv, engine = _served(tmp_path, start_server, make_engine, publish)
    mu, log_sigma, labels = _bank(engine)
    z = _queries(mu, log_sigma)
    scores = log_q(z, mu, log_sigma)  # (B, N) float64
    # Typicality's reference: brute-force leave-one-out log q at the index's posterior samples.
    rows, z_ref = reference_points(mu, log_sigma, engine.config.typicality_samples, engine.config.seed)
    reference = np.sort(leave_one_out_log_qz(log_q(z_ref, mu, log_sigma), rows))
    with LatentSearchClient(srv.target) as client:
        for b in range(z.shape[0]):
            plain = client.nearest(z[b], 6, mode="exact")
            answer = client.nearest(z[b], 6, mode="exact", with_probability=True)
            assert answer.ids == plain.ids and answer.certified
            assert plain.log_qz is None and plain.typicality is None
            assert all(h.probability is None for h in plain.hits)
            _check(answer, scores[b], engine, None)
            want = float(log_qz(scores[b])[0])
            assert answer.typicality == np.mean(reference <= want)
            filtered = client.nearest(z[b], 6, labels=[1, 2], with_probability=True)
            _check(filtered, scores[b], engine, np.isin(labels, [1, 2]))
            assert filtered.typicality is None  # the reference sample is unfiltered
        # Far from every item, z is atypical: below every reference density.
        assert client.nearest(z[-1], 3, with_probability=True).typicality == 0.0
        # The whole batch in one NearestBatch call answers the same.
        batch = client.nearest_batch(z, 6, with_probability=True)
        for b, answer in enumerate(batch):
            _check(answer, scores[b], engine, None)


def test_distribution_probabilities_use_the_expected_log_likelihood(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    srv, engine = _served(tmp_path, start_server, make_engine, publish)
    mu, log_sigma, labels = _bank(engine)
    mean = _queries(mu, log_sigma)
    sigma = np.random.default_rng(8).uniform(0.05, 0.6, mean.shape)
    scores = expected_log_q(mean, sigma, mu, log_sigma)
    with LatentSearchClient(srv.target) as client:
        for b in range(mean.shape[0]):
            answer = client.nearest_to_distribution(mean[b], sigma[b], 5, with_probability=True)
            _check(answer, scores[b], engine, None)
            assert all(h.kl is not None for h in answer.hits)
            filtered = client.nearest_to_distribution(mean[b], sigma[b], 5, labels=[0], with_probability=True)
            _check(filtered, scores[b], engine, labels == 0)
            plain = client.nearest_to_distribution(mean[b], sigma[b], 5)
            assert plain.log_qz is None and all(h.probability is None for h in plain.hits)


def test_rel_tol_is_checked_by_the_engine(tmp_path: Path, start_server, make_engine, publish) -> None:
    srv, engine = _served(tmp_path, start_server, make_engine, publish)
    mu, log_sigma, _ = _bank(engine)
    z = _queries(mu, log_sigma)[0]
    scores = log_q(z, mu, log_sigma)[0]
    with LatentSearchClient(srv.target) as client:
        for bad in (1.0, -0.1, float("nan")):
            with pytest.raises(InvalidArgumentError) as err:
                client.nearest(z, 3, with_probability=True, rel_tol=bad)
            assert err.value.field == "rel_tol" and err.value.grpc_code == "INVALID_ARGUMENT"
            with pytest.raises(InvalidArgumentError) as err:
                client.nearest_to_distribution(z, np.full(DIM, 0.1), 3, with_probability=True, rel_tol=bad)
            assert err.value.field == "rel_tol"
        assert client.nearest(z, 3, rel_tol=5.0).log_qz is None  # read only with with_probability
        # 0: every item scored in float64, so the interval closes on the brute force.
        exact = client.nearest(z, 3, with_probability=True, rel_tol=0.0)
        assert exact.log_qz == pytest.approx(float(log_qz(scores)[0]), rel=1e-12)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        good = pb.NearestRequest(z=z.tolist(), k=3, with_probability=True)
        bad_req = pb.NearestRequest(z=z.tolist(), k=3, with_probability=True, rel_tol=2.0)
        with pytest.raises(grpc.RpcError) as rpc_err:
            stub.NearestBatch(pb.NearestBatchRequest(queries=[good, bad_req]), timeout=30)
        assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("latentsearch-field", "queries[1].rel_tol") in tuple(rpc_err.value.trailing_metadata() or ())


def test_calls_with_and_without_probability_share_a_batch_window(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    srv, engine = _served(tmp_path, start_server, make_engine, publish, search_threads=1, max_wait_ms=5)
    mu, log_sigma, _ = _bank(engine)
    service = srv.server.service
    original = service.search_group
    release, groups = threading.Event(), []

    def blocking(snapshot, key, zs):  # every search waits for release; records each group
        groups.append((key, [tuple(z) for z in zs]))
        assert release.wait(30)
        return original(snapshot, key, zs)

    service.search_group = blocking
    rng = np.random.default_rng(9)
    specs = [(rng.uniform(-2.0, 2.0, DIM), i % 2 == 1) for i in range(16)]
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        futures = [
            stub.Nearest.future(pb.NearestRequest(z=z.tolist(), k=4, with_probability=p), timeout=60)
            for z, p in specs
        ]
        wait_until(lambda: groups)
        wait_until(lambda: srv.server._batcher.pending == len(specs))
        release.set()
        replies = [f.result(timeout=60) for f in futures]
    asked = {tuple(z.tolist()): p for z, p in specs}
    for key, zs in groups:  # a search answers calls of one kind only
        assert {asked[z] for z in zs} == {key.rel_tol is not None}
    assert max(len(zs) for key, zs in groups if key.rel_tol is None) > 1
    assert max(len(zs) for key, zs in groups if key.rel_tol is not None) > 1
    for (z, p), resp in zip(specs, replies, strict=True):
        expected = engine.search(z, 4)
        assert [n.id for n in resp.neighbors] == expected.ids
        assert resp.HasField("log_qz") == p
        assert all(n.HasField("probability") == p for n in resp.neighbors)
        if p:
            scores = log_q(z, mu, log_sigma)[0]
            assert resp.log_qz_lower <= float(log_qz(scores)[0]) <= resp.log_qz_upper
            probs = [n.probability for n in resp.neighbors]
            np.testing.assert_allclose(probs, np.exp(expected.scores - logsumexp(scores)[0]), rtol=1e-6)


def test_query_command_prints_probabilities(
    tmp_path: Path, start_server, make_engine, publish, capsys
) -> None:
    srv, engine = _served(tmp_path, start_server, make_engine, publish)
    mu, log_sigma, _ = _bank(engine)
    z = _queries(mu, log_sigma)[3]
    scores = log_q(z, mu, log_sigma)[0]
    point = ",".join(map(repr, z.tolist()))
    assert main(["query", "--target", srv.target, "--z", point, "-k", "3", "--probability"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == "p(i|z)"
    rows = [line.split() for line in lines[2:5]]
    expected = engine.search(z, 3)
    assert [r[1] for r in rows] == expected.ids
    np.testing.assert_allclose(
        [float(r[-1]) for r in rows], np.exp(expected.scores - logsumexp(scores)[0]), rtol=1e-5
    )
    assert len(lines) == 6 and lines[5].startswith("log q(z) = ")
    want = float(log_qz(scores)[0])
    got = float(lines[5].split()[3])
    assert got == pytest.approx(want, abs=2e-6)
    assert "certified within [" in lines[5] and lines[5].endswith("%")
    assert main(["query", "--target", srv.target, "--z", "0,0,0,0", "-k", "2"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert len(plain) == 4 and "p(i|z)" not in plain[1]  # no column, no log q(z) line without the flag

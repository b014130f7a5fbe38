"""Replies bounded before the work: the reply-size bound holds against real serialized replies, a
NearestBatch that could not be sent is refused before any search, and /metrics counts the real
status of a reply too large to send."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import reference

from latentsearch.client import LatentSearchClient
from latentsearch.engine.engine import SearchEngine
from latentsearch.errors import FIELD_METADATA_KEY
from latentsearch.server.engine_service import nearest_responses
from latentsearch.server.replies import (
    batch_reply_bound,
    label_name_bytes,
    max_id_bytes,
    nearest_reply_bound,
)
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

DIM = 4


def _engine(ids: list[str], seed: int = 0, labels: int | None = None) -> SearchEngine:
    """Random posteriors with ``ids``; labels in [0, labels), else huge ones of both signs (negative
    labels take 10-byte varints)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    return SearchEngine.build(
        rng.normal(size=(n, DIM)),
        log_sigma=rng.uniform(-1.5, 0.5, size=(n, DIM)),
        ids=ids,
        labels=rng.integers(-(2**40), 2**40, size=n) if labels is None else rng.integers(0, labels, size=n),
    )


def test_max_id_bytes_bounds_the_utf8_length_of_every_id() -> None:
    ascii_ids = [f"item{i}" for i in range(300)]
    assert max_id_bytes(_engine(ascii_ids).bank) == len("item299")  # exact for ASCII
    mixed = ["a", "ééé", "😀x", "plain"]
    longest = max(len(s.encode()) for s in mixed)  # 6 ("ééé")
    bound = max_id_bytes(_engine(mixed).bank)
    assert longest <= bound <= 4 * max(len(s) for s in mixed)


@pytest.mark.parametrize("named", [False, True])
def test_the_bound_holds_for_worst_case_replies(named: bool) -> None:
    # Long non-ASCII ids, probabilities, and either 10-byte labels or long label names: every field
    # of every neighbour set.
    ids = [f"{'ü' * (i % 40)}-{i}-{'字' * (i % 7)}" for i in range(400)]
    engine = _engine(ids, seed=3, labels=4 if named else None)
    names = ["short", "ä" * 100, "名前" * 20, "x"] if named else None
    bank = engine.bank
    name_bytes = label_name_bytes(names)
    assert name_bytes == (200 if named else 0)  # "ä" * 100: 2 bytes each
    z = np.random.default_rng(1).normal(size=(5, DIM))
    for k in (1, 10, 400):
        batch = engine.search_batch_arrays(z, k, with_probability=True)
        replies = nearest_responses(batch, bank, "v000042", names)
        assert all(n.label_name for r in replies for n in r.neighbors) == named
        bound = nearest_reply_bound(k, max_id_bytes(bank), "v000042", name_bytes)
        assert max(r.ByteSize() for r in replies) <= bound
        whole = pb.NearestBatchResponse(results=replies, index_version="v000042").ByteSize()
        batch_bound = batch_reply_bound([k] * len(replies), max_id_bytes(bank), "v000042", name_bytes)
        assert whole <= batch_bound
        if k == 400:  # a bound, but not a wild one
            assert batch_bound < 4 * whole


def test_the_reply_messages_hold_only_fields_the_bound_counts() -> None:
    # The bound counts singular scalar fields of Neighbor and NearestResponse, plus the repeated
    # neighbours: a new repeated or message field must be added to it (server/replies.py).
    for message, repeated in ((pb.Neighbor, set()), (pb.NearestResponse, {"neighbors"})):
        nested = {f.name for f in message.DESCRIPTOR.fields if f.is_repeated or f.message_type is not None}
        assert nested == repeated, message.DESCRIPTOR.name


def _batch(n: int, k: int, seed: int = 0) -> pb.NearestBatchRequest:
    rng = np.random.default_rng(seed)
    return pb.NearestBatchRequest(
        queries=[pb.NearestRequest(z=rng.normal(size=DIM).tolist(), k=k) for _ in range(n)]
    )


def test_a_batch_whose_reply_cannot_fit_is_refused_before_any_search(
    tmp_path: Path, start_server, make_engine, publish, wait_until
) -> None:
    root = tmp_path / "idx"
    publish(root, make_engine(500, seed=2))
    limit = 256 * 1024
    srv = start_server(index=root, max_message_bytes=limit)
    service = srv.server.service
    searched: list[int] = []
    original = service.search_group

    def counting(snapshot, key, zs):
        searched.append(len(zs))
        return original(snapshot, key, zs)

    service.search_group = counting
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.NearestBatch(_batch(200, 500), timeout=30)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (FIELD_METADATA_KEY, "queries") in tuple(err.trailing_metadata() or ())
        details = err.details() or ""
        assert "200 queries" in details and "k up to 500" in details
        assert searched == []  # refused before the work
        # The message says how many queries fit at that k: exactly those are answered, one more is not.
        match = re.search(r"at most (\d+) queries at k = 500", details)
        assert match is not None, details
        fit = int(match.group(1))
        assert fit > 0
        reply = stub.NearestBatch(_batch(fit, 500), timeout=30)
        assert len(reply.results) == fit and all(len(r.neighbors) == 500 for r in reply.results)
        assert reply.ByteSize() <= limit
        with pytest.raises(grpc.RpcError) as info:
            stub.NearestBatch(_batch(fit + 1, 500), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(searched) == fit
    sample = srv.server.metrics.registry.get_sample_value
    # (counted as the handler returns: the client may see the status a moment earlier)
    refused = {"method": "NearestBatch", "code": "INVALID_ARGUMENT"}
    wait_until(lambda: sample("latentsearch_requests_total", refused) == 2)
    assert sample("latentsearch_requests_total", {"method": "NearestBatch", "code": "OK"}) == 1


@pytest.mark.parametrize("batching", [True, False])
def test_metrics_count_a_reply_too_large_to_send_as_resource_exhausted(
    tmp_path: Path, start_server, make_engine, publish, wait_until, batching: bool
) -> None:
    root = tmp_path / "idx"
    publish(root, make_engine(500, seed=2))
    limit = 2000  # bytes: a Nearest reply of k = 10 fits, k = 200 does not
    srv = start_server(index=root, max_message_bytes=limit, batching=batching)
    z = np.zeros(DIM).tolist()
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LatentSearchStub(ch)
        assert stub.Nearest(pb.NearestRequest(z=z, k=10), timeout=30).ByteSize() <= limit
        with pytest.raises(grpc.RpcError) as info:
            stub.Nearest(pb.NearestRequest(z=z, k=200), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in (info.value.details() or "")
    sample = srv.server.metrics.registry.get_sample_value
    exhausted = {"method": "Nearest", "code": "RESOURCE_EXHAUSTED"}
    wait_until(lambda: sample("latentsearch_requests_total", exhausted) == 1)
    assert sample("latentsearch_requests_total", {"method": "Nearest", "code": "OK"}) == 1



def test_the_client_receives_a_batch_reply_larger_than_grpcs_default_limit(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    # grpc's default receive limit is 4 MiB; the server sends up to its max_message_bytes (64 MiB),
    # so the client must accept as much.
    root = tmp_path / "idx"
    engine = make_engine(400, seed=4)
    publish(root, engine)
    srv = start_server(index=root)
    z = np.random.default_rng(5).normal(size=(1024, engine.dim))
    with LatentSearchClient(srv.target) as client:
        answers = client.nearest_batch(z, k=400, mode="exact")
    # every neighbour costs >= 12 bytes on the wire (id, score, rank with their tags)
    assert sum(len(a.hits) for a in answers) * 12 > 4 * 1024 * 1024
    bank = engine.bank
    scores = reference.log_q(z[:3], np.asarray(bank.mu), np.asarray(bank.log_sigma))
    for row, answer in zip(reference.top_k(scores, 400), answers, strict=False):
        assert [h.id for h in answer.hits] == bank.id_of(row)

"""Exact mode of the search engine against an independent float64 numpy brute force.

The reference (tests/reference.py) is written from the ranking rule alone and shares no code with
the engine:

    log q(z|x) = -1/2 sum(((z - mu) / sigma)^2) - sum(log sigma) - d/2 log(2 pi)

ranked by score descending, ties by ascending row.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import LOG_2PI, SIGMA_REGIMES, expected_log_q, kl_to, log_q, make_bank, top_k

from latentsearch.engine import EngineConfig, ExactIndex, SearchEngine
from latentsearch.engine.exact import BitmapFilter, Selection
from latentsearch.errors import InvalidArgumentError, NotFoundError


def assert_matches_reference(result, scores_row, k, allowed=None):
    want = top_k(scores_row, k, allowed)
    np.testing.assert_array_equal(result.rows, want, err_msg="top-k rows/order differ from brute force")
    np.testing.assert_allclose(result.scores, scores_row[want], rtol=1e-12, atol=1e-9)
    assert result.ids == [str(r) for r in want]


# -- hypothesis-driven equivalence --------------------------------------------------------------
@st.composite
def banks(draw):
    n = draw(st.one_of(st.integers(1, 40), st.integers(1, 3000)))
    d = draw(st.one_of(st.integers(1, 8), st.integers(1, 32), st.integers(1, 128)))
    k = draw(st.integers(1, n + 5))
    regime = draw(st.sampled_from(SIGMA_REGIMES))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, d, k, regime, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(banks())
def test_exact_matches_brute_force(params):
    n, d, k, regime, seed = params
    rng = np.random.default_rng(seed)
    mu, log_sigma = make_bank(n, d, regime, rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(max_k=5000))
    # box queries, queries exactly at an item's mean (float32 cancellation is worst there for tiny
    # sigma), and a query at the mean of the smallest-sigma item.
    at_mu = rng.integers(0, n, size=2)
    tiniest = int(np.argmin(log_sigma.sum(1)))
    z = np.concatenate([rng.uniform(-5.0, 5.0, size=(2, d)), mu[at_mu], mu[tiniest : tiniest + 1]], axis=0)
    ref = log_q(z, mu, log_sigma)
    results = engine.search_batch(z, k, mode="exact")
    assert len(results) == z.shape[0]
    for b, res in enumerate(results):
        assert len(res) == min(k, n)
        assert res.certified is True
        assert res.mode == "exact"
        assert_matches_reference(res, ref[b], k)
    # single-query API agrees with the batch API
    single = engine.search(z[2], k, mode="exact")
    np.testing.assert_array_equal(single.rows, results[2].rows)


def test_k_above_bank_size_returns_whole_bank_sorted():
    rng = np.random.default_rng(1)
    mu, log_sigma = make_bank(7, 3, "moderate", rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    z = rng.uniform(-5, 5, size=3)
    res = engine.search(z, 50)
    assert len(res) == 7
    assert sorted(res.rows.tolist()) == list(range(7))
    assert_matches_reference(res, log_q(z, mu, log_sigma)[0], 50)


def test_brute_force_method_matches_reference():
    rng = np.random.default_rng(2)
    mu, log_sigma = make_bank(300, 5, "loguniform", rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    z = rng.uniform(-5, 5, size=(3, 5))
    ref = log_q(z, mu, log_sigma)
    for b, res in enumerate(engine.brute_force(z, 12)):
        assert_matches_reference(res, ref[b], 12)


@pytest.mark.parametrize("param", ["log_sigma", "logvar", "sigma"])
def test_parameterisations_agree(param):
    rng = np.random.default_rng(3)
    mu, log_sigma = make_bank(200, 4, "loguniform", rng)
    value = {"log_sigma": log_sigma, "logvar": 2 * log_sigma, "sigma": np.exp(log_sigma)}[param]
    engine = SearchEngine.build(mu, **{param: value})
    z = rng.uniform(-5, 5, size=4)
    assert_matches_reference(engine.search(z, 10), log_q(z, mu, log_sigma)[0], 10)


# -- float32 cancellation -----------------------------------------------------------------------
def test_naive_float32_lifted_inner_product_fails_where_engine_is_exact():
    """sigma = 1e-4 and means that differ by about one sigma: the float32 lifted form
    <[z^2, z, 1], [-1/(2 sigma^2), mu/sigma^2, c]> cancels terms of size ~1e9 and cannot rank them."""
    rng = np.random.default_rng(4)
    n, d = 200, 4
    sigma = 1e-4
    mu = 3.0 + sigma * rng.standard_normal((n, d))  # near-duplicates, ~1 sigma apart
    log_sigma = np.full((n, d), math.log(sigma))
    queries = mu[:20]  # each query sits exactly on an item's mean: that item is the true top-1
    ref = log_q(queries, mu, log_sigma)
    truth = np.array([top_k(r, 1)[0] for r in ref])
    np.testing.assert_array_equal(truth, np.arange(20))  # sanity: the construction is as intended

    # naive float32 lifted scores, written here independently of the engine's lifting module
    inv_var = np.exp(-2.0 * log_sigma)
    items = np.concatenate(
        [
            -0.5 * inv_var,
            mu * inv_var,
            (-0.5 * (mu**2 * inv_var).sum(1) - log_sigma.sum(1) - d / 2 * LOG_2PI)[:, None],
        ],
        axis=1,
    ).astype(np.float32)
    lifted_q = np.concatenate([queries**2, queries, np.ones((20, 1))], axis=1).astype(np.float32)
    naive_top1 = np.argmax(lifted_q @ items.T, axis=1)
    naive_correct = int((naive_top1 == truth).sum())
    assert naive_correct <= 10, f"float32 lifted IP unexpectedly ranked {naive_correct}/20 correctly"

    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    for b, res in enumerate(engine.search_batch(queries, 5, mode="exact")):
        assert res.rows[0] == truth[b]
        assert_matches_reference(res, ref[b], 5)


# -- ties ---------------------------------------------------------------------------------------
def test_ties_broken_by_ascending_row_across_k_boundary():
    rng = np.random.default_rng(5)
    n, d = 400, 3
    mu = rng.uniform(-3, 3, size=(n, d))
    log_sigma = rng.uniform(math.log(0.2), math.log(1.0), size=(n, d))
    copies = np.array([390, 7, 250, 31, 120, 399, 64])  # deliberately unsorted
    mu[copies] = [0.5, -0.5, 0.25]
    log_sigma[copies] = math.log(0.1)
    # a second tied group, worse than the first: rows 3 and 300 identical
    mu[[300, 3]] = [0.5, -0.5, 0.4]
    log_sigma[[300, 3]] = math.log(0.1)
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    z = np.array([0.5, -0.5, 0.25])
    ref = log_q(z, mu, log_sigma)[0]
    assert len(set(ref[copies].tolist())) == 1  # the reference sees exact ties
    sorted_copies = np.sort(copies)
    for k in (1, 3, 7, 8, 9):
        res = engine.search(z, k, mode="exact")
        np.testing.assert_array_equal(res.rows[: min(k, 7)], sorted_copies[: min(k, 7)])
        assert_matches_reference(res, ref, k)
    res = engine.search(z, 8, mode="exact")
    assert res.rows[7] == 3  # the second tied group: row 3 before row 300


def test_many_identical_rows_more_than_screened():
    """More tied copies than the float32 screen keeps: the lowest rows must still win."""
    n, d = 300, 2
    mu = np.zeros((n, d))
    log_sigma = np.zeros((n, d))
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    for k in (1, 5, 40, 299):
        res = engine.search(np.array([0.1, -0.2]), k, mode="exact")
        np.testing.assert_array_equal(res.rows, np.arange(k))
        assert np.all(res.scores == res.scores[0])


# -- label filter -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(6)
    n, d = 600, 4
    mu, log_sigma = make_bank(n, d, "mixed", rng)
    labels = rng.integers(0, 6, size=n)
    labels[labels == 5] = 4  # label 5 absent
    engine = SearchEngine.build(mu, log_sigma=log_sigma, labels=labels)
    return engine, mu, log_sigma, labels


@pytest.mark.parametrize("wanted", [[1], [0, 3], [2, 4, 1]])
def test_label_filter_equals_restricted_brute_force(labelled, wanted):
    engine, mu, log_sigma, labels = labelled
    rng = np.random.default_rng(7)
    z = np.concatenate([rng.uniform(-5, 5, size=(3, 4)), mu[:2]])
    ref = log_q(z, mu, log_sigma)
    allowed = np.isin(labels, wanted)
    for b, res in enumerate(engine.search_batch(z, 15, labels=wanted, mode="exact")):
        assert set(res.labels.tolist()) <= set(wanted)
        np.testing.assert_array_equal(res.labels, labels[res.rows])
        assert_matches_reference(res, ref[b], 15, allowed)
    # brute_force honours the filter too
    bf = engine.brute_force(z[:1], 15, labels=wanted)[0]
    assert_matches_reference(bf, ref[0], 15, allowed)


def test_label_filter_k_larger_than_subset(labelled):
    engine, mu, log_sigma, labels = labelled
    z = np.zeros(4)
    subset = np.flatnonzero(labels == 2)
    res = engine.search(z, subset.size + 100, labels=[2])
    assert len(res) == subset.size
    np.testing.assert_array_equal(np.sort(res.rows), subset)
    assert_matches_reference(res, log_q(z, mu, log_sigma)[0], subset.size + 100, labels == 2)


def test_label_filter_errors(labelled):
    engine, *_ = labelled
    with pytest.raises(InvalidArgumentError) as exc:
        engine.search(np.zeros(4), 5, labels=[5])
    assert exc.value.field == "labels"
    with pytest.raises(InvalidArgumentError) as exc:
        engine.search(np.zeros(4), 5, labels=[99, 1])
    assert exc.value.field == "labels"
    with pytest.raises(InvalidArgumentError) as exc:
        engine.search(np.zeros(4), 5, labels=[])
    assert exc.value.field == "labels"
    unlabelled = SearchEngine.build(np.zeros((3, 4)), log_sigma=np.zeros((3, 4)))
    with pytest.raises(InvalidArgumentError) as exc:
        unlabelled.search(np.zeros(4), 2, labels=[0])
    assert exc.value.field == "labels"


# -- ids ----------------------------------------------------------------------------------------
def test_string_ids_returned():
    rng = np.random.default_rng(8)
    mu, log_sigma = make_bank(50, 3, "moderate", rng)
    ids = [f"item-{i:03d}" for i in range(50)]
    engine = SearchEngine.build(mu, log_sigma=log_sigma, ids=ids)
    z = rng.uniform(-5, 5, size=3)
    res = engine.search(z, 6)
    assert res.ids == [ids[r] for r in res.rows]
    assert all(isinstance(i, str) for i in res.ids)
    assert engine.bank.row_of("item-017") == 17
    with pytest.raises(NotFoundError):
        engine.bank.row_of("item-999")
    with pytest.raises(NotFoundError):
        engine.bank.row_of("17")


def test_integer_ids_become_strings():
    engine = SearchEngine.build(np.eye(3), log_sigma=np.zeros((3, 3)), ids=[10, 20, 30])
    res = engine.search(np.array([0.0, 1.0, 0.0]), 1)
    assert res.ids == ["20"]
    assert engine.bank.row_of(30) == 2
    assert engine.bank.row_of("30") == 2


def test_default_ids_are_row_numbers():
    rng = np.random.default_rng(9)
    mu, log_sigma = make_bank(20, 2, "moderate", rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    res = engine.search(np.zeros(2), 20)
    assert res.ids == [str(r) for r in res.rows]
    assert engine.bank.row_of("13") == 13
    assert engine.bank.row_of(13) == 13
    for bad in ("20", "-1", "013", "abc", 20):
        with pytest.raises(NotFoundError):
            engine.bank.row_of(bad)


def test_result_iteration_gives_neighbors():
    rng = np.random.default_rng(10)
    mu, log_sigma = make_bank(30, 2, "moderate", rng)
    labels = np.arange(30) % 3
    engine = SearchEngine.build(mu, log_sigma=log_sigma, labels=labels)
    res = engine.search(np.zeros(2), 4)
    neighbors = list(res)
    assert [nb.rank for nb in neighbors] == [0, 1, 2, 3]
    assert [nb.row for nb in neighbors] == res.rows.tolist()
    assert [nb.label for nb in neighbors] == (res.rows % 3).tolist()
    assert [nb.score for nb in neighbors] == res.scores.tolist()


# -- distribution queries -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_bank():
    rng = np.random.default_rng(11)
    mu, log_sigma = make_bank(800, 6, "mixed", rng)
    return SearchEngine.build(mu, log_sigma=log_sigma), mu, log_sigma


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_distribution_ranks_by_expected_log_prob(dist_bank, seed):
    engine, mu, log_sigma = dist_bank
    rng = np.random.default_rng(100 + seed)
    mean = rng.uniform(-4, 4, size=6)
    std = np.exp(rng.uniform(math.log(1e-3), math.log(3.0), size=6))
    expected = expected_log_q(mean, std, mu, log_sigma)[0]
    res = engine.search_distribution(mean, std, 20, mode="exact")
    assert res.certified is True
    assert_matches_reference(res, expected, 20)
    # KL ranks identically (entropy of the query is constant) and matches the closed form
    kl = kl_to(mean, std, mu, log_sigma)[0]
    assert res.kl is not None
    np.testing.assert_allclose(res.kl, kl[res.rows], rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(res.rows, np.lexsort((np.arange(kl.size), kl))[:20])


def test_search_distribution_batch_matches_single(dist_bank):
    engine, mu, log_sigma = dist_bank
    rng = np.random.default_rng(12)
    mean = rng.uniform(-4, 4, size=(3, 6))
    std = rng.uniform(0.05, 1.0, size=(3, 6))
    batch = engine.search_distribution_batch(mean, std, 7)
    for b, res in enumerate(batch):
        assert_matches_reference(res, expected_log_q(mean[b], std[b], mu, log_sigma)[0], 7)
        np.testing.assert_allclose(res.kl, kl_to(mean[b], std[b], mu, log_sigma)[0, res.rows], rtol=1e-10)


def test_zero_std_equals_point_search(dist_bank):
    engine, mu, log_sigma = dist_bank
    z = np.random.default_rng(13).uniform(-4, 4, size=6)
    point = engine.search(z, 25, mode="exact")
    dist = engine.search_distribution(z, np.zeros(6), 25, mode="exact")
    np.testing.assert_array_equal(dist.rows, point.rows)
    # same quantity, evaluated as (diff^2 + 0) / sigma^2 vs (diff / sigma)^2: equal to an ulp or so
    np.testing.assert_allclose(dist.scores, point.scores, rtol=1e-14, atol=0)
    assert dist.kl is None  # KL to a point mass is undefined
    assert_matches_reference(dist, log_q(z, mu, log_sigma)[0], 25)


def test_expected_log_prob_against_monte_carlo():
    rng = np.random.default_rng(14)
    mu = np.array([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]])
    log_sigma = np.log(np.array([[0.5, 1.2, 0.8], [2.0, 0.3, 1.0]]))
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    mean, std = np.array([0.0, -0.5, 1.5]), np.array([0.4, 0.7, 0.2])
    res = engine.search_distribution(mean, std, 2)
    samples = mean + std * rng.standard_normal((200_000, 3))
    mc = log_q(samples, mu, log_sigma)  # (S, 2)
    for i, row in enumerate(res.rows):
        est, se = mc[:, row].mean(), mc[:, row].std() / math.sqrt(mc.shape[0])
        assert abs(res.scores[i] - est) < 5 * se + 1e-3, (row, res.scores[i], est, se)


# -- label-filter selectors -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_bitmap_filter_selects_exactly_the_mask(n):
    mask = np.random.default_rng(n).random(n) < 0.3
    subset = BitmapFilter.from_mask(mask)
    assert subset.count == int(mask.sum())
    members = np.array([subset.selector.is_member(i) for i in range(n + 16)])
    np.testing.assert_array_equal(members[:n], mask)
    assert not members[n:].any()  # the last byte's padding bits and ids past it
    index = faiss.IndexFlatIP(1)  # every item scores 1: FAISS returns all the selected ones
    index.add(np.ones((n, 1), dtype=np.float32))
    _, ids = index.search(np.ones((1, 1), dtype=np.float32), n, params=subset.params)
    assert sorted(ids[ids >= 0].tolist()) == np.flatnonzero(mask).tolist()


def test_selection_selectors_address_bank_rows_and_local_ids():
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(300, 2))
    log_sigma = np.where(rng.random((300, 1)) < 0.2, math.log(1e-4), math.log(0.5)) + np.zeros((1, 2))
    exact = ExactIndex.build(mu, log_sigma)
    assert len(exact.groups) >= 2
    mask = rng.random(300) < 0.4
    sel = Selection(mask, exact.groups)
    assert sel.count == int(mask.sum())
    np.testing.assert_array_equal([sel.rows.selector.is_member(i) for i in range(300)], mask)
    for gi, group in enumerate(exact.groups):
        local = sel.group(gi)
        assert local.count == int(mask[group.rows].sum())
        members = [local.selector.is_member(i) for i in range(len(group))]
        np.testing.assert_array_equal(members, mask[group.rows])

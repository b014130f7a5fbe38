"""Exact mode over the partitions (branch and bound) and the partition upper bounds it relies on.

References are the independent float64 numpy brute forces of tests/reference.py, ties broken by row.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import expected_log_q, log_q, top_k

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine.approx import ApproxQuery
from latentsearch.engine.lifting import lift_distributions, lift_points


@pytest.fixture(scope="module")
def bank():
    b = vae_like_posteriors(30_000, 8, seed=11)
    log_sigma = b.log_sigma.copy()
    log_sigma[:3] = np.log(2e-4)  # tiny-sigma outliers: a scale group on the exact path
    return b.mu, log_sigma, b.labels


@pytest.fixture(scope="module")
def engine(bank) -> SearchEngine:
    mu, log_sigma, labels = bank
    return SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        labels=labels,
        config=EngineConfig(approx_nlist=400, exact_strategy="partitions"),  # not the cost model's pick
        build_approx=True,
    )


def queries(bank, n: int = 16) -> dict[str, np.ndarray]:
    mu, log_sigma, _ = bank
    fam = query_families((mu, log_sigma), n, seed=5)
    fam["outlier"] = mu[:3] + 1e-5  # top-1 is a tiny-sigma item
    return fam


@pytest.mark.parametrize("k", [1, 10, 57])
def test_partition_exact_equals_brute_force(bank, engine: SearchEngine, k: int) -> None:
    mu, log_sigma, _ = bank
    assert engine.approx is not None and engine.config.exact_strategy == "partitions"
    for family, z in queries(bank).items():
        want = top_k(log_q(z, mu, log_sigma), k)
        got = engine.search_batch(z, k, mode="exact")
        for b, res in enumerate(got):
            assert res.certified
            np.testing.assert_array_equal(res.rows, want[b], err_msg=f"{family} query {b}")
            ref = log_q(z[b : b + 1], mu[res.rows], log_sigma[res.rows])[0]
            np.testing.assert_allclose(res.scores, ref, rtol=1e-12, atol=1e-9)


def test_partition_exact_with_label_filter(bank, engine: SearchEngine) -> None:
    mu, log_sigma, labels = bank
    allowed = np.isin(labels, [2, 7])
    for z in queries(bank).values():
        want = top_k(log_q(z, mu, log_sigma), 12, allowed)
        for b, res in enumerate(engine.search_batch(z, 12, mode="exact", labels=[2, 7])):
            np.testing.assert_array_equal(res.rows, want[b])
            assert res.labels is not None and set(res.labels.tolist()) <= {2, 7}


def test_partition_exact_distribution_queries(bank, engine: SearchEngine) -> None:
    mu, log_sigma, _ = bank
    rows = np.arange(40, 48)
    m, s = mu[rows] + 0.05, np.exp(log_sigma[rows]) * 1.3
    want = top_k(expected_log_q(m, s, mu, log_sigma), 9)
    for b, res in enumerate(engine.search_distribution_batch(m, s, 9, mode="exact")):
        np.testing.assert_array_equal(res.rows, want[b])


def test_fallback_when_the_scan_keeps_too_few_candidates(bank) -> None:
    # rerank = k = 1: the scan's cut-off often cannot rule out dropped items, so queries fall back
    # to the flat scan; the answer must still be the brute force's.
    mu, log_sigma, _ = bank
    small = SearchEngine.build(
        mu[:5000],
        log_sigma=log_sigma[:5000],
        config=EngineConfig(approx_nlist=100, approx_rerank=1),
        build_approx=True,
    )
    for z in queries(bank, 8).values():
        want = top_k(log_q(z, mu[:5000], log_sigma[:5000]), 1)
        for b, res in enumerate(small.search_batch(z, 1, mode="exact")):
            np.testing.assert_array_equal(res.rows, want[b])


def test_flat_and_partition_strategies_agree(bank, engine: SearchEngine) -> None:
    import dataclasses

    flat = SearchEngine(
        engine.bank,
        dataclasses.replace(engine.config, exact_strategy="flat"),
        exact=engine.exact,
        approx=engine.approx,
    )
    for z in queries(bank).values():
        a = engine.search_batch(z, 10, mode="exact")
        b = flat.search_batch(z, 10, mode="exact")
        assert [r.ids for r in a] == [r.ids for r in b]


def test_approx_certified_flag_is_truthful(bank) -> None:
    mu, log_sigma, _ = bank
    eng = SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        config=EngineConfig(approx_nlist=400, approx_nprobe=160, approx_certify=True),
        build_approx=True,
    )
    z = np.concatenate(list(queries(bank).values()))
    want = top_k(log_q(z, mu, log_sigma), 10)
    results = eng.search_batch(z, 10, mode="approx")
    certified = [b for b, r in enumerate(results) if r.certified]
    assert certified, "expected some approximate answers to be provably exact"
    for b in certified:
        np.testing.assert_array_equal(results[b].rows, want[b])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(50, 600),
    d=st.integers(1, 12),
    nlist=st.integers(2, 40),
    spread=st.sampled_from([0.05, 0.5, 2.0]),
    distribution=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_partition_bounds_dominate_every_member(n, d, nlist, spread, distribution, seed) -> None:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d))
    log_sigma = rng.normal(np.log(0.3), spread, size=(n, d)).clip(-9, 4)
    eng = SearchEngine.build(
        mu, log_sigma=log_sigma, config=EngineConfig(approx_nlist=nlist, kmeans_iters=4), build_approx=True
    )
    ap = eng.approx
    assert ap is not None
    z = np.concatenate([rng.uniform(-5, 5, size=(4, d)), mu[rng.integers(0, n, 4)] + 0.01])
    std = np.abs(rng.normal(0.2, 0.1, size=z.shape)) if distribution else None
    truth = log_q(z, mu, log_sigma) if std is None else expected_log_q(z, std, mu, log_sigma)
    best = np.full((z.shape[0], ap.nlist), -np.inf)
    inside = ap.list_of_row >= 0
    for b in range(z.shape[0]):
        np.maximum.at(best[b], ap.list_of_row[inside], truth[b, inside])
    tol = 1e-9 * (1 + np.abs(best))
    assert np.all(ap.upper_bounds(z, std) >= best - tol)
    # The three-stage bound used by exact search: with threshold -inf every non-empty partition
    # comes back, with a bound at least its best member's score.
    q = lift_points(z) if std is None else lift_distributions(z, std)
    query = ApproxQuery(
        points=z, std=std, lifted=q, rescore=lambda qi, rows: np.take_along_axis(truth[qi], rows, 1)
    )
    scanned = np.zeros((z.shape[0], ap.nlist), dtype=bool)
    needed = ap._needed(query, np.full(z.shape[0], -np.inf), scanned)
    qi, part, ub = needed.query, needed.partition, needed.bound
    assert qi.size == z.shape[0] * int((ap.list_sizes > 0).sum())
    assert np.all(ub >= best[qi, part] - tol[qi, part])

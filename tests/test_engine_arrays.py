"""``SearchEngine.search_batch_arrays`` (the server's path) and the BLAS-batched FAISS screens.

Every answer is checked against the per-query API and against the independent float64 ground truth
(tests/reference.py).
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from reference import SIGMA_REGIMES, assert_batch_is_brute_force, kl_to, log_q, make_bank, top_k

from latentsearch.data.banks import vae_like_posteriors
from latentsearch.engine import BatchResult, EngineConfig, SearchEngine, SearchMode
from latentsearch.engine import exact as exact_mod
from latentsearch.engine.engine import BLAS_MIN_QUERIES


@pytest.fixture(scope="module")
def labelled() -> SearchEngine:
    rng = np.random.default_rng(11)
    mu, log_sigma = make_bank(3000, 6, "mixed", rng)
    return SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        ids=[f"x{i}" for i in range(3000)],
        labels=rng.integers(0, 5, size=3000),
        config=EngineConfig(approx_min_items=1000, approx_nprobe=8),
    )


def _assert_same(batch: BatchResult, results, mode: str) -> None:
    assert len(batch) == len(results)
    assert batch.mode == mode
    for b, res in enumerate(results):
        n = int(batch.counts[b])
        assert n == len(res)
        np.testing.assert_array_equal(batch.rows[b, :n], res.rows)
        np.testing.assert_array_equal(batch.scores[b, :n], res.scores)
        assert (batch.rows[b, n:] == -1).all() and np.isneginf(batch.scores[b, n:]).all()
        assert bool(batch.certified[b]) == res.certified
        if res.kl is not None:
            assert batch.kl is not None
            np.testing.assert_array_equal(batch.kl[b, :n], res.kl)


@pytest.mark.parametrize("mode", ["exact", "approx"])
@pytest.mark.parametrize("labels", [None, [2]])
def test_arrays_equal_per_query_results(
    labelled: SearchEngine, mode: SearchMode, labels: list[int] | None
) -> None:
    z = np.random.default_rng(3).uniform(-4, 4, size=(25, 6))
    batch = labelled.search_batch_arrays(z, 10, mode=mode, labels=labels)
    _assert_same(batch, labelled.search_batch(z, 10, mode=mode, labels=labels), mode)


def test_arrays_pad_past_the_selected_items(labelled: SearchEngine) -> None:
    """k above the filtered subset: every selected item, then -1 / -inf padding."""
    z = np.random.default_rng(4).uniform(-4, 4, size=(3, 6))
    labels = labelled.bank.labels
    assert labels is not None
    subset = int((labels == 1).sum())
    batch = labelled.search_batch_arrays(z, 1000, mode="exact", labels=[1])
    assert batch.rows.shape == (3, 1000) and batch.counts.tolist() == [subset] * 3
    ref = log_q(z, labelled.bank.mu, labelled.bank.log_sigma)
    for b in range(3):
        want = top_k(ref[b], 1000, allowed=labels == 1)
        np.testing.assert_array_equal(batch.rows[b, :subset], want)


def test_distribution_arrays_carry_kl(labelled: SearchEngine) -> None:
    rng = np.random.default_rng(5)
    mean, std = rng.normal(size=(4, 6)), rng.uniform(0.1, 1.0, size=(4, 6))
    batch = labelled._search_arrays(mean, std, 7, "exact", None, None)
    _assert_same(batch, labelled.search_distribution_batch(mean, std, 7, mode="exact"), "exact")
    # KL(N(m, s^2) || q) from its closed form, for every returned item.
    kl = kl_to(mean, std, labelled.bank.mu, labelled.bank.log_sigma)  # (4, N)
    assert batch.kl is not None
    np.testing.assert_allclose(batch.kl, np.take_along_axis(kl, batch.rows, axis=1), rtol=1e-9, atol=1e-9)


def test_faiss_batches_use_blas() -> None:
    assert faiss.cvar.distance_compute_blas_threshold <= BLAS_MIN_QUERIES


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
def test_blas_batched_exact_screen_matches_brute_force(regime: str) -> None:
    """Batches of >= BLAS_MIN_QUERIES take FAISS's matrix-product path; the certified top-k holds."""
    rng = np.random.default_rng(SIGMA_REGIMES.index(regime))
    n, d, k = 2500, 8, 12
    mu, log_sigma = make_bank(n, d, regime, rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(num_threads=1))
    z = np.concatenate([rng.uniform(-5, 5, size=(BLAS_MIN_QUERIES + 10, d)), mu[rng.integers(0, n, 10)]])
    ref = log_q(z, mu, log_sigma)
    batch = engine.search_batch_arrays(z, k, mode="exact")
    assert batch.certified.all()
    assert_batch_is_brute_force(batch.rows, batch.scores, ref, k)


# -- the dense screen (exact.ScaleGroup.dense_screen) --------------------------------------------


def _count_dense(monkeypatch) -> list[int]:
    """Record how many candidates each dense screen returned (None: it handed over to FAISS)."""
    calls: list[int] = []
    original = exact_mod.ScaleGroup.dense_screen

    def spy(self, q32, kg):
        out = original(self, q32, kg)
        calls.append(-1 if out is None else int((out[0] >= 0).sum()))
        return out

    monkeypatch.setattr(exact_mod.ScaleGroup, "dense_screen", spy)
    monkeypatch.setattr(exact_mod, "BATCH_SCREEN", False)  # batches forced here: not the batch screen
    return calls


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
@pytest.mark.parametrize("k", [1, 10, 40])
def test_dense_screen_matches_brute_force(monkeypatch, regime: str, k: int) -> None:
    monkeypatch.setattr(exact_mod, "DENSE_BLOCK", 4)  # engage it on a small bank, for batches too
    monkeypatch.setattr(exact_mod, "DENSE_MAX_QUERIES", 64)
    calls = _count_dense(monkeypatch)
    rng = np.random.default_rng(SIGMA_REGIMES.index(regime) * 100 + k)
    n, d = 1500, 5
    mu, log_sigma = make_bank(n, d, regime, rng)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(num_threads=1))
    tiniest = int(np.argmin(log_sigma.sum(1)))
    z = np.concatenate([rng.uniform(-5, 5, size=(30, d)), mu[rng.integers(0, n, 10)], mu[[tiniest]]])
    ref = log_q(z, mu, log_sigma)
    batches = [engine.search_batch_arrays(z, k, mode="exact"), engine.search_batch_arrays(z[:1], k)]
    assert any(c > 0 for c in calls), "the dense screen was not used"
    for batch, queries in zip(batches, (range(z.shape[0]), [0]), strict=True):
        assert batch.certified.all()
        for b in queries:
            want = top_k(ref[b], k)
            np.testing.assert_array_equal(batch.rows[b], want)
            np.testing.assert_allclose(batch.scores[b], ref[b][want], rtol=1e-12, atol=1e-9)


def test_dense_screen_hands_flat_scores_to_faiss(monkeypatch) -> None:
    """Hundreds of identical rows tie at the threshold: too many candidates, FAISS answers, ties by row."""
    monkeypatch.setattr(exact_mod, "DENSE_BLOCK", 8)
    monkeypatch.setattr(exact_mod, "DENSE_MAX_QUERIES", 64)
    calls = _count_dense(monkeypatch)
    rng = np.random.default_rng(9)
    mu = np.concatenate([np.zeros((800, 3)), rng.normal(3.0, 1.0, size=(400, 3))])
    log_sigma = np.concatenate([np.full((800, 3), -1.0), rng.uniform(-1, 0.5, size=(400, 3))])
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(num_threads=1))
    z = np.zeros((2, 3))
    batch = engine.search_batch_arrays(z, 10, mode="exact")
    assert -1 in calls
    ref = log_q(z, mu, log_sigma)
    for b in range(2):
        np.testing.assert_array_equal(batch.rows[b], top_k(ref[b], 10))


@pytest.mark.parametrize("nq", [1, 30])
def test_dense_screen_at_its_default_block(monkeypatch, nq: int) -> None:
    """Single queries take the dense screen at the default settings; batches (here forced) agree."""
    if nq > 1:
        monkeypatch.setattr(exact_mod, "DENSE_MAX_QUERIES", nq * 2)
    calls = _count_dense(monkeypatch)
    bank = vae_like_posteriors(8000, 10, seed=3)
    engine = SearchEngine.build(bank.mu, log_sigma=bank.log_sigma, config=EngineConfig(num_threads=1))
    rng = np.random.default_rng(nq)
    z = np.concatenate([rng.uniform(-5, 5, size=(nq, 10)), rng.standard_normal((nq, 10))])
    if nq == 1:
        batch = engine.search_batch_arrays(z[:1], 10, mode="exact")
        z = z[:1]
    else:
        batch = engine.search_batch_arrays(z, 10, mode="exact")
    assert calls and all(c >= 26 for c in calls)  # k + max(k, extra=16) candidates at least
    ref = log_q(z, bank.mu, bank.log_sigma)
    for b in range(z.shape[0]):
        np.testing.assert_array_equal(batch.rows[b], top_k(ref[b], 10))

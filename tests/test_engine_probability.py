"""Match probabilities, log q(z) and typicality against an independent float64 brute force.

The reference (tests/reference.py) scores every item in float64 and takes a max-shifted logsumexp:

    log q(z) = logsumexp_n log q(z|x_n) - log N,    p(n | z) = exp(log q(z|x_n) - logsumexp_m ...)

over the N items passing the label filter; distribution queries use the expected log-likelihood.
The engine's certified interval [log_qz_lower, log_qz_upper] must contain the reference value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from reference import SIGMA_REGIMES, expected_log_q, log_q, log_qz, logsumexp, make_bank

from latentsearch.engine import BatchResult, EngineConfig, SearchEngine
from latentsearch.errors import CorruptIndexError, InvalidArgumentError

N, D, K = 2500, 6, 7


def _engine(regime: str, seed: int = 0, **config: object) -> tuple[SearchEngine, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu, log_sigma = make_bank(N, D, regime, rng)
    labels = rng.integers(0, 5, size=N)
    cfg = EngineConfig(**{"typicality_samples": 256, **config})  # type: ignore[arg-type]
    return SearchEngine.build(mu, log_sigma=log_sigma, labels=labels, config=cfg), mu, log_sigma


def _queries(mu: np.ndarray, log_sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Box points, points near items (a posterior sample and the exact mean of the tiniest-sigma
    item), and box corners far from every item."""
    tiniest = int(np.argmin(log_sigma.sum(1)))
    near = mu[:3] + np.exp(log_sigma[:3]) * rng.standard_normal((3, D))
    corners = np.stack([np.full(D, 5.0), np.full(D, -5.0), np.where(np.arange(D) % 2 == 0, 5.0, -5.0)])
    return np.concatenate([rng.uniform(-4.0, 4.0, (4, D)), near, mu[tiniest : tiniest + 1], corners])


def _check(batch: BatchResult, scores: np.ndarray, allowed: np.ndarray | None, rel_tol: float) -> None:
    assert batch.log_qz is not None and batch.log_qz_lower is not None and batch.log_qz_upper is not None
    assert batch.probability is not None
    want = log_qz(scores, allowed)
    assert np.all(batch.log_qz_lower <= want), (batch.log_qz_lower - want).max()
    assert np.all(want <= batch.log_qz_upper), (want - batch.log_qz_upper).max()
    width = np.expm1(batch.log_qz_upper - batch.log_qz_lower)
    assert np.all(width <= rel_tol + 1e-9 * (1.0 + np.abs(want))), width.max()
    norm = logsumexp(scores if allowed is None else scores[:, allowed])  # (B,)
    valid = batch.rows >= 0
    p_want = np.exp(np.take_along_axis(scores, np.maximum(batch.rows, 0), 1) - norm[:, None])
    np.testing.assert_allclose(
        batch.probability[valid], p_want[valid], rtol=rel_tol + 1e-9 * (1.0 + np.abs(want).max()), atol=0
    )
    assert np.all(batch.probability[~valid] == 0.0)
    assert np.all(batch.probability[valid] <= 1.0 + 1e-6)


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
def test_point_queries_match_brute_force(regime: str) -> None:
    engine, mu, log_sigma = _engine(regime)
    rng = np.random.default_rng(1)
    z = _queries(mu, log_sigma, rng)
    scores = log_q(z, mu, log_sigma)
    for rel_tol in (1e-6, 1e-2, 0.0):
        batch = engine.search_batch_arrays(z, K, mode="exact", with_probability=True, rel_tol=rel_tol)
        _check(batch, scores, None, max(rel_tol, 1e-12))
    plain = engine.search_batch_arrays(z, K, mode="exact")
    np.testing.assert_array_equal(plain.rows, batch.rows)  # probabilities leave the ranking unchanged
    assert plain.probability is None and plain.log_qz is None


def test_tiny_sigmas_and_label_filter() -> None:
    engine, mu, log_sigma = _engine("loguniform")
    log_sigma_tiny = np.full_like(log_sigma, math.log(1e-4))
    engine = SearchEngine.build(mu, log_sigma=log_sigma_tiny, labels=engine.bank.labels)
    rng = np.random.default_rng(2)
    z = np.concatenate([_queries(mu, log_sigma_tiny, rng), mu[5:8] + 2e-4])
    scores = log_q(z, mu, log_sigma_tiny)
    _check(engine.search_batch_arrays(z, K, with_probability=True), scores, None, 1e-6)
    labels = engine.bank.labels
    assert labels is not None
    allowed = np.isin(labels, [1, 3])
    batch = engine.search_batch_arrays(z, K, labels=[1, 3], with_probability=True)
    _check(batch, scores, allowed, 1e-6)
    assert batch.typicality is not None and np.isnan(batch.typicality).all()  # reference is unfiltered
    # Next to one tiny-sigma item, that item takes all the probability.
    assert np.all(engine.search_batch_arrays(mu[5:8], 1, with_probability=True).probability == 1.0)


@pytest.mark.parametrize("regime", ["moderate", "mixed"])
def test_distribution_queries_use_the_expected_log_likelihood(regime: str) -> None:
    engine, mu, log_sigma = _engine(regime)
    rng = np.random.default_rng(3)
    mean = _queries(mu, log_sigma, rng)
    std = rng.uniform(0.0, 0.5, mean.shape)
    std[0] = 0.0  # a point mass: the point case
    scores = expected_log_q(mean, std, mu, log_sigma)
    results = engine.search_distribution_batch(mean, std, K, with_probability=True)
    assert all(r.certified for r in results)
    got = np.array([r.log_qz for r in results])
    np.testing.assert_allclose(got, log_qz(scores), rtol=1e-6, atol=0)
    for b, res in enumerate(results):
        assert res.log_qz_lower is not None and res.log_qz_upper is not None and res.probability is not None
        assert res.log_qz_lower <= log_qz(scores[b])[0] <= res.log_qz_upper
        p = np.exp(scores[b, res.rows] - logsumexp(scores[b])[0])
        np.testing.assert_allclose(res.probability, p, rtol=1e-6)
        assert [n.probability for n in res] == pytest.approx(list(p), rel=1e-6)
    point = engine.search(mean[0], K, with_probability=True)
    assert point.log_qz == pytest.approx(results[0].log_qz, rel=1e-12)


def test_box_corner_is_dominated_by_one_item_and_atypical() -> None:
    engine, mu, log_sigma = _engine("moderate")
    corner = np.full(D, 5.0)
    res = engine.search(corner, 3, with_probability=True)
    scores = log_q(corner, mu, log_sigma)[0]
    assert res.log_qz is not None and res.probability is not None and res.typicality is not None
    assert res.log_qz == pytest.approx(log_qz(scores)[0], rel=1e-9)
    assert res.probability[0] == pytest.approx(math.exp(scores.max() - logsumexp(scores)[0]), rel=1e-6)
    assert res.typicality == 0.0  # below every reference latent
    # A sample from an item's own posterior is typical (somewhere inside the reference).
    inside = engine.search(mu[10] + 0.1 * np.exp(log_sigma[10]), 3, with_probability=True)
    assert inside.typicality is not None and 0.0 < inside.typicality <= 1.0


def test_typicality_reference_is_the_brute_force_of_its_samples() -> None:
    engine, mu, log_sigma = _engine("mixed")
    assert engine.typicality is not None and len(engine.typicality) == 256
    ref = engine.typicality.log_qz
    assert np.all(np.diff(ref) >= 0)
    # The same seeded draw, recomputed here: items uniformly with replacement, z = mu + sigma * eps.
    rng = np.random.default_rng(engine.config.seed)
    rows = np.sort(rng.integers(0, N, size=256))
    z = mu[rows] + np.exp(log_sigma[rows]) * rng.standard_normal((256, D))
    np.testing.assert_allclose(ref, np.sort(log_qz(log_q(z, mu, log_sigma))), rtol=1e-6)
    # percentile = fraction of reference values <= log q(z)
    assert engine.typicality.percentile(np.array([ref[99], -np.inf, np.inf])).tolist() == [
        np.count_nonzero(ref <= ref[99]) / 256,
        0.0,
        1.0,
    ]


def test_typicality_is_saved_and_old_versions_load_without_it(tmp_path: Path) -> None:
    engine, mu, _ = _engine("moderate")
    saved = engine.save(tmp_path / "v")
    manifest = json.loads((saved / "manifest.json").read_text())
    assert "typicality.npy" in manifest["files"]
    loaded = SearchEngine.load(saved, verify=True)
    assert loaded.typicality is not None
    np.testing.assert_array_equal(loaded.typicality.log_qz, engine.typicality.log_qz)  # type: ignore[union-attr]
    a = engine.search(mu[0], 3, with_probability=True)
    b = loaded.search(mu[0], 3, with_probability=True)
    assert a.typicality == b.typicality and a.log_qz == b.log_qz
    # A version written before typicality existed: no file, no manifest entry.
    (saved / "typicality.npy").unlink()
    del manifest["files"]["typicality.npy"]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    old = SearchEngine.load(saved, verify=True)
    assert old.typicality is None
    res = old.search(mu[0], 3, with_probability=True)
    assert res.typicality is not None and math.isnan(res.typicality)
    assert res.log_qz == a.log_qz


def test_damaged_typicality_file_is_refused(tmp_path: Path) -> None:
    engine, _, _ = _engine("moderate")
    saved = engine.save(tmp_path / "v")
    arr = np.load(saved / "typicality.npy")
    np.save(saved / "typicality.npy", arr[::-1].copy())  # same size, not ascending
    with pytest.raises(CorruptIndexError, match=r"typicality\.npy"):
        SearchEngine.load(saved)


def test_no_reference_when_disabled_and_bad_rel_tol() -> None:
    engine, mu, _ = _engine("moderate", typicality_samples=0)
    assert engine.typicality is None
    for bad in (-0.1, 1.0, float("nan"), "1e-6", True):
        with pytest.raises(InvalidArgumentError) as info:
            engine.search(mu[0], 3, with_probability=True, rel_tol=bad)  # type: ignore[arg-type]
        assert info.value.field == "rel_tol"
    with pytest.raises(InvalidArgumentError):
        EngineConfig(typicality_samples=-1)


def test_approx_mode_interval_still_holds() -> None:
    engine, mu, log_sigma = _engine("moderate", approx_nlist=32, approx_nprobe=2, mode="approx")
    engine = SearchEngine.from_bank(engine.bank, engine.config, build_approx=True)
    z = _queries(mu, log_sigma, np.random.default_rng(4))
    batch = engine.search_batch_arrays(z, K, mode="approx", with_probability=True)
    assert batch.mode == "approx"
    assert batch.log_qz_lower is not None and batch.log_qz_upper is not None
    want = log_qz(log_q(z, mu, log_sigma))
    assert np.all((batch.log_qz_lower <= want) & (want <= batch.log_qz_upper))

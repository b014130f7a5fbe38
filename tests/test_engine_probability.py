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
from reference import (
    SIGMA_REGIMES,
    expected_log_q,
    leave_one_out_log_qz,
    log_q,
    log_qz,
    logsumexp,
    make_bank,
)

from latentsearch.data.banks import vae_like_posteriors
from latentsearch.engine import (
    BatchResult,
    EngineConfig,
    SearchEngine,
    lift_distributions,
    lift_points,
    probability,
)
from latentsearch.engine import exact as exact_mod
from latentsearch.engine.approx import ApproxQuery
from latentsearch.engine.probability import Normaliser, SearchWork, normalise
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
    # leave-one-out: each draw's own item is out of its sum, which is a mean over N - 1 items
    np.testing.assert_allclose(ref, np.sort(leave_one_out_log_qz(log_q(z, mu, log_sigma), rows)), rtol=1e-6)
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
    for b in range(z.shape[0]):  # single queries: the normaliser bounds whole partitions
        one = engine.search_batch_arrays(z[b : b + 1], K, mode="approx", with_probability=True)
        assert one.log_qz_lower is not None and one.log_qz_upper is not None
        assert one.log_qz_lower[0] <= want[b] <= one.log_qz_upper[0]


# -- partition bounds (an engine with an approximate index, calls of at most 4 queries) ---------


def _partitioned(regime: str, seed: int = 0) -> tuple[SearchEngine, np.ndarray, np.ndarray]:
    """N items in about 48 partitions of ~50 (exact mode: branch and bound over them)."""
    engine, mu, log_sigma = _engine(regime, seed, approx_nlist=48, approx_min_items=1000)
    assert engine.approx is not None
    return engine, mu, log_sigma


def _normaliser(
    engine: SearchEngine,
    z: np.ndarray,
    std: np.ndarray | None = None,
    labels: list[int] | None = None,
    rel_tol: float = 1e-6,
) -> tuple[Normaliser, BatchResult]:
    """The normaliser of one exact search, computed with the partitions, and that search."""
    assert engine.approx is not None
    if std is None:
        batch = engine.search_batch_arrays(z, K, mode="exact", labels=labels)
        lifted = lift_points(z)
        rescore = lambda qi, rows: engine.bank.log_prob_rows(z[qi], rows)  # noqa: E731
    else:
        batch = engine.search_distribution_batch(z, std, K, mode="exact", labels=labels)  # type: ignore[assignment]
        lifted = lift_distributions(z, std)
        rescore = lambda qi, rows: engine.bank.expected_log_prob_rows(z[qi], std[qi], rows)  # noqa: E731
    selection = None if labels is None else engine._selection(labels)
    query = ApproxQuery(points=z, std=std, lifted=lifted, rescore=rescore, selection=selection)
    bounds = engine.approx.partition_bounds(query)
    rows = batch.rows if isinstance(batch, BatchResult) else np.stack([r.rows for r in batch])
    scores = batch.scores if isinstance(batch, BatchResult) else np.stack([r.scores for r in batch])
    work = SearchWork(partitions=bounds)
    norm = normalise(engine.exact, lifted, rows, scores, rescore, selection, rel_tol=rel_tol, work=work)
    return norm, batch


def _contains(norm: Normaliser, scores: np.ndarray, allowed: np.ndarray | None, rel_tol: float) -> None:
    want = logsumexp(scores if allowed is None else scores[:, allowed])
    assert np.all(norm.log_lower <= want), (norm.log_lower - want).max()
    assert np.all(want <= norm.log_upper), (want - norm.log_upper).max()
    # rel_tol, plus the widening for the float64 rounding of scores of magnitude |want|
    assert np.all(norm.rel_error <= rel_tol + 1e-9 * (1.0 + np.abs(want))), norm.rel_error.max()
    assert np.all(norm.log_lower <= norm.log_scanned) and np.all(norm.log_scanned <= norm.log_upper)


@pytest.mark.parametrize("max_queries", [4, 0])  # partition bounds for calls of <= 4 queries / never
@pytest.mark.parametrize("regime", ["moderate", "mixed", "tiny"])
def test_partition_bounds_match_brute_force(
    regime: str, max_queries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probability, "PARTITION_MAX_QUERIES", max_queries)
    engine, mu, log_sigma = _partitioned(regime)
    z_all = _queries(mu, log_sigma, np.random.default_rng(5))
    scores_all = log_q(z_all, mu, log_sigma)
    for start in range(0, z_all.shape[0], 4):  # calls of at most PARTITION_MAX_QUERIES queries
        z, scores = z_all[start : start + 4], scores_all[start : start + 4]
        for rel_tol in (1e-6, 1e-2):
            norm, _ = _normaliser(engine, z, rel_tol=rel_tol)
            _contains(norm, scores, None, rel_tol)
            assert (norm.partitions_read > 0).any() == (max_queries > 0)
        # the engine's own call takes the same path
        batch = engine.search_batch_arrays(z, K, mode="exact", with_probability=True)
        _check(batch, scores, None, 1e-6)


def test_box_corner_accepts_whole_partitions_by_their_bound() -> None:
    # VAE-like posteriors (small sigmas, clustered means): far from a box corner the partitions'
    # bounds fall tens of nats below the best item's score.
    bank = vae_like_posteriors(N, D, seed=2)
    mu, log_sigma = bank.mu, bank.log_sigma
    cfg = EngineConfig(approx_nlist=48, approx_min_items=1000, typicality_samples=64)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=cfg)
    assert engine.approx is not None
    nonempty = int((engine.approx.list_sizes > 0).sum())
    corners = np.stack([np.full(D, 5.0), np.full(D, -5.0)])
    scores = log_q(corners, mu, log_sigma)
    norm, _ = _normaliser(engine, corners)
    _contains(norm, scores, None, 1e-6)
    # most partitions were accepted without touching their items, and few items were rescored
    assert np.all(norm.partitions_read < nonempty / 4), (norm.partitions_read, nonempty)
    assert np.all(norm.rescored < N / 20), norm.rescored
    # the reported p(i | z) of the top item is the brute force's
    res = engine.search(corners[0], 3, mode="exact", with_probability=True)
    assert res.probability is not None
    assert res.probability[0] == pytest.approx(math.exp(scores[0].max() - logsumexp(scores[0])[0]), rel=1e-6)


def test_partition_bounds_with_label_filter_and_distribution_queries() -> None:
    engine, mu, log_sigma = _partitioned("mixed", seed=1)
    labels = engine.bank.labels
    assert labels is not None
    rng = np.random.default_rng(6)
    z = _queries(mu, log_sigma, rng)[[0, 4, 7, 8]]
    allowed = np.isin(labels, [0, 2])
    norm, _ = _normaliser(engine, z, labels=[0, 2])
    assert norm.count == int(allowed.sum())
    _contains(norm, log_q(z, mu, log_sigma), allowed, 1e-6)
    std = rng.uniform(0.0, 0.5, z.shape)
    escores = expected_log_q(z, std, mu, log_sigma)
    norm, _ = _normaliser(engine, z, std=std)
    _contains(norm, escores, None, 1e-6)
    results = engine.search_distribution_batch(z, std, K, mode="exact", labels=[0, 2], with_probability=True)
    for b, res in enumerate(results):
        assert res.log_qz_lower is not None and res.log_qz_upper is not None
        assert res.log_qz_lower <= log_qz(escores[b], allowed)[0] <= res.log_qz_upper


class _FakeIndex:
    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def selected_counts(self, selection: object) -> np.ndarray:
        return self.counts


class _FakeBounds:
    """Hand-set partition bounds: ``cheap`` for every pair, ``refined`` where refinement is asked."""

    def __init__(self, cheap: np.ndarray, refined: np.ndarray, counts: np.ndarray) -> None:
        self.cheap, self._refined, self.index = cheap, refined, _FakeIndex(counts)
        self.asked: list[tuple[int, int]] = []

    def refine(self, q: np.ndarray, part: np.ndarray) -> np.ndarray:
        self.asked += list(zip(q.tolist(), part.tolist(), strict=True))
        return self._refined[q, part]


def test_partition_acceptance_at_its_cut_is_tight() -> None:
    # Three partitions of 10, 20 and 30 items (N_P = 60) and a budget W with c_P = log(W/2) - log 60.
    counts = np.array([10, 20, 30, 0])
    budget = np.array([math.log(1e-3)])
    c_part = math.log(0.5e-3) - math.log(60)
    cheap = np.array([[c_part + 5.0, c_part, c_part - 1e-9, 7.0]])
    refined = np.array([[c_part - 2.0, c_part, c_part - 1e-9, 7.0]])
    fake = _FakeBounds(cheap, refined, counts)
    keep, spent, kept = probability._accept_partitions(fake, np.array([0]), budget, None)  # type: ignore[arg-type]
    # Partition 1's bound equals the cut: scanned. 0 is refined below it and 2 is below: accepted whole.
    # The empty partition 3 is neither scanned nor counted, whatever its bound.
    assert keep.tolist() == [[False, True, False, False]]
    assert kept.tolist() == [20.0]
    assert sorted(fake.asked) == [(0, 0), (0, 1)]  # refined only where the cheap bound reaches the cut
    want = math.log(10 * math.exp(c_part - 2.0) + 30 * math.exp(c_part - 1e-9))
    assert spent[0] == pytest.approx(want, rel=1e-12)
    assert spent[0] <= budget[0] - math.log(2.0)  # the accepted partitions use at most half the width


@pytest.mark.parametrize("regime", ["moderate", "mixed", "tiny"])
def test_single_query_reuses_the_dense_screen_scores(regime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single unfiltered exact query scores every item of a group in the top-k search's dense
    screen; the normaliser screens with those same float32 scores instead of computing them again."""
    monkeypatch.setattr(exact_mod, "DENSE_BLOCK", 4)  # engage the dense screen on a small bank
    reused: list[bool] = []
    original = probability._screen_group

    def spy(*args: object) -> None:
        reused.append(args[-1] is not None)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(probability, "_screen_group", spy)
    engine, mu, log_sigma = _engine(regime)
    z = _queries(mu, log_sigma, np.random.default_rng(8))
    scores = log_q(z, mu, log_sigma)
    labels = engine.bank.labels
    assert labels is not None
    for b in range(z.shape[0]):
        reused.clear()
        batch = engine.search_batch_arrays(z[b : b + 1], K, mode="exact", with_probability=True)
        _check(batch, scores[b : b + 1], None, 1e-6)
        assert any(reused), reused  # the groups screened densely (the small ones go through FAISS)
        reused.clear()
        filtered = engine.search_batch_arrays(z[b : b + 1], K, labels=[1, 4], with_probability=True)
        _check(filtered, scores[b : b + 1], np.isin(labels, [1, 4]), 1e-6)
        assert not any(reused)  # filtered searches go through FAISS: nothing to reuse


def test_latents_of_new_items_are_typical_and_catalogue_items_more_so() -> None:
    # Items the engine never saw, drawn like its own: the reference leaves each draw's own item out,
    # so their latents land inside it (typicality about uniform), not below it.
    bank = vae_like_posteriors(N + 200, D, seed=4)
    mu, log_sigma = np.asarray(bank.mu), np.asarray(bank.log_sigma)
    engine = SearchEngine.build(mu[:N], log_sigma=log_sigma[:N], config=EngineConfig(typicality_samples=256))
    rng = np.random.default_rng(9)
    new = mu[N:] + np.exp(log_sigma[N:]) * rng.standard_normal((200, D))
    typ = engine.search_batch_arrays(new, 3, with_probability=True).typicality
    assert typ is not None
    assert 0.3 < float(np.mean(typ)) < 0.7, float(np.mean(typ))
    own = mu[:200] + np.exp(log_sigma[:200]) * rng.standard_normal((200, D))
    typ_own = engine.search_batch_arrays(own, 3, with_probability=True).typicality
    assert typ_own is not None and float(np.mean(typ_own)) > float(np.mean(typ))

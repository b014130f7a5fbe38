"""The compiled branch and bound (latentsearch/engine/kernels.py), forced onto explicitly.

References are the independent float64 numpy brute forces of tests/reference.py (ties broken by
ascending row) and a hand-computed case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import threading

import numpy as np
import pytest
from reference import SIGMA_REGIMES, log_q, make_bank, top_k

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine.exact import _topk
from latentsearch.engine.kernels import (
    _BUCKETS,
    KernelIndex,
    _bucket_order,
    _in_order,
    _quad_t,
    _round_f32,
    kernel_log_prob,
    warm,
)
from latentsearch.engine.strategy import StrategyCosts
from latentsearch.errors import CorruptIndexError
from latentsearch.posterior import DiagonalGaussian

KERNEL = EngineConfig(
    exact_strategy="kernel", approx_strategy="kernel", approx_certify=True, typicality_samples=0
)


def _engine(
    mu: np.ndarray, log_sigma: np.ndarray, labels: np.ndarray | None = None, *, nlist: int
) -> SearchEngine:
    config = dataclasses.replace(KERNEL, approx_nlist=nlist)
    return SearchEngine.build(mu, log_sigma=log_sigma, labels=labels, config=config, build_approx=True)


def _check_exact(engine: SearchEngine, mu: np.ndarray, log_sigma: np.ndarray, z: np.ndarray, k: int,
                 allowed: np.ndarray | None = None, labels: list[int] | None = None) -> None:  # fmt: skip
    want = top_k(log_q(z, mu, log_sigma), k, allowed)
    batch = engine.search_batch_arrays(z, k, mode="exact", labels=labels)
    singles = [engine.search(z[b], k, mode="exact", labels=labels) for b in range(z.shape[0])]
    for b in range(z.shape[0]):
        rows = batch.rows[b][batch.rows[b] >= 0]
        np.testing.assert_array_equal(rows, want[b], err_msg=f"batched query {b}")
        np.testing.assert_array_equal(singles[b].rows, want[b], err_msg=f"single query {b}")
        assert batch.certified[b] and singles[b].certified
        ref = log_q(z[b : b + 1], mu[rows], log_sigma[rows])[0]
        np.testing.assert_allclose(batch.scores[b][: rows.size], ref, rtol=1e-12, atol=1e-9)


@pytest.fixture(scope="module")
def vae_bank() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = vae_like_posteriors(20_000, 10, seed=3)
    log_sigma = b.log_sigma.copy()
    log_sigma[:4] = np.log(2e-4)  # tiny-sigma outliers: a scale group outside the partitions
    assert b.labels is not None
    return b.mu, log_sigma, b.labels


@pytest.fixture(scope="module")
def vae_engine(vae_bank) -> SearchEngine:
    mu, log_sigma, labels = vae_bank
    return _engine(mu, log_sigma, labels, nlist=300)


def test_kernel_score_is_the_posterior_log_prob() -> None:
    rng = np.random.default_rng(0)
    for regime in SIGMA_REGIMES:
        mu, log_sigma = make_bank(500, 7, regime, rng)
        index = KernelIndex(mu, log_sigma, np.full(500, -1, np.int32), 0, *(np.zeros((0, 7)),) * 4)
        z = rng.uniform(-5, 5, size=7)
        got = kernel_log_prob(index, z)  # position order: rows index.rows
        want = DiagonalGaussian(mu[index.rows], log_sigma=log_sigma[index.rows]).log_prob(z)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=regime)


def test_kernel_quad_sums_each_item_in_dimension_order() -> None:
    """The kernel's four-at-a-time sums (and the tail of a partition not a multiple of four) are
    the one-item loop's bit for bit: ``sum_j u_j^2`` accumulated in ascending j, in Python floats."""
    rng = np.random.default_rng(3)
    mu, log_sigma = make_bank(23, 5, "loguniform", rng)  # 23 = 5 * 4 + 3
    index = KernelIndex(mu, log_sigma, np.full(23, -1, np.int32), 0, *(np.zeros((0, 5)),) * 4)
    z = rng.uniform(-5, 5, size=5)
    got = kernel_log_prob(index, z)
    for c, row in enumerate(index.rows):
        s = 0.0
        for j in range(5):
            u = (float(z[j]) - float(mu[row, j])) * float(index.inv_b[c, j])
            s += u * u
        assert got[c] == -0.5 * s - float(index.log_norm[c]), c


def test_kernel_dimension_major_quad_matches_the_item_loop_bit_for_bit() -> None:
    """The batched pass's sums over a partition transposed to ``(d, n)`` (``_quad_t``, vectorised
    over items) are the one-item loop's bit for bit, on every sigma regime and a partition whose
    size is no multiple of a vector's width; the scratch past ``n`` is left alone."""
    rng = np.random.default_rng(5)
    for regime in SIGMA_REGIMES:
        mu, log_sigma = make_bank(37, 6, regime, rng)
        inv = np.exp(-log_sigma)
        z = rng.uniform(-5, 5, size=6)
        quad = np.full(40, 7.0)
        _quad_t(z, np.ascontiguousarray(mu.T), np.ascontiguousarray(inv.T), 37, quad)
        for c in range(37):
            s = 0.0
            for j in range(6):
                u = (float(z[j]) - float(mu[c, j])) * float(inv[c, j])
                s += u * u
            assert quad[c] == s, (regime, c)
        assert (quad[37:] == 7.0).all()


def test_hand_computed_case() -> None:
    # d = 1: items N(0, 1), N(2, 0.5^2), N(-1, 2^2), N(2, 0.5^2) (a duplicate: the tie goes to row 1).
    mu = np.array([[0.0], [2.0], [-1.0], [2.0]])
    log_sigma = np.log(np.array([[1.0], [0.5], [2.0], [0.5]]))
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=KERNEL, build_approx=True)
    res = engine.search(np.array([1.5]), 4, mode="exact")
    # log q(1.5) = -(1.5 - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2
    c = 0.5 * math.log(2 * math.pi)
    want = {
        0: -1.125 - c,
        1: -0.5 + math.log(2.0) - c,
        2: -(2.5**2) / 8 - math.log(2.0) - c,
    }
    assert res.rows.tolist() == [1, 3, 0, 2]
    np.testing.assert_allclose(res.scores, [want[1], want[1], want[0], want[2]], rtol=1e-14)


@pytest.mark.parametrize("k", [1, 10, 57])
def test_exact_kernel_equals_brute_force(vae_bank, vae_engine: SearchEngine, k: int) -> None:
    mu, log_sigma, _ = vae_bank
    fam = query_families((mu, log_sigma), 12, seed=5)
    fam["outlier"] = mu[:4] + 1e-5  # the top-1 is a tiny-sigma item outside the partitions
    for z in fam.values():
        _check_exact(vae_engine, mu, log_sigma, z, k)


def test_exact_kernel_with_label_filters(vae_bank, vae_engine: SearchEngine) -> None:
    mu, log_sigma, labels = vae_bank
    z = query_families((mu, log_sigma), 8, seed=6)["prior"]
    for wanted in ([0], [3, 7], [int(labels[0])]):
        allowed = np.isin(labels, wanted)
        _check_exact(vae_engine, mu, log_sigma, z, 10, allowed, wanted)


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
@pytest.mark.parametrize("d", [1, 10, 32])
def test_exact_kernel_on_random_banks(regime: str, d: int) -> None:
    rng = np.random.default_rng(d * 31 + len(regime))
    mu, log_sigma = make_bank(3000, d, regime, rng)
    mu[100:110], log_sigma[100:110] = mu[5], log_sigma[5]  # exact ties across partitions
    engine = _engine(mu, log_sigma, nlist=40)
    z = np.concatenate([rng.uniform(-5, 5, size=(5, d)), mu[[5, 7, 2000]] + 1e-3])
    _check_exact(engine, mu, log_sigma, z, 12)


def _tied_bank_and_queries(regime: str, d: int, *, seed: int) -> tuple[KernelIndex, np.ndarray, np.ndarray]:
    """A 2,500-item bank of ``regime`` in 40 partitions with exact ties across partitions, its
    kernel index, 32 queries (uniform, prior, near items) and their brute-force scores ``(32, N)``."""
    rng = np.random.default_rng(seed)
    mu, log_sigma = make_bank(2500, d, regime, rng)
    mu[100:110], log_sigma[100:110] = mu[5], log_sigma[5]  # exact ties across partitions
    index = _engine(mu, log_sigma, nlist=40).kernel_index()
    near = mu[[5, 7, 2000]] + 1e-3
    z = np.concatenate([rng.uniform(-5, 5, size=(20, d)), rng.standard_normal((9, d)), near])
    return index, z, log_q(z, mu, log_sigma)


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
@pytest.mark.parametrize("d", [1, 10, 128])
def test_batched_exact_kernel_equals_brute_force_and_the_per_query_search(regime: str, d: int) -> None:
    """The partition-by-partition search of a batch (forced on and off) and the per-query search
    split into 2 and 3 shares of the partitions (merged) against the float64 brute force: the same
    rows, certified, on every sigma regime, with ties across partitions."""
    index, z, scores = _tied_bank_and_queries(regime, d, seed=d * 7 + len(regime))
    ranked = -np.sort(-scores, axis=1)
    for k in (1, 12, 3000):  # k past the bank: the whole bank, in order
        want = top_k(scores, k)
        # a near tie at the k-th score (mu[5]'s copies, or chance in d = 1) may leave the proof short
        kth, nxt = ranked[:, min(k, ranked.shape[1]) - 1], ranked[:, min(k, ranked.shape[1] - 1)]
        tied = (k < ranked.shape[1]) & (kth - nxt <= 1e-9 * (1.0 + np.abs(kth)))
        results = {f"batched={b}": index.search(z, k, batched=b) for b in (True, False)}
        for split in (2, 3):
            results[f"split={split}"] = index.search(z, k, batched=False, split=split)
        for how, res in results.items():
            assert res.certified[~tied].all(), (how, k)
            for b in np.flatnonzero(res.certified):  # an uncertified answer goes to another exact path
                got = res.rows[b][res.rows[b] >= 0]
                np.testing.assert_array_equal(got, want[b], err_msg=f"{how} k={k} query {b}")
        alone = results["batched=False"]
        for how, res in results.items():
            both = alone.certified & res.certified
            np.testing.assert_array_equal(res.scores[both], alone.scores[both], err_msg=how)
        for split in (2, 3):  # the shares scan what the whole search would, and more: each prunes alone
            assert (results[f"split={split}"].visits >= results["batched=False"].visits).all()


def test_single_queries_split_across_threads_equal_the_brute_force(vae_bank) -> None:
    """An engine whose bank reaches ``split_min_items`` splits each small approximate call's
    partitions among its threads (they keep their recall; exact calls, not split, stay the float64
    brute force's); batches are not split."""
    mu, log_sigma, labels = vae_bank
    config = dataclasses.replace(KERNEL, approx_nlist=300, split_min_items=1, num_threads=2)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, labels=labels, config=config, build_approx=True)
    assert (engine._split_for(1), engine._split_for(7), engine._split_for(8)) == (2, 2, 1)
    unsplit = dataclasses.replace(config, split_min_items=len(mu) + 1)
    assert SearchEngine.build(mu[:50], log_sigma=log_sigma[:50], config=unsplit)._split_for(1) == 1
    z = query_families((mu, log_sigma), 6, seed=12)
    points = np.concatenate(list(z.values()))
    _check_exact(engine, mu, log_sigma, points[:5], 10)
    _check_exact(engine, mu, log_sigma, points[5:10], 10, np.isin(labels, [1, 4]), [1, 4])
    want = top_k(log_q(points, mu, log_sigma), 10)
    single = [engine.search(points[b], 10, mode="approx").rows for b in range(points.shape[0])]
    whole = dataclasses.replace(config, split_min_items=len(mu) + 1)
    alone = SearchEngine.build(mu, log_sigma=log_sigma, labels=labels, config=whole, build_approx=True)
    ref = [alone.search(points[b], 10, mode="approx").rows for b in range(points.shape[0])]
    assert _recall(np.array(single), want) >= _recall(np.array(ref), want) - 0.1


def test_batched_exact_kernel_with_a_label_filter(vae_bank, vae_engine: SearchEngine) -> None:
    mu, log_sigma, labels = vae_bank
    z = query_families((mu, log_sigma), 40, seed=8)["posterior"]
    selection = vae_engine._selection([3, 7])
    allowed = np.isin(labels, [3, 7])
    want = top_k(log_q(z, mu, log_sigma), 10, allowed)
    res = vae_engine.kernel_index().search(z, 10, selection=selection, batched=True)
    assert res.certified.all()
    for b in range(z.shape[0]):
        np.testing.assert_array_equal(res.rows[b][res.rows[b] >= 0], want[b])


def _recall(rows: np.ndarray, want: np.ndarray) -> float:
    hits = [len(set(rows[b][rows[b] >= 0]) & set(want[b])) for b in range(len(want))]
    return float(np.mean(hits)) / want.shape[1]


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
@pytest.mark.parametrize("d", [1, 10, 128])
def test_batched_approx_kernel_against_brute_force_and_the_per_query_search(regime: str, d: int) -> None:
    """The approximate search of a batch partition by partition (forced on) and query by query:
    certified answers are the float64 brute force's, recall close to the per-query search's, every
    partition allowed: exact and certified, k past the bank: the whole bank in order."""
    index, z, scores = _tied_bank_and_queries(regime, d, seed=d * 11 + len(regime))
    want = top_k(scores, 12)
    found = {b: index.search(z, 12, max_visits=6, first=2, batched=b) for b in (True, False)}
    for batched, res in found.items():
        for b in np.flatnonzero(res.certified):
            np.testing.assert_array_equal(res.rows[b], want[b], err_msg=f"batched={batched} query {b}")
        assert (res.visits >= 1).all() and (res.visits <= 6).all(), batched  # 12 items in 2500 / 40
    assert _recall(found[True].rows, want) >= _recall(found[False].rows, want) - 0.1
    halves = index.search(z, 12, max_visits=6, first=2, split=2)  # 3 partitions per share, 1 first
    for b in np.flatnonzero(halves.certified):
        np.testing.assert_array_equal(halves.rows[b], want[b], err_msg=f"split query {b}")
    assert (halves.visits >= 2).all() and (halves.visits <= 6).all()
    assert _recall(halves.rows, want) >= _recall(found[False].rows, want) - 0.15
    every = index.search(z, 12, max_visits=41, first=2, batched=True)  # every partition (+ outliers)
    ranked = -np.sort(-scores, axis=1)
    tied = ranked[:, 11] - ranked[:, 12] <= 1e-9 * (1.0 + np.abs(ranked[:, 11]))
    assert every.certified[~tied].all()
    for b in np.flatnonzero(every.certified):
        np.testing.assert_array_equal(every.rows[b], want[b])
    whole = index.search(z[:4], 3000, max_visits=3, first=1, batched=True)  # k past the bank
    assert whole.certified.all()
    np.testing.assert_array_equal(whole.rows[:, :2500], top_k(scores[:4], 3000))
    assert (whole.rows[:, 2500:] == -1).all()


def test_batched_approx_kernel_with_a_label_filter_finds_k_items(vae_bank, vae_engine: SearchEngine) -> None:
    """A filter that leaves few items in the budget's partitions: the batched search goes on by
    bound until it has k, and what it certifies is the filtered brute force's."""
    mu, log_sigma, labels = vae_bank
    z = query_families((mu, log_sigma), 40, seed=8)["posterior"]
    rare = int(np.argmin(np.bincount(labels)))
    selection = vae_engine._selection([rare])
    allowed = labels == rare
    want = top_k(log_q(z, mu, log_sigma), 10, allowed)
    index = vae_engine.kernel_index()
    res = index.search(z, 10, max_visits=2, first=1, selection=selection, batched=True)
    assert (res.rows >= 0).all()  # k found although 2 partitions may hold fewer
    assert (res.visits > 2).any()  # ... which they did for some queries: the search went on
    assert allowed[res.rows].all()
    for b in np.flatnonzero(res.certified):
        np.testing.assert_array_equal(res.rows[b], want[b])
    single = index.search(z, 10, max_visits=2, first=1, selection=selection, batched=False)
    assert _recall(res.rows, want) >= _recall(single.rows, want) - 0.1


def test_k_beyond_the_bank_and_the_filter() -> None:
    rng = np.random.default_rng(4)
    mu, log_sigma = make_bank(300, 4, "moderate", rng)
    labels = np.arange(300) % 3
    engine = _engine(mu, log_sigma, labels, nlist=10)
    z = rng.uniform(-4, 4, size=(3, 4))
    _check_exact(engine, mu, log_sigma, z, 500)  # k > N: the whole bank, in order
    _check_exact(engine, mu, log_sigma, z, 150, labels == 2, [2])  # k > the 100 selected items


def test_approx_kernel_recall_and_certified_answers(vae_bank, vae_engine: SearchEngine) -> None:
    mu, log_sigma, _ = vae_bank
    for family, z in query_families((mu, log_sigma), 32, seed=8).items():
        want = top_k(log_q(z, mu, log_sigma), 10)
        got = vae_engine.search_batch_arrays(z, 10, mode="approx")
        assert _recall(got.rows, want) >= 0.6, family  # 0.77-0.99 on this bank (prior lowest)
        assert vae_engine.approx is not None
        every = vae_engine.search_batch_arrays(z, 10, mode="approx", nprobe=vae_engine.approx.nlist)
        np.testing.assert_array_equal(every.rows, want)  # every partition scanned: exact
        assert every.certified.all()
        for b in np.flatnonzero(got.certified):  # certified: the bound stopped the search
            np.testing.assert_array_equal(got.rows[b], want[b])
        one = vae_engine.search_batch_arrays(z, 10, mode="approx", nprobe=1)  # one partition each
        assert not one.certified.all()


def test_kernel_index_without_rescore_and_threads(vae_bank, vae_engine: SearchEngine) -> None:
    mu, log_sigma, _ = vae_bank
    z = query_families((mu, log_sigma), 20, seed=9)["posterior"]
    index = vae_engine.kernel_index()
    one = index.search(z, 10, threads=1)
    two = index.search(z, 10, threads=2)
    want = top_k(log_q(z, mu, log_sigma), 10)
    np.testing.assert_array_equal(one.rows, want)
    np.testing.assert_array_equal(two.rows, one.rows)
    np.testing.assert_array_equal(two.scores, one.scores)
    assert one.certified.all() and (one.visits < index.offsets.size - 1).all()  # pruned some


def test_warm_is_once_per_process() -> None:
    warm()
    assert warm() == 0.0


def test_cost_model_takes_the_kernel_when_measured_cheaper() -> None:
    base = {"partitions": (1e-3, 20e-3), "flat": (4e-3, 8e-3)}
    with_kernel = StrategyCosts(batch_sizes=(1, 64), seconds={**base, "kernel": (0.5e-3, 30e-3)})
    assert with_kernel.choose(1) == "kernel"
    assert with_kernel.choose(64) == "flat"
    old = StrategyCosts.from_dict({"batch_sizes": [1, 64], "seconds": {k: list(v) for k, v in base.items()}})
    assert old.choose(1) == "partitions"  # costs saved before the kernel: the two measured paths


def test_in_order_agrees_with_the_sort() -> None:
    # the fast path that skips re-sorting the rescored top-k: only where the sort changes nothing
    rng = np.random.default_rng(11)
    for _ in range(200):
        k = int(rng.integers(1, 6))
        scores = np.round(rng.normal(size=(3, k)), 1)  # rounding makes ties
        rows = rng.permutation(50)[: 3 * k].reshape(3, k).astype(np.int64)
        pad = rng.random((3, k)) < 0.2
        rows[pad], scores[pad] = -1, -np.inf
        sorted_rows, sorted_scores = _topk(rows, scores, k)
        same = np.array_equal(sorted_rows, rows) and np.array_equal(sorted_scores, scores)
        assert _in_order(rows, scores) == same
        assert _in_order(sorted_rows, sorted_scores)


KERNEL_FILES = ("kernel_rows.npy", "kernel_mu.npy", "kernel_inv_sigma.npy", "kernel_log_norm.npy")


@pytest.mark.parametrize("mmap", [True, False])
def test_saved_kernel_arrays_are_loaded_not_rebuilt(
    vae_bank, vae_engine: SearchEngine, tmp_path, mmap: bool
) -> None:
    mu, log_sigma, _ = vae_bank
    path = vae_engine.save(tmp_path / "engine")
    assert all((path / name).is_file() for name in KERNEL_FILES)
    loaded = SearchEngine.load(path, mmap=mmap)
    assert loaded._kernel is not None  # no background thread: the saved copy
    assert not any(t.name == "latentsearch-kernel-index" for t in threading.enumerate())
    built = vae_engine.kernel_index()
    for field in ("rows", "mu_b", "inv_b", "log_norm"):
        got = getattr(loaded._kernel, field)
        assert isinstance(got, np.memmap) == mmap, field
        np.testing.assert_array_equal(got, getattr(built, field))
    np.testing.assert_array_equal(loaded._kernel.box, built.box)
    np.testing.assert_array_equal(loaded._kernel.offsets, built.offsets)
    z = query_families((mu, log_sigma), 6, seed=12)["box"]
    _check_exact(loaded, mu, log_sigma, z, 10)


def test_kernel_arrays_in_the_older_block_layout_are_rebuilt_not_misread(
    vae_bank, vae_engine: SearchEngine, tmp_path
) -> None:
    """Engines saved before the item-major rows hold mu and 1/sigma as ``(N d,)`` per-partition
    ``(d, n_p)`` blocks: read as rows they would score garbage, so the load rebuilds them."""
    mu, log_sigma, _ = vae_bank
    path = vae_engine.save(tmp_path / "engine")
    built = vae_engine.kernel_index()
    manifest = json.loads((path / "manifest.json").read_text())
    for name, field in (("kernel_mu.npy", "mu_b"), ("kernel_inv_sigma.npy", "inv_b")):
        rows = np.asarray(getattr(built, field))
        blocks = np.concatenate([rows[a:b].T.ravel() for a, b in itertools.pairwise(built.offsets.tolist())])
        np.save(path / name, blocks)
        manifest["files"][name] = {
            "bytes": (path / name).stat().st_size,
            "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(),
        }
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = SearchEngine.load(path)
    for thread in threading.enumerate():
        if thread.name == "latentsearch-kernel-index":
            thread.join(timeout=60)
    assert loaded._kernel is not None and loaded._kernel.mu_b.shape == mu.shape
    np.testing.assert_array_equal(loaded._kernel.mu_b, built.mu_b)
    z = query_families((mu, log_sigma), 6, seed=13)["prior"]
    _check_exact(loaded, mu, log_sigma, z, 10)


def test_engine_saved_without_kernel_arrays_builds_them_in_the_background(
    vae_bank, vae_engine: SearchEngine, tmp_path
) -> None:
    mu, log_sigma, _ = vae_bank
    path = vae_engine.save(tmp_path / "engine")
    manifest = json.loads((path / "manifest.json").read_text())
    for name in KERNEL_FILES:  # an engine saved before the kernel's arrays were
        (path / name).unlink()
        del manifest["files"][name]
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = SearchEngine.load(path)
    for thread in threading.enumerate():
        if thread.name == "latentsearch-kernel-index":
            thread.join(timeout=60)
    assert loaded._kernel is not None  # made by the load's thread, before any query
    assert not isinstance(loaded._kernel.mu_b, np.memmap)
    z = query_families((mu, log_sigma), 6, seed=12)["box"]
    _check_exact(loaded, mu, log_sigma, z, 10)
    flat = dataclasses.replace(vae_engine.config, exact_strategy="flat", approx_strategy="scan")
    assert SearchEngine(loaded.bank, flat, exact=loaded.exact, approx=loaded.approx).prepare_kernel() is None


def test_engine_that_never_takes_the_kernel_saves_no_kernel_arrays(vae_bank, tmp_path) -> None:
    mu, log_sigma, _ = vae_bank
    config = dataclasses.replace(KERNEL, exact_strategy="flat", approx_strategy="scan", approx_nlist=100)
    engine = SearchEngine.build(mu[:3000], log_sigma=log_sigma[:3000], config=config, build_approx=True)
    path = engine.save(tmp_path / "engine")
    assert not any((path / name).exists() for name in KERNEL_FILES)
    assert SearchEngine.load(path)._kernel is None


@pytest.mark.parametrize("damage", ["duplicate", "order"])
def test_damaged_kernel_rows_are_refused(vae_engine: SearchEngine, tmp_path, damage: str) -> None:
    path = vae_engine.save(tmp_path / "engine")
    rows = np.load(path / "kernel_rows.npy")
    lists = np.load(path / "approx_lists.npy")
    key = np.where(lists < 0, lists.max() + 1, lists)[rows]
    if damage == "duplicate":
        rows[1] = rows[0]
    else:  # two rows of different partitions swapped: still a permutation, out of partition order
        i = int(np.flatnonzero(np.diff(key) > 0)[0])
        rows[i], rows[i + 1] = rows[i + 1], rows[i]
    np.save(path / "kernel_rows.npy", rows)  # same size: only the content check can tell
    with pytest.raises(CorruptIndexError, match=r"kernel_rows\.npy"):
        SearchEngine.load(path)


def test_partitions_from_partition_min_items_with_exact_auto_mode() -> None:
    rng = np.random.default_rng(13)
    mu, log_sigma = make_bank(2000, 6, "moderate", rng)
    config = EngineConfig(partition_min_items=1500, approx_min_items=5000, typicality_samples=0)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config)
    assert engine.approx is not None and engine.costs is not None  # the partitions, measured
    z = rng.uniform(-4, 4, size=(5, 6))
    res = engine.search(z[0], 10)
    assert res.mode == "exact"  # below approx_min_items "auto" still answers exactly
    _check_exact(engine, mu, log_sigma, z, 10)
    small = SearchEngine.build(mu[:1000], log_sigma=log_sigma[:1000], config=config)
    assert small.approx is None


def test_float32_box_is_rounded_outward() -> None:
    values = np.array([0.1, -1.0 / 3.0, 1.0, 2.0**-149 / 3.0, 1e300, -1e300, 3.4028235e38, np.inf, -np.inf])
    down, up = _round_f32(values, down=True), _round_f32(values, down=False)
    assert down.dtype == np.float32 and up.dtype == np.float32
    wide = values.astype(np.float64)
    assert np.all(down.astype(np.float64) <= wide) and np.all(up.astype(np.float64) >= wide)
    # the nearest float32 on each side: one step further in would cross the value (or be exact)
    with np.errstate(over="ignore"):
        inner_down = np.nextafter(down, np.float32(np.inf)).astype(np.float64)
        inner_up = np.nextafter(up, np.float32(-np.inf)).astype(np.float64)
    exact = down.astype(np.float64) == wide
    assert np.all(exact | (inner_down > wide)) and np.all((up.astype(np.float64) == wide) | (inner_up < wide))
    assert down[4] == np.finfo(np.float32).max and up[4] == np.inf  # 1e300: past float32
    assert down[5] == -np.inf and up[5] == -np.finfo(np.float32).max
    assert np.isnan(_round_f32(np.array([np.nan]), down=True)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_order_is_by_bucket_of_the_bound(seed: int) -> None:
    """Every partition not seen and above -inf once; buckets non-decreasing along the order, +inf in
    bucket 0; each bucket's recorded maximum is its members' maximum and bounds every later bucket."""
    rng = np.random.default_rng(seed)
    n = 3000
    bound = -np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-3, 6, n) + 5.0
    bound[rng.choice(n, 40, replace=False)] = -np.inf
    bound[rng.choice(n, 3, replace=False)] = np.inf
    seen = np.zeros(n, dtype=np.bool_)
    seen[rng.choice(n, 100, replace=False)] = True
    order, key = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    starts, bmax = np.empty(_BUCKETS + 1, dtype=np.int64), np.empty(_BUCKETS)
    got = _bucket_order(bound, seen, order, key, starts, bmax)
    want = np.flatnonzero(~seen & (bound > -np.inf))
    assert got == want.size
    np.testing.assert_array_equal(np.sort(order[:got]), want)
    keys = key[order[:got]]
    assert np.all(np.diff(keys) >= 0)
    finite = np.isfinite(bound[order[:got]])
    assert np.all(keys[~finite] == 0) and np.all(keys[finite] >= 1)
    for c in np.unique(keys):
        members = bound[order[:got]][keys == c]
        assert bmax[c] == members.max()
        assert np.all(bound[order[:got]][keys > c] <= members.min())

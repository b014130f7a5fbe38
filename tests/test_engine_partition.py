"""Partitioning of the approximate index (engine/partition.py) and the build's bounds over it.

Two-level k-means must give every item exactly one list, use every list id in [0, nlist), be
deterministic for a seed, and the approximate index built on it must keep rigorous boxes: every
item inside its partition's mu, sigma, lifted and centred boxes, and the per-partition upper bound
at or above the exact log q(z|x) of every member (against the independent float64 reference).
"""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
from reference import log_q, top_k

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine, lift_items, partition
from latentsearch.engine.approx import ApproxIndex
from latentsearch.engine.exact import ExactIndex
from latentsearch.engine.partition import fine_list_counts, flat_partition, two_level_partition
from latentsearch.errors import InvalidArgumentError

N, D = 6_000, 6


@pytest.fixture(scope="module")
def bank():
    return vae_like_posteriors(N, D, seed=3)


def _features(bank):
    feat = np.concatenate([bank.mu, bank.log_sigma], axis=1)
    feat = ((feat - feat.mean(0)) / feat.std(0)).astype(np.float32)
    reads = []

    def features(p):
        reads.append(p.size)
        return feat[p]

    return features, feat, reads


@pytest.mark.parametrize("nlist", [1, 7, 150, 600])
def test_two_level_gives_every_item_one_list_and_uses_every_list(bank, nlist):
    features, _, _ = _features(bank)
    assign = two_level_partition(features, N, nlist, sample=2_000, iters=5, seed=0)
    assert assign.shape == (N,) and assign.dtype == np.int64
    assert assign.min() >= 0 and assign.max() < nlist
    # every list gets items: fine k-means inside a cell is seeded on that cell's own items
    assert np.unique(assign).size >= 0.95 * nlist


def test_two_level_is_deterministic_and_depends_on_the_seed(bank):
    features, _, _ = _features(bank)
    a = two_level_partition(features, N, 200, sample=2_000, iters=5, seed=4)
    b = two_level_partition(features, N, 200, sample=2_000, iters=5, seed=4)
    c = two_level_partition(features, N, 200, sample=2_000, iters=5, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_two_level_lists_are_compact(bank):
    """Items sit nearer their own list's mean than the average distance to other lists' means
    (a partition by shape, not an arbitrary split), and about as well as flat k-means does."""
    features, feat, _ = _features(bank)

    def spread(assign):
        counts = np.bincount(assign)
        means = np.zeros((counts.size, feat.shape[1]))
        np.add.at(means, assign, feat)
        means /= np.maximum(counts, 1)[:, None]
        return float(((feat - means[assign]) ** 2).sum(1).mean())

    two = spread(two_level_partition(features, N, 100, sample=N, iters=10, seed=0))
    flat = spread(flat_partition(features, N, 100, sample=N, iters=10, seed=0))
    total = float(((feat - feat.mean(0)) ** 2).sum(1).mean())
    assert two < 0.25 * total
    assert two < 1.3 * flat


def test_two_level_reads_features_in_bounded_chunks():
    """The features are read through the callable, never all at once beyond a chunk or a cell."""
    rng = np.random.default_rng(0)
    n = 600_000
    feat = rng.standard_normal((n, 2)).astype(np.float32)
    reads = []

    def features(p):
        reads.append(p.size)
        return feat[p]

    assign = two_level_partition(features, n, 16, sample=10_000, iters=2, seed=0)
    assert np.bincount(assign, minlength=16).sum() == n
    assert max(reads) <= max(partition._CHUNK, int(np.bincount(assign).max() * 4 + 1))
    assert max(reads) < n


@pytest.mark.parametrize(
    ("counts", "nlist"),
    [([10, 0, 5, 1], 4), ([100, 100, 1], 3), ([3, 3, 3], 9), ([1000, 1, 1, 1], 10), ([7], 7), ([50, 49], 17)],
)
def test_fine_list_counts(counts, nlist):
    counts = np.array(counts)
    lists = fine_list_counts(counts, nlist)
    assert lists.sum() == nlist
    assert ((lists >= 1) == (counts > 0)).all()  # every non-empty cell gets a list, empty ones none
    assert (lists <= counts).all()
    share = counts * nlist / counts.sum()
    assert (np.abs(lists - share) < 1 + 1e-9).all() or (counts == 1).any()


def test_partition_items_switches_to_two_level(bank, monkeypatch):
    features, _, _ = _features(bank)
    monkeypatch.setattr(partition, "TWO_LEVEL_MIN_LISTS", 50)
    two = partition.partition_items(features, N, 60, sample=2_000, iters=5, seed=0)
    np.testing.assert_array_equal(two, two_level_partition(features, N, 60, sample=2_000, iters=5, seed=0))
    flat = partition.partition_items(features, N, 40, sample=2_000, iters=5, seed=0)
    np.testing.assert_array_equal(flat, flat_partition(features, N, 40, sample=2_000, iters=5, seed=0))


def _nearest_hook(features, calls):
    """An assign hook doing what the build does itself (FAISS nearest centroid, one call for N
    under the build's chunk), recording each call's positions and centroids' shape."""

    def assign(positions, centroids):
        calls.append((positions.copy(), centroids.shape))
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        return index.search(features(positions), 1)[1][:, 0]

    return assign


@pytest.mark.parametrize(("part", "centroids"), [(flat_partition, 150), (two_level_partition, 12)])
def test_assign_hook_replaces_the_every_item_pass(bank, part, centroids):
    """The hook gets every position once, with the flat centroids or the sqrt(nlist) coarse cells;
    giving the build's own nearest-centroid answer leaves the partition bit-identical."""
    features, _, _ = _features(bank)
    calls = []
    hooked = part(features, N, 150, sample=2_000, iters=5, seed=0, assign=_nearest_hook(features, calls))
    np.testing.assert_array_equal(hooked, part(features, N, 150, sample=2_000, iters=5, seed=0))
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0][0], np.arange(N))
    assert calls[0][1] == (centroids, 2 * D)


def test_assign_hook_answer_is_the_one_used(bank):
    """An arbitrary answer (item i -> centroid i mod k): flat lists are exactly it; two-level lists
    lie in the list range of the cell the hook gave (fine_list_counts, numbered cell after cell)."""
    features, _, _ = _features(bank)

    def modulo(positions, centroids):
        return positions % centroids.shape[0]

    flat = flat_partition(features, N, 40, sample=2_000, iters=5, seed=0, assign=modulo)
    np.testing.assert_array_equal(flat, np.arange(N) % 40)
    two = two_level_partition(features, N, 150, sample=2_000, iters=5, seed=0, assign=modulo)
    cell = np.arange(N) % 12  # round(sqrt(150)) coarse cells
    lists = fine_list_counts(np.bincount(cell, minlength=12), 150)
    first = np.cumsum(lists) - lists
    assert (first[cell] <= two).all() and (two < first[cell] + lists[cell]).all()
    assert np.unique(two).size > 0.9 * 150


@pytest.mark.parametrize(
    "answer",
    [
        lambda p, c: p[:-1] % c.shape[0],  # too short
        lambda p, c: p % c.shape[0] + 1,  # one past the last centroid
        lambda p, c: -np.ones(p.size, np.int64),  # negative
        lambda p, c: (p % c.shape[0]).astype(np.float64),  # not integers
    ],
)
def test_assign_hook_answer_is_checked(bank, answer):
    features, _, _ = _features(bank)
    with pytest.raises(InvalidArgumentError) as info:
        flat_partition(features, N, 40, sample=2_000, iters=5, seed=0, assign=answer)
    assert info.value.field == "assign"


def _scrambled(rows, centroids, center, scale):
    """An assign_rows hook ignoring the features: bank row r -> centroid (7919 r) mod k."""
    return (rows * 7919) % centroids.shape[0]


@pytest.fixture(scope="module", params=["flat", "two_level", "hooked"])
def built(request, bank):
    """The approximate index of each partitioning; "hooked": a flat build whose every-item pass is
    the arbitrary :func:`_scrambled` (boxes and bounds must stay rigorous for any assignment)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(partition, "TWO_LEVEL_MIN_LISTS", 1 if request.param == "two_level" else 1 << 30)
    hook = _scrambled if request.param == "hooked" else None
    try:
        exact = ExactIndex.build(bank.mu, bank.log_sigma)
        config = EngineConfig(approx_nlist=90, kmeans_iters=5)
        approx = ApproxIndex.build(bank.mu, bank.log_sigma, config, groups=exact.groups, assign_rows=hook)
        if hook is not None:
            rows = np.flatnonzero(approx.list_of_row >= 0)
            np.testing.assert_array_equal(approx.list_of_row[rows], (rows * 7919) % 90)
        return approx, exact, config
    finally:
        mp.undo()


def test_build_boxes_contain_their_items(built, bank):
    approx, _, _ = built
    mu, ls = bank.mu, bank.log_sigma
    lists = approx.list_of_row.astype(np.int64)
    inside = lists >= 0
    assert inside.sum() == approx.ivf.ntotal == approx.list_sizes.sum()
    np.testing.assert_array_equal(np.bincount(lists[inside], minlength=approx.nlist), approx.list_sizes)
    r, a = np.flatnonzero(inside), lists[inside]
    assert (approx.lo[a] <= mu[r]).all() and (mu[r] <= approx.hi[a]).all()
    sigma = np.exp(ls[r])
    assert (approx.slo[a] <= sigma * (1 + 1e-12)).all() and (sigma <= approx.shi[a] * (1 + 1e-12)).all()
    lifted = lift_items(mu[r], ls[r])
    assert (approx.lifted_box[0][a] <= lifted).all() and (lifted <= approx.lifted_box[1][a]).all()
    m, blo, bhi = approx.centred
    b = (mu[r] - m[a]) * np.exp(-2.0 * ls[r])
    assert (blo[a] <= b).all() and (b <= bhi[a]).all()
    # the partition's centre is its members' mean mu (computed by segments, checked here by bincount)
    full = approx.list_sizes > 0
    for j in range(D):
        mean = np.bincount(a, weights=mu[r, j], minlength=approx.nlist) / np.maximum(approx.list_sizes, 1)
        np.testing.assert_allclose(m[full, j], mean[full], rtol=1e-9, atol=1e-12)
    # every stored inverted list holds exactly its partition's rows
    invlists = approx.ivf.invlists
    for p in range(0, approx.nlist, 7):
        ids = faiss.rev_swig_ptr(invlists.get_ids(p), invlists.list_size(p)).copy()
        np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(lists == p))


def test_build_bounds_are_rigorous(built, bank):
    """Every partition's upper bound reaches the best exact score among its members."""
    approx, _, _ = built
    z = np.concatenate(list(query_families(bank, 20, seed=9).values()))
    bounds = approx.upper_bounds(z, None)  # (Q, L)
    exact = log_q(z, bank.mu, bank.log_sigma)  # (Q, N) independent float64 reference
    lists = approx.list_of_row.astype(np.int64)
    for p in np.flatnonzero(approx.list_sizes):
        members = lists == p
        assert (exact[:, members].max(axis=1) <= bounds[:, p]).all()


def test_two_level_engine_exact_search_matches_brute_force(bank, monkeypatch):
    monkeypatch.setattr(partition, "TWO_LEVEL_MIN_LISTS", 1)
    config = EngineConfig(approx_nlist=90, kmeans_iters=5, typicality_samples=0)
    engine = SearchEngine.build(bank.mu, log_sigma=bank.log_sigma, config=config, build_approx=True)
    z = np.concatenate(list(query_families(bank, 10, seed=11).values()))
    want = top_k(log_q(z, bank.mu, bank.log_sigma), 10)
    for strategy in ("partitions", "flat"):
        forced = SearchEngine(
            engine.bank,
            dataclasses.replace(config, exact_strategy=strategy),
            exact=engine.exact,
            approx=engine.approx,
        )
        np.testing.assert_array_equal(forced.search_batch_arrays(z, 10, mode="exact").rows, want)


def test_engine_build_passes_the_assign_hook_and_stays_exact(bank):
    """SearchEngine.build hands assign_rows to the approximate build; with the arbitrary
    :func:`_scrambled` partitions, exact search still equals the float64 brute force."""
    config = EngineConfig(approx_nlist=90, kmeans_iters=5, typicality_samples=0)
    engine = SearchEngine.build(
        bank.mu, log_sigma=bank.log_sigma, config=config, build_approx=True, assign_rows=_scrambled
    )
    assert engine.approx is not None
    rows = np.flatnonzero(engine.approx.list_of_row >= 0)
    assert rows.size > 0.9 * N
    np.testing.assert_array_equal(engine.approx.list_of_row[rows], (rows * 7919) % 90)
    z = np.concatenate(list(query_families(bank, 10, seed=12).values()))
    want = top_k(log_q(z, bank.mu, bank.log_sigma), 10)
    np.testing.assert_array_equal(engine.search_batch_arrays(z, 10, mode="exact").rows, want)

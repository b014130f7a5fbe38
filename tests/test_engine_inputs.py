"""Bad inputs raise InvalidArgumentError naming the field, and leave the engine answering as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import log_q, top_k

from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.errors import InvalidArgumentError, LatentSearchError

D = 3


def ref_top(z, mu, log_sigma, k):
    """Rows of the float64 reference's top ``k`` for one point ``z (d,)``."""
    return top_k(log_q(z, mu, log_sigma)[0], k)


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(30)
    mu = rng.uniform(-3, 3, size=(120, D))
    log_sigma = rng.uniform(math.log(1e-3), math.log(2.0), size=(120, D))
    labels = np.arange(120) % 4
    return mu, log_sigma, labels


@pytest.fixture(scope="module")
def engine(bank):
    mu, log_sigma, labels = bank
    return SearchEngine.build(
        mu, log_sigma=log_sigma, labels=labels, config=EngineConfig(max_k=50), build_approx=True
    )


Z_OK = np.array([0.3, -1.2, 2.0])
MEAN_OK, STD_OK = np.array([0.1, 0.2, -0.3]), np.array([0.5, 0.1, 1.0])


def snapshot(engine):
    return (
        engine.search(Z_OK, 7, mode="exact"),
        engine.search_batch(np.stack([Z_OK, -Z_OK]), 5, mode="exact", labels=[1, 2]),
        engine.search(Z_OK, 7, mode="approx", nprobe=2),
        engine.search_distribution(MEAN_OK, STD_OK, 6),
    )


def assert_same(a, b):
    flat_a = [a[0], *a[1], a[2], a[3]]
    flat_b = [b[0], *b[1], b[2], b[3]]
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x.rows, y.rows)
        np.testing.assert_array_equal(x.scores, y.scores)
        assert x.ids == y.ids


QUERY_CASES = {
    "z too short": (lambda e: e.search(np.zeros(D - 1), 5), "z"),
    "z too long": (lambda e: e.search(np.zeros(D + 1), 5), "z"),
    "z 2-D to search": (lambda e: e.search(np.zeros((1, D)), 5), "z"),
    "batch wrong d": (lambda e: e.search_batch(np.zeros((2, D + 2)), 5), "z"),
    "batch empty": (lambda e: e.search_batch(np.zeros((0, D)), 5), "z"),
    "batch 1-D": (lambda e: e.search_batch(np.zeros(D), 5), "z"),
    "z NaN": (lambda e: e.search(np.array([0.0, np.nan, 0.0]), 5), "z"),
    "z inf": (lambda e: e.search(np.array([np.inf, 0.0, 0.0]), 5), "z"),
    "z -inf in batch": (lambda e: e.search_batch(np.array([[0.0, 0, 0], [0, -np.inf, 0]]), 5), "z"),
    "z too large": (lambda e: e.search(np.array([0.0, 1.0000001e6, 0.0]), 5), "z"),
    "z non-numeric": (lambda e: e.search(["a", "b", "c"], 5), "z"),
    "k zero": (lambda e: e.search(Z_OK, 0), "k"),
    "k negative": (lambda e: e.search(Z_OK, -3), "k"),
    "k above max_k": (lambda e: e.search(Z_OK, 51), "k"),
    "k float": (lambda e: e.search(Z_OK, 5.0), "k"),
    "k str": (lambda e: e.search(Z_OK, "5"), "k"),
    "k bool": (lambda e: e.search(Z_OK, True), "k"),
    "k zero brute force": (lambda e: e.brute_force(Z_OK[None], 0), "k"),
    "mode unknown": (lambda e: e.search(Z_OK, 5, mode="fast"), "mode"),
    "nprobe zero": (lambda e: e.search(Z_OK, 5, mode="approx", nprobe=0), "nprobe"),
    "nprobe float": (lambda e: e.search(Z_OK, 5, mode="approx", nprobe=2.5), "nprobe"),
    "labels unknown": (lambda e: e.search(Z_OK, 5, labels=[9]), "labels"),
    "labels non-int": (lambda e: e.search(Z_OK, 5, labels=["x"]), "labels"),
    "labels fractional": (lambda e: e.search(Z_OK, 5, labels=[2.5]), "labels"),
    "labels inf": (lambda e: e.search(Z_OK, 5, labels=[float("inf")]), "labels"),
    "labels NaN": (lambda e: e.search(Z_OK, 5, labels=[float("nan")]), "labels"),
    "labels scalar": (lambda e: e.search(Z_OK, 5, labels=2), "labels"),
    "std negative": (lambda e: e.search_distribution(MEAN_OK, np.array([0.1, -0.1, 0.1]), 5), "std"),
    "std NaN": (lambda e: e.search_distribution(MEAN_OK, np.array([0.1, np.nan, 0.1]), 5), "std"),
    "std inf": (lambda e: e.search_distribution(MEAN_OK, np.array([0.1, np.inf, 0.1]), 5), "std"),
    "std wrong shape": (lambda e: e.search_distribution(MEAN_OK, np.ones(D + 1), 5), "std"),
    "std batch shape": (lambda e: e.search_distribution_batch(np.zeros((2, D)), np.ones((3, D)), 5), "std"),
    "mean NaN": (lambda e: e.search_distribution(np.array([np.nan, 0, 0]), STD_OK, 5), "mean"),
    "mean wrong d": (lambda e: e.search_distribution(np.zeros(D + 1), np.ones(D + 1), 5), "mean"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES), ids=list(QUERY_CASES))
def test_bad_query_raises_and_engine_unchanged(engine, bank, case):
    call, field = QUERY_CASES[case]
    before = snapshot(engine)
    with pytest.raises(InvalidArgumentError) as exc:
        call(engine)
    assert exc.value.field == field, exc.value.message
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, LatentSearchError)
    after = snapshot(engine)
    assert_same(before, after)
    mu, log_sigma, _ = bank
    np.testing.assert_array_equal(after[0].rows, ref_top(Z_OK, mu, log_sigma, 7))


def test_boundary_values_accepted(engine, bank):
    mu, log_sigma, _ = bank
    assert len(engine.search(Z_OK, 50)) == 50  # k == max_k
    assert len(engine.search(Z_OK, np.int64(3))) == 3  # numpy integer k
    z = np.array([1e6, -1e6, 0.0])  # |z| == 1e6 exactly is allowed
    np.testing.assert_array_equal(engine.search(z, 4, mode="exact").rows, ref_top(z, mu, log_sigma, 4))
    assert len(engine.search(Z_OK, 5, mode="approx", nprobe=np.int32(1))) == 5
    assert len(engine.search(Z_OK.tolist(), 2)) == 2  # lists are fine


BUILD_CASES = {
    "sigma zero": (dict(sigma=np.where(np.eye(4, D) > 0, 0.0, 1.0)), "sigma"),
    "sigma negative": (dict(sigma=-np.ones((4, D))), "sigma"),
    "sigma inf": (dict(sigma=np.full((4, D), np.inf)), "sigma"),
    "sigma NaN": (dict(sigma=np.full((4, D), np.nan)), "sigma"),
    "log_sigma inf": (dict(log_sigma=np.full((4, D), np.inf)), "sigma"),
    "log_sigma -inf": (dict(log_sigma=np.full((4, D), -np.inf)), "sigma"),
    "logvar NaN": (dict(logvar=np.full((4, D), np.nan)), "sigma"),
    "no scale": ({}, "log_sigma"),
    "two scales": (dict(log_sigma=np.zeros((4, D)), sigma=np.ones((4, D))), "log_sigma"),
    "three scales": (
        dict(log_sigma=np.zeros((4, D)), logvar=np.zeros((4, D)), sigma=np.ones((4, D))),
        "log_sigma",
    ),
    "shape mismatch d": (dict(log_sigma=np.zeros((4, D + 1))), "log_sigma"),
    "shape mismatch n": (dict(log_sigma=np.zeros((5, D))), "log_sigma"),
    "log_sigma 1-D": (dict(log_sigma=np.zeros(4)), "log_sigma"),
    "log_sigma str": (dict(log_sigma=np.full((4, D), "a")), "log_sigma"),
    "ids wrong length": (dict(log_sigma=np.zeros((4, D)), ids=["a", "b", "c"]), "ids"),
    "ids duplicate": (dict(log_sigma=np.zeros((4, D)), ids=["a", "b", "c", "a"]), "ids"),
    "ids duplicate int/str": (dict(log_sigma=np.zeros((4, D)), ids=np.array([1, "1", 2, 3], object)), "ids"),
    "ids empty string": (dict(log_sigma=np.zeros((4, D)), ids=["a", "", "c", "d"]), "ids"),
    "ids 2-D": (dict(log_sigma=np.zeros((4, D)), ids=[["a", "b"], ["c", "d"]]), "ids"),
    "ids float": (dict(log_sigma=np.zeros((4, D)), ids=[0.5, 1.5, 2.5, 3.5]), "ids"),
    "labels float": (dict(log_sigma=np.zeros((4, D)), labels=[0.5, 1, 2, 3]), "labels"),
    "labels str": (dict(log_sigma=np.zeros((4, D)), labels=["a", "b", "c", "d"]), "labels"),
    "labels NaN": (dict(log_sigma=np.zeros((4, D)), labels=[0, np.nan, 1, 2]), "labels"),
    "labels wrong length": (dict(log_sigma=np.zeros((4, D)), labels=[0, 1, 2]), "labels"),
}


@pytest.mark.parametrize("case", list(BUILD_CASES), ids=list(BUILD_CASES))
def test_bad_build_raises(case):
    kwargs, field = BUILD_CASES[case]
    mu = np.zeros((4, D))
    with pytest.raises(InvalidArgumentError) as exc:
        SearchEngine.build(mu, **kwargs)
    assert exc.value.field == field, exc.value.message


@pytest.mark.parametrize(
    "mu",
    [
        np.zeros((0, D)),  # empty bank
        np.zeros((4, 0)),  # zero latent dimension
        np.zeros(4),  # 1-D
        np.where(np.eye(4, D) > 0, np.nan, 0.0),  # NaN in mu
        np.full((4, D), np.inf),  # inf in mu
    ],
    ids=["empty", "d0", "1-D", "NaN", "inf"],
)
def test_bad_mu_raises(mu):
    ls = np.zeros(mu.shape) if mu.ndim == 2 else np.zeros((4, D))
    with pytest.raises(InvalidArgumentError) as exc:
        SearchEngine.build(mu, log_sigma=ls)
    assert exc.value.field in ("mu", "log_sigma"), exc.value.message
    if mu.size and not np.isfinite(mu).all():
        assert exc.value.field == "mu"


def test_integral_float_labels_accepted():
    engine = SearchEngine.build(np.zeros((3, D)), log_sigma=np.zeros((3, D)), labels=[0.0, 1.0, 1.0])
    res = engine.search(np.zeros(D), 3, labels=[1])
    assert res.rows.tolist() == [1, 2]
    assert res.labels.dtype == np.int64


def test_build_does_not_alias_caller_arrays():
    rng = np.random.default_rng(31)
    mu = rng.uniform(-2, 2, size=(50, D))
    ls = rng.uniform(-1, 0.5, size=(50, D))
    engine = SearchEngine.build(mu, log_sigma=ls)
    before = engine.search(Z_OK, 5)
    want = ref_top(Z_OK, mu.copy(), ls.copy(), 5)
    mu[:] = 0.0
    ls[:] = 5.0
    after = engine.search(Z_OK, 5)
    np.testing.assert_array_equal(before.rows, after.rows)
    np.testing.assert_array_equal(after.rows, want)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_k=0),
        dict(exact_extra=-1),
        dict(scale_group_base=1.0),
        dict(approx_nlist=0),
        dict(mode="fast"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(InvalidArgumentError) as exc:
        EngineConfig(**kwargs)
    assert exc.value.field == next(iter(kwargs))

"""The lifted inner-product identity and its float32 error bound."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from reference import LOG_2PI, expected_log_q, log_q

from latentsearch.engine.lifting import (
    error_coefficient,
    lift_distributions,
    lift_items,
    lift_points,
)


@pytest.mark.parametrize("d", [1, 2, 10, 64])
def test_lifted_identity_points(d):
    rng = np.random.default_rng(d)
    mu = rng.uniform(-3, 3, size=(200, d))
    log_sigma = rng.uniform(math.log(0.1), math.log(10.0), size=(200, d))
    z = rng.uniform(-5, 5, size=(20, d))
    items, queries = lift_items(mu, log_sigma), lift_points(z)
    assert items.shape == (200, 2 * d + 1) and queries.shape == (20, 2 * d + 1)
    assert items.dtype == np.float64 and queries.dtype == np.float64
    ref = log_q(z, mu, log_sigma)
    np.testing.assert_allclose(queries @ items.T, ref, rtol=1e-9, atol=1e-9)


def test_lifted_layout():
    mu = np.array([[1.0, -2.0]])
    log_sigma = np.log(np.array([[0.5, 2.0]]))
    x = lift_items(mu, log_sigma)[0]
    # [-1/(2 sigma^2), mu/sigma^2, c] with c = -sum mu^2/(2 sigma^2) - sum log sigma - log(2 pi)
    c = -(1.0 / (2 * 0.25) + 4.0 / (2 * 4.0)) - 0.0 - LOG_2PI
    np.testing.assert_allclose(x, [-2.0, -0.125, 4.0, -0.5, c], rtol=1e-15)
    np.testing.assert_array_equal(lift_points(np.array([[3.0, -1.0]]))[0], [9.0, 1.0, 3.0, -1.0, 1.0])
    np.testing.assert_array_equal(
        lift_distributions(np.array([[3.0, -1.0]]), np.array([[0.5, 2.0]]))[0], [9.25, 5.0, 3.0, -1.0, 1.0]
    )


@pytest.mark.parametrize("d", [1, 7, 32])
def test_lifted_identity_distributions(d):
    rng = np.random.default_rng(100 + d)
    mu = rng.uniform(-3, 3, size=(150, d))
    log_sigma = rng.uniform(math.log(0.1), math.log(10.0), size=(150, d))
    mean = rng.uniform(-5, 5, size=(10, d))
    std = rng.uniform(0.0, 2.0, size=(10, d))
    got = lift_distributions(mean, std) @ lift_items(mu, log_sigma).T
    np.testing.assert_allclose(got, expected_log_q(mean, std, mu, log_sigma), rtol=1e-9, atol=1e-9)
    # std = 0 is the point query
    np.testing.assert_array_equal(lift_distributions(mean, np.zeros_like(mean)), lift_points(mean))


@pytest.mark.parametrize("regime", ["moderate", "tiny", "mixed"])
def test_float32_error_bound_holds(regime):
    """|fl32(<q, x>) - log q| <= kappa * |q| @ |x| for BLAS sgemm and the FAISS flat IP kernel."""
    rng = np.random.default_rng({"moderate": 1, "tiny": 2, "mixed": 3}[regime])
    n_items, d = 500, 16
    mu = rng.uniform(-4, 4, size=(n_items, d))
    if regime == "moderate":
        log_sigma = rng.uniform(math.log(0.05), math.log(5.0), size=(n_items, d))
    elif regime == "tiny":
        log_sigma = rng.uniform(math.log(1e-4), math.log(1e-3), size=(n_items, d))
        mu = 3.0 + 1e-4 * rng.standard_normal((n_items, d))  # worst cancellation
    else:
        log_sigma = np.log(rng.choice([1e-4, 1e-2, 1.0, 1e2], size=(n_items, 1))) + rng.uniform(
            -0.3, 0.3, size=(n_items, d)
        )
    z = np.concatenate([rng.uniform(-5, 5, size=(30, d)), mu[:30]])  # incl. z exactly at a mean
    x, q = lift_items(mu, log_sigma), lift_points(z)
    ref = log_q(z, mu, log_sigma)
    bound = error_coefficient(2 * d + 1) * (np.abs(q) @ np.abs(x).T)

    blas = (q.astype(np.float32) @ x.astype(np.float32).T).astype(np.float64)
    index = faiss.IndexFlatIP(2 * d + 1)
    index.add(x.astype(np.float32))
    dist, ids = index.search(q.astype(np.float32), n_items)
    flat = np.empty_like(ref)
    np.put_along_axis(flat, ids.astype(np.int64), dist.astype(np.float64), axis=1)
    # one query at a time takes FAISS's non-BLAS kernel
    dist1, ids1 = index.search(q[:1].astype(np.float32), n_items)
    single = np.empty(n_items)
    single[ids1[0]] = dist1[0]

    for name, got in (("blas", blas), ("faiss", flat), ("faiss-single", single[None])):
        err = np.abs(got - ref[: got.shape[0]])
        assert np.all(err <= bound[: got.shape[0]]), (
            f"{name}: bound violated, max ratio {np.max(err / bound)}"
        )
    if regime == "tiny":
        # the bound is needed: float32 error here is far larger than the score gaps (O(1))
        assert np.abs(blas - ref).max() > 1.0


def test_error_coefficient_values():
    u = 2.0**-24
    assert error_coefficient(1) == pytest.approx(2 * 5 * u / (1 - 5 * u), rel=1e-15)
    assert error_coefficient(21) > error_coefficient(3) > 0
    assert error_coefficient(257) < 1e-4

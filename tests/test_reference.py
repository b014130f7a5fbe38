"""The ground truth itself (tests/reference.py) against values worked out by hand.

Hand examples (log 2 = 0.6931471805599453, log(2 pi) = 1.8378770664093453):

1-d: mu = 1, sigma = 2.
    z = 3:             u = (3 - 1) / 2 = 1
                       log q = -1/2 - log 2 - 1/2 log(2 pi)                 = -2.1120857137646180
    m = 3, s = 1:      quad = ((3 - 1)^2 + 1) / 4 = 1.25
                       E log q = -0.625 - log 2 - 1/2 log(2 pi)             = -2.2370857137646180
                       KL = log(2 / 1) + (1 + 4) / (2 * 4) - 1/2 = log 2 + 1/8 = 0.8181471805599453
2-d: mu = (1, -1), sigma = (2, 1/2), so sum log sigma = log 2 + log 1/2 = 0.
    z = (2, 0):        u = (1/2, 2), sum u^2 = 4.25
                       log q = -2.125 - 0 - log(2 pi)                       = -3.9628770664093453
    m = (0, 0), s = (1, 1):
                       quad = (1 + 1) / 4 + (1 + 1) / (1/4) = 0.5 + 8 = 8.5
                       E log q = -4.25 - 0 - log(2 pi)                      = -6.0878770664093453
                       KL = [log 2 + 2/8 - 1/2] + [log 1/2 + 2/(2/4) - 1/2] = 0.25 - 0.5 + 4 - 0.5 = 3.25
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    LOG_2PI,
    SIGMA_REGIMES,
    expected_log_q,
    kl_to,
    log_q,
    log_qz,
    logsumexp,
    make_bank,
    top_k,
)

MU_1 = np.array([[1.0]])
LOG_SIGMA_1 = np.log(np.array([[2.0]]))
MU_2 = np.array([[1.0, -1.0]])
LOG_SIGMA_2 = np.log(np.array([[2.0, 0.5]]))


def test_log_2pi() -> None:
    assert abs(LOG_2PI - 1.8378770664093453) < 1e-15


def test_log_q_by_hand() -> None:
    assert log_q(np.array([3.0]), MU_1, LOG_SIGMA_1)[0, 0] == pytest.approx(-2.1120857137646180, rel=1e-15)
    assert log_q(np.array([2.0, 0.0]), MU_2, LOG_SIGMA_2)[0, 0] == pytest.approx(
        -3.9628770664093453, rel=1e-15
    )


def test_expected_log_q_by_hand() -> None:
    got_1 = expected_log_q(np.array([3.0]), np.array([1.0]), MU_1, LOG_SIGMA_1)[0, 0]
    assert got_1 == pytest.approx(-2.2370857137646180, rel=1e-15)
    got_2 = expected_log_q(np.zeros(2), np.ones(2), MU_2, LOG_SIGMA_2)[0, 0]
    assert got_2 == pytest.approx(-6.0878770664093453, rel=1e-15)


def test_kl_to_by_hand() -> None:
    assert kl_to(np.array([3.0]), np.array([1.0]), MU_1, LOG_SIGMA_1)[0, 0] == pytest.approx(
        0.8181471805599453, rel=1e-15
    )
    assert kl_to(np.zeros(2), np.ones(2), MU_2, LOG_SIGMA_2)[0, 0] == pytest.approx(3.25, rel=1e-15)


def _log_q_scalar(z: list[float], mu: list[float], log_sigma: list[float]) -> float:
    """One pair, term by term with ``math``: a second, loop-level reading of the formula."""
    total = -len(z) / 2 * math.log(2 * math.pi)
    for zi, mi, li in zip(z, mu, log_sigma, strict=True):
        total -= 0.5 * ((zi - mi) / math.exp(li)) ** 2 + li
    return total


def test_log_q_all_pairs_and_blocks() -> None:
    """(B, N) over several memory blocks equals the pairwise scalar formula."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(100_000, 5))
    log_sigma = rng.uniform(-2, 1, size=mu.shape)
    z = rng.normal(size=(9, 5))  # 500,000 elements per query: 4 queries a block, 3 blocks
    got = log_q(z, mu, log_sigma)
    assert got.shape == (9, 100_000) and got.dtype == np.float64
    for b, n in [(0, 0), (3, 99_999), (4, 17), (8, 51_234)]:
        want = _log_q_scalar(z[b].tolist(), mu[n].tolist(), log_sigma[n].tolist())
        assert got[b, n] == pytest.approx(want, rel=1e-13)


def test_distribution_identities() -> None:
    rng = np.random.default_rng(1)
    mu, log_sigma = rng.normal(size=(30, 3)), rng.uniform(-1, 1, size=(30, 3))
    mean, std = rng.normal(size=(4, 3)), rng.uniform(0.1, 2, size=(4, 3))
    # std = 0: the point query
    point = log_q(mean, mu, log_sigma)
    np.testing.assert_allclose(expected_log_q(mean, 0 * std, mu, log_sigma), point, rtol=1e-14)
    # KL = -entropy - E log q, entropy = sum log s + d/2 (1 + log 2 pi)
    entropy = np.log(std).sum(1) + 1.5 * (1 + LOG_2PI)
    via_expected = -entropy[:, None] - expected_log_q(mean, std, mu, log_sigma)
    np.testing.assert_allclose(kl_to(mean, std, mu, log_sigma), via_expected, rtol=1e-11)
    # KL of a posterior to itself is 0, to any other positive
    kl_self = kl_to(mu[:5], np.exp(log_sigma[:5]), mu, log_sigma)
    np.testing.assert_allclose(np.diag(kl_self[:, :5]), 0.0, atol=1e-14)
    assert (kl_self[:, 5:] > 0).all()
    with pytest.raises(AssertionError):
        kl_to(mean, 0 * std, mu, log_sigma)


def test_top_k_descending_ties_by_row() -> None:
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -np.inf])
    assert top_k(scores, 3).tolist() == [1, 2, 4]
    assert top_k(scores, 4).tolist() == [1, 2, 4, 3]
    assert top_k(scores, 100).tolist() == [1, 2, 4, 3, 0, 5]
    allowed = np.array([True, False, True, True, False, True])
    assert top_k(scores, 2, allowed).tolist() == [2, 3]
    assert top_k(scores, 10, allowed).tolist() == [2, 3, 0, 5]
    batch = top_k(np.stack([scores, -scores]), 2)
    assert batch.tolist() == [[1, 2], [5, 0]]


def test_logsumexp_and_log_qz_by_hand() -> None:
    # log(e^1 + e^2 + e^3) = 3 + log(1 + e^-1 + e^-2); huge offsets must not overflow.
    want = 3.0 + math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
    got = logsumexp(np.array([[1.0, 2.0, 3.0], [1001.0, 1002.0, 1003.0], [-1e4, -1e4, -np.inf]]))
    assert got[0] == pytest.approx(want, rel=1e-15)
    assert got[1] == pytest.approx(1000.0 + want, rel=1e-15)
    assert got[2] == pytest.approx(-1e4 + math.log(2.0), rel=1e-15)
    assert log_qz(np.array([1.0, 2.0, 3.0]))[0] == pytest.approx(want - math.log(3.0), rel=1e-15)
    allowed = np.array([True, False, True])
    assert log_qz(np.array([1.0, 2.0, 3.0]), allowed)[0] == pytest.approx(
        math.log((math.e + math.e**3) / 2.0), rel=1e-15
    )


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
def test_make_bank_regimes(regime: str) -> None:
    mu, log_sigma = make_bank(500, 6, regime, np.random.default_rng(2))
    assert mu.shape == log_sigma.shape == (500, 6)
    assert np.isfinite(mu).all() and np.isfinite(log_sigma).all()
    sigma = np.exp(log_sigma)
    if regime == "tiny":
        assert sigma.min() >= 1e-4 and sigma.max() <= 1e-3
    elif regime == "mixed":
        assert sigma.min() < 1e-3 and sigma.max() > 50  # tiny and huge items in one bank
    elif regime == "collapsed":
        assert (sigma[:, 3:] > 0.89).all() and (np.abs(mu[:, 3:]) < 0.3).all()
    # the same generator state gives the same bank
    again = make_bank(500, 6, regime, np.random.default_rng(2))
    np.testing.assert_array_equal(again[0], mu)
    np.testing.assert_array_equal(again[1], log_sigma)


def test_make_bank_unknown_regime() -> None:
    with pytest.raises(ValueError, match="unknown sigma regime"):
        make_bank(3, 2, "huge", np.random.default_rng(0))

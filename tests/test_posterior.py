"""latentsearch.posterior.DiagonalGaussian: numpy float64 and torch (autograd) paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentsearch.errors import InvalidArgumentError
from latentsearch.posterior import LOG_2PI, DiagonalGaussian, log_prob_matrix

# Hand-picked 2-D example: mean (1, -1), sigma (2, 1/2), z = (2, 0).
#   u = ((2 - 1) / 2, (0 + 1) / 0.5) = (0.5, 2)      sum u^2 = 0.25 + 4 = 4.25
#   sum log sigma = log 2 + log 0.5 = 0               d/2 log 2pi = log(2 pi) = 1.8378770664093453
#   log q = -4.25 / 2 - 0 - 1.8378770664093453 = -3.9628770664093453
#   KL to N(0, I) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
#                 = 1/2 [(1 + 4 - 1 - log 4) + (1 + 1/4 - 1 + log 4)] = 1/2 * 4.25 = 2.125
#   entropy = sum log sigma + d/2 (1 + log 2pi) = 0 + 1 + 1.8378770664093453 = 2.8378770664093453
MEAN = np.array([1.0, -1.0])
SIGMA = np.array([2.0, 0.5])
Z = np.array([2.0, 0.0])
LOG_Q = -3.9628770664093453
KL_PRIOR = 2.125
ENTROPY = 2.8378770664093453


def test_hand_example_log_prob_kl_entropy():
    g = DiagonalGaussian.from_std(MEAN, SIGMA)
    assert abs(LOG_2PI - 1.8378770664093453) < 1e-15
    assert float(g.log_prob(Z)) == pytest.approx(LOG_Q, rel=1e-14)
    assert float(g.kl()) == pytest.approx(KL_PRIOR, rel=1e-14)
    assert float(g.entropy()) == pytest.approx(ENTROPY, rel=1e-14)
    assert g.dim == 2 and g.batch_shape == ()
    np.testing.assert_allclose(g.std, SIGMA, rtol=1e-15)
    np.testing.assert_allclose(g.var, SIGMA**2, rtol=1e-15)
    np.testing.assert_array_equal(g.mode(), MEAN)


def test_float32_input_computed_in_float64():
    g = DiagonalGaussian.from_std(MEAN.astype(np.float32), SIGMA.astype(np.float32))
    out = g.log_prob(Z.astype(np.float32))
    assert out.dtype == np.float64
    assert float(out) == pytest.approx(LOG_Q, rel=1e-14)


def test_log_prob_broadcasts_and_matches_matrix():
    rng = np.random.default_rng(40)
    mu = rng.normal(size=(6, 3))
    ls = rng.uniform(-1, 1, size=(6, 3))
    z = rng.normal(size=(4, 3))
    g = DiagonalGaussian.from_log_sigma(mu, ls)
    sigma = np.exp(ls)
    hand = -0.5 * (((z[:, None] - mu[None]) / sigma) ** 2).sum(-1) - ls.sum(-1) - 1.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(g.log_prob(z[:, None, :]), hand, rtol=1e-13)
    np.testing.assert_allclose(log_prob_matrix(z, mu, ls), hand, rtol=1e-13)


def test_expected_log_prob_by_formula():
    rng = np.random.default_rng(41)
    mu, ls = rng.normal(size=(5, 4)), rng.uniform(-1, 1, size=(5, 4))
    m, s = rng.normal(size=4), rng.uniform(0.1, 1, size=4)
    g = DiagonalGaussian.from_log_sigma(mu, ls)
    hand = -0.5 * (((m - mu) ** 2 + s**2) / np.exp(2 * ls)).sum(-1) - ls.sum(-1) - 2 * math.log(2 * math.pi)
    np.testing.assert_allclose(g.expected_log_prob(m, s), hand, rtol=1e-13)
    np.testing.assert_allclose(g.expected_log_prob(m, np.zeros(4)), g.log_prob(m), rtol=1e-13)


def test_kl_closed_form():
    rng = np.random.default_rng(42)
    m1, s1 = rng.normal(size=(3, 5)), rng.uniform(0.2, 2, size=(3, 5))
    m2, s2 = rng.normal(size=(3, 5)), rng.uniform(0.2, 2, size=(3, 5))
    p, q = DiagonalGaussian.from_std(m1, s1), DiagonalGaussian.from_std(m2, s2)
    hand = (np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum(-1)
    np.testing.assert_allclose(p.kl(q), hand, rtol=1e-12)
    np.testing.assert_allclose(p.kl(p), 0.0, atol=1e-14)
    prior = DiagonalGaussian(np.zeros((3, 5)), np.zeros((3, 5)))
    np.testing.assert_allclose(p.kl(prior), p.kl(), rtol=1e-13)
    assert (p.kl(q) > 0).all()
    # KL = -entropy - E_p log q
    np.testing.assert_allclose(p.kl(q), -p.entropy() - q.expected_log_prob(m1, s1), rtol=1e-11)


def test_sample_moments():
    mean = np.array([0.5, -2.0, 3.0])
    std = np.array([0.1, 1.0, 4.0])
    g = DiagonalGaussian.from_std(np.broadcast_to(mean, (100_000, 3)), np.broadcast_to(std, (100_000, 3)))
    x = g.sample(np.random.default_rng(43))
    assert x.shape == (100_000, 3)
    assert np.all(np.abs(x.mean(0) - mean) <= 5 * std / math.sqrt(100_000))
    np.testing.assert_allclose(x.std(0), std, rtol=0.02)
    # seeded: reproducible
    np.testing.assert_array_equal(g[:10].sample(7), g[:10].sample(7))


def test_torch_autograd_gradient():
    mean = torch.tensor([[1.0, -1.0], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    logvar = torch.log(torch.tensor([[4.0, 0.25], [1.0, 9.0]], dtype=torch.float64)).requires_grad_(True)
    z = torch.tensor([2.0, 0.0], dtype=torch.float64)
    g = DiagonalGaussian(mean, logvar)
    lp = g.log_prob(z)
    assert isinstance(lp, torch.Tensor) and lp.dtype == torch.float64 and lp.shape == (2,)
    assert float(lp[0].detach()) == pytest.approx(LOG_Q, rel=1e-14)
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()
    want = (z - mean.detach()) / torch.exp(logvar.detach())
    torch.testing.assert_close(mean.grad, want, rtol=1e-12, atol=1e-12)
    # d log q / d logvar = 1/2 ((z - mu)^2 / sigma^2 - 1)
    want_lv = 0.5 * ((z - mean.detach()) ** 2 / torch.exp(logvar.detach()) - 1.0)
    torch.testing.assert_close(logvar.grad, want_lv, rtol=1e-12, atol=1e-12)


def test_torch_float32_kl_and_sample_keep_graph():
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    g = DiagonalGaussian(mean, logvar)
    kl = g.kl()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.zeros(4))
    s = g.sample(torch.Generator().manual_seed(0))
    assert s.requires_grad and s.shape == (4, 3)
    s.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(4, 3))
    n = g.numpy()
    assert isinstance(n.mean, np.ndarray) and n.mean.dtype == np.float64


def test_parameterisations_equivalent():
    rng = np.random.default_rng(44)
    mu, ls = rng.normal(size=(5, 3)), rng.uniform(-2, 2, size=(5, 3))
    a = DiagonalGaussian.from_log_sigma(mu, ls)
    b = DiagonalGaussian.from_std(mu, np.exp(ls))
    c = DiagonalGaussian(mu, 2 * ls)
    z = rng.normal(size=3)
    for other in (b, c):
        np.testing.assert_allclose(other.logvar, a.logvar, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(other.log_prob(z), a.log_prob(z), rtol=1e-13)
    np.testing.assert_allclose(a.log_sigma, ls, rtol=1e-15)
    np.testing.assert_allclose(a.std, np.exp(ls), rtol=1e-14)
    assert len(a) == 5 and a[1:3].batch_shape == (2,)


def test_invalid_inputs():
    with pytest.raises(InvalidArgumentError) as exc:
        DiagonalGaussian(np.zeros((2, 3)), np.zeros((2, 4)))
    assert exc.value.field == "logvar"
    with pytest.raises(InvalidArgumentError):
        DiagonalGaussian(np.float64(1.0), np.float64(0.0))
    with pytest.raises(InvalidArgumentError):
        DiagonalGaussian(torch.zeros(3), np.zeros(3))
    for bad in ([1.0, 0.0], [1.0, -1.0], [np.inf, 1.0], [np.nan, 1.0]):
        with pytest.raises(InvalidArgumentError) as exc:
            DiagonalGaussian.from_std(np.zeros(2), np.array(bad))
        assert exc.value.field == "std"
    with pytest.raises(TypeError):
        len(DiagonalGaussian(np.zeros(2), np.zeros(2)))

"""latentsearch.posterior.DiagonalGaussian: hand-computed values, the float64 reference, numpy and
torch agreeing, autograd through every method, indexing and the cached normaliser."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import EllipsisType

import numpy as np
import pytest
import torch
from reference import expected_log_q, kl_to, log_q

import latentsearch.posterior
from latentsearch.errors import InvalidArgumentError
from latentsearch.posterior import LOG_2PI, DiagonalGaussian

# Hand-picked 2-D example: mean (1, -1), sigma (2, 1/2), z = (2, 0).
#   u = ((2 - 1) / 2, (0 + 1) / 0.5) = (0.5, 2)      sum u^2 = 0.25 + 4 = 4.25
#   sum log sigma = log 2 + log 0.5 = 0               d/2 log 2pi = log(2 pi) = 1.8378770664093453
#   log normaliser = 0 + 1.8378770664093453
#   log q = -4.25 / 2 - 0 - 1.8378770664093453 = -3.9628770664093453
#   KL to N(0, I) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
#                 = 1/2 [(1 + 4 - 1 - log 4) + (1 + 1/4 - 1 + log 4)] = 1/2 * 4.25 = 2.125
#   entropy = sum log sigma + d/2 (1 + log 2pi) = 0 + 1 + 1.8378770664093453 = 2.8378770664093453
MEAN = np.array([1.0, -1.0])
SIGMA = np.array([2.0, 0.5])
Z = np.array([2.0, 0.0])
LOG_NORMALIZER = 1.8378770664093453
LOG_Q = -3.9628770664093453
KL_PRIOR = 2.125
ENTROPY = 2.8378770664093453

# Hand-picked 1-D pair: p = N(0, 1), q = N(1, 2^2), query N(m = 1, s = 1/2).
#   KL(p || q) = log(2 / 1) + (1 + (0 - 1)^2) / (2 * 4) - 1/2 = log 2 - 1/4 = 0.44314718055994530
#   KL(q || p) = log(1 / 2) + (4 + 1) / 2 - 1/2 = 2 - log 2 = 1.3068528194400546
#   E_{z ~ N(1, 1/4)} log p(z) = -1/2 (1^2 + 1/4) - 1/2 log 2pi = -0.625 - 0.9189385332046727
KL_PQ = math.log(2.0) - 0.25
KL_QP = 2.0 - math.log(2.0)
EXPECTED_1D = -0.625 - 0.5 * LOG_2PI


def test_hand_example_2d() -> None:
    g = DiagonalGaussian.from_std(MEAN, SIGMA)
    assert abs(LOG_2PI - 1.8378770664093453) < 1e-15
    assert float(g.log_prob(Z)) == pytest.approx(LOG_Q, rel=1e-14)
    assert float(g.log_normalizer) == pytest.approx(LOG_NORMALIZER, rel=1e-14, abs=1e-15)
    assert float(g.kl()) == pytest.approx(KL_PRIOR, rel=1e-14)
    assert float(g.entropy()) == pytest.approx(ENTROPY, rel=1e-14)
    assert float(g.expected_log_prob(Z, np.zeros(2))) == pytest.approx(LOG_Q, rel=1e-14)
    assert g.dim == 2 and g.batch_shape == () and not g.is_torch
    np.testing.assert_allclose(g.std, SIGMA, rtol=1e-15)
    np.testing.assert_allclose(g.var, SIGMA**2, rtol=1e-15)
    np.testing.assert_allclose(g.logvar, np.log(SIGMA**2), rtol=1e-15)
    np.testing.assert_allclose(g.log_sigma, np.log(SIGMA), rtol=1e-15)
    np.testing.assert_array_equal(g.mode(), MEAN)


def test_hand_example_1d_kl_and_expectation() -> None:
    p = DiagonalGaussian(np.array([0.0]), log_sigma=np.array([0.0]))
    q = DiagonalGaussian.from_std(np.array([1.0]), np.array([2.0]))
    assert float(p.kl(q)) == pytest.approx(KL_PQ, rel=1e-14)
    assert float(q.kl(p)) == pytest.approx(KL_QP, rel=1e-14)
    assert float(p.kl(p)) == 0.0
    assert float(p.kl()) == 0.0
    expected = p.expected_log_prob(np.array([1.0]), np.array([0.5]))
    assert float(expected) == pytest.approx(EXPECTED_1D, rel=1e-14)
    # KL(N(m, s^2) || p) = -entropy(N(m, s^2)) - E log p, the identity the engine's kl uses
    query = DiagonalGaussian.from_std(np.array([1.0]), np.array([0.5]))
    want = float(-query.entropy() - p.expected_log_prob(query.mean, query.std))
    assert float(query.kl(p)) == pytest.approx(want, rel=1e-13)


def test_float32_input_computed_in_float64() -> None:
    g = DiagonalGaussian.from_std(MEAN.astype(np.float32), SIGMA.astype(np.float32))
    out = g.log_prob(Z.astype(np.float32))
    assert g.mean.dtype == g.log_sigma.dtype == np.float64
    assert out.dtype == np.float64
    assert float(out) == pytest.approx(LOG_Q, rel=1e-14)


def test_float64_parameters_are_not_copied() -> None:
    mu, ls = np.zeros((4, 2)), np.zeros((4, 2))
    g = DiagonalGaussian(mu, log_sigma=ls)
    assert g.mean is mu and g.log_sigma is ls


def test_log_prob_broadcasts_against_the_reference() -> None:
    rng = np.random.default_rng(40)
    mu = rng.normal(size=(6, 3))
    ls = rng.uniform(-1, 1, size=(6, 3))
    z = rng.normal(size=(4, 3))
    g = DiagonalGaussian(mu, log_sigma=ls)
    want = log_q(z, mu, ls)  # (4, 6), the independent float64 reference
    np.testing.assert_allclose(g.log_prob(z[:, None, :]), want, rtol=1e-13)
    # rows (B, C) gathered per query: g[rows].log_prob(z[:, None, :]) is (B, C)
    rows = rng.integers(0, 6, size=(4, 5))
    got = g[rows].log_prob(z[:, None, :])
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, np.take_along_axis(want, rows, axis=1), rtol=1e-13)
    # one point against every posterior, and each posterior at its own point
    np.testing.assert_allclose(g.log_prob(z[0]), want[0], rtol=1e-13)
    np.testing.assert_allclose(g[:4].log_prob(z), np.diag(want[:, :4]), rtol=1e-13)


def test_expected_log_prob_against_the_reference() -> None:
    rng = np.random.default_rng(41)
    mu, ls = rng.normal(size=(5, 4)), rng.uniform(-1, 1, size=(5, 4))
    m, s = rng.normal(size=(3, 4)), rng.uniform(0.1, 1, size=(3, 4))
    g = DiagonalGaussian(mu, log_sigma=ls)
    want = expected_log_q(m, s, mu, ls)  # (3, 5)
    np.testing.assert_allclose(g.expected_log_prob(m[:, None, :], s[:, None, :]), want, rtol=1e-13)
    np.testing.assert_allclose(g.expected_log_prob(m[0], s[0]), want[0], rtol=1e-13)
    rows = np.array([[4, 0], [1, 1], [2, 3]])
    got = g[rows].expected_log_prob(m[:, None, :], s[:, None, :])
    np.testing.assert_allclose(got, np.take_along_axis(want, rows, axis=1), rtol=1e-13)
    # std = 0 is the point query; one std broadcast over all means
    np.testing.assert_allclose(g.expected_log_prob(m[0], np.zeros(4)), g.log_prob(m[0]), rtol=1e-13)
    np.testing.assert_allclose(
        g.expected_log_prob(m[:, None, :], s[0]), expected_log_q(m, np.tile(s[0], (3, 1)), mu, ls), rtol=1e-13
    )


def test_kl_against_the_reference() -> None:
    rng = np.random.default_rng(42)
    m1, s1 = rng.normal(size=(3, 5)), rng.uniform(0.2, 2, size=(3, 5))
    m2, s2 = rng.normal(size=(3, 5)), rng.uniform(0.2, 2, size=(3, 5))
    p, q = DiagonalGaussian.from_std(m1, s1), DiagonalGaussian.from_std(m2, s2)
    want = np.diag(kl_to(m1, s1, m2, np.log(s2)))  # (3,): KL(p_i || q_i)
    np.testing.assert_allclose(p.kl(q), want, rtol=1e-12)
    np.testing.assert_allclose(p.kl(p), 0.0, atol=1e-14)
    prior = DiagonalGaussian(np.zeros((3, 5)), log_sigma=np.zeros((3, 5)))
    np.testing.assert_allclose(p.kl(prior), p.kl(), rtol=1e-13)
    assert (p.kl(q) > 0).all()
    # KL = -entropy - E_p log q
    np.testing.assert_allclose(p.kl(q), -p.entropy() - q.expected_log_prob(m1, s1), rtol=1e-11)


def test_sample_moments() -> None:
    mean = np.array([0.5, -2.0, 3.0])
    std = np.array([0.1, 1.0, 4.0])
    g = DiagonalGaussian.from_std(np.broadcast_to(mean, (100_000, 3)), np.broadcast_to(std, (100_000, 3)))
    x = g.sample(np.random.default_rng(43))
    assert x.shape == (100_000, 3)
    assert np.all(np.abs(x.mean(0) - mean) <= 5 * std / math.sqrt(100_000))
    np.testing.assert_allclose(x.std(0), std, rtol=0.02)
    # seeded: reproducible
    np.testing.assert_array_equal(g[:10].sample(7), g[:10].sample(7))


def _params(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu, ls = rng.normal(size=(4, 3)), rng.uniform(-1, 1, size=(4, 3))
    z, m, s = rng.normal(size=(2, 1, 3)), rng.normal(size=(2, 1, 3)), rng.uniform(0.1, 1, size=(2, 1, 3))
    return mu, ls, z, m, s


def test_torch_and_numpy_agree() -> None:
    mu, ls, z, m, s = _params(45)
    n = DiagonalGaussian(mu, log_sigma=ls)
    t = DiagonalGaussian(torch.from_numpy(mu), log_sigma=torch.from_numpy(ls))
    other_n = DiagonalGaussian(mu[::-1].copy(), log_sigma=ls[::-1].copy())
    other_t = DiagonalGaussian(torch.from_numpy(mu[::-1].copy()), log_sigma=torch.from_numpy(ls[::-1].copy()))
    zt, mt, st = (torch.from_numpy(a) for a in (z, m, s))
    pairs = [
        (n.log_prob(z), t.log_prob(zt)),
        (n.expected_log_prob(m, s), t.expected_log_prob(mt, st)),
        (n.kl(), t.kl()),
        (n.kl(other_n), t.kl(other_t)),
        (n.entropy(), t.entropy()),
        (n.log_normalizer, t.log_normalizer),
        (n.std, t.std),
        (n.var, t.var),
        (n.logvar, t.logvar),
        (n[np.array([2, 0])].log_prob(z[0]), t[np.array([2, 0])].log_prob(zt[0])),
        (n[1:3].kl(), t[1:3].kl()),
    ]
    for i, (a, b) in enumerate(pairs):
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64, i
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-13, atol=1e-15, err_msg=str(i))
    assert t.is_torch and t.numpy().mean.dtype == np.float64
    np.testing.assert_array_equal(t.numpy().log_sigma, ls)


def test_torch_gradients_match_hand_derivatives() -> None:
    mean = torch.tensor([[1.0, -1.0], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    logvar = torch.log(torch.tensor([[4.0, 0.25], [1.0, 9.0]], dtype=torch.float64)).requires_grad_(True)
    z = torch.tensor([2.0, 0.0], dtype=torch.float64)
    g = DiagonalGaussian.from_logvar(mean, logvar)
    lp = g.log_prob(z)
    assert isinstance(lp, torch.Tensor) and lp.dtype == torch.float64 and lp.shape == (2,)
    assert float(lp[0].detach()) == pytest.approx(LOG_Q, rel=1e-14)
    lp.sum().backward()
    mu0, var0 = mean.detach(), torch.exp(logvar.detach())
    # d log q / d mu = (z - mu) / sigma^2;  d log q / d logvar = 1/2 ((z - mu)^2 / sigma^2 - 1)
    torch.testing.assert_close(mean.grad, (z - mu0) / var0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logvar.grad, 0.5 * ((z - mu0) ** 2 / var0 - 1.0), rtol=1e-12, atol=1e-12)


def test_torch_gradients_of_kl_expectation_and_sample() -> None:
    mean = torch.tensor([[0.5, -2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([[0.1, -0.7, 0.4]], dtype=torch.float64, requires_grad=True)
    g = DiagonalGaussian(mean, log_sigma=log_sigma)
    mu0, ls0 = mean.detach(), log_sigma.detach()
    # KL to the prior: d/d mu = mu, d/d log sigma = sigma^2 - 1
    g.kl().sum().backward()
    torch.testing.assert_close(mean.grad, mu0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_sigma.grad, torch.exp(2 * ls0) - 1.0, rtol=1e-12, atol=1e-12)
    # E_{N(m, s^2)} log q: d/d log sigma = ((m - mu)^2 + s^2) / sigma^2 - 1
    mean.grad = log_sigma.grad = None
    m = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    g.expected_log_prob(m, s).sum().backward()
    torch.testing.assert_close(mean.grad, (m - mu0) / torch.exp(2 * ls0), rtol=1e-12, atol=1e-12)
    want = ((m - mu0) ** 2 + s**2) / torch.exp(2 * ls0) - 1.0
    torch.testing.assert_close(log_sigma.grad, want, rtol=1e-12, atol=1e-12)
    # reparameterised sample: d/d mu = 1, d/d log sigma = sigma * eps = sample - mu
    mean.grad = log_sigma.grad = None
    x = g.sample(torch.Generator().manual_seed(0))
    x.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mu0))
    torch.testing.assert_close(log_sigma.grad, x.detach() - mu0, rtol=1e-12, atol=1e-12)


def test_torch_float32_stays_float32_and_keeps_graph() -> None:
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    g = DiagonalGaussian.from_logvar(mean, logvar)
    kl = g.kl()
    assert kl.dtype == torch.float32 and kl.requires_grad
    torch.testing.assert_close(kl, torch.zeros(4))
    s = g.sample(torch.Generator().manual_seed(0))
    assert s.requires_grad and s.shape == (4, 3) and s.dtype == torch.float32
    # the normaliser is not cached for tensors: each call builds a fresh graph from the leaves
    leaf = DiagonalGaussian(mean, log_sigma=logvar)
    for _ in range(2):
        leaf.log_prob(torch.ones(3)).sum().backward()
    torch.testing.assert_close(mean.grad, torch.full((4, 3), 2.0))  # d/d mu (z - mu) = 1, twice
    n = g.numpy()
    assert isinstance(n.mean, np.ndarray) and n.mean.dtype == np.float64 and not n.is_torch


def test_indexing_keeps_the_latent_axis_and_the_cached_normaliser() -> None:
    rng = np.random.default_rng(46)
    mu, ls = rng.normal(size=(6, 3)), rng.uniform(-1, 1, size=(6, 3))
    g = DiagonalGaussian(mu, log_sigma=ls)
    full = g.log_normalizer  # cached from here on
    assert g.log_normalizer is full
    np.testing.assert_allclose(full, ls.sum(-1) + 1.5 * LOG_2PI, rtol=1e-15)
    mask = np.array([True, False, True, False, False, True])
    rows = np.array([[5, 0], [2, 2]])
    cases: list[tuple[np.ndarray | slice | int | tuple[EllipsisType, slice] | list[int], tuple[int, ...]]] = [
        (rows, (2, 2)),
        (slice(1, 4), (3,)),
        (mask, (3,)),
        (3, ()),
        ((Ellipsis, slice(0, 2)), (2,)),  # batch axes only: d is never indexed
        ([4, 1], (2,)),
    ]
    for index, want in cases:
        sub = g[index]
        assert sub.batch_shape == want and sub.dim == 3, index
        picked = np.arange(6)[index]  # the batch rows the index selects
        np.testing.assert_array_equal(sub.mean, mu[picked])
        np.testing.assert_array_equal(sub.log_sigma, ls[picked])
        # the carried normaliser is the one computed afresh
        fresh = DiagonalGaussian(sub.mean.copy(), log_sigma=sub.log_sigma.copy()).log_normalizer
        np.testing.assert_array_equal(sub.log_normalizer, fresh)
    with pytest.raises(IndexError):
        g[1, 2]  # the latent axis cannot be indexed
    with pytest.raises(IndexError):
        g[3][0]  # a single posterior has no batch axes
    assert len(g) == 6 and len(g[rows]) == 2


def test_parameterisations_equivalent() -> None:
    rng = np.random.default_rng(44)
    mu, ls = rng.normal(size=(5, 3)), rng.uniform(-2, 2, size=(5, 3))
    a = DiagonalGaussian(mu, log_sigma=ls)
    b = DiagonalGaussian.from_std(mu, np.exp(ls))
    c = DiagonalGaussian.from_logvar(mu, 2 * ls)
    z = rng.normal(size=3)
    np.testing.assert_array_equal(c.log_sigma, ls)  # logvar / 2 is exact
    for other in (b, c):
        np.testing.assert_allclose(other.logvar, a.logvar, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(other.log_prob(z), a.log_prob(z), rtol=1e-13)
    np.testing.assert_allclose(a.std, np.exp(ls), rtol=1e-14)
    assert len(a) == 5 and a[1:3].batch_shape == (2,)
    assert "batch_shape=(5,)" in repr(a) and "numpy" in repr(a)


def test_invalid_inputs() -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        DiagonalGaussian(np.zeros((2, 3)), log_sigma=np.zeros((2, 4)))
    assert exc.value.field == "log_sigma"
    with pytest.raises(InvalidArgumentError):
        DiagonalGaussian(np.float64(1.0), log_sigma=np.float64(0.0))
    with pytest.raises(InvalidArgumentError):
        DiagonalGaussian(torch.zeros(3), log_sigma=np.zeros(3))
    with pytest.raises(TypeError):  # the scale is keyword-only: a positional logvar cannot slip in
        DiagonalGaussian(np.zeros(2), np.zeros(2))  # type: ignore[call-arg]
    for bad in ([1.0, 0.0], [1.0, -1.0], [np.inf, 1.0], [np.nan, 1.0]):
        with pytest.raises(InvalidArgumentError) as exc:
            DiagonalGaussian.from_std(np.zeros(2), np.array(bad))
        assert exc.value.field == "std"
    with pytest.raises(TypeError):
        len(DiagonalGaussian(np.zeros(2), log_sigma=np.zeros(2)))


def test_module_imports_only_numpy_stdlib_and_errors() -> None:
    """posterior.py is the base layer: torch is reached through sys.modules, never imported."""
    tree = ast.parse(Path(latentsearch.posterior.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported == {"__future__", "math", "sys", "typing", "numpy", "latentsearch.errors"}

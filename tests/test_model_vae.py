"""Shapes, dtypes and objective of the VAE (conv and MLP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentsearch.errors import InvalidArgumentError
from latentsearch.model.config import Normalization, VAEConfig
from latentsearch.model.loader import encode_batch
from latentsearch.model.vae import build_vae
from latentsearch.posterior import DiagonalGaussian


@pytest.mark.parametrize("shape", [(28, 28, 1), (20, 12, 3), (7, 5, 2), (1, 1, 1)])
def test_conv_shapes_and_dtypes(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_vae(VAEConfig(input_shape=shape, latent_dim=4, channels=(8, 16), hidden=32)).eval()
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    q = model.encode(x)
    assert isinstance(q, DiagonalGaussian)
    assert q.mean.shape == (3, 4) and q.logvar.shape == (3, 4)
    assert q.mean.dtype == torch.float32
    y = model.decode(q.mean)
    assert y.shape == (3, *shape) and y.dtype == torch.float32
    assert float(y.detach().min()) >= 0.0 and float(y.detach().max()) <= 1.0
    mu, logvar = encode_batch(model, x.numpy())
    assert mu.dtype == np.float32 and logvar.dtype == np.float32 and mu.shape == (3, 4)
    np.testing.assert_allclose(mu, q.mean.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_mlp_gaussian_shapes_and_units() -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(
        arch="mlp",
        input_shape=(6,),
        latent_dim=3,
        hidden=16,
        likelihood="gaussian",
        normalization=Normalization(kind="standardize", shift=[10.0] * 6, scale=[0.5] * 6),
    )
    model = build_vae(cfg)
    x = torch.randn(5, 6, dtype=torch.float64) * 2 + 10
    q = model.encode(x)
    assert q.mean.shape == (5, 3)
    y = model.decode(q.mean)
    assert y.shape == (5, 6) and y.dtype == torch.float32
    # decoded in data units: decoder output / scale + shift
    raw = model.decode_logits(q.mean).float()
    torch.testing.assert_close(y, raw / 0.5 + 10.0)
    terms = model.elbo_terms(x)
    assert terms.recon.shape == (5,) and terms.kl.shape == (5,)
    assert torch.all(terms.kl >= 0)


def test_mlp_on_flattened_images() -> None:
    model = build_vae(VAEConfig(arch="mlp", input_shape=(4, 3, 2), latent_dim=2, hidden=8))
    x = torch.randint(0, 256, (2, 4, 3, 2), dtype=torch.uint8)
    assert model.encode(x).mean.shape == (2, 2)
    assert model.decode(torch.zeros(2, 2)).shape == (2, 4, 3, 2)


def test_wrong_input_shape_is_clear() -> None:
    model = build_vae(VAEConfig(input_shape=(8, 8, 1), channels=(4,), hidden=8))
    with pytest.raises(
        InvalidArgumentError, match=r"expected a batch of shape \(N, 8, 8, 1\), got \(2, 8, 8\)"
    ):
        model.encode(torch.zeros(2, 8, 8))


def test_bad_configs() -> None:
    with pytest.raises(InvalidArgumentError, match="needs input_shape"):
        VAEConfig(arch="conv", input_shape=(10,))
    with pytest.raises(InvalidArgumentError, match="latent_dim"):
        VAEConfig(latent_dim=0)
    assert VAEConfig.from_dict(VAEConfig().to_dict()) == VAEConfig()


def test_elbo_terms_are_finite_and_kl_zero_at_prior() -> None:
    model = build_vae(VAEConfig(input_shape=(8, 8, 1), channels=(4,), hidden=8))
    x = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)
    terms = model.elbo_terms(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.neg_elbo()).all()
    q = DiagonalGaussian.from_logvar(torch.zeros(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(q.kl(), torch.zeros(2))


def test_kl_per_dimension_matches_the_posterior() -> None:
    model = build_vae(VAEConfig(input_shape=(8, 8, 1), latent_dim=3, channels=(4,), hidden=8))
    x = torch.randint(0, 256, (5, 8, 8, 1), dtype=torch.uint8)
    terms = model.elbo_terms(x, torch.Generator().manual_seed(0))
    assert terms.kl_dims.shape == (5, 3) and terms.recon.shape == (5,)
    mu, logvar = (t.detach().double().numpy() for t in model.encode_params(x))
    # Independent reference: the float64 numpy posterior's KL, one dimension at a time.
    for j in range(3):
        want = DiagonalGaussian.from_logvar(mu[:, j : j + 1], logvar[:, j : j + 1]).kl()
        np.testing.assert_allclose(terms.kl_dims[:, j].detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.kl, terms.kl_dims.sum(-1))
    want = DiagonalGaussian.from_logvar(mu, logvar).kl()
    np.testing.assert_allclose(terms.kl.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_decode_bf16_autocast() -> None:
    model = build_vae().cuda()
    x = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = model.elbo_terms(x)
    assert terms.recon.dtype == torch.float32 and torch.isfinite(terms.recon).all()
    assert model.decode(model.encode(x).mean).shape == (4, 28, 28, 1)

"""The contrastive ranking term (model.objective.contrastive_nll) and its place in training."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsearch.data.readers import ArrayDataset
from latentsearch.errors import InvalidArgumentError
from latentsearch.model.checkpoint import WEIGHTS_FILE, load_checkpoint
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.objective import contrastive_nll
from latentsearch.model.train import train

TINY = VAEConfig(input_shape=(12, 10, 1), latent_dim=2, channels=(4, 8), hidden=16)


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=16, lr=5e-3, progress=False, patience=100).replace(**kw)


def _log_normal(z: float, mean: float, var: float) -> float:
    return -0.5 * ((z - mean) ** 2 / var + math.log(var) + math.log(2 * math.pi))


def test_contrastive_nll_by_hand() -> None:
    # N = 2 items, d = 1: q(z|x_0) = N(0, 1), q(z|x_1) = N(2, 4); queries t_0 = 0.5, t_1 = 1.0.
    mu = torch.tensor([[0.0], [2.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.0], [math.log(4.0)]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    logits = np.array(
        [[_log_normal(t, m, v) for m, v in ((0.0, 1.0), (2.0, 4.0))] for t in (0.5, 1.0)]
    )  # L[n, m] = log q(t_n | x_m)
    for temperature in (1.0, 0.5):
        scaled = logits / temperature
        expected = np.log(np.exp(scaled).sum(1)) - np.diag(scaled)
        nll = contrastive_nll(mu, logvar, target, temperature)
        assert nll.shape == (2,)
        np.testing.assert_allclose(nll.detach().numpy(), expected, rtol=0, atol=1e-12)
    # t_0 = 0.5: log N(0.5; 0, 1) = -0.125 - c, log N(0.5; 2, 4) = -0.28125 - log 2 - c (c = 0.5 log 2pi),
    # so the loss of query 0 at T = 1 is log(1 + exp(-0.15625 - log 2)) = log(1 + 0.5 exp(-0.15625)).
    nll = contrastive_nll(mu, logvar, target)
    assert float(nll[0].detach()) == pytest.approx(math.log(1 + 0.5 * math.exp(-0.15625)), abs=1e-12)
    # Gradient of query 0's loss with respect to mu_1: p_01 * dL[0, 1]/dmu_1 = p_01 * (t_0 - mu_1) / var_1,
    # p_01 the softmax weight of candidate 1.
    p01 = 1.0 / (1.0 + math.exp(logits[0, 0] - logits[0, 1]))
    (g_mu,) = torch.autograd.grad(nll[0], (mu,))
    assert float(g_mu[1, 0]) == pytest.approx(p01 * (0.5 - 2.0) / 4.0, abs=1e-12)


def test_contrastive_nll_is_log_n_when_all_alike_and_ignores_a_global_shift() -> None:
    mu = torch.zeros(5, 3, dtype=torch.float64)
    logvar = torch.full((5, 3), 0.7, dtype=torch.float64)
    nll = contrastive_nll(mu, logvar, torch.ones(5, 3, dtype=torch.float64))
    np.testing.assert_allclose(nll.numpy(), np.full(5, math.log(5)), rtol=0, atol=1e-12)
    # Adding a constant to every logvar adds -d c / 2 to every logit and scales the Mahalanobis part:
    # at a temperature scaled to match (T = exp(-c)), with equal logvars per dimension, the loss is
    # unchanged.
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    t = mu + 0.3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    lv = torch.zeros(4, 3, dtype=torch.float64)
    base = contrastive_nll(mu, lv, t)
    np.testing.assert_allclose(
        contrastive_nll(mu, lv + math.log(2.0), t, 0.5).numpy(), base.numpy(), atol=1e-12
    )


def test_contrastive_weight_zero_trains_bit_identically(tmp_path, tiny_images) -> None:
    data = ArrayDataset(tiny_images(80, (12, 10, 1)), labels=np.arange(80) % 2)
    base = train(data, tmp_path / "d", config=_cfg(), vae_config=TINY)
    off = _cfg(
        contrastive_weight=0.0, contrastive_shift=3, contrastive_temperature=0.1, contrastive_target_grad=True
    )
    same = train(data, tmp_path / "o", config=off, vae_config=TINY)
    on = train(data, tmp_path / "c", config=_cfg(contrastive_weight=1.0), vae_config=TINY)
    wa, wb, wc = (load_file(str(tmp_path / m / WEIGHTS_FILE)) for m in ("d", "o", "c"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop_rate = [[v for k, v in h.items() if k != "items_per_s"] for h in base.history]
    assert drop_rate == [[v for k, v in h.items() if k != "items_per_s"] for h in same.history]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert on.history[0]["loss"] != base.history[0]["loss"]


def test_contrastive_term_enters_the_training_loss_only(tmp_path) -> None:
    # Black images: every shifted copy is the image itself and every item of the batch has the same
    # posterior, so each query scores its N candidates alike and the term is log N (34 training items
    # in one batch). One step at a negligible learning rate; free bits of 100 nats (d = 2, beta 1)
    # make the KL term exactly 200.
    black = ArrayDataset(np.zeros((40, 12, 10, 1), dtype=np.uint8))
    cfg = _cfg(epochs=1, batch_size=64, lr=1e-12, beta=1.0, free_bits=100.0, contrastive_weight=0.5)
    res = train(black, tmp_path / "c", config=cfg, vae_config=TINY)
    plain = train(black, tmp_path / "p", config=cfg.replace(contrastive_weight=0.0), vae_config=TINY)
    assert load_checkpoint(tmp_path / "c").config["data"]["n_train"] == 34
    h, p = res.history[0], plain.history[0]
    assert h["loss"] - h["recon"] - 200.0 == pytest.approx(0.5 * math.log(34), abs=1e-4)
    assert p["loss"] - p["recon"] - 200.0 == pytest.approx(0.0, abs=1e-4)
    assert h["val_neg_elbo"] == pytest.approx(p["val_neg_elbo"], rel=1e-6)  # validation: the plain -ELBO


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("contrastive_weight", -1.0),
        ("contrastive_weight", math.inf),
        ("contrastive_weight", float("nan")),
        ("contrastive_shift", 0),
        ("contrastive_temperature", 0.0),
        ("contrastive_temperature", math.inf),
    ],
)
def test_contrastive_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError, match=field) as err:
        TrainConfig().replace(**{field: value})
    assert err.value.field == field

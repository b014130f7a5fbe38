"""Training: loss falls, CPU determinism, resume, early stop, the CLI (without --data; its defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsearch.cli import train as model_cli
from latentsearch.cli.defaults import default_of
from latentsearch.data.builtin import NOTICE
from latentsearch.data.fashion_mnist import SAMPLE_IMAGES
from latentsearch.data.readers import ArrayDataset
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from latentsearch.model.augment import random_shift
from latentsearch.model.checkpoint import WEIGHTS_FILE, load_checkpoint
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.objective import consistency_nll, kl_penalty
from latentsearch.model.train import (
    TRAIN_STATE,
    default_vae_config,
    evaluate,
    split_indices,
    train,
    training_done,
)

TINY = VAEConfig(input_shape=(12, 10, 1), latent_dim=2, channels=(4, 8), hidden=16)


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=16, lr=5e-3, progress=False, patience=100).replace(**kw)


@pytest.fixture(scope="module")
def data(tiny_images) -> ArrayDataset:
    return ArrayDataset(tiny_images(80, (12, 10, 1)), labels=np.arange(80) % 2)


def test_tiny_model_loss_falls(data, tmp_path) -> None:
    res = train(data, tmp_path / "m", config=_cfg(epochs=4), vae_config=TINY)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.history[-1]["val_neg_elbo"] < res.history[0]["val_neg_elbo"]
    ck = load_checkpoint(tmp_path / "m")
    assert ck.model_hash == res.model_hash
    assert ck.config["data"]["fingerprint"] == data.fingerprint()
    assert ck.config["data"]["n_val"] == 12 and ck.config["metrics"]["epoch"] == res.best_epoch


def test_same_seed_same_weights(data, tmp_path) -> None:
    a = train(data, tmp_path / "a", config=_cfg(seed=3), vae_config=TINY)
    b = train(data, tmp_path / "b", config=_cfg(seed=3), vae_config=TINY)
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    assert a.model_hash == b.model_hash
    c = train(data, tmp_path / "c", config=_cfg(seed=4), vae_config=TINY)
    assert c.model_hash != a.model_hash


def test_resume_continues_exactly(data, tmp_path) -> None:
    full = train(data, tmp_path / "full", config=_cfg(), vae_config=TINY)
    part = train(data, tmp_path / "part", config=_cfg(time_limit_s=0.0), vae_config=TINY)
    assert part.epochs_run == 1 and part.stopped_early
    assert part.time_limited and part.epochs_planned == 3 and not full.time_limited
    assert training_done(tmp_path / "part") is False and training_done(tmp_path / "full") is True
    with pytest.raises(FailedPreconditionError, match="--resume"):
        train(data, tmp_path / "part", config=_cfg(), vae_config=TINY)
    rest = train(data, tmp_path / "part", config=_cfg(), vae_config=TINY, resume=True)
    assert rest.epochs_run == 3
    assert [h["val_neg_elbo"] for h in rest.history] == [h["val_neg_elbo"] for h in full.history]
    wa = load_file(str(tmp_path / "full" / WEIGHTS_FILE))
    wb = load_file(str(tmp_path / "part" / WEIGHTS_FILE))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    # resuming a finished run does nothing; --overwrite starts over
    again = train(data, tmp_path / "part", config=_cfg(), vae_config=TINY, resume=True)
    assert again.epochs_run == 3 and again.model_hash == rest.model_hash
    more = train(data, tmp_path / "part", config=_cfg(epochs=4), vae_config=TINY, resume=True)
    assert more.epochs_run == 4 and len(more.history) == 4
    train(data, tmp_path / "part", config=_cfg(epochs=1), vae_config=TINY, overwrite=True)
    assert torch.load(tmp_path / "part" / TRAIN_STATE, weights_only=True)["epoch"] == 1


def test_early_stop_on_plateau(data, tmp_path) -> None:
    res = train(data, tmp_path / "m", config=_cfg(epochs=20, patience=1, min_delta=1e9), vae_config=TINY)
    assert res.stopped_early and res.epochs_run == 2 and res.best_epoch == 1
    assert not res.time_limited and training_done(tmp_path / "m") is True


def test_features_get_mlp_gaussian(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((60, 5)) * 3 + 7
    ds = ArrayDataset(x.astype(np.float32))
    tr, va = split_indices(len(ds), 0.15, 0)
    assert len(va) == 9 and len(np.intersect1d(tr, va)) == 0
    cfg = default_vae_config(ds, latent_dim=2, train_rows=tr)
    assert cfg.arch == "mlp" and cfg.likelihood == "gaussian"
    np.testing.assert_allclose(cfg.normalization.shift, x[tr].mean(0), rtol=1e-5)
    res = train(ds, tmp_path / "f", config=_cfg(epochs=2), vae_config=cfg.replace(hidden=16))
    assert np.isfinite(res.best_val_neg_elbo)


def test_cli_train_without_data_uses_the_packaged_fashion_mnist_sample(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    model_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["train", "--out", str(tmp_path / "m"), "--epochs", "1", "--max-items", "120", "--no-progress"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert NOTICE in out and "model written to" in out
    ck = load_checkpoint(tmp_path / "m")
    assert ck.config["data"]["source"] == str(SAMPLE_IMAGES)
    assert ck.config["data"]["n_items"] == 120
    assert ck.model.latent_dim == 10 and ck.model.input_shape == (28, 28, 1)


def test_cli_train_data_shapes_generates_max_items(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    model_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["train", "--data", "shapes", "--out", str(tmp_path / "m"), "--epochs", "1", "--max-items", "50",
         "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert NOTICE not in capsys.readouterr().out
    data = load_checkpoint(tmp_path / "m").config["data"]
    assert data["source"] == "generated:garments(n=50, seed=0)" and data["n_items"] == 50


def test_cli_train_defaults_are_the_configs() -> None:
    parser = argparse.ArgumentParser()
    model_cli.register_cli(sub := parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--out", "m"])
    dest_to_field = {
        "epochs": "epochs",
        "batch_size": "batch_size",
        "lr": "lr",
        "beta": "beta",
        "kl_warmup": "kl_warmup_epochs",
        "free_bits": "free_bits",
        "augment_shift": "augment_shift",
        "consistency_weight": "consistency_weight",
        "consistency_shift": "consistency_shift",
        "patience": "patience",
        "val_fraction": "val_fraction",
        "device": "device",
        "seed": "seed",
        "time_limit": "time_limit_s",
    }
    defaults = TrainConfig()
    expected = {dest: getattr(defaults, name) for dest, name in dest_to_field.items()}
    assert {dest: getattr(args, dest) for dest in dest_to_field} == expected
    assert args.latent_dim == VAEConfig().latent_dim
    help_text = " ".join(sub.choices["train"].format_help().split())
    assert f"maximum epochs (default {defaults.epochs})" in help_text
    assert f"held-out fraction (default {defaults.val_fraction})" in help_text
    assert "stop after this many seconds (default" not in help_text  # a None default goes unmentioned


def test_free_bits_by_hand() -> None:
    # (N=2, d=3): batch means per dimension 0.05, 0.5 and 2.0; threshold 0.1.
    kl_dims = torch.tensor([[0.02, 0.4, 1.0], [0.08, 0.6, 3.0]], dtype=torch.float64, requires_grad=True)
    plain = kl_penalty(kl_dims)
    assert float(plain.detach()) == pytest.approx(0.05 + 0.5 + 2.0, abs=1e-12)
    fb = kl_penalty(kl_dims, free_bits=0.1)
    # The first dimension counts as 0.1.
    assert float(fb.detach()) == pytest.approx(0.1 + 0.5 + 2.0, abs=1e-12)
    (grad,) = torch.autograd.grad(fb, kl_dims)
    # Below its threshold a dimension's KL term has no gradient; above it, d mean / d item = 1/N.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64))
    # A threshold above every dimension: a constant, zero gradient everywhere.
    (grad,) = torch.autograd.grad(kl_penalty(kl_dims, free_bits=5.0), kl_dims)
    assert float(grad.abs().sum()) == 0.0


def test_free_bits_in_training_loss_not_in_validation(data, tmp_path) -> None:
    # d = 2 and 100 free nats per dimension: every dimension is far below its allowance, so the
    # training loss is recon + beta * 2 * 100 exactly, while the logged and validated KL stay the true one.
    cfg = _cfg(epochs=2, beta=1.0, kl_warmup_epochs=0, free_bits=100.0)
    res = train(data, tmp_path / "m", config=cfg, vae_config=TINY)
    for h in res.history:
        assert h["loss"] - h["recon"] == pytest.approx(200.0, abs=1e-3)
        assert 0.0 < h["kl"] < 200.0 and 0.0 < h["val_kl"] < 200.0
    assert load_checkpoint(tmp_path / "m").config["training"]["free_bits"] == 100.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("free_bits", -0.1),
        ("free_bits", float("nan")),
        ("free_bits", float("inf")),
        ("beta", -1.0),
        ("beta", float("nan")),
        ("lr", 0.0),
        ("kl_warmup_epochs", -1),
    ],
)
def test_train_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError, match=field) as err:
        TrainConfig().replace(**{field: value})
    assert err.value.field == field


def test_cli_free_bits_reaches_the_config(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    model_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    argv = ["train", "--out", str(tmp_path / "m"), "--epochs", "1", "--max-items", "60", "--no-progress"]
    args = parser.parse_args([*argv, "--free-bits", "0.3"])
    assert args.func(args) == 0
    assert load_checkpoint(tmp_path / "m").config["training"]["free_bits"] == 0.3


def test_default_of_reads_the_dataclass() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Knobs:
        need: int
        port: int = 50051
        tags: list[str] = dataclasses.field(default_factory=lambda: ["a"])

    assert default_of(Knobs, "port") == 50051
    first = default_of(Knobs, "tags")
    assert first == ["a"] and first is not default_of(Knobs, "tags")
    with pytest.raises(InvalidArgumentError, match="no default"):
        default_of(Knobs, "need")
    with pytest.raises(NotFoundError, match="no field 'nope'"):
        default_of(Knobs, "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_bf16(data, tmp_path) -> None:
    res = train(data, tmp_path / "g", config=_cfg(device="cuda", epochs=2), vae_config=TINY)
    assert np.isfinite(res.best_val_neg_elbo)


def test_random_shift_against_a_numpy_reference() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(1, 256, (40, 6, 5, 2), dtype=np.uint8))
    out = random_shift(x, 2, torch.Generator().manual_seed(7))
    offsets = torch.randint(-2, 3, (40, 2), generator=torch.Generator().manual_seed(7)).numpy()
    assert out.shape == x.shape and out.dtype == x.dtype
    xs = x.numpy()
    for n, (dy, dx) in enumerate(offsets):
        expected = np.zeros_like(xs[n])  # output row r = input row r - dy (0 where that is outside)
        for r in range(6):
            for c in range(5):
                if 0 <= r - dy < 6 and 0 <= c - dx < 5:
                    expected[r, c] = xs[n, r - dy, c - dx]
        np.testing.assert_array_equal(out[n].numpy(), expected)
    assert len({(int(a), int(b)) for a, b in offsets}) > 10  # the shifts vary per item
    assert random_shift(x, 0, torch.Generator()) is x


def test_shift_augmentation_trains_on_shifted_images_and_validates_on_the_originals(data, tmp_path) -> None:
    plain = train(data, tmp_path / "a", config=_cfg(epochs=1), vae_config=TINY)
    shifted = train(data, tmp_path / "b", config=_cfg(epochs=1, augment_shift=1), vae_config=TINY)
    again = train(data, tmp_path / "c", config=_cfg(epochs=1, augment_shift=1), vae_config=TINY)
    assert shifted.history[0]["loss"] != plain.history[0]["loss"]  # other training batches
    # Seeded shifts: the same run again gives the same history (its speed aside).
    assert [{k: v for k, v in h.items() if k != "items_per_s"} for h in again.history] == [
        {k: v for k, v in h.items() if k != "items_per_s"} for h in shifted.history
    ]
    assert load_checkpoint(tmp_path / "b").config["training"]["augment_shift"] == 1
    with pytest.raises(InvalidArgumentError) as err:
        TrainConfig(augment_shift=-1)
    assert err.value.field == "augment_shift"


def test_cpu_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LATENTSEARCH_CPU_THREADS", "1")
        assert configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        assert configure_cpu_threads(2) == 2  # an explicit count wins
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv("LATENTSEARCH_CPU_THREADS", bad)
            with pytest.raises(InvalidArgumentError, match="LATENTSEARCH_CPU_THREADS"):
                configure_cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_explicit_val_rows_are_held_out(data, tmp_path) -> None:
    val = np.array([5, 0, 17, 33, 79])  # any order; the rest (75 items) are trained on
    res = train(data, tmp_path / "m", config=_cfg(epochs=1), vae_config=TINY, val_rows=val)
    ck = load_checkpoint(tmp_path / "m")
    assert ck.config["data"]["n_val"] == 5 and ck.config["data"]["n_train"] == 75
    assert ck.config["data"]["split"] == "explicit val_rows"
    # The validation -ELBO is that of exactly these items: recompute it with the saved model.
    x = torch.from_numpy(data.to_array()[np.sort(val)].copy())
    again = evaluate(ck.model, x, seed=0, device=torch.device("cpu"))
    assert res.history[0]["val_neg_elbo"] == pytest.approx(again["neg_elbo"], rel=1e-6)
    for bad in ([], [0, 0, 1], [80], [-1], list(range(80))):
        with pytest.raises(InvalidArgumentError) as err:
            train(data, tmp_path / "bad", config=_cfg(epochs=1), vae_config=TINY, val_rows=np.array(bad))
        assert err.value.field == "val_rows"


def test_consistency_nll_by_hand() -> None:
    mu = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    # -log N(1; 0, 1) - log N(3; 1, 4) = 0.5 (1 + log 2pi) + 0.5 (4 / 4 + log 4 + log 2pi)
    expected = 0.5 * (1.0 + math.log(2 * math.pi)) + 0.5 * (1.0 + math.log(4.0) + math.log(2 * math.pi))
    nll = consistency_nll(mu, logvar, target)
    assert nll.shape == (1,) and float(nll.detach()) == pytest.approx(expected, abs=1e-12)
    (g_mu, g_lv) = torch.autograd.grad(nll.sum(), (mu, logvar))
    # d/dmu = (mu - t) / var; d/dlogvar = 0.5 (1 - (t - mu)^2 / var)
    torch.testing.assert_close(g_mu, torch.tensor([[-1.0, -0.5]], dtype=torch.float64))
    torch.testing.assert_close(g_lv, torch.tensor([[0.0, 0.0]], dtype=torch.float64))


def test_consistency_term_enters_the_training_loss_only(tmp_path) -> None:
    # Black images: a shifted copy is the image itself, so the target is mu(x) and the term is
    # 0.5 * sum_j (logvar_j + log 2 pi). One step at a negligible learning rate leaves the model as
    # it started; with free bits of 100 nats (d = 2, beta 1) the KL term is exactly 200.
    black = ArrayDataset(np.zeros((40, 12, 10, 1), dtype=np.uint8))
    cfg = _cfg(epochs=1, batch_size=64, lr=1e-12, beta=1.0, free_bits=100.0, consistency_weight=0.5)
    res = train(black, tmp_path / "c", config=cfg, vae_config=TINY)
    plain = train(black, tmp_path / "p", config=cfg.replace(consistency_weight=0.0), vae_config=TINY)
    model = load_checkpoint(tmp_path / "c").model
    with torch.no_grad():
        _, logvar = model.encode_params(torch.zeros(1, 12, 10, 1))
    term = 0.5 * float((logvar.double() + math.log(2 * math.pi)).sum())
    h, p = res.history[0], plain.history[0]
    assert h["loss"] - h["recon"] - 200.0 == pytest.approx(0.5 * term, abs=1e-3)
    assert p["loss"] - p["recon"] - 200.0 == pytest.approx(0.0, abs=1e-3)
    assert h["val_neg_elbo"] == pytest.approx(p["val_neg_elbo"], rel=1e-6)  # validation: the plain -ELBO
    bad = (("consistency_weight", -1.0), ("consistency_weight", math.inf), ("consistency_shift", 0))
    for field, value in bad:
        with pytest.raises(InvalidArgumentError) as err:
            TrainConfig().replace(**{field: value})
        assert err.value.field == field

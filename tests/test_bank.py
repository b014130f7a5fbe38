"""latentsearch.bank.PosteriorBank, the one catalogue type: its scores against the float64
reference, its (one) validation of values, and that it never copies what it need not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference import expected_log_q, log_q

from latentsearch.bank import LOG_SIGMA_LIMIT, PosteriorBank
from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.errors import InvalidArgumentError, NotFoundError
from latentsearch.posterior import DiagonalGaussian


def _arrays(n: int = 40, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.uniform(-1.5, 0.5, size=(n, d))


def test_scores_are_the_reference_at_the_rows() -> None:
    mu, ls = _arrays()
    bank = PosteriorBank.from_arrays(mu, log_sigma=ls)
    rng = np.random.default_rng(1)
    z, std = rng.normal(size=(5, 3)), rng.uniform(0.05, 1.0, size=(5, 3))
    rows = rng.integers(0, 40, size=(5, 7))
    np.testing.assert_allclose(
        bank.log_prob_rows(z, rows), np.take_along_axis(log_q(z, mu, ls), rows, 1), rtol=1e-13
    )
    want = np.take_along_axis(expected_log_q(z, std, mu, ls), rows, 1)
    np.testing.assert_allclose(bank.expected_log_prob_rows(z, std, rows), want, rtol=1e-13)
    np.testing.assert_allclose(bank.penalty, ls.sum(1) + 1.5 * np.log(2 * np.pi), rtol=1e-14)
    assert bank.penalty is bank.posteriors.log_normalizer  # computed once, by the Gaussian


def test_memory_mapped_arrays_are_used_in_place(tmp_path: Path) -> None:
    mu, ls = _arrays()
    np.save(tmp_path / "mu.npy", mu)
    np.save(tmp_path / "ls.npy", ls)
    mm_mu = np.load(tmp_path / "mu.npy", mmap_mode="r")
    mm_ls = np.load(tmp_path / "ls.npy", mmap_mode="r")
    bank = PosteriorBank(mm_mu, mm_ls)
    assert bank.mu is mm_mu and bank.log_sigma is mm_ls
    assert isinstance(bank.posteriors, DiagonalGaussian) and len(bank) == 40 and bank.dim == 3
    z = np.zeros((2, 3))
    rows = np.array([[0, 39], [5, 5]])
    got = bank.log_prob_rows(z, rows)
    assert type(got) is np.ndarray  # gathered rows are plain arrays, not memory maps
    np.testing.assert_allclose(got, np.take_along_axis(log_q(z, mu, ls), rows, 1), rtol=1e-13)


def test_from_arrays_copies_unless_told_not_to() -> None:
    mu, ls = _arrays()
    copied = PosteriorBank.from_arrays(mu, log_sigma=ls)
    assert not np.shares_memory(copied.mu, mu) and not np.shares_memory(copied.log_sigma, ls)
    kept = PosteriorBank.from_arrays(mu, log_sigma=ls, copy=False)
    assert kept.mu is mu and kept.log_sigma is ls
    fortran = PosteriorBank.from_arrays(np.asfortranarray(mu), log_sigma=np.asfortranarray(ls), copy=False)
    assert fortran.mu.flags.c_contiguous and fortran.log_sigma.flags.c_contiguous
    np.testing.assert_array_equal(fortran.mu, mu)
    by_logvar = PosteriorBank.from_arrays(mu.astype(np.float32), logvar=2 * ls)
    np.testing.assert_array_equal(by_logvar.log_sigma, ls)
    by_sigma = PosteriorBank.from_arrays(mu, sigma=np.exp(ls))
    np.testing.assert_allclose(by_sigma.log_sigma, ls, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("change", "field", "row"),
    [
        (lambda mu, ls: mu.__setitem__((7, 1), np.nan), "mu", 7),
        (lambda mu, ls: ls.__setitem__((12, 0), np.inf), "sigma", 12),
        (lambda mu, ls: ls.__setitem__((30, 2), -LOG_SIGMA_LIMIT - 1), "sigma", 30),
        (lambda mu, ls: ls.__setitem__((3, 2), np.nan), "sigma", 3),
    ],
    ids=["nan mu", "inf log_sigma", "log_sigma too small", "nan log_sigma"],
)
def test_bad_values_name_field_and_first_row(change, field: str, row: int) -> None:
    mu, ls = _arrays()
    change(mu, ls)
    for make in (lambda: PosteriorBank(mu, ls), lambda: PosteriorBank.from_arrays(mu, log_sigma=ls)):
        with pytest.raises(InvalidArgumentError) as exc:
            make()
        assert exc.value.field == field and f"first bad row {row}" in exc.value.message, exc.value.message


def test_shapes_are_checked_before_values() -> None:
    mu, ls = _arrays()
    with pytest.raises(InvalidArgumentError, match="first bad row 30") as exc:
        PosteriorBank.from_arrays(mu, logvar=ls[:30])
    assert exc.value.field == "logvar"
    with pytest.raises(InvalidArgumentError, match="like mu") as exc:
        PosteriorBank(mu, ls[:, :2])
    assert exc.value.field == "log_sigma"
    with pytest.raises(InvalidArgumentError, match="empty"):
        PosteriorBank(mu[:0], ls[:0])


def test_ids_labels_and_lookup() -> None:
    mu, ls = _arrays(n=4)
    whole_floats = np.array([1.0, 2, 2, 7])
    bank = PosteriorBank.from_arrays(mu, log_sigma=ls, ids=[10, "b", "c", "d"], labels=whole_floats)
    assert bank.id_of(np.array([0, 3])) == ["10", "d"] and bank.row_of("c") == 2
    assert bank.labels is not None and bank.labels.dtype == np.int64
    assert bank.label_set == frozenset({1, 2, 7})
    with pytest.raises(NotFoundError):
        bank.row_of("zz")
    plain = PosteriorBank(mu, ls)
    assert plain.row_of(3) == 3 and plain.id_of(np.array([1])) == ["1"] and plain.label_set == frozenset()
    with pytest.raises(NotFoundError):
        plain.row_of("04")


def test_synthetic_banks_are_banks() -> None:
    bank = vae_like_posteriors(500, 6, seed=4)
    assert isinstance(bank, PosteriorBank) and bank.mu.shape == bank.log_sigma.shape == (500, 6)
    assert bank.labels is not None and bank.labels.shape == (500,) and bank.labels.dtype == np.int64
    again = query_families((bank.mu, bank.log_sigma), 8, seed=2)
    fam = query_families(bank, 8, seed=2)
    assert set(fam) == {"box", "prior", "posterior"}
    for name in fam:
        assert fam[name].shape == (8, 6)
        np.testing.assert_array_equal(fam[name], again[name])
    # posterior queries are draws from the items' posteriors: close to some item's mean in its sigmas
    u = (fam["posterior"][:, None, :] - bank.mu[None]) / np.exp(bank.log_sigma)[None]
    assert (np.abs(u).max(-1).min(-1) < 6).all()

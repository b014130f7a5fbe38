"""indexer.posteriors and indexer.config: npz validation (key + first bad row) and --index-spec.

The reader returns the one catalogue type, :class:`latentsearch.bank.PosteriorBank`, whose checks
are the only validation of posterior values; these tests pin that the npz-specific reporting (the
file, the key, the first bad row) survives on top of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference import log_q

from latentsearch.bank import PosteriorBank
from latentsearch.engine import EngineConfig
from latentsearch.errors import InvalidArgumentError, NotFoundError
from latentsearch.indexer import (
    IndexJobConfig,
    IndexRoot,
    parse_index_spec,
    read_posteriors_npz,
    run_index_job,
)


def _arrays(n: int = 50, d: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "mu": rng.normal(size=(n, d)),
        "logvar": rng.normal(-2.0, 0.3, size=(n, d)),
        "ids": np.array([f"item-{i}" for i in range(n)]),
        "labels": rng.integers(0, 4, size=n),
    }


# (name, arrays, key the message must name, row the message must name or None)
BadCase = tuple[str, dict[str, np.ndarray], str, str | None]


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # allow_pickle is numpy's default, named so that mypy matches **arrays only to array keywords
    np.savez(path, allow_pickle=True, **arrays)


def _bad_cases() -> list[BadCase]:
    """(name, arrays, key the message must name, row the message must name)."""
    cases: list[BadCase] = []
    a = _arrays()
    del a["mu"]
    cases.append(("missing mu", a, "mu", None))
    a = _arrays()
    del a["logvar"]
    cases.append(("missing scale", a, "logvar", None))
    a = _arrays()
    a["sigma"] = np.ones((50, 3))
    cases.append(("two scales", a, "sigma", None))
    a = _arrays()
    a["logvar"] = a["logvar"][:40]
    cases.append(("row mismatch", a, "logvar", "40"))
    a = _arrays()
    a["logvar"] = a["logvar"][:, :2]
    cases.append(("dim mismatch", a, "logvar", None))
    a = _arrays()
    a["mu"][17, 1] = np.nan
    cases.append(("nan mu", a, "mu", "17"))
    a = _arrays()
    a["logvar"][23, 0] = np.inf
    cases.append(("inf logvar", a, "logvar", "23"))
    a = _arrays()
    a["sigma"] = np.exp(0.5 * a.pop("logvar"))
    a["sigma"][31, 2] = 0.0
    cases.append(("sigma zero", a, "sigma", "31"))
    a = _arrays()
    a["sigma"] = np.exp(0.5 * a.pop("logvar"))
    a["sigma"][8, 0] = -1.0
    cases.append(("sigma negative", a, "sigma", "8"))
    a = _arrays()
    a["log_sigma"] = 0.5 * a.pop("logvar")
    a["log_sigma"][12, 1] = np.nan
    cases.append(("nan log_sigma", a, "log_sigma", "12"))
    a = _arrays()
    a["log_sigma"] = 0.5 * a.pop("logvar")
    a["log_sigma"][36, 2] = -400.0  # sigma underflows the lifted form
    cases.append(("log_sigma out of range", a, "log_sigma", "36"))
    a = _arrays()
    a["logvar"] = a["logvar"].astype(str)
    cases.append(("logvar not numeric", a, "logvar", None))
    a = _arrays()
    a["ids"][44] = a["ids"][9]
    cases.append(("duplicate ids", a, "ids", "44"))
    a = _arrays()
    a["ids"] = np.arange(50) % 48
    cases.append(("duplicate integer ids", a, "ids", "48"))
    a = _arrays()
    a["ids"] = a["ids"][:49]
    cases.append(("ids length", a, "ids", "49"))
    a = _arrays()
    a["labels"] = a["labels"].astype(float)
    a["labels"][5] = 1.5
    cases.append(("fractional label", a, "labels", "5"))
    a = _arrays()
    a["labels"] = a["labels"][:10]
    cases.append(("labels length", a, "labels", "10"))
    a = _arrays()
    a["mu"] = a["mu"][:, 0]
    cases.append(("mu not 2-D", a, "mu", None))
    return cases


@pytest.fixture(scope="module")
def published_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("valid")
    _save(tmp / "good.npz", _arrays())
    run_index_job(IndexJobConfig(out=tmp / "root", posteriors=str(tmp / "good.npz"), progress=False))
    return tmp / "root"


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_malformed_npz_is_rejected_and_nothing_published(
    case: BadCase, published_root: Path, tmp_path: Path
) -> None:
    _, arrays, key, row = case
    path = tmp_path / "bad.npz"
    _save(path, arrays)
    root = IndexRoot(published_root)
    before_current, before_versions = root.current(), root.versions()
    with pytest.raises(InvalidArgumentError) as info:
        run_index_job(IndexJobConfig(out=published_root, posteriors=str(path), progress=False))
    message = str(info.value)
    assert repr(key) in message, message
    assert "bad.npz" in message, message
    if row is not None:
        assert f"row {row}" in message, message
        assert info.value.field == key, message
    assert root.current() == before_current
    assert root.versions() == before_versions
    assert not [p for p in published_root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_variants_of_scale_and_ids_are_equivalent(tmp_path: Path) -> None:
    a = _arrays()
    np.savez(tmp_path / "lv.npz", mu=a["mu"], logvar=a["logvar"], ids=np.arange(50) + 1000)
    np.savez(tmp_path / "sg.npz", mu=a["mu"], sigma=np.exp(0.5 * a["logvar"]))
    mu32 = a["mu"].astype(np.float32)
    np.savez(tmp_path / "ls.npz", mu=mu32, log_sigma=0.5 * a["logvar"], labels=a["labels"])
    lv = read_posteriors_npz(tmp_path / "lv.npz")
    sg = read_posteriors_npz(tmp_path / "sg.npz")
    ls = read_posteriors_npz(tmp_path / "ls.npz")
    assert all(isinstance(b, PosteriorBank) for b in (lv, sg, ls))
    np.testing.assert_array_equal(lv.log_sigma, 0.5 * a["logvar"])  # logvar / 2 is exact
    np.testing.assert_allclose(lv.log_sigma, sg.log_sigma, rtol=1e-12)
    np.testing.assert_array_equal(ls.log_sigma, lv.log_sigma)
    assert lv.ids is not None and lv.ids[0] == "1000" and sg.ids is None
    assert lv.row_of("1049") == 49 and lv.labels is None
    assert ls.labels is not None and ls.labels.dtype == np.int64
    np.testing.assert_array_equal(ls.labels, a["labels"])
    assert lv.mu.dtype == ls.mu.dtype == np.float64 and lv.mu.shape == (50, 3) and lv.mu.flags.c_contiguous
    # The bank scores what the file holds: log q against the float64 reference.
    z = np.random.default_rng(3).normal(size=(4, 3))
    rows = np.tile(np.arange(50), (4, 1))
    np.testing.assert_allclose(lv.log_prob_rows(z, rows), log_q(z, a["mu"], 0.5 * a["logvar"]), rtol=1e-12)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_posteriors_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgumentError, match="not a readable"):
        read_posteriors_npz(tmp_path / "junk.npz")
    np.savez(
        tmp_path / "obj.npz", mu=np.zeros((2, 2)), logvar=np.zeros((2, 2)), ids=np.array([1, "a"], object)
    )
    with pytest.raises(InvalidArgumentError, match="'ids'"):
        read_posteriors_npz(tmp_path / "obj.npz")


def test_parse_index_spec() -> None:
    cfg = parse_index_spec("approx_nlist=4096,approx_nprobe=120,mode=auto")
    assert cfg == EngineConfig(approx_nlist=4096, approx_nprobe=120, mode="auto")
    cfg = parse_index_spec(" approx_certify=true , scale_group_base=32, approx_nlist=none,num_threads=2")
    assert cfg.approx_certify is True and cfg.scale_group_base == 32.0 and cfg.num_threads == 2
    assert parse_index_spec(None) == EngineConfig()
    with pytest.raises(InvalidArgumentError, match=r"unknown key 'nlist'.*approx_nlist"):
        parse_index_spec("nlist=10")
    with pytest.raises(InvalidArgumentError, match="key=value"):
        parse_index_spec("approx_nlist")
    with pytest.raises(InvalidArgumentError, match="approx_nprobe"):
        parse_index_spec("approx_nprobe=many")
    with pytest.raises(InvalidArgumentError, match="mode"):
        parse_index_spec("mode=fast")
    with pytest.raises(InvalidArgumentError, match="twice"):
        parse_index_spec("seed=1,seed=2")


def test_job_config_validation(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="--posteriors"):
        IndexJobConfig(out=tmp_path)
    with pytest.raises(InvalidArgumentError, match="not both"):
        IndexJobConfig(out=tmp_path, posteriors="x.npz", model="m", data="d")
    with pytest.raises(InvalidArgumentError, match="keep"):
        IndexJobConfig(out=tmp_path, posteriors="x.npz", keep=0)

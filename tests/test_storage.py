"""Save / load of the engine: round trip, memory mapping, and every kind of damaged directory."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.errors import CorruptIndexError, InvalidArgumentError, NotFoundError


@pytest.fixture(scope="module")
def engine() -> SearchEngine:
    bank = vae_like_posteriors(6000, 6, seed=3)
    log_sigma = bank.log_sigma.copy()
    log_sigma[:4] = np.log(1e-4)  # a tiny-sigma scale group on the exact path
    return SearchEngine.build(
        bank.mu,
        log_sigma=log_sigma,
        ids=[f"item-{i:05d}" for i in range(6000)],
        labels=bank.labels,
        config=EngineConfig(approx_nlist=48, approx_nprobe=6),
        build_approx=True,
    )


@pytest.fixture()
def saved(engine: SearchEngine, tmp_path: Path) -> Path:
    return engine.save(tmp_path / "engine", extra={"model_hash": "abc"})


def _queries(engine: SearchEngine) -> np.ndarray:
    fam = query_families((engine.bank.mu, engine.bank.log_sigma), 12, seed=9)
    return np.concatenate(list(fam.values()))


def _same(a: list, b: list) -> bool:
    return all(x.ids == y.ids and np.array_equal(x.scores, y.scores) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_answers_identically(engine: SearchEngine, saved: Path, mmap: bool) -> None:
    loaded = SearchEngine.load(saved, mmap=mmap, verify=True)
    z = _queries(engine)
    for mode in ("exact", "approx"):
        assert _same(engine.search_batch(z, 7, mode=mode), loaded.search_batch(z, 7, mode=mode))
        assert _same(
            engine.search_batch(z, 7, mode=mode, labels=[1, 3]),
            loaded.search_batch(z, 7, mode=mode, labels=[1, 3]),
        )
    assert loaded.approx is not None and loaded.approx.nprobe == 6
    assert loaded.config == engine.config
    assert isinstance(loaded.bank.mu, np.memmap) == mmap
    assert loaded.bank.row_of("item-00042") == 42


def test_manifest_records_parameters_and_checksums(engine: SearchEngine, saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["items"] == 6000 and manifest["latent_dim"] == 6
    assert manifest["approx"]["factory"] == "IVF48,Flat"
    assert manifest["approx"]["metric"] == "inner_product"
    assert manifest["exact"]["factory"] == "Flat"
    assert manifest["extra"] == {"model_hash": "abc"}
    on_disk = {p.name for p in saved.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, meta in manifest["files"].items():
        assert (saved / name).stat().st_size == meta["bytes"]
        assert len(meta["sha256"]) == 64


def test_flipped_byte_is_caught_by_verify(saved: Path) -> None:
    path = saved / "log_sigma.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    SearchEngine.load(saved)  # sizes still match: only the checksum can tell
    with pytest.raises(CorruptIndexError, match=r"log_sigma\.npy fails its sha256"):
        SearchEngine.load(saved, verify=True)


@pytest.mark.parametrize("name", ["mu.npy", "labels.npy", "approx.faiss", "ids.npy", "exact_groups.npy"])
def test_truncated_file(saved: Path, name: str) -> None:
    path = saved / name
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CorruptIndexError, match="truncated"):
        SearchEngine.load(saved)


def test_missing_file_and_missing_manifest(saved: Path) -> None:
    (saved / "approx_boxes.npy").unlink()
    with pytest.raises(CorruptIndexError, match=r"approx_boxes\.npy is missing"):
        SearchEngine.load(saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(CorruptIndexError, match=r"manifest\.json is missing"):
        SearchEngine.load(saved)


def test_garbled_manifest(saved: Path) -> None:
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="unreadable"):
        SearchEngine.load(saved)
    (saved / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorruptIndexError, match=r"not a latentsearch\.engine manifest"):
        SearchEngine.load(saved)


def test_future_format_version_is_refused(saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["format_version"] = 99
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match="format_version 99"):
        SearchEngine.load(saved)


def test_array_of_wrong_shape_is_refused(saved: Path) -> None:
    # Same byte size, different shape: a file swapped in from elsewhere.
    manifest = json.loads((saved / "manifest.json").read_text())
    np.save(saved / "labels.npy", np.zeros((3000, 2), dtype=np.int64))
    manifest["files"]["labels.npy"]["bytes"] = (saved / "labels.npy").stat().st_size
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match="shape"):
        SearchEngine.load(saved)


def test_no_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        SearchEngine.load(tmp_path / "nothing-here")


def test_save_refuses_to_clobber_and_leaves_no_temporaries(engine: SearchEngine, saved: Path) -> None:
    before = (saved / "manifest.json").read_bytes()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        engine.save(saved)
    assert (saved / "manifest.json").read_bytes() == before
    engine.save(saved, overwrite=True)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["engine"]


def test_exact_only_engine_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mu, log_sigma = rng.normal(size=(50, 3)), rng.normal(scale=0.3, size=(50, 3))
    engine = SearchEngine.build(mu, log_sigma=log_sigma)
    loaded = SearchEngine.load(engine.save(tmp_path / "small"), verify=True)
    assert loaded.approx is None and loaded.bank.ids is None and loaded.bank.labels is None
    z = rng.normal(size=(5, 3))
    assert _same(engine.search_batch(z, 50), loaded.search_batch(z, 50))


def test_exact_groups_are_restored_without_building_flat_indexes(engine: SearchEngine, saved: Path) -> None:
    loaded = SearchEngine.load(saved)
    assert [len(g) for g in loaded.exact.groups] == [len(g) for g in engine.exact.groups]
    for a, b in zip(loaded.exact.groups, engine.exact.groups, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.absmax, b.absmax)
        assert a.direct == b.direct
    # Exact search over the partitions only touches the flat index of the outlier group.
    loaded.config = dataclasses.replace(loaded.config, exact_strategy="partitions")  # not the cost model's
    loaded.search_batch(_queries(engine), 5, mode="exact")
    big = max(range(len(loaded.exact.groups)), key=lambda g: len(loaded.exact.groups[g]))
    assert not loaded.exact.groups[big].built

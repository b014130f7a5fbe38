"""indexer end to end: model + IDX data and npz sources, versioned root, verify, rollback, retention."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import log_q, top_k

from latentsearch.cli import main
from latentsearch.data.readers import open_dataset
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.errors import CorruptIndexError, NotFoundError, ResourceExhaustedError, UnavailableError
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job
from latentsearch.indexer import job as job_module
from latentsearch.indexer.encode import encode_dataset
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.loader import encode_batch, load_model
from latentsearch.model.vae import build_vae


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory, write_idx) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    vae = build_vae(input_shape=(28, 28, 1), latent_dim=4, channels=(4, 8), hidden=32)
    save_checkpoint(vae, tmp / "model")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    write_idx(tmp / "train-images-idx3-ubyte", images)
    write_idx(tmp / "train-labels-idx1-ubyte", rng.integers(0, 10, size=200).astype(np.uint8))
    return tmp / "model", tmp / "train-images-idx3-ubyte"


def test_model_to_index_end_to_end(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = model_and_data
    out = tmp_path / "root"
    result = run_index_job(
        IndexJobConfig(
            out=out, model=str(model_dir), data=str(data), device="cpu", batch_size=64, progress=False
        )
    )
    root = IndexRoot(out)
    assert root.current() == result.version and root.versions() == [result.version]
    version, engine = root.load_current(verify=True)
    assert version == result.version and len(engine) == 200 and engine.dim == 4
    # The written posteriors are exactly the model's, batch by batch.
    model = load_model(model_dir, device="cpu")
    dataset = open_dataset(data)
    mu, logvar = encode_batch(model, dataset.to_array())
    np.testing.assert_allclose(np.asarray(engine.bank.mu), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(engine.bank.log_sigma), 0.5 * logvar.astype(np.float64), atol=1e-6)
    np.testing.assert_array_equal(engine.bank.labels, dataset.labels)
    z = np.random.default_rng(1).normal(size=(8, 4))
    want = top_k(log_q(z, engine.bank.mu, engine.bank.log_sigma), 10)
    got = np.stack([r.rows for r in engine.search_batch(z, 10, mode="exact")])
    np.testing.assert_array_equal(got, want)
    m = root.manifest(version)
    assert m["items"] == 200 and m["latent_dim"] == 4 and m["version"] == version
    assert m["model_hash"] == model.model_hash
    assert m["dataset_fingerprint"] == dataset.fingerprint()
    assert m["faiss"]["exact_factory"] == "Flat" and m["engine"]["config"]["mode"] == "auto"
    assert {"encode", "build", "save"} <= set(m["metadata"]["timings"])
    files = {
        p.relative_to(root.version_dir(version)).as_posix() for p in root.version_dir(version).rglob("*")
    }
    parts = ("engine/", "catalogue/", "content/")
    assert set(m["files"]) == {f for f in files if f.startswith(parts) and "." in f}
    assert "encode/mu.npy" not in files


def test_model_job_checks_free_space_before_encoding(
    model_and_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, data = model_and_data
    out = tmp_path / "root"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=4096))
    encoded = []
    monkeypatch.setattr(job_module, "encode_dataset", lambda *a, **k: encoded.append(1))
    config = IndexJobConfig(out=out, model=str(model_dir), data=str(data), device="cpu", progress=False)
    message = rf"no space left on {out} \(needed about 0\.\d MiB, 0\.0 MiB free\)"
    with pytest.raises(ResourceExhaustedError, match=message):
        run_index_job(config)
    assert not encoded and IndexRoot(out).versions() == []
    assert sorted(p.name for p in out.iterdir()) == [".lock", "versions"]  # no staging left


def test_encode_dataset_streams_to_memmaps(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = model_and_data
    model = load_model(model_dir, device="cpu")
    dataset = open_dataset(data)
    enc = encode_dataset(model, dataset, tmp_path / "enc", batch_size=33, progress=False)
    assert isinstance(enc.mu, np.memmap) and enc.mu.shape == (200, 4) and enc.mu.dtype == np.float32
    mu, logvar = encode_batch(model, dataset.to_array())
    np.testing.assert_allclose(enc.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.logvar, logvar, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_encoding_matches_cpu(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = model_and_data
    dataset = open_dataset(data)
    cpu = encode_dataset(load_model(model_dir, device="cpu"), dataset, tmp_path / "c", progress=False)
    gpu = encode_dataset(
        load_model(model_dir, device="cuda"), dataset, tmp_path / "g", bf16=True, progress=False
    )
    assert gpu.mu.dtype == np.float32
    np.testing.assert_allclose(gpu.mu, cpu.mu, atol=0.1)


def _npz(path: Path, n: int, d: int = 5, seed: int = 0) -> Path:
    from latentsearch.data.banks import vae_like_posteriors

    b = vae_like_posteriors(n, d, seed=seed)
    assert b.labels is not None
    np.savez(path, mu=b.mu, logvar=2 * b.log_sigma, labels=b.labels)
    return path


def test_npz_publish_verify_rollback_retention(tmp_path: Path) -> None:
    out = tmp_path / "root"
    root = IndexRoot(out, create=True)
    assert root.current() is None and root.versions() == []
    with pytest.raises(UnavailableError):
        root.load_current()
    published = []
    for i in range(5):
        path = _npz(tmp_path / f"p{i}.npz", 300 + i, seed=i)
        res = run_index_job(IndexJobConfig(out=out, posteriors=str(path), keep=3, progress=False))
        published.append(res.version)
        assert root.current() == res.version
        _, engine = root.load_current()
        assert len(engine) == 300 + i
        with np.load(path) as z:
            mu, ls = z["mu"], 0.5 * z["logvar"]
        q = np.random.default_rng(i).normal(size=(4, 5))
        got = np.stack([r.rows for r in engine.search_batch(q, 7)])
        np.testing.assert_array_equal(got, top_k(log_q(q, mu, ls), 7))
    assert published == sorted(published)
    assert root.versions() == published[-3:]  # retention
    # Rollback (default: the previous one), then to an explicit version.
    assert root.rollback() == published[3] and root.current() == published[3]
    assert len(root.load_current()[1]) == 303
    assert root.rollback(published[2]) == published[2]
    with pytest.raises(NotFoundError):
        root.rollback("20000101T000000.000000Z-abcdef")
    # Retention never deletes the current version, even when it is the oldest.
    res = run_index_job(IndexJobConfig(out=out, posteriors=str(tmp_path / "p0.npz"), keep=1, progress=False))
    assert root.versions() == [res.version]
    root.rollback(res.version)
    # A flipped byte is detected and named.
    target = root.version_dir(res.version) / "engine" / "mu.npy"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0x01
    target.chmod(0o644)  # published versions are read-only
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptIndexError, match=r"engine/mu\.npy"):
        root.verify()
    with pytest.raises(CorruptIndexError, match=r"mu\.npy"):
        root.load_current(verify=True)
    assert root.check(res.version) == [f"{target}: fails its sha256 checksum"]


def test_manifest_tamper_and_extra_files_detected(tmp_path: Path) -> None:
    out = tmp_path / "root"
    res = run_index_job(
        IndexJobConfig(out=out, posteriors=str(_npz(tmp_path / "p.npz", 100)), progress=False)
    )
    root = IndexRoot(out)
    vdir = root.version_dir(res.version)
    for path in (vdir, vdir / "engine"):  # published versions are read-only
        path.chmod(0o755)
    (vdir / "manifest.json").chmod(0o644)
    (vdir / "engine" / "stray.bin").write_bytes(b"x")
    assert any("stray.bin" in p for p in root.check(res.version))
    (vdir / "engine" / "stray.bin").unlink()
    m = json.loads((vdir / "manifest.json").read_text())
    m["items"] = 99
    (vdir / "manifest.json").write_text(json.dumps(m))
    assert any("manifest.json" in p for p in root.check(res.version))


def test_cli_index_ls_verify_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "root")
    p = str(_npz(tmp_path / "p.npz", 120))
    assert main(["index", "--posteriors", p, "--out", out, "--no-progress"]) == 0
    assert "indexed 120 items" in capsys.readouterr().out
    assert main(["index", "--posteriors", p, "--out", out, "--no-progress", "--index-spec", "max_k=50"]) == 0
    root = IndexRoot(out)
    v1, v2 = root.versions()
    assert root.manifest(v2)["engine"]["config"]["max_k"] == 50
    capsys.readouterr()
    assert main(["index", "ls", out]) == 0
    listing = capsys.readouterr().out
    assert f"* {v2}" in listing and f"  {v1}" in listing
    assert main(["index", "rollback", out]) == 0 and root.current() == v1
    assert main(["index", "verify", out, "--all"]) == 0
    target = root.version_dir(v2) / "engine" / "log_sigma.npy"
    raw = bytearray(target.read_bytes())
    raw[200] ^= 0xFF
    target.chmod(0o644)  # published versions are read-only
    target.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["index", "verify", out, v2]) == 1
    assert "log_sigma.npy" in capsys.readouterr().out
    assert main(["index", "--posteriors", p, "--out", out, "--index-spec", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["index", "--posteriors", p, "--out", out, "--index-spec", "approx_certify=maybe"]) == 2
    assert "bad value for approx_certify: expected true or false" in capsys.readouterr().err
    assert main(["index", "--out", out]) == 2


def test_concurrent_reader_always_sees_a_complete_version(tmp_path: Path) -> None:
    out = tmp_path / "root"
    root = IndexRoot(out, create=True)
    sizes = [150 + 37 * i for i in range(6)]
    npzs = [_npz(tmp_path / f"p{i}.npz", n, seed=i) for i, n in enumerate(sizes)]
    run_index_job(IndexJobConfig(out=out, posteriors=str(npzs[0]), progress=False, keep=100))
    stop = threading.Event()
    seen: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                version, engine = root.load_current()
                assert len(engine) == root.manifest(version)["items"]
                engine.search(np.zeros(5), 3)
                seen.append((version, len(engine)))
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for path in npzs[1:]:
            run_index_job(IndexJobConfig(out=out, posteriors=str(path), progress=False, keep=100))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len({v for v, _ in seen}) >= 2
    assert {n for _, n in seen} <= set(sizes)


def test_publish_engine_api(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    engine = SearchEngine.build(
        rng.normal(size=(64, 3)), logvar=np.full((64, 3), -1.0), config=EngineConfig()
    )
    root = IndexRoot(tmp_path / "r", create=True)
    v = root.publish_engine(engine, {"model_hash": "abc", "dataset_fingerprint": "fp"})
    assert root.current() == v and root.manifest(v)["model_hash"] == "abc"
    assert root.verify() == v
    assert [(r.version, r.current, r.items) for r in root.version_infos()] == [(v, True, 64)]
    v2 = root.publish_engine(engine, keep=None)
    assert root.rollback() == v
    assert root.prune(1) == [] and root.versions() == [v, v2]  # newest + current survive

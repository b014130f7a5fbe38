"""``index --ray``: the encode step on Ray Data (a local 2-CPU Ray instance) gives the local job's
posteriors and search results; a failed or killed Ray job leaves the previous version current."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from reference import log_q, top_k

ray = pytest.importorskip("ray")  # the ``ray`` extra (part of ``dev``); skipped cleanly without it

from latentsearch.engine import EngineConfig, SearchEngine  # noqa: E402
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job  # noqa: E402
from latentsearch.indexer.ray_build import ray_assigner  # noqa: E402
from latentsearch.indexer.ray_encode import SHARD_DIR, ray_encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# float32 posteriors from the same weights, computed with different torch thread counts and batch
# boundaries: equal up to float32 rounding of the convolutions' sums.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray instance with 2 CPUs for the whole session (its GCS address), shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory, tiny_images, write_idx) -> Path:
    """300 (8, 8, 1) uint8 images with labels, as IDX files (the tiny model's item shape)."""
    tmp = tmp_path_factory.mktemp("ray-data")
    write_idx(tmp / "train-images-idx3-ubyte", tiny_images(300, (8, 8), seed=3))
    labels = np.random.default_rng(3).integers(0, 10, 300).astype(np.uint8)
    write_idx(tmp / "train-labels-idx1-ubyte", labels)
    return tmp / "train-images-idx3-ubyte"


def _config(out: Path, model: Path, data: Path, **kw: Any) -> IndexJobConfig:
    return IndexJobConfig(
        out=out, model=str(model), data=str(data), device="cpu", batch_size=64, progress=False, **kw
    )


def test_ray_job_gives_the_local_posteriors_and_results(
    ray_address: str, tiny_model_dir: Path, blobs: Path, tmp_path: Path
) -> None:
    """The whole ``--ray`` job (encode on Ray Data, the build's assignment as Ray tasks) against the
    local job, both with an approximate index (EngineConfig(approx_min_items=100), 18 partitions)."""
    engine_config = EngineConfig(approx_min_items=100, typicality_samples=0)
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def assign(directory: Path, config: IndexJobConfig) -> Any:
        return _recording(ray_assigner(directory, config), calls)

    local = run_index_job(_config(tmp_path / "local", tiny_model_dir, blobs, engine=engine_config))
    remote = run_index_job(
        _config(tmp_path / "ray", tiny_model_dir, blobs, ray=True, ray_actors=2, engine=engine_config),
        encode=ray_encode,
        assign=assign,
    )
    assert len(calls) == 1 and calls[0][0].size == 300
    # the same encoded posteriors, the build's assignment on Ray: the local job's engine exactly
    hybrid = run_index_job(
        _config(tmp_path / "hybrid", tiny_model_dir, blobs, engine=engine_config), assign=assign
    )
    assert len(calls) == 2 and hybrid.items == 300
    _, a = IndexRoot(tmp_path / "local").load_current(verify=True)
    _, h = IndexRoot(tmp_path / "hybrid").load_current(verify=True)
    np.testing.assert_array_equal(np.asarray(h.bank.mu), np.asarray(a.bank.mu))
    _assert_same_approx(h, a)
    assert a.approx is not None and a.approx.nlist == calls[1][1].shape[0] == 18  # flat k-means
    _check_nearest(a, calls[1][0], calls[1][1], a.approx.list_of_row[calls[1][0]].astype(np.int64))
    zq = np.random.default_rng(6).normal(size=(32, 4))
    for mode in ("approx", "exact"):
        hr, ar = h.search_batch_arrays(zq, 10, mode=mode), a.search_batch_arrays(zq, 10, mode=mode)
        np.testing.assert_array_equal(hr.rows, ar.rows)
        np.testing.assert_array_equal(hr.scores, ar.scores)
    # the Ray job's engine is the local build of its own posteriors
    _, b = IndexRoot(tmp_path / "ray").load_current(verify=True)
    rebuilt = SearchEngine.from_bank(b.bank, engine_config)
    _assert_same_approx(b, rebuilt)
    np.testing.assert_array_equal(
        b.search_batch_arrays(zq, 10, mode="approx").rows,
        rebuilt.search_batch_arrays(zq, 10, mode="approx").rows,
    )
    assert len(a) == len(b) == remote.items == local.items == 300  # 5 chunks of 64 rows, the last 44
    np.testing.assert_allclose(np.asarray(b.bank.mu), np.asarray(a.bank.mu), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(b.bank.log_sigma), np.asarray(a.bank.log_sigma), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_array_equal(b.bank.labels, a.bank.labels)
    # Identical exact top-k, and both equal to the float64 brute force over the local posteriors.
    z = np.random.default_rng(5).normal(size=(16, 4))
    want = top_k(log_q(z, np.asarray(a.bank.mu), np.asarray(a.bank.log_sigma)), 10)
    for engine in (a, b):
        got = np.stack([r.rows for r in engine.search_batch(z, 10, mode="exact")])
        np.testing.assert_array_equal(got, want)
    ma = IndexRoot(tmp_path / "local").manifest(local.version)
    mb = IndexRoot(tmp_path / "ray").manifest(remote.version)
    assert ma["model_hash"] == mb["model_hash"] and ma["dataset_fingerprint"] == mb["dataset_fingerprint"]
    assert mb["metadata"]["job"]["ray"] is True and mb["metadata"]["job"]["ray_actors"] == 2
    assert not list((tmp_path / "ray").rglob("*.npz*"))  # shards and staging removed
    assert ray.is_initialized()  # the job used the session's instance and left it running


def test_ray_flag_without_the_ray_encode_step_is_refused(
    tiny_model_dir: Path, blobs: Path, tmp_path: Path
) -> None:
    with pytest.raises(FailedPreconditionError, match="ray_encode"):
        run_index_job(_config(tmp_path / "r", tiny_model_dir, blobs, ray=True))
    with pytest.raises(InvalidArgumentError) as info:
        _config(tmp_path / "r", tiny_model_dir, blobs, ray=True, ray_actors=0)
    assert info.value.field == "ray_actors"
    with pytest.raises(InvalidArgumentError) as info:
        IndexJobConfig(out=tmp_path / "r", posteriors=str(tmp_path / "p.npz"), ray=True)
    assert info.value.field == "ray"


def test_an_actor_error_mid_run_keeps_the_previous_version(
    ray_address: str, tiny_model_dir: Path, tiny_images, tmp_path: Path
) -> None:
    """An image of the wrong size near the end: the driver opens the folder (lazily), an actor fails
    reading it; the reader's own error reaches the caller and nothing is published."""
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i, img in enumerate(tiny_images(150, (8, 8), seed=4)):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    out = tmp_path / "root"
    first = run_index_job(_config(out, tiny_model_dir, folder.parent, ray=True), encode=ray_encode).version
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(folder / "0140.png")
    with pytest.raises(InvalidArgumentError, match=r"0140\.png: image is 9x9"):
        run_index_job(_config(out, tiny_model_dir, folder.parent, ray=True, ray_actors=2), encode=ray_encode)
    root = IndexRoot(out)
    assert root.current() == first and root.versions() == [first]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # the staging area is gone


def test_driver_sigkill_mid_encode_keeps_the_previous_version(
    ray_address: str, tiny_model_dir: Path, tiny_images, write_idx, tmp_path: Path
) -> None:
    """The CLI's driver, on the session's Ray instance, is SIGKILLed once shards are being written;
    the previous version stays current and a rerun publishes (and clears the stale staging area)."""
    data = write_idx(tmp_path / "big-images-idx3-ubyte", tiny_images(16_000, (8, 8), seed=6))
    out = tmp_path / "root"
    small = write_idx(tmp_path / "small-images-idx3-ubyte", tiny_images(50, (8, 8), seed=7))
    first = run_index_job(_config(out, tiny_model_dir, small)).version
    cmd = [sys.executable, "-m", "latentsearch.cli", "index", "--model", str(tiny_model_dir)]
    cmd += ["--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "64"]
    cmd += ["--no-progress", "--ray", ray_address]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob(f".tmp-*/encode/{SHARD_DIR}/*.npz")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before any shard was written"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    root = IndexRoot(out)
    assert root.current() == first and root.versions() == [first]
    assert root.load_current()[1].bank.mu.shape == (50, 4)
    again = run_index_job(_config(out, tiny_model_dir, data, ray=True, ray_actors=2), encode=ray_encode)
    assert root.current() == again.version and again.items == 16_000
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def _recording(assign: Any, calls: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """``assign`` (an assign_rows hook), recording the bank rows and centroids of every call."""

    def hook(rows: np.ndarray, centroids: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        calls.append((rows.copy(), centroids.copy()))
        return assign(rows, centroids, center, scale)

    return hook


def _check_nearest(engine: Any, rows: np.ndarray, centroids: np.ndarray, got: np.ndarray) -> None:
    """Independent of FAISS: ``got`` is the float64 nearest of ``centroids`` to the standardised
    features of bank ``rows``, wherever the best two are not within rounding of each other."""
    assert engine.approx is not None
    center, scale = engine.approx.features
    mu, log_sigma = np.asarray(engine.bank.mu), np.asarray(engine.bank.log_sigma)
    features = (np.concatenate([mu[rows], log_sigma[rows]], axis=1) - center) / scale
    dist = ((features[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(2)
    best2 = np.sort(dist, axis=1)[:, :2]
    clear = best2[:, 1] - best2[:, 0] > 1e-4 * (1 + best2[:, 0])
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear], np.argmin(dist, axis=1)[clear])


def _assert_same_approx(a: Any, b: Any) -> None:
    """Two engines' approximate indexes hold the same partitions, bounds and inverted lists."""
    assert a.approx is not None and b.approx is not None
    np.testing.assert_array_equal(a.approx.list_of_row, b.approx.list_of_row)
    for name in ("lo", "hi", "slo", "shi", "lifted_box", "centred", "centred_c", "list_sizes", "features"):
        np.testing.assert_array_equal(getattr(a.approx, name), getattr(b.approx, name), err_msg=name)


def test_ray_assignment_equals_the_local_build(ray_address: str, tmp_path: Path) -> None:
    """The build's every-item step as Ray tasks (indexer.ray_build), 20,000 rows in 5 tasks: the
    engine built with the RayAssigner hook is the engine built without it, bit for bit (partitions,
    boxes, bounds, approximate results), for the flat k-means and the two-level one's coarse pass."""
    from latentsearch.data.banks import query_families, vae_like_posteriors
    from latentsearch.indexer.ray_build import RayAssigner, shard_bounds

    bank = vae_like_posteriors(20_000, 6, seed=2)
    mu32, logvar32 = bank.mu.astype(np.float32), (2 * bank.log_sigma).astype(np.float32)
    np.save(tmp_path / "mu.npy", mu32)
    np.save(tmp_path / "logvar.npy", logvar32)
    z = np.concatenate(list(query_families(bank, 8, seed=3).values()))
    for nlist, centroids in ((150, 150), (4096, 64)):  # from 4096 lists up: 64 coarse cells first
        config = EngineConfig(approx_nlist=nlist, typicality_samples=0)
        calls: list[tuple[np.ndarray, np.ndarray]] = []
        hook = _recording(RayAssigner(tmp_path, shard_rows=4096), calls)
        ray_engine = SearchEngine.build(
            mu32, logvar=logvar32, config=config, build_approx=True, assign_rows=hook
        )
        local = SearchEngine.build(mu32, logvar=logvar32, config=config, build_approx=True)
        assert local.approx is not None and local.approx.nlist == nlist
        _assert_same_approx(ray_engine, local)
        assert len(calls) == 1
        rows, cents = calls[0]
        np.testing.assert_array_equal(rows, np.flatnonzero(local.approx.list_of_row >= 0))
        assert cents.shape == (centroids, 12) and len(shard_bounds(rows.size, 4096)) == 5
        if nlist == centroids:  # flat: the assignment is the partition
            _check_nearest(local, rows, cents, local.approx.list_of_row[rows].astype(np.int64))
        got = ray_engine.search_batch_arrays(z, 10, mode="approx")
        want = local.search_batch_arrays(z, 10, mode="approx")
        np.testing.assert_array_equal(got.rows, want.rows)
        np.testing.assert_array_equal(got.scores, want.scores)

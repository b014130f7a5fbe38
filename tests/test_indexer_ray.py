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

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job  # noqa: E402
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
    local = run_index_job(_config(tmp_path / "local", tiny_model_dir, blobs))
    remote = run_index_job(
        _config(tmp_path / "ray", tiny_model_dir, blobs, ray=True, ray_actors=2), encode=ray_encode
    )
    _, a = IndexRoot(tmp_path / "local").load_current(verify=True)
    _, b = IndexRoot(tmp_path / "ray").load_current(verify=True)
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

"""``index --ray``: the encode step on Ray Data (a local 2-CPU Ray instance) gives the local job's
posteriors and search results; a failed or killed Ray job leaves the previous version current."""

from __future__ import annotations

import hashlib
import io
import json
import logging
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
import torch
from PIL import Image
from reference import log_q, top_k

ray = pytest.importorskip("ray")  # the ``ray`` extra (part of ``dev``); skipped cleanly without it

from latentsearch.bank import PosteriorBank  # noqa: E402
from latentsearch.cli import main  # noqa: E402
from latentsearch.data.readers import open_dataset  # noqa: E402
from latentsearch.engine import EngineConfig, SearchEngine  # noqa: E402
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job  # noqa: E402
from latentsearch.indexer import ray_encode as ray_encode_module  # noqa: E402
from latentsearch.indexer.catalogue import write_catalogue  # noqa: E402
from latentsearch.indexer.config import parse_index_spec  # noqa: E402
from latentsearch.indexer.encode import encode_posteriors  # noqa: E402
from latentsearch.indexer.incremental import content_hashes  # noqa: E402
from latentsearch.indexer.ray_build import ray_assigner  # noqa: E402
from latentsearch.indexer.ray_encode import SHARD_DIR, ray_encode, ray_payloads  # noqa: E402
from latentsearch.model.loader import load_model  # noqa: E402

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
    assert ma["model_hash"] == mb["model_hash"]
    assert ma["dataset_fingerprint"] == open_dataset(blobs).fingerprint()
    # the Ray driver reads no item: its fingerprint is the sha256 of the actors' content hashes
    assert mb["dataset_fingerprint"] == _content_fingerprint(tmp_path / "local", local.version)
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
    log_path = tmp_path / "driver.log"  # the driver's output, for the message of a failed check
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob(f".tmp-*/encode/{SHARD_DIR}/*.npz")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before any shard was written:\n{log_path.read_text()}"
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


def test_cli_ray_index_builds_partitions_on_ray_then_reindexes_only_what_changed(
    ray_address: str, tiny_model_dir: Path, blobs: Path, tiny_images, write_idx, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``latentsearch index --ray`` (the CLI, in this process, on the session's Ray instance) with an
    approximate index (``--index-spec approx_min_items=100``: 18 partitions of the 300 items): its log
    shows the build's assignment ran as Ray tasks, and the version answers exact and approximate
    searches as a local ``index`` of the same data does. A rerun with 5 changed items prints the
    reuse line, and the actors encode those 5 items only."""
    spec = "approx_min_items=100,typicality_samples=0"
    base = ["index", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "64"]
    base += ["--threads", "1", "--no-progress", "--index-spec", spec]  # the actors' 1 torch thread
    ray_args = ["--ray", ray_address, "--ray-actors", "2"]
    spy = _SpyEncode()
    monkeypatch.setattr(ray_encode_module, "ray_encode", spy)  # what the CLI imports for --ray
    caplog.set_level(logging.INFO, logger="latentsearch.indexer")
    threads = torch.get_num_threads()
    try:
        assert main([*base, "--data", str(blobs), "--out", str(tmp_path / "local")]) == 0
        assert not _ray_lines(caplog) and not spy.items  # no Ray without --ray
        assert main([*base, "--data", str(blobs), "--out", str(tmp_path / "ray"), *ray_args]) == 0
        first = _ray_lines(caplog)
        caplog.clear()
        # the rerun: rows 7, 50, 123, 200 and 299 changed by one pixel, the others as before
        x = tiny_images(300, (8, 8), seed=3)  # the blobs fixture's items
        changed = np.array([7, 50, 123, 200, 299])
        x[changed, 3, 3] ^= 1
        (tmp_path / "v2").mkdir()
        data = write_idx(tmp_path / "v2" / "train-images-idx3-ubyte", x)
        (tmp_path / "v2" / "train-labels-idx1-ubyte").write_bytes(
            (blobs.parent / "train-labels-idx1-ubyte").read_bytes()
        )
        capsys.readouterr()
        assert main([*base, "--data", str(data), "--out", str(tmp_path / "ray"), *ray_args]) == 0
        again = _ray_lines(caplog)
    finally:
        torch.set_num_threads(threads)
    # The first Ray job: the actors encoded all 300 items, the build assigned all 300 on Ray.
    assert {"Ray encoded 300 items", "Ray assigned 300 items to 18 centroids in 1 tasks"} <= set(first)
    _, a = IndexRoot(tmp_path / "local").load_current(verify=True)
    root = IndexRoot(tmp_path / "ray")
    v1, v2 = root.versions()
    b = root.load(v1)
    assert a.approx is not None and b.approx is not None and a.approx.nlist == b.approx.nlist == 18
    mu_a, ls_a = np.asarray(a.bank.mu), np.asarray(a.bank.log_sigma)
    mu_b, ls_b = np.asarray(b.bank.mu), np.asarray(b.bank.log_sigma)
    np.testing.assert_allclose(mu_b, mu_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ls_b, ls_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(b.bank.labels, a.bank.labels)
    z = np.random.default_rng(8).normal(size=(32, 4))
    exact_a, exact_b = (e.search_batch_arrays(z, 10, mode="exact") for e in (a, b))
    # Exact: the same items, each engine's scores the float64 brute force over its own posteriors
    # (to 1e-9: the engine sums in another order), and the two versions' scores apart by no more
    # than the first-order effect of their posteriors' differences (0 when they are bitwise equal).
    np.testing.assert_array_equal(exact_b.rows, exact_a.rows)
    np.testing.assert_array_equal(exact_a.rows, top_k(log_q(z, mu_a, ls_a), 10))
    for got, mu, ls in ((exact_a, mu_a, ls_a), (exact_b, mu_b, ls_b)):
        want = np.take_along_axis(log_q(z, mu, ls), got.rows, axis=1)
        np.testing.assert_allclose(got.scores, want, rtol=1e-12, atol=1e-9)
    bound = _score_bound(z, exact_a.rows, mu_a, ls_a, mu_b, ls_b)
    np.testing.assert_array_less(np.abs(exact_b.scores - exact_a.scores), 2 * bound + 1e-9)
    # Approximate: the Ray-assigned partitions are the local build's of the same posteriors, so the
    # results equal a local build of the version's own bank; and, when the Ray actors' posteriors
    # are bitwise the local encoder's (one torch thread each, the same batches), the local version's.
    rebuilt = SearchEngine.from_bank(b.bank, parse_index_spec(spec))
    _assert_same_approx(b, rebuilt)
    approx_b = b.search_batch_arrays(z, 10, mode="approx")
    want_b = rebuilt.search_batch_arrays(z, 10, mode="approx")
    np.testing.assert_array_equal(approx_b.rows, want_b.rows)
    np.testing.assert_array_equal(approx_b.scores, want_b.scores)
    if np.array_equal(mu_a, mu_b) and np.array_equal(ls_a, ls_b):
        _assert_same_approx(b, a)
        approx_a = a.search_batch_arrays(z, 10, mode="approx")
        np.testing.assert_array_equal(approx_b.rows, approx_a.rows)
        np.testing.assert_array_equal(approx_b.scores, approx_a.scores)
    # The rerun: the reuse line, the actors given the 5 changed items only (the job's file of them),
    # the other 295 posteriors the first version's bit for bit, the 5 new ones the local encoder's.
    out = capsys.readouterr().out.splitlines()
    assert f"reuse: 295 posteriors reused from version {v1}, 5 items encoded" in out
    assert {"Ray encoded 5 items", "Ray assigned 300 items to 18 centroids in 1 tasks"} <= set(again)
    assert not [line for line in again if line.startswith("Ray encoded") and line != "Ray encoded 5 items"]
    assert len(spy.items) == 2 and len(spy.items[0]) == 300
    np.testing.assert_array_equal(spy.items[1], x[changed][..., None])
    assert str(spy.paths[1]).endswith(os.path.join("changed", "items.npy"))
    assert root.current() == v2 and root.manifest(v2)["metadata"]["reuse"]["encoded"] == 5
    c = root.load(v2, verify=True)
    same = np.setdiff1d(np.arange(300), changed)
    np.testing.assert_array_equal(np.asarray(c.bank.mu)[same], mu_b[same])
    np.testing.assert_array_equal(np.asarray(c.bank.log_sigma)[same], ls_b[same])
    mu_new, logvar_new = encode_posteriors(load_model(tiny_model_dir), x[changed][..., None])
    np.testing.assert_allclose(np.asarray(c.bank.mu)[changed], mu_new, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(c.bank.log_sigma)[changed], 0.5 * logvar_new, rtol=RTOL, atol=ATOL)
    assert not list((tmp_path / "ray").rglob("*.npz*"))
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".tmp-")]


class _SpyEncode:
    """``ray_encode``, recording the items (and the data path) of every call."""

    def __init__(self) -> None:
        self.items: list[np.ndarray] = []
        self.paths: list[str | None] = []

    def __call__(self, model: Any, dataset: Any, directory: Path, config: IndexJobConfig) -> Any:
        self.items.append(dataset.to_array().copy())
        self.paths.append(config.data)
        return ray_encode(model, dataset, directory, config)


def _ray_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The job's "Ray encoded N items" / "Ray assigned N items to L centroids in T tasks" log lines,
    up to their timings."""
    lines = []
    for record in caplog.records:
        text = record.getMessage()
        if not record.name.startswith("latentsearch.indexer.ray_"):
            continue
        if text.startswith("Ray encoded"):
            lines.append(text.split(" in ")[0])
        elif text.startswith("Ray assigned"):
            lines.append(text.rsplit(",", 1)[0])
    return lines


def _score_bound(
    z: np.ndarray, rows: np.ndarray, mu_a: np.ndarray, ls_a: np.ndarray, mu_b: np.ndarray, ls_b: np.ndarray
) -> np.ndarray:
    """``(B, k)``: the first-order change of log q(z | x_row) from posteriors ``a`` to ``b``:
    sum_j |z_j - mu_j| / sigma_j^2 |d mu_j| + |(z_j - mu_j)^2 / sigma_j^2 - 1| |d log sigma_j|."""
    diff = z[:, None, :] - mu_a[rows]  # (B, k, d)
    inv_var = np.exp(-2 * ls_a[rows])
    d_mu, d_ls = np.abs(mu_b - mu_a)[rows], np.abs(ls_b - ls_a)[rows]
    return (np.abs(diff) * inv_var * d_mu + np.abs(diff**2 * inv_var - 1) * d_ls).sum(axis=2)


def _content_fingerprint(root: Path, version: str) -> str:
    """The fingerprint a ``--ray`` job records, computed here from a version's stored content hashes
    and labels: sha256 over repr((shape, dtype, hash algorithm)), the hashes, b"labels", the labels."""
    manifest = IndexRoot(root).manifest(version)
    vdir = IndexRoot(root).version_dir(version)
    hashes = np.load(vdir / "content" / "hashes.npy")
    content = manifest["metadata"]["content_hashes"]
    shape = (len(hashes), *content["item_shape"])
    h = hashlib.sha256(repr((shape, content["dtype"], content["algorithm"])).encode())
    h.update(hashes.tobytes())
    if (vdir / "engine" / "labels.npy").exists():
        h.update(b"labels" + np.load(vdir / "engine" / "labels.npy").astype("<i8").tobytes())
    return "content-sha256:" + h.hexdigest()


def _current_dir(root: Path) -> Path:
    """The directory of the current version under ``root``."""
    version = IndexRoot(root).current()
    assert version is not None
    return IndexRoot(root).version_dir(version)


def _payload_files(root: Path) -> dict[str, bytes]:
    """The current version's per-item files that do not depend on the posteriors: the catalogue's
    payloads (thumbnails, metadata records and offsets), the content hashes, the engine's labels and
    ids; and catalogue.json without the latent diagnostics."""
    vdir = _current_dir(root)
    files = {
        str(p.relative_to(vdir)): p.read_bytes()
        for p in sorted([*(vdir / "catalogue").iterdir(), *(vdir / "content").iterdir()])
        if p.name != "catalogue.json"
    }
    for p in (vdir / "engine").iterdir():
        if p.name.startswith(("labels", "ids")):
            files[f"engine/{p.name}"] = p.read_bytes()
    info = json.loads((vdir / "catalogue" / "catalogue.json").read_text())
    info.pop("diagnostics")
    files["catalogue.json without diagnostics"] = json.dumps(info, sort_keys=True).encode()
    return files


def test_ray_job_payloads_are_the_local_jobs_byte_for_byte(
    ray_address: str, tiny_model_dir: Path, blobs: Path, tiny_images, tmp_path: Path
) -> None:
    """Under ``--ray`` the actors compute every item's content hash, id, label, thumbnail and metadata
    record and the driver merges them: the catalogue files, content hashes and engine labels / ids are
    the local job's byte for byte, on IDX files (labels, thumbnails) and an image folder (named ids,
    labels from folders, metadata records), for a full run (no payload pass: the encode pass computes
    them) and an incremental rerun (a payload pass first, then only the changed items encoded)."""
    folder = tmp_path / "images"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
    images = tiny_images(130, (8, 8), seed=9)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / ("cat" if i % 3 else "dog") / f"{i:04d}.png")
    passes: list[int] = []

    def payloads(dataset: Any, directory: Path, config: IndexJobConfig) -> Any:
        passes.append(len(dataset))
        return ray_payloads(dataset, directory, config)

    def both(data: Path, name: str) -> tuple[Any, Any]:
        local = run_index_job(_config(tmp_path / f"{name}-local", tiny_model_dir, data))
        remote = run_index_job(
            _config(tmp_path / f"{name}-ray", tiny_model_dir, data, ray=True, ray_actors=2),
            encode=ray_encode,
            payloads=payloads,
        )
        a, b = _payload_files(tmp_path / f"{name}-local"), _payload_files(tmp_path / f"{name}-ray")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], key
        return a, (local, remote)

    files, _ = both(blobs, "idx")
    assert {"catalogue/thumbnails.npy", "content/hashes.npy", "engine/labels.npy"} <= files.keys()
    files, _ = both(folder, "folder")
    assert {"catalogue/metadata.jsonl", "catalogue/metadata_offsets.npy", "engine/ids.npy"} <= files.keys()
    assert passes == []  # nothing to reuse: the encode pass brought the payloads
    # independent references: the stored thumbnails are the pixels, the records the files' paths
    vdir = _current_dir(tmp_path / "folder-ray")
    order = sorted(range(130), key=lambda i: ("cat" if i % 3 else "dog", i))  # the folder's row order
    np.testing.assert_array_equal(np.load(vdir / "catalogue" / "thumbnails.npy")[..., 0], images[order])
    records = (vdir / "catalogue" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(r)["source"] for r in records] == [
        str((folder / ("cat" if i % 3 else "dog") / f"{i:04d}.png").resolve()) for i in order
    ]
    # the rerun: 3 images changed, 1 removed, 1 added; a payload pass over all 130, then 4 encoded
    for i in (4, 5, 60):
        Image.fromarray(images[i] ^ 1).save(folder / ("cat" if i % 3 else "dog") / f"{i:04d}.png")
    (folder / "cat" / "0007.png").unlink()
    Image.fromarray(images[0]).save(folder / "cat" / "1000.png")  # a copy of an item: reused
    Image.fromarray(images[1] ^ 2).save(folder / "dog" / "1001.png")
    _, (local, remote) = both(folder, "folder")
    assert passes == [131]
    assert local.reuse.reused == remote.reuse.reused == 127 and remote.reuse.encoded == 4
    assert not list(tmp_path.rglob("*.npz*")) and not list(tmp_path.rglob("payloads"))


def test_payload_pass_downscales_and_reads_parquet_as_the_local_catalogue(
    ray_address: str, tiny_model_dir: Path, tiny_images, tmp_path: Path
) -> None:
    """:func:`ray_payloads` (the actors' payload pass, no model) gives the files ``write_catalogue``
    writes from the dataset itself, and ``content_hashes``' hashes: for large RGB images (downscaled
    thumbnails) and a Parquet file of PNGs (Ray Data's reader; the records name file and row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(11)
    big = tmp_path / "big" / "a"
    big.mkdir(parents=True)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(big / f"{i:03d}.png")
    small = tiny_images(50, (8, 8), seed=12)
    pngs = []
    for img in small:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        pngs.append(buf.getvalue())
    table = pa.table({"id": [f"p{i}" for i in range(50)], "label": np.arange(50) % 4, "image": pngs})
    pq.write_table(table, tmp_path / "items.parquet", row_group_size=16)
    for data in (big.parent, tmp_path / "items.parquet"):
        dataset = open_dataset(data)
        config = _config(tmp_path / "root", tiny_model_dir, data, ray=True, ray_actors=2)
        staged = ray_payloads(dataset, tmp_path / f"stage-{data.name}", config)
        want = tmp_path / f"local-{data.name}"
        n = len(dataset)
        bank = PosteriorBank(np.zeros((n, 2)), np.zeros((n, 2)), ids=dataset.ids, labels=dataset.labels)
        write_catalogue(want, bank, dataset=dataset)
        assert staged.plan.thumbnail_shape is not None and staged.plan.metadata
        written = sorted(p.name for p in want.iterdir() if p.name != "catalogue.json")
        assert sorted(staged.plan.files) == written
        for name in staged.plan.files:
            assert (staged.directory / name).read_bytes() == (want / name).read_bytes(), name
        np.testing.assert_array_equal(staged.hashes, content_hashes(dataset))
        np.testing.assert_array_equal(staged.ids, dataset.ids)
        np.testing.assert_array_equal(staged.labels, dataset.labels)
    assert staged.plan.thumbnail_shape == (8, 8, 1)
    assert json.loads((want / "metadata.jsonl").read_text().splitlines()[20])["row"] == 20
    assert np.load(tmp_path / "local-big" / "thumbnails.npy").shape[1:] == (42, 32, 3)  # downscaled

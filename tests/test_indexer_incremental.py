"""Incremental reindexing: with the same model, a job reuses the current version's posteriors for the
items whose bytes are unchanged and encodes only the new or changed ones; the result equals a full
reindex (posteriors to float32 rounding, identical search results)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reference import log_q, top_k

from latentsearch.cli import main
from latentsearch.data.readers import ArrayDataset, Dataset
from latentsearch.engine import SearchEngine
from latentsearch.errors import UnavailableError
from latentsearch.indexer import IndexJobConfig, IndexRoot, local_encode, run_index_job
from latentsearch.indexer.encode import EncodedPosteriors
from latentsearch.indexer.incremental import content_hashes, encode_with_reuse, open_previous, plan_reuse
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.loader import LoadedModel
from latentsearch.model.vae import build_vae

# Posteriors of the same item from the same weights in other batches: equal up to float32 rounding.
RTOL, ATOL = 1e-5, 1e-6
SHAPE = (8, 8, 1)  # the tiny model's item shape


class SpyEncode:
    """An encode step that records the items it is given, then runs ``step``."""

    def __init__(self, step: Callable[..., EncodedPosteriors] = local_encode) -> None:
        self.step = step
        self.seen: list[np.ndarray] = []
        self.paths: list[str | None] = []

    def __call__(
        self, model: LoadedModel, dataset: Dataset, directory: Path, config: Any
    ) -> EncodedPosteriors:
        self.seen.append(dataset.to_array().copy())
        self.paths.append(config.data)
        return self.step(model, dataset, directory, config)


def _config(out: Path, model: Path, data: Path, **kw: Any) -> IndexJobConfig:
    return IndexJobConfig(
        out=out, model=str(model), data=str(data), device="cpu", batch_size=64, progress=False, **kw
    )


def _npz(path: Path, x: np.ndarray, ids: list[str]) -> Path:
    labels = np.array([int(i[3:]) % 3 for i in ids])  # labels follow the ids, not the rows
    np.savez(path, x=x, y=labels, ids=np.array(ids))
    return path


def _changed(old: np.ndarray, tiny_images: Callable[..., np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """A new dataset from ``old`` (300 items, ids img0000...): rows 0-19 removed, rows 100-149 in
    reverse order, 5 items changed by one pixel, 15 new items, two more copies of an unchanged item
    and a copy of a removed one (still stored, so reused): 278 reused, 20 encoded."""
    keep = list(range(20, 300))
    keep[80:130] = keep[80:130][::-1]
    x = old[keep].copy()
    for r in (3, 40, 77, 150, 279):
        x[r, 4, 4, 0] ^= 1
    x = np.concatenate([x, tiny_images(15, SHAPE, seed=99), old[[200, 200, 5]]])
    ids = [f"img{i:04d}" for i in keep] + [f"new{i:04d}" for i in range(15)]
    ids += ["dup0200", "dup0201", "old0005"]
    return x, ids


def _expected(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``(N,)`` the first row of ``old`` holding each new row's bytes (-1: none), by byte comparison."""
    first: dict[bytes, int] = {}
    for i, item in enumerate(old):
        first.setdefault(item.tobytes(), i)
    return np.array([first.get(item.tobytes(), -1) for item in new], dtype=np.int64)


def _search_equal(a: SearchEngine, b: SearchEngine) -> None:
    """Identical exact top-10 on both engines, equal to the float64 brute force over ``a``."""
    z = np.random.default_rng(5).normal(size=(16, 4))
    want = top_k(log_q(z, np.asarray(a.bank.mu), np.asarray(a.bank.log_sigma)), 10)
    for engine in (a, b):
        got = np.stack([r.rows for r in engine.search_batch(z, 10, mode="exact")])
        np.testing.assert_array_equal(got, want)


def _posteriors_close(a: SearchEngine, b: SearchEngine) -> None:
    np.testing.assert_allclose(np.asarray(a.bank.mu), np.asarray(b.bank.mu), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(a.bank.log_sigma), np.asarray(b.bank.log_sigma), rtol=RTOL, atol=ATOL
    )


@pytest.fixture(scope="module")
def old_items(tiny_images: Callable[..., np.ndarray]) -> np.ndarray:
    return tiny_images(300, SHAPE, seed=3)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture with other weights (another model hash)."""
    torch.manual_seed(1)
    vae = build_vae(input_shape=SHAPE, latent_dim=4, channels=(4,), hidden=16)
    path = tmp_path_factory.mktemp("other-model") / "model"
    save_checkpoint(vae, path)
    return path


def test_content_hashes_are_blake2b_of_shape_dtype_and_bytes(old_items: np.ndarray) -> None:
    header = repr((SHAPE, "|u1")).encode()
    want = [hashlib.blake2b(header + item.tobytes(), digest_size=16).digest() for item in old_items]
    got = content_hashes(ArrayDataset(old_items))
    assert got.shape == (300, 16) and got.dtype == np.uint8
    assert [bytes(row) for row in got] == want
    # the same bytes as another shape or dtype hash differently
    assert not (content_hashes(ArrayDataset(old_items.reshape(300, 64))) == got).all(axis=1).any()
    assert not (content_hashes(ArrayDataset(old_items.view(np.int8))) == got).all(axis=1).any()


def test_incremental_reindexing_encodes_only_what_changed(
    tiny_model_dir: Path, old_items: np.ndarray, tiny_images: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "root"
    old_ids = [f"img{i:04d}" for i in range(300)]
    first = run_index_job(_config(out, tiny_model_dir, _npz(tmp_path / "v1.npz", old_items, old_ids)))
    assert first.reuse is not None and first.reuse.to_dict() == {
        "previous_version": None, "reused": 0, "encoded": 300, "reason": "no version is current yet"
    }

    x, ids = _changed(old_items, tiny_images)
    source = _expected(old_items, x)
    assert len(x) == 298 and int((source >= 0).sum()) == 278
    spy = SpyEncode()
    data = _npz(tmp_path / "v2.npz", x, ids)
    second = run_index_job(_config(out, tiny_model_dir, data), encode=spy)
    assert second.reuse is not None
    reuse = second.reuse
    assert (reuse.previous_version, reuse.reused, reuse.encoded) == (first.version, 278, 20)
    # The encode step saw exactly the 20 new or changed items, in the new data's order, once.
    assert len(spy.seen) == 1
    np.testing.assert_array_equal(spy.seen[0], x[source < 0])

    root = IndexRoot(out)
    v1 = root.load(first.version)
    _, inc = root.load_current(verify=True)
    # Reused rows hold the first version's posteriors bit for bit (the first row of the same bytes).
    hit = source >= 0
    np.testing.assert_array_equal(np.asarray(inc.bank.mu)[hit], np.asarray(v1.bank.mu)[source[hit]])
    np.testing.assert_array_equal(
        np.asarray(inc.bank.log_sigma)[hit], np.asarray(v1.bank.log_sigma)[source[hit]]
    )
    # Ids and labels follow the new data.
    assert inc.bank.ids is not None and inc.bank.ids.tolist() == ids
    np.testing.assert_array_equal(inc.bank.labels, [int(i[3:]) % 3 for i in ids])

    # A full reindex of the same data: the same posteriors (float32 rounding), ids, labels, results.
    full = run_index_job(_config(tmp_path / "full", tiny_model_dir, data, reuse=False))
    assert full.reuse is not None and (full.reuse.reused, full.reuse.encoded) == (0, 298)
    assert full.reuse.reason == "reuse is off (--full)"
    _, ref = IndexRoot(tmp_path / "full").load_current()
    _posteriors_close(inc, ref)
    np.testing.assert_array_equal(inc.bank.ids, ref.bank.ids)
    np.testing.assert_array_equal(inc.bank.labels, ref.bank.labels)
    _search_equal(ref, inc)

    m, mf = root.manifest(second.version), IndexRoot(tmp_path / "full").manifest(full.version)
    assert m["metadata"]["reuse"] == {
        "previous_version": first.version, "reused": 278, "encoded": 20, "reason": None
    }
    assert m["dataset_fingerprint"] == mf["dataset_fingerprint"] and m["model_hash"] == mf["model_hash"]
    assert m["engine"]["config"] == mf["engine"]["config"]
    assert {"hash", "reuse", "encode"} <= set(m["metadata"]["timings"])
    stored = np.load(root.version_dir(second.version) / "content" / "hashes.npy")
    np.testing.assert_array_equal(stored, content_hashes(ArrayDataset(x)))
    assert m["files"]["content/hashes.npy"]["bytes"] == os.path.getsize(
        root.version_dir(second.version) / "content" / "hashes.npy"
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # scratch removed


def test_image_folder_moves_renames_and_edits(
    tiny_model_dir: Path, tiny_images: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    """An image folder: a renamed file and one moved to another class are reused (their ids and
    labels are the new ones), an edited file and a new one are encoded, a deleted one is gone."""
    folder = tmp_path / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
    images = tiny_images(40, SHAPE, seed=8)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / ("a" if i < 20 else "b") / f"{i:03d}.png")
    out = tmp_path / "root"
    first = run_index_job(_config(out, tiny_model_dir, folder))
    (folder / "a" / "003.png").rename(folder / "a" / "zzz.png")  # renamed
    (folder / "a" / "004.png").rename(folder / "b" / "004.png")  # moved to class b
    (folder / "b" / "030.png").unlink()  # deleted
    edited = images[31, ..., 0].copy()
    edited[0, 0] ^= 1
    Image.fromarray(edited).save(folder / "b" / "031.png")  # edited
    Image.fromarray(tiny_images(1, SHAPE, seed=9)[0, ..., 0]).save(folder / "b" / "new.png")  # new
    spy = SpyEncode()
    second = run_index_job(_config(out, tiny_model_dir, folder), encode=spy)
    assert second.reuse is not None and (second.reuse.reused, second.reuse.encoded) == (38, 2)
    assert sorted(bytes(x) for x in spy.seen[0]) == sorted(
        [edited[..., None].tobytes(), tiny_images(1, SHAPE, seed=9)[0].tobytes()]
    )
    root = IndexRoot(out)
    _, inc = root.load_current(verify=True)
    v1 = root.load(first.version)
    assert inc.bank.ids is not None and v1.bank.ids is not None
    ids = inc.bank.ids.tolist()
    assert "a/zzz.png" in ids and "b/004.png" in ids and "a/003.png" not in ids and "b/030.png" not in ids
    old_row = v1.bank.ids.tolist().index("a/003.png")
    np.testing.assert_array_equal(inc.bank.mu[ids.index("a/zzz.png")], v1.bank.mu[old_row])
    assert inc.bank.labels is not None and inc.bank.labels[ids.index("b/004.png")] == 1  # class b now
    full = run_index_job(_config(tmp_path / "full", tiny_model_dir, folder, reuse=False))
    _, ref = IndexRoot(tmp_path / "full").load_current()
    assert full.items == second.items == 40
    _posteriors_close(inc, ref)
    _search_equal(ref, inc)


def test_nothing_changed_publishes_a_version_with_nothing_encoded(
    tiny_model_dir: Path, old_items: np.ndarray, write_idx: Callable[..., Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_idx(tmp_path / "items-idx3-ubyte", old_items[..., 0])
    out = tmp_path / "root"
    base = ["index", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    base += ["--device", "cpu", "--no-progress"]
    assert main(base) == 0
    assert "reuse: none, all 300 items encoded: no version is current yet" in capsys.readouterr().out
    assert main(base) == 0
    text = capsys.readouterr().out
    root = IndexRoot(out)
    first, second = root.versions()
    assert root.current() == second
    assert f"reuse: 300 posteriors reused from version {first}, 0 items encoded" in text.splitlines()
    a, b = root.load(first), root.load(second)
    np.testing.assert_array_equal(np.asarray(a.bank.mu), np.asarray(b.bank.mu))
    np.testing.assert_array_equal(np.asarray(a.bank.log_sigma), np.asarray(b.bank.log_sigma))
    assert root.manifest(second)["metadata"]["encode_items_per_s"] is None
    assert main([*base, "--full"]) == 0
    assert "reuse: none, all 300 items encoded: reuse is off (--full)" in capsys.readouterr().out
    assert main(["index", "ls", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "reused 0 encoded 300" in rows[0] and "reused 300 encoded 0" in rows[1]
    assert "reused 0 encoded 300" in rows[2] and rows[2].startswith("*")


def test_when_nothing_can_be_reused_every_item_is_encoded_and_the_log_says_why(
    tiny_model_dir: Path, other_model_dir: Path, old_items: np.ndarray, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [f"img{i:04d}" for i in range(300)]
    data = _npz(tmp_path / "items.npz", old_items, ids)
    out = tmp_path / "root"
    caplog.set_level(logging.INFO, logger="latentsearch.indexer")

    def encoded_all(why: str, model: Path = tiny_model_dir, path: Path = data) -> None:
        spy = SpyEncode()
        result = run_index_job(_config(out, model, path), encode=spy)
        assert result.reuse is not None and result.reuse.previous_version is None
        assert (result.reuse.reused, result.reuse.encoded) == (0, result.items)
        assert why in str(result.reuse.reason)
        assert sum(len(x) for x in spy.seen) == result.items
        assert any(why in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
        caplog.clear()

    # An old root: the current version has no content hashes.
    monkeypatch.setattr("latentsearch.indexer.job.content_metadata", lambda dataset: None)
    monkeypatch.setattr("latentsearch.indexer.job.write_hashes", lambda directory, hashes: directory)
    old = run_index_job(_config(out, tiny_model_dir, data)).version
    monkeypatch.undo()
    assert not (IndexRoot(out).version_dir(old) / "content").exists()
    encoded_all("has no content hashes (published before incremental reindexing)")
    # Another model.
    encoded_all("was encoded with model", model=other_model_dir)
    # The items' shape changed: (64,) vectors of the same bytes.
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=old_items.reshape(300, 64), y=np.arange(300) % 3, ids=np.array(ids))
    run_index_job(_config(out, tiny_model_dir, data))
    encoded_all("holds items of shape (8, 8, 1) |u1, this data (64,) |u1", path=flat)
    # No item in common.
    np.savez(flat, x=255 - old_items, y=np.arange(300) % 3, ids=np.array(ids))
    run_index_job(_config(out, tiny_model_dir, data))
    encoded_all("is unchanged", path=flat)
    # Published from posteriors.
    np.savez(tmp_path / "p.npz", mu=np.zeros((10, 4)), logvar=np.zeros((10, 4)))
    run_index_job(IndexJobConfig(out=out, posteriors=str(tmp_path / "p.npz"), progress=False))
    encoded_all("was published from posteriors")


def test_a_damaged_current_version_is_not_reused(
    tiny_model_dir: Path, old_items: np.ndarray, write_idx: Callable[..., Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = write_idx(tmp_path / "items-idx3-ubyte", old_items[..., 0])
    out = tmp_path / "root"
    first = run_index_job(_config(out, tiny_model_dir, data))
    vdir = IndexRoot(out).version_dir(first.version)
    target = vdir / "engine" / "mu.npy"
    os.chmod(vdir / "engine", 0o755)
    os.chmod(target, 0o644)
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0x40
    target.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO, logger="latentsearch.indexer")
    second = run_index_job(_config(out, tiny_model_dir, data))
    assert second.reuse is not None and (second.reuse.reused, second.reuse.encoded) == (0, 300)
    assert f"{target}: fails its sha256 checksum" in str(second.reuse.reason)
    assert any(r.levelno == logging.WARNING and "cannot be reused" in r.getMessage() for r in caplog.records)
    assert IndexRoot(out).verify() == second.version  # the new version is whole
    (out / "CURRENT").write_text("garbage\n")  # an unreadable CURRENT: nothing reused, the publish fixes it
    third = run_index_job(_config(out, tiny_model_dir, data))
    assert third.reuse is not None and third.reuse.encoded == 300 and "CURRENT" in str(third.reuse.reason)
    assert IndexRoot(out).current() == third.version


def test_a_failed_incremental_job_keeps_the_previous_version(
    tiny_model_dir: Path, old_items: np.ndarray, tiny_images: Callable[..., np.ndarray],
    write_idx: Callable[..., Path], tmp_path: Path,
) -> None:
    out = tmp_path / "root"
    data = write_idx(tmp_path / "a-idx3-ubyte", old_items[..., 0])
    first = run_index_job(_config(out, tiny_model_dir, data))
    x, _ = _changed(old_items, tiny_images)
    changed = write_idx(tmp_path / "b-idx3-ubyte", x[..., 0])

    def failing(model: LoadedModel, dataset: Dataset, directory: Path, config: Any) -> EncodedPosteriors:
        assert len(dataset) == 20  # only the changed items reach the encode step
        raise UnavailableError("the encoder went away")

    with pytest.raises(UnavailableError, match="went away"):
        run_index_job(_config(out, tiny_model_dir, changed), encode=failing)
    root = IndexRoot(out)
    assert root.current() == first.version and root.versions() == [first.version]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert root.verify() == first.version


def test_reuse_reads_the_previous_version_safely_while_it_is_pruned(
    tiny_model: LoadedModel, tiny_model_dir: Path, old_items: np.ndarray, write_idx: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """open_previous holds the root's writer lock while it checks and maps the version; once it
    returns, a prune deleting that version does not change what is reused."""
    data = write_idx(tmp_path / "items-idx3-ubyte", old_items[..., 0])
    out = tmp_path / "root"
    first = run_index_job(_config(out, tiny_model_dir, data))
    root = IndexRoot(out)
    want = root.load(first.version, mmap=False)
    dataset = ArrayDataset(old_items)
    previous, why = open_previous(
        root, model_hash=tiny_model.model_hash, input_rule=tiny_model.input_rule, bf16=False,
        item_shape=SHAPE, dtype=np.dtype(np.uint8),
    )
    assert previous is not None and why is None and previous.version == first.version
    run_index_job(_config(out, tiny_model_dir, data, reuse=False))
    assert root.prune(keep=1) == [first.version]
    assert not (out / "versions" / first.version).exists()
    plan = plan_reuse(content_hashes(dataset), previous)
    assert plan.reused == 300 and len(plan.encode_rows) == 0

    def never(items: Dataset, where: Path) -> EncodedPosteriors:
        raise AssertionError("nothing to encode")

    got = encode_with_reuse(plan, dataset, tmp_path / "enc", 4, never)
    np.testing.assert_array_equal(got.mu.astype(np.float64), want.bank.mu)
    np.testing.assert_array_equal(0.5 * got.logvar.astype(np.float64), want.bank.log_sigma)

    # While another writer holds the lock, open_previous waits for it.
    done = threading.Event()

    def opener() -> None:
        open_previous(
            root, model_hash=tiny_model.model_hash, input_rule=tiny_model.input_rule, bf16=False,
            item_shape=SHAPE, dtype=np.dtype(np.uint8),
        )
        done.set()

    with root.writer_lock():
        thread = threading.Thread(target=opener)
        thread.start()
        assert not done.wait(0.5)
    assert done.wait(30)
    thread.join()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance with 2 CPUs for this module (or the one already running in the session);
    skipped cleanly without the ``ray`` extra."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_incremental_reindexing_on_ray_encodes_only_what_changed(
    local_ray: None, tiny_model_dir: Path, old_items: np.ndarray, tiny_images: Callable[..., np.ndarray],
    write_idx: Callable[..., Path], tmp_path: Path,
) -> None:
    """``--ray``: the actors encode only the new or changed items (read from the job's own file of
    them); the version equals a full local reindex."""
    ray_encode = pytest.importorskip("latentsearch.indexer.ray_encode").ray_encode
    out = tmp_path / "root"
    v1 = write_idx(tmp_path / "v1-idx3-ubyte", old_items[..., 0])
    first = run_index_job(_config(out, tiny_model_dir, v1))
    x, _ = _changed(old_items, tiny_images)
    source = _expected(old_items, x)
    data = write_idx(tmp_path / "v2-idx3-ubyte", x[..., 0])
    spy = SpyEncode(ray_encode)
    second = run_index_job(_config(out, tiny_model_dir, data, ray=True, ray_actors=2), encode=spy)
    assert second.reuse is not None
    reuse = second.reuse
    assert (reuse.previous_version, reuse.reused, reuse.encoded) == (first.version, 278, 20)
    assert len(spy.seen) == 1
    np.testing.assert_array_equal(spy.seen[0], x[source < 0])
    assert str(spy.paths[0]).endswith(os.path.join("changed", "items.npy"))
    full = run_index_job(_config(tmp_path / "full", tiny_model_dir, data, reuse=False))
    _, inc = IndexRoot(out).load_current(verify=True)
    _, ref = IndexRoot(tmp_path / "full").load_current()
    assert full.items == inc.bank.mu.shape[0] == 298
    _posteriors_close(inc, ref)
    np.testing.assert_array_equal(inc.bank.labels, ref.bank.labels)
    _search_equal(ref, inc)
    assert IndexRoot(out).manifest(second.version)["metadata"]["job"]["ray"] is True
    assert not list(out.rglob("*.npz*")) and not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

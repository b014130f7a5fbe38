"""Catalogues: label names, thumbnails, metadata and latent diagnostics, from the indexer to the client.

References are independent: folder names listed with ``os.listdir``, pixels read back with Pillow
from the image files, diagnostics recomputed in float64 numpy from the stored mu and sigma (the
percentiles by sorting and interpolating by hand).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentsearch.bank import PosteriorBank
from latentsearch.cli import main
from latentsearch.client import LatentSearchClient
from latentsearch.data.readers import ImageFolderDataset
from latentsearch.diagnostics import ACTIVE_KL_THRESHOLD, latent_diagnostics
from latentsearch.errors import CorruptIndexError, InvalidArgumentError
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job
from latentsearch.indexer import catalogue as catalogue_module
from latentsearch.indexer.catalogue import (
    MAX_THUMBNAIL_VALUES,
    Catalogue,
    check_label_names,
    write_catalogue,
)
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.vae import build_vae
from latentsearch.server.engine_service import load_snapshot

CLASSES = ["zebra", "ant", "moth"]  # written as folders; the reader sorts them
SHAPE = (12, 10, 1)


# -- references -----------------------------------------------------------------------------------
def _percentile(col: np.ndarray, q: float) -> float:
    """Linear-interpolation percentile by hand: position (n - 1) q / 100 in the sorted column."""
    s = sorted(float(v) for v in col)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _reference_diagnostics(mu: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    kl = (0.5 * (mu**2 + sigma**2 - 1.0) - np.log(sigma)).mean(axis=0)
    d = mu.shape[1]
    return {
        "kl": kl,
        "mean_p01": np.array([_percentile(mu[:, j], 1.0) for j in range(d)]),
        "mean_p99": np.array([_percentile(mu[:, j], 99.0) for j in range(d)]),
        "mean_min": np.array([min(mu[:, j]) for j in range(d)]),
        "mean_max": np.array([max(mu[:, j]) for j in range(d)]),
    }


def _assert_diagnostics(diag, mu: np.ndarray, sigma: np.ndarray) -> None:
    want = _reference_diagnostics(mu, sigma)
    for name, values in want.items():
        np.testing.assert_allclose(getattr(diag, name), values, rtol=1e-12, atol=1e-12, err_msg=name)
    assert diag.threshold == 0.1
    np.testing.assert_array_equal(diag.active, want["kl"] >= 0.1)


def _named(names: list[str], label: int | None) -> str:
    assert label is not None
    return names[label]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, tiny_images) -> Path:
    """30 grayscale 12x10 PNGs in three class folders."""
    root = tmp_path_factory.mktemp("images") / "garments"
    images = tiny_images(30, SHAPE, seed=3)
    for i, img in enumerate(images):
        folder = root / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0]).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = build_vae(input_shape=SHAPE, latent_dim=3, channels=(4, 8), hidden=16)
    out = tmp_path_factory.mktemp("model") / "model"
    save_checkpoint(vae, out)
    return out


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, model_dir: Path) -> Path:
    """An index root with one version encoded from ``image_folder`` through the CLI."""
    out = tmp_path_factory.mktemp("root") / "root"
    argv = ["index", "--model", str(model_dir), "--data", str(image_folder), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    return out


def _posteriors_npz(path: Path, n: int = 40, d: int = 3, labels: int = 3, **extra: Any) -> Path:
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(n, d))
    mu[:, 1] *= 0.01  # a collapsed dimension: mean ~0, sigma ~1
    sigma = rng.uniform(0.3, 0.9, size=(n, d))
    sigma[:, 1] = 0.99
    np.savez(path, mu=mu, sigma=sigma, labels=rng.integers(0, labels, size=n), **extra)
    return path


# -- diagnostics ----------------------------------------------------------------------------------
def test_diagnostics_equal_a_float64_numpy_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(501, 4)) * np.array([1.0, 0.05, 2.0, 0.0])
    sigma = rng.uniform(0.2, 1.2, size=(501, 4))
    sigma[:, 3] = 1.0  # exactly the prior: KL 0
    monkeypatch.setattr("latentsearch.diagnostics._CHUNK_ROWS", 64)  # several chunks
    diag = latent_diagnostics(mu.astype(np.float32), np.log(sigma))
    _assert_diagnostics(diag, mu.astype(np.float32), sigma)
    assert diag.kl[3] == 0.0 and 3 in diag.collapsed and 0 not in diag.collapsed
    assert diag.summary().startswith(f"{4 - len(diag.collapsed)}/4 active; collapsed: ")
    assert ACTIVE_KL_THRESHOLD == 0.1


def test_posteriors_version_gets_diagnostics_and_npz_label_names(tmp_path: Path, start_server) -> None:
    names = np.array(["alpha", "beta", "gamma"])
    npz = _posteriors_npz(tmp_path / "p.npz", label_names=names)
    result = run_index_job(IndexJobConfig(out=tmp_path / "root", posteriors=str(npz), progress=False))
    with np.load(npz) as z:
        mu, sigma, labels = z["mu"], z["sigma"], z["labels"]
    srv = start_server(index=str(tmp_path / "root"))
    with LatentSearchClient(srv.target) as client:
        info = client.info()
        assert info["index_version"] == result.version and info["label_names"] == list(names)
        _assert_diagnostics(info["diagnostics"], mu, sigma)
        assert info["diagnostics"].collapsed == [1]
        item = client.get_item("7")
        assert item.label == labels[7] and item.label_name == str(names[labels[7]])
        assert item.thumbnail_png == b"" and item.metadata is None  # no pixels, no records
        answer = client.nearest_to_distribution(mu[7], sigma[7], 5, with_label_names=True)
        assert [h.label_name for h in answer.hits] == [_named(list(names), h.label) for h in answer.hits]
        assert all(h.label_name is None for h in client.nearest_to_distribution(mu[7], sigma[7], 5).hits)


# -- an image folder end to end -------------------------------------------------------------------
def test_image_folder_names_thumbnails_metadata_reach_the_client(
    folder_root: Path, image_folder: Path, start_server, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = sorted(p.name for p in image_folder.iterdir())  # independent of the reader
    files = sorted(p for p in image_folder.rglob("*.png"))
    root = IndexRoot(folder_root)
    version = root.verify()
    engine = root.load(version)
    srv = start_server(index=str(folder_root))
    with LatentSearchClient(srv.target) as client:
        info = client.info()
        assert info["label_names"] == classes
        _assert_diagnostics(info["diagnostics"], engine.bank.mu, np.exp(engine.bank.log_sigma))
        for path in files[::7]:
            rel = path.relative_to(image_folder).as_posix()
            item = client.get_item(rel)
            assert item.label_name == path.parent.name and _named(classes, item.label) == path.parent.name
            with Image.open(io.BytesIO(item.thumbnail_png)) as png, Image.open(path) as original:
                assert png.format == "PNG"
                np.testing.assert_array_equal(np.asarray(png), np.asarray(original))
            assert item.metadata == {"source": str(path.resolve())}
        z = np.asarray(engine.bank.mu[4])
        hits = client.nearest(z, 8, with_label_names=True).hits
        assert len(hits) == 8 and [h.label_name for h in hits] == [_named(classes, h.label) for h in hits]
        assert all(h.label_name is None for h in client.nearest(z, 8).hits)  # only when asked
        batch = client.nearest_batch(np.stack([z, z]), 3, with_label_names=True)
        assert [h.label_name for h in batch[1].hits] == [_named(classes, h.label) for h in batch[1].hits]
    capsys.readouterr()
    assert main(["query", "--target", srv.target, "--z", ",".join(map(str, z)), "-k", "8"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 8
    for h, row in zip(hits, rows, strict=True):
        assert row.split()[1] == h.id and row.split()[3:5] == [str(h.label), _named(classes, h.label)]


def test_index_ls_shows_diagnostics_briefly(folder_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = IndexRoot(folder_root)
    engine = root.load(root.verify())
    want = _reference_diagnostics(engine.bank.mu, np.exp(engine.bank.log_sigma))
    collapsed = [j for j in range(3) if want["kl"][j] < 0.1]
    capsys.readouterr()
    assert main(["index", "ls", str(folder_root)]) == 0
    line = capsys.readouterr().out.strip()
    assert (
        f"dims {3 - len(collapsed)}/3 active" in line and "names 3" in line and "thumbnails 12x10x1" in line
    )
    assert ("collapsed: " + ", ".join(map(str, collapsed))) in line if collapsed else "collapsed" not in line


# -- label names from --label-names -----------------------------------------------------------------
def test_label_names_flag_comma_list_and_file(tmp_path: Path, start_server) -> None:
    npz = _posteriors_npz(tmp_path / "p.npz", label_names=np.array(["x", "y", "z"]))
    out = tmp_path / "root"
    assert main(["index", "--posteriors", str(npz), "--out", str(out), "--label-names", "Cat, Dog,Eel"]) == 0
    srv = start_server(index=str(out))
    with LatentSearchClient(srv.target) as client:
        assert client.info()["label_names"] == ["Cat", "Dog", "Eel"]  # the flag beats the npz's names
    names_file = tmp_path / "names.txt"
    names_file.write_text("T-shirt/top\nTrouser\n\nPullover\n", encoding="utf-8")
    assert main(["index", "--posteriors", str(npz), "--out", str(out), "--label-names", str(names_file)]) == 0
    assert srv.run(srv.server.reload_now())
    with LatentSearchClient(srv.target) as client:
        assert client.info()["label_names"] == ["T-shirt/top", "Trouser", "Pullover"]
        item = client.get_item("0")
        assert item.label_name == _named(["T-shirt/top", "Trouser", "Pullover"], item.label)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a,b", "give at least 3 names"),
        ("", "label name 0 is empty"),
        ("a,,c", "label name 1 is empty"),
        ("a,b,a", "are both 'a'"),
    ],
)
def test_bad_label_names_flag_is_a_clear_error(
    tmp_path: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = _posteriors_npz(tmp_path / "p.npz")
    out = tmp_path / "root"
    capsys.readouterr()
    assert main(["index", "--posteriors", str(npz), "--out", str(out), "--label-names", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --label-names {value!r}: ") and message in err and "Traceback" not in err
    assert IndexRoot(out).versions() == []  # nothing published


def test_label_names_for_a_dataset_are_checked_before_encoding(
    image_folder: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded before checking the label names")

    monkeypatch.setattr("latentsearch.indexer.job.encode_dataset", no_encoding)
    config = IndexJobConfig(
        out=tmp_path / "root",
        model=str(model_dir),
        data=str(image_folder),
        label_names=("a", "b"),
        progress=False,
    )
    with pytest.raises(InvalidArgumentError, match="give at least 3 names") as info:
        run_index_job(config)
    assert info.value.field == "label_names"


def test_check_label_names_rules() -> None:
    labels = np.array([0, 2, 1, 2])
    assert check_label_names(["a", "b", "c", "unused"], labels) == ["a", "b", "c", "unused"]
    assert check_label_names(None, labels) is None
    for names, labels_, message in [
        ([], labels, "empty"),
        (["a", "b"], labels, "label 2"),
        (["a"], None, "no labels"),
        (["a", "b"], np.array([-1, 0]), "label -1"),
        (["a\nb"], np.array([0]), "line break"),
        (["x" * 300], np.array([0]), "over 256"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message) as info:
            check_label_names(names, labels_, field="label_names")
        assert info.value.field == "label_names"


# -- thumbnails -----------------------------------------------------------------------------------
def test_large_images_are_downscaled_to_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "rgb"
    folder.mkdir()
    originals = []
    for i in range(5):
        pixels = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        originals.append(pixels)
    dataset = ImageFolderDataset(folder)
    bank = PosteriorBank(rng.normal(size=(5, 2)), np.zeros((5, 2)))
    write_catalogue(tmp_path / "cat", bank, dataset=dataset)
    cat = Catalogue.load(tmp_path / "cat", bank)
    shape = cat.thumbnail_shape
    assert shape is not None
    h, w, c = shape
    assert c == 3 and h * w * c <= MAX_THUMBNAIL_VALUES and cat.downscaled
    assert abs(w / h - 80 / 64) < 0.1 and h * w * c > MAX_THUMBNAIL_VALUES * 0.8
    for i, pixels in enumerate(originals):
        want = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BOX))
        np.testing.assert_array_equal(cat.thumbnail(i), want)
        with Image.open(io.BytesIO(cat.thumbnail_png(i))) as png:
            np.testing.assert_array_equal(np.asarray(png), want)
        assert cat.metadata(i) == {"source": str((folder / f"{i}.png").resolve())}


def test_metadata_records_round_trip_one_at_a_time(tmp_path: Path) -> None:
    records = [{"source": f"/data/{i}.png", "note": "é" * (i % 4), "n": i} for i in range(2500)]

    class WithRecords(ImageFolderDataset):
        def item_metadata(self, start: int, stop: int) -> list[dict[str, object]]:
            return records[start:stop]

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2500):
        Image.fromarray(np.full((2, 2), i % 256, dtype=np.uint8)).save(folder / f"{i:04d}.png")
    bank = PosteriorBank(np.zeros((2500, 1)), np.zeros((2500, 1)))
    write_catalogue(tmp_path / "cat", bank, dataset=WithRecords(folder))
    cat = Catalogue.load(tmp_path / "cat", bank)
    for i in (0, 1, 1023, 1024, 2499):
        assert cat.metadata(i) == records[i] and json.loads(cat.metadata_json(i)) == records[i]
        thumb = cat.thumbnail(i)
        assert thumb is not None and thumb.tolist() == [[[i % 256]] * 2] * 2


# -- integrity ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["catalogue.json", "thumbnails.npy", "metadata.jsonl", "metadata_offsets.npy"]
)
def test_flipped_byte_in_a_payload_file_is_detected_and_not_served(
    folder_root: Path, image_folder: Path, model_dir: Path, name: str, tmp_path: Path, start_server
) -> None:
    out = tmp_path / "root"
    shutil.copytree(folder_root, out)
    root = IndexRoot(out)
    old = root.current()
    config = IndexJobConfig(
        out=out, model=str(model_dir), data=str(image_folder), device="cpu", progress=False
    )
    new = run_index_job(config).version
    target = root.version_dir(new) / "catalogue" / name
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=rf"catalogue/{name}: fails its sha256"):
        root.verify(new)
    with pytest.raises(CorruptIndexError, match=name):
        load_snapshot(root, verify=True)
    srv = start_server(index=str(out))  # verifies by default: the intact older version serves
    with LatentSearchClient(srv.target) as client:
        info = client.info()
    assert info["index_version"] == old and info["current_version"] == new
    assert name in info["fallback_reason"]


def test_version_without_catalogue_still_serves(tmp_path: Path, make_engine, publish, start_server) -> None:
    engine = make_engine(50, dim=3)
    publish(tmp_path / "root", engine)  # the engine alone, as versions were before catalogues
    srv = start_server(index=str(tmp_path / "root"))
    with LatentSearchClient(srv.target) as client:
        info = client.info()
        assert info["label_names"] == [] and info["diagnostics"] is None
        item = client.get_item("item3")
        assert item.label == engine.bank.labels[3] and item.label_name is None
        assert item.thumbnail_png == b"" and item.metadata is None
        hits = client.nearest(np.zeros(3), 5, with_label_names=True).hits
        assert len(hits) == 5 and all(h.label_name is None and h.label is not None for h in hits)
    assert (
        catalogue_module.read_catalogue_info(IndexRoot(tmp_path / "root").version_dir(info["index_version"]))
        is None
    )


# -- training -------------------------------------------------------------------------------------
def test_train_warns_naming_the_collapsed_dimensions(
    tmp_path: Path, tiny_images, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentsearch.model.loader import encode_batch, load_model
    from latentsearch.model.train import split_indices

    images = tiny_images(80, SHAPE, seed=1)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "m"
    argv = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(out), "--epochs", "1", "--no-progress"]
    # a heavy KL weight and no free bits: most dimensions collapse
    assert (
        main([*argv, "--latent-dim", "4", "--beta", "8", "--free-bits", "0", "--val-fraction", "0.25"]) == 0
    )
    printed = capsys.readouterr().out
    _, val_rows = split_indices(80, 0.25, 0)  # the default seed
    mu, logvar = encode_batch(load_model(out, device="cpu"), images[val_rows])
    want = _reference_diagnostics(mu, np.exp(0.5 * logvar.astype(np.float64)))
    collapsed = [j for j in range(4) if want["kl"][j] < 0.1]
    assert collapsed  # the setting above collapses some
    warning = [line for line in printed.splitlines() if "collapsed to the prior" in line]
    assert len(warning) == 1
    assert warning[0].startswith(
        f"WARNING: latent dimensions {', '.join(map(str, collapsed))} of 4 collapsed"
    )


def test_npz_dataset_label_names_reach_the_version(tmp_path: Path, model_dir: Path, tiny_images) -> None:
    images = tiny_images(12, SHAPE, seed=4)
    labels = np.arange(12) % 2
    np.savez(tmp_path / "items.npz", x=images, y=labels, label_names=np.array(["even", "odd"]))
    out = tmp_path / "root"
    config = IndexJobConfig(out=out, model=str(model_dir), data=str(tmp_path / "items.npz"), progress=False)
    version = run_index_job(config).version
    snap = load_snapshot(IndexRoot(out), verify=True)
    assert snap.version == version and snap.catalogue is not None
    assert snap.catalogue.label_names == ("even", "odd")
    assert [snap.catalogue.label_name(int(v)) for v in labels[:3]] == ["even", "odd", "even"]
    for row in (0, 11):
        thumb = snap.catalogue.thumbnail(row)
        assert thumb is not None
        np.testing.assert_array_equal(thumb, images[row])


def test_no_thumbnails_flag(tmp_path: Path, image_folder: Path, model_dir: Path, start_server) -> None:
    out = tmp_path / "root"
    argv = ["index", "--model", str(model_dir), "--data", str(image_folder), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--no-progress", "--no-thumbnails"]) == 0
    root = IndexRoot(out)
    version = root.verify()
    assert not (root.version_dir(version) / "catalogue" / "thumbnails.npy").exists()
    srv = start_server(index=str(out))
    with LatentSearchClient(srv.target) as client:
        item = client.get_item(
            sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))[0]
        )
        assert item.thumbnail_png == b"" and item.label_name is not None and item.metadata is not None


def test_without_verify_a_truncated_payload_is_still_refused(folder_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "root"
    shutil.copytree(folder_root, out)
    root = IndexRoot(out)
    version = root.current()
    assert version is not None
    target = root.version_dir(version) / "catalogue" / "thumbnails.npy"
    target.chmod(0o644)
    size = target.stat().st_size
    with open(target, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(CorruptIndexError, match=rf"thumbnails.npy has {size - 10} bytes"):
        load_snapshot(root, verify=False)

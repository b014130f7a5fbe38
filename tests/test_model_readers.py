"""Data readers: IDX (plain/gz), npy, npz, image folders, the shared sample, corrupt inputs."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from latentsearch.data.garments import GARMENT_CLASSES, garment_dataset, garment_images
from latentsearch.data.readers import ArrayDataset, ImageFolderDataset, open_dataset, read_idx
from latentsearch.errors import InvalidArgumentError, NotFoundError


def _images(n: int = 10, h: int = 5, w: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w), dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_with_labels(tmp_path, write_idx, gz: bool) -> None:
    x, y = _images(), np.arange(10, dtype=np.uint8) % 3
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", x, gz=gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", y, gz=gz)
    for path in (tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path):
        ds = open_dataset(path)
        assert ds.shape == (10, 5, 4, 1) and ds.dtype == np.uint8 and ds.kind == "image"
        np.testing.assert_array_equal(ds.to_array()[..., 0], x)
        np.testing.assert_array_equal(ds.labels, y)
        assert list(ds.ids) == [str(i) for i in range(10)]
    if not gz:
        assert isinstance(read_idx(tmp_path / "train-images-idx3-ubyte"), np.memmap)


def test_idx_float_big_endian_features(tmp_path, write_idx) -> None:
    x = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32)
    write_idx(tmp_path / "feats.idx", x)
    ds = open_dataset(tmp_path / "feats.idx")
    assert ds.kind == "features" and ds.dtype == np.float32 and ds.dtype.isnative
    np.testing.assert_array_equal(ds.to_array(), x)
    assert ds.labels is None


def test_iter_batches_streams_in_order(tmp_path, write_idx) -> None:
    x = _images(23)
    write_idx(tmp_path / "a-images-idx3-ubyte", x)
    ds = open_dataset(tmp_path / "a-images-idx3-ubyte")
    starts, parts = zip(*ds.iter_batches(5), strict=True)
    assert starts == (0, 5, 10, 15, 20)
    np.testing.assert_array_equal(np.concatenate(parts)[..., 0], x)
    assert [s for s, _ in ds.iter_batches(4, start=8, stop=15)] == [8, 12]
    assert list(ds.batch_ids(20, 30)) == ["20", "21", "22"]


def test_corrupt_and_truncated_idx(tmp_path, write_idx) -> None:
    x = _images()
    good = write_idx(tmp_path / "good-images-idx3-ubyte", x)
    raw = good.read_bytes()
    (tmp_path / "short-images-idx3-ubyte").write_bytes(raw[:-7])
    with pytest.raises(InvalidArgumentError, match=r"short-images-idx3-ubyte: IDX file truncated.*10x5x4"):
        open_dataset(tmp_path / "short-images-idx3-ubyte")
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(InvalidArgumentError, match=r"bad-images-idx3-ubyte: not an IDX file \(bad magic"):
        open_dataset(tmp_path / "bad-images-idx3-ubyte")
    (tmp_path / "long-images-idx3-ubyte").write_bytes(raw + b"xx")
    with pytest.raises(InvalidArgumentError, match="trailing bytes"):
        open_dataset(tmp_path / "long-images-idx3-ubyte")
    gz = gzip.compress(raw)
    (tmp_path / "cut-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(InvalidArgumentError, match=r"cut-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        open_dataset(tmp_path / "cut-images-idx3-ubyte.gz")
    with pytest.raises(NotFoundError):
        open_dataset(tmp_path / "missing.npy")


def test_label_count_mismatch(tmp_path, write_idx) -> None:
    write_idx(tmp_path / "t-images-idx3-ubyte", _images())
    write_idx(tmp_path / "t-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(InvalidArgumentError, match="9 labels for 10 items"):
        open_dataset(tmp_path / "t-images-idx3-ubyte")


def test_npy_memmap_and_sidecar_labels(tmp_path) -> None:
    x = np.random.default_rng(2).random((6, 8)).astype(np.float64)
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "f.labels.npy", np.arange(6))
    ds = open_dataset(tmp_path / "f.npy")
    assert ds.kind == "features" and ds.item_shape == (8,)
    np.testing.assert_array_equal(ds.to_array(), x)
    np.testing.assert_array_equal(ds.labels, np.arange(6))
    imgs = _images(4, 6, 6)[..., None].repeat(3, axis=-1)
    np.save(tmp_path / "rgb.npy", imgs)
    ds2 = open_dataset(tmp_path / "rgb.npy")
    assert ds2.shape == (4, 6, 6, 3) and ds2.labels is None
    np.testing.assert_array_equal(ds2.read(1, 3), imgs[1:3])


def test_npz_keys_and_ids(tmp_path) -> None:
    x, y = _images(5), np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "d.npz", x=x, y=y, ids=np.array(["a", "b", "c", "d", "e"]))
    ds = open_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(ds.to_array()[..., 0], x)
    np.testing.assert_array_equal(ds.labels, y)
    assert list(ds.ids) == ["a", "b", "c", "d", "e"]
    np.savez_compressed(tmp_path / "one.npz", whatever=x)
    np.testing.assert_array_equal(open_dataset(tmp_path / "one.npz").to_array()[..., 0], x)
    np.savez(tmp_path / "amb.npz", p=x, q=x)
    with pytest.raises(InvalidArgumentError, match="cannot tell which array"):
        open_dataset(tmp_path / "amb.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgumentError, match=r"junk\.npz"):
        open_dataset(tmp_path / "junk.npz")


def test_image_folder_with_label_subfolders(tmp_path) -> None:
    rng = np.random.default_rng(3)
    written = {}
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            written[f"{cls}/{i}.png"] = arr
    ds = open_dataset(tmp_path)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.shape == (6, 6, 5, 1) and ds.label_names == ["ant", "cat"]
    assert list(ds.ids) == sorted(written)
    arr = ds.to_array()
    for i, rel in enumerate(ds.ids):
        np.testing.assert_array_equal(arr[i, ..., 0], written[rel])
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    _, batch = next(ds.iter_batches(4, start=2))
    assert batch.shape == (4, 6, 5, 1)


def test_image_folder_rgb_jpeg_no_labels_and_size_mismatch(tmp_path) -> None:
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(tmp_path / "b.png")
    ds = open_dataset(tmp_path)
    assert ds.shape == (2, 4, 4, 3) and ds.labels is None
    assert abs(int(ds.to_array()[0].mean()) - 200) < 5
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(InvalidArgumentError, match=r"c.png: image is 4x5"):
        ImageFolderDataset(tmp_path).to_array()
    assert ImageFolderDataset(tmp_path, size=(4, 4)).to_array().shape == (3, 4, 4, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InvalidArgumentError, match=r"broken\.png: cannot decode"):
        ImageFolderDataset(tmp_path, size=(4, 4)).to_array()


def test_unknown_format(tmp_path) -> None:
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(InvalidArgumentError, match="unknown data format"):
        open_dataset(tmp_path / "x.csv")


def test_fingerprint_identifies_content(tmp_path, write_idx) -> None:
    x = _images()
    a = ArrayDataset(x, labels=np.zeros(10))
    write_idx(tmp_path / "z-images-idx3-ubyte.gz", x, gz=True)
    write_idx(tmp_path / "z-labels-idx1-ubyte.gz", np.zeros(10, np.uint8), gz=True)
    assert a.fingerprint() == open_dataset(tmp_path / "z-images-idx3-ubyte.gz").fingerprint()
    assert a.fingerprint() != ArrayDataset(x).fingerprint()


def test_generated_garments_deterministic() -> None:
    x1, y1 = garment_images(40, seed=5)
    x2, y2 = garment_images(40, seed=5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (40, 28, 28) and x1.dtype == np.uint8 and set(y1) == set(range(10))
    assert not np.array_equal(x1, garment_images(40, seed=6)[0])
    ds = garment_dataset(20)
    assert ds.item_shape == (28, 28, 1) and ds.label_names == GARMENT_CLASSES


def test_shared_fashion_mnist_sample(fashion_mnist_dir) -> None:
    ds = open_dataset(fashion_mnist_dir)
    assert ds.shape == (3443, 28, 28, 1) and ds.dtype == np.uint8
    assert ds.labels is not None and set(np.unique(ds.labels)) == set(range(10))
    first = next(ds.iter_batches(512))[1]
    assert first.shape == (512, 28, 28, 1) and first.max() > 200

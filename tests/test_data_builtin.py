"""The packaged Fashion-MNIST sample (the default data) and ``--data`` by built-in name or path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from latentsearch.data.builtin import BUILTIN_DATASETS, DEFAULT_DATASET, head, load_data
from latentsearch.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    SAMPLE_DIR,
    SAMPLE_IMAGES,
    SAMPLE_LABELS,
    fashion_mnist_sample,
)
from latentsearch.data.garments import garment_dataset
from latentsearch.data.readers import ArrayDataset
from latentsearch.errors import InvalidArgumentError, NotFoundError


def _parse_idx_by_hand(path: Path) -> np.ndarray:
    """An independent IDX parser: big-endian magic (0, 0, 0x08 = uint8, ndim), ndim uint32 dims, bytes."""
    raw = gzip.decompress(path.read_bytes())
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    assert (zero, code) == (0, 0x08)
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def test_the_packaged_sample_is_the_fashion_mnist_sample_with_names() -> None:
    ds = fashion_mnist_sample()
    x, y = _parse_idx_by_hand(SAMPLE_IMAGES), _parse_idx_by_hand(SAMPLE_LABELS)
    assert x.shape == (3443, 28, 28) and y.shape == (3443,)
    assert ds.shape == (3443, 28, 28, 1) and ds.dtype == np.uint8
    np.testing.assert_array_equal(ds.to_array()[..., 0], x)
    np.testing.assert_array_equal(ds.labels, y.astype(np.int64))
    # Ten roughly balanced classes, named by label as Fashion-MNIST names them.
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10 and counts.min() > 250 and counts.max() < 450
    assert ds.label_names == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    assert ds.label_names is not FASHION_MNIST_CLASSES  # a copy: editing it changes no other dataset
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    # The licence notice ships beside the data, and the README lists every class name.
    assert "MIT License" in (SAMPLE_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "Zalando SE" in (SAMPLE_DIR / "LICENSE").read_text(encoding="utf-8")
    readme = (SAMPLE_DIR / "README.md").read_text(encoding="utf-8")
    assert all(f"| {i} | {name} |" in readme for i, name in enumerate(FASHION_MNIST_CLASSES))


def test_the_packaged_files_equal_the_shared_sample(fashion_mnist_dir: Path) -> None:
    for name in (SAMPLE_IMAGES.name, SAMPLE_LABELS.name):
        assert (SAMPLE_DIR / name).read_bytes() == (fashion_mnist_dir / name).read_bytes(), name


def test_load_data_by_name_path_and_default() -> None:
    assert DEFAULT_DATASET in BUILTIN_DATASETS and "shapes" in BUILTIN_DATASETS
    default = load_data(None)
    assert len(default) == 3443 and default.label_names == FASHION_MNIST_CLASSES
    named = load_data("fashion-mnist-sample", items=40)
    np.testing.assert_array_equal(named.to_array(), default.read(0, 40))
    np.testing.assert_array_equal(named.labels, np.asarray(default.labels)[:40])
    # The packaged folder or images file given as a path is the same built-in dataset, names included.
    for path in (SAMPLE_DIR, SAMPLE_IMAGES):
        by_path = load_data(str(path), items=40)
        assert by_path.label_names == FASHION_MNIST_CLASSES
        assert by_path.fingerprint() == named.fingerprint()
    shapes = load_data("shapes", items=30, seed=2)
    assert shapes.fingerprint() == garment_dataset(n=30, seed=2).fingerprint() and len(shapes) == 30
    with pytest.raises(NotFoundError):
        load_data("no-such-dataset-or-path")
    with pytest.raises(InvalidArgumentError) as err:
        load_data("shapes", labels="labels.npy")
    assert err.value.field == "labels"
    with pytest.raises(InvalidArgumentError) as err:
        load_data(None, items=0)
    assert err.value.field == "items"


def test_load_data_from_a_path_keeps_labels_names_and_ids(tmp_path: Path) -> None:
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1, 0]), ids=np.array(list("abcdef")))
    ds = load_data(str(tmp_path / "d.npz"), items=4)
    np.testing.assert_array_equal(ds.to_array(), x[:4])
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    assert list(ds.ids) == list("abcd")
    named = ArrayDataset(x, labels=np.zeros(6), label_names=["only"])
    assert head(named, 2).label_names == ["only"] and len(head(named, 2)) == 2
    assert head(named, None) is named and head(named, 6) is named

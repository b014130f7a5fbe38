"""The Fashion-MNIST sample shipped inside the package: 3,443 real 28x28 garment images with labels.

The files live in ``latentsearch/data/fashion_mnist_sample/`` (package data, in the wheel): the
first 3,443 images of the Fashion-MNIST test set and their labels, IDX gzipped as the official
files store them, with the MIT licence notice of Zalando SE (``LICENSE`` there) and a README
giving provenance and checksums. It is the built-in default dataset of ``latentsearch train`` and
``latentsearch quickstart`` (see :mod:`latentsearch.data.builtin`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentsearch.data.readers import ArrayDataset, read_idx
from latentsearch.errors import InvalidArgumentError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SAMPLE_DIR",
    "SAMPLE_IMAGES",
    "SAMPLE_LABELS",
    "fashion_mnist_sample",
]

# Fashion-MNIST's class names by label (0..9).
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# The packaged folder and its two IDX files.
SAMPLE_DIR = Path(__file__).resolve().with_name("fashion_mnist_sample")
SAMPLE_IMAGES = SAMPLE_DIR / "sample-images-idx3-ubyte.gz"
SAMPLE_LABELS = SAMPLE_DIR / "sample-labels-idx1-ubyte.gz"


def fashion_mnist_sample(n: int | None = None) -> ArrayDataset:
    """The packaged sample (or its first ``n`` items): ``(n, 28, 28, 1)`` uint8 images, int64 labels
    0..9, ``label_names`` = :data:`FASHION_MNIST_CLASSES`, ids = row numbers.

    Raises:
        NotFoundError: the package data is missing (a broken install).
        InvalidArgumentError: ``n < 1``.
    """
    images, labels = read_idx(SAMPLE_IMAGES), read_idx(SAMPLE_LABELS)  # (N, 28, 28) and (N,) uint8
    if n is not None:
        if n < 1:
            raise InvalidArgumentError(f"items must be >= 1, got {n}", field="items")
        images, labels = images[:n], labels[:n]
    return ArrayDataset(
        images,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=list(FASHION_MNIST_CLASSES),
        path=SAMPLE_IMAGES,
    )

"""``--data``: a built-in dataset by name, or a path; the default when none is given.

Built-in names (:data:`BUILTIN_DATASETS`):

* ``fashion-mnist-sample`` (the default): 3,443 real Fashion-MNIST images shipped in the package
  (:func:`latentsearch.data.fashion_mnist.fashion_mnist_sample`);
* ``shapes``: generated garment-like shapes of any size (:func:`latentsearch.data.garments.garment_dataset`),
  for tests and runs that need a chosen number of items.

Anything else is a path for :func:`latentsearch.data.readers.open_dataset`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.data.fashion_mnist import SAMPLE_DIR, SAMPLE_IMAGES, fashion_mnist_sample
from latentsearch.data.garments import garment_dataset
from latentsearch.data.readers import ArrayDataset, Dataset, open_dataset
from latentsearch.errors import InvalidArgumentError

__all__ = ["BUILTIN_DATASETS", "DEFAULT_DATASET", "NOTICE", "head", "load_data"]

log = logging.getLogger(__name__)

# Built-in dataset names and what each is.
BUILTIN_DATASETS = {
    "fashion-mnist-sample": "3,443 real Fashion-MNIST test images shipped with the package (MIT licence)",
    "shapes": "generated garment-like shapes (any number of items)",
}
# What --data means when it is not given.
DEFAULT_DATASET = "fashion-mnist-sample"
# Items of the generated shapes when no count is asked for.
DEFAULT_SHAPES_ITEMS = 6000
# The line printed when no --data was given.
NOTICE = f"no --data given: using the built-in {DEFAULT_DATASET}, {BUILTIN_DATASETS[DEFAULT_DATASET]}"


def load_data(
    spec: str | os.PathLike[str] | None,
    *,
    labels: str | os.PathLike[str] | None = None,
    items: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """The dataset ``spec`` names: a built-in name, a path, or ``None`` (:data:`DEFAULT_DATASET`).

    ``items``: only the first ``items`` (``shapes``: generate that many, default
    ``DEFAULT_SHAPES_ITEMS``); ``seed`` seeds the generated shapes; ``labels`` and ``options`` (reader
    options such as Parquet's ``column``; ``None`` values ignored) go to :func:`open_dataset` for a
    path. The packaged sample's folder or images file given as a path is the built-in sample (with
    its class names).

    Raises:
        InvalidArgumentError: ``items < 1``, ``labels`` or options with a built-in name, unreadable data.
        NotFoundError: no such path.
    """
    if items is not None and items < 1:
        raise InvalidArgumentError(f"items must be >= 1, got {items}", field="items")
    name = DEFAULT_DATASET if spec is None else str(spec)
    if name in BUILTIN_DATASETS or _is_packaged_sample(name):
        if labels is not None:
            raise InvalidArgumentError(f"--labels cannot be given with the built-in {name}", field="labels")
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise InvalidArgumentError(
                f"{', '.join(given)} cannot be given with the built-in {name}", field=given[0]
            )
        if name == "shapes":
            return garment_dataset(n=items or DEFAULT_SHAPES_ITEMS, seed=seed)
        return fashion_mnist_sample(items)
    return head(open_dataset(name, labels=labels, **options), items)


def head(data: Dataset, items: int | None) -> Dataset:
    """The first ``items`` of ``data`` in memory, with their labels, names and ids (``data`` itself
    when ``items`` is ``None`` or covers it)."""
    if items is None or items >= len(data):
        return data
    return ArrayDataset(
        data.read(0, items),
        labels=None if data.labels is None else np.asarray(data.labels[:items]),
        ids=data.batch_ids(0, items),
        label_names=data.label_names,
        path=data.path,
    )


def _is_packaged_sample(name: str) -> bool:
    try:
        path = Path(name).resolve()
    except (OSError, RuntimeError):
        return False
    return path in (SAMPLE_DIR, SAMPLE_IMAGES)

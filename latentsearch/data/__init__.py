"""latentsearch.data: dataset readers and built-in data (numpy and Pillow, no torch).

* :mod:`latentsearch.data.readers`: IDX files, ``.npy``/``.npz`` arrays, folders of images, Parquet
  (column handling in :mod:`latentsearch.data.parquet`);
* :mod:`latentsearch.data.fashion_mnist`: the Fashion-MNIST sample shipped in the package;
* :mod:`latentsearch.data.garments`: generated garment-shapes images (any number);
* :mod:`latentsearch.data.builtin`: ``--data`` by built-in name or path, and the default;
* :mod:`latentsearch.data.banks`: synthetic posterior banks shaped like a trained VAE's.
"""

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.data.builtin import BUILTIN_DATASETS, DEFAULT_DATASET, NOTICE, head, load_data
from latentsearch.data.fashion_mnist import FASHION_MNIST_CLASSES, SAMPLE_DIR, fashion_mnist_sample
from latentsearch.data.garments import GARMENT_CLASSES, garment_dataset, garment_images
from latentsearch.data.readers import (
    ArrayDataset,
    Dataset,
    ImageFolderDataset,
    ParquetDataset,
    open_dataset,
    read_idx,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_DATASET",
    "FASHION_MNIST_CLASSES",
    "GARMENT_CLASSES",
    "NOTICE",
    "SAMPLE_DIR",
    "ArrayDataset",
    "Dataset",
    "ImageFolderDataset",
    "ParquetDataset",
    "fashion_mnist_sample",
    "garment_dataset",
    "garment_images",
    "head",
    "load_data",
    "open_dataset",
    "query_families",
    "read_idx",
    "vae_like_posteriors",
]

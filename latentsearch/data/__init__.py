"""latentsearch.data: dataset readers and generated data (numpy and Pillow, no torch).

* :mod:`latentsearch.data.readers`: IDX files, ``.npy``/``.npz`` arrays, folders of images;
* :mod:`latentsearch.data.garments`: the built-in generated garment-shapes image dataset;
* :mod:`latentsearch.data.banks`: synthetic posterior banks shaped like a trained VAE's.
"""

from latentsearch.data.banks import query_families, vae_like_posteriors
from latentsearch.data.garments import GARMENT_CLASSES, NOTICE, garment_dataset, garment_images
from latentsearch.data.readers import ArrayDataset, Dataset, ImageFolderDataset, open_dataset, read_idx

__all__ = [
    "GARMENT_CLASSES",
    "NOTICE",
    "ArrayDataset",
    "Dataset",
    "ImageFolderDataset",
    "garment_dataset",
    "garment_images",
    "open_dataset",
    "query_families",
    "read_idx",
    "vae_like_posteriors",
]

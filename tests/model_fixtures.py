"""Shared helpers for the model tests (tests/conftest.py is shared; these are imported explicitly)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_IDX_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzip-compressed when ``gz``."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">HBB", 0, _IDX_CODES[np.dtype(dtype)], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    if gz:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def fashion_mnist_dir() -> Path:
    """The shared Fashion-MNIST sample, or skip the test cleanly when it is absent."""
    candidates = []
    if os.environ.get("LATENTSEARCH_FASHION_MNIST"):
        candidates.append(Path(os.environ["LATENTSEARCH_FASHION_MNIST"]))
    candidates += [
        REPO_ROOT.parent / "shared" / "data" / "fashion-mnist",
        Path("/work/shared/data/fashion-mnist"),
    ]
    for c in candidates:
        if (c / "sample-images-idx3-ubyte.gz").is_file():
            return c
    pytest.skip("Fashion-MNIST sample not present (set LATENTSEARCH_FASHION_MNIST)")
    raise AssertionError  # unreachable


def tiny_images(n: int = 64, shape: tuple[int, ...] = (12, 10, 1), seed: int = 0) -> np.ndarray:
    """``(n, *shape)`` uint8 images with some structure (bright blobs) so a VAE can learn."""
    rng = np.random.default_rng(seed)
    h, w = shape[0], shape[1]
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, *shape), dtype=np.float64)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
        out[i] = blob.reshape(h, w, *([1] * (len(shape) - 2)))
    return (out * 255).astype(np.uint8)

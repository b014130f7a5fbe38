"""A generated stand-in for Fashion-MNIST: simple garment-like 28x28 shapes, any number of them.

The built-in dataset ``shapes`` (``--data shapes``; the default is the packaged Fashion-MNIST
sample, :mod:`latentsearch.data.fashion_mnist`), and the data of tests that need a chosen size. Ten
classes mirror Fashion-MNIST's (T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker,
bag, ankle boot); each item is a procedurally drawn silhouette with random scale, shift, rotation,
brightness and texture, rendered at 4x and downsampled (anti-aliased). Fully deterministic per seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from latentsearch.data.fashion_mnist import FASHION_MNIST_CLASSES
from latentsearch.data.readers import ArrayDataset

__all__ = ["GARMENT_CLASSES", "garment_dataset", "garment_images"]

# Class names by label: Fashion-MNIST's, which the ten drawers below mirror.
GARMENT_CLASSES = FASHION_MNIST_CLASSES

_Poly = list[tuple[float, float]]
_Shape = list[tuple[str, _Poly, float]]  # (kind "poly"/"line", points in [0,1]^2, relative intensity)


def _tshirt(r: np.random.Generator) -> _Shape:
    w, s = r.uniform(0.26, 0.34), r.uniform(0.12, 0.2)
    body = [(0.5 - w, 0.28), (0.5 + w, 0.28), (0.5 + w, 0.9), (0.5 - w, 0.9)]
    left = [(0.5 - w, 0.18), (0.5 - w - s, 0.3), (0.5 - w - s + 0.05, 0.45), (0.5 - w, 0.4)]
    right = [(1 - x, y) for x, y in left]
    neck = [(0.4, 0.15), (0.6, 0.15), (0.5 + w, 0.28), (0.5 - w, 0.28)]
    return [("poly", body, 1.0), ("poly", left, 1.0), ("poly", right, 1.0), ("poly", neck, 1.0)]


def _trouser(r: np.random.Generator) -> _Shape:
    gap, w = r.uniform(0.02, 0.05), r.uniform(0.13, 0.17)
    waist = [(0.5 - w - 0.02, 0.08), (0.5 + w + 0.02, 0.08), (0.5 + w + 0.02, 0.3), (0.5 - w - 0.02, 0.3)]
    left = [(0.5 - w - 0.02, 0.25), (0.5 - gap, 0.25), (0.5 - gap - 0.02, 0.95), (0.5 - w - 0.05, 0.95)]
    right = [(1 - x, y) for x, y in left]
    return [("poly", waist, 1.0), ("poly", left, 1.0), ("poly", right, 1.0)]


def _long_sleeves(w: float, r: np.random.Generator) -> _Shape:
    s = r.uniform(0.1, 0.15)
    left = [(0.5 - w, 0.18), (0.5 - w - s, 0.3), (0.5 - w - s + 0.02, 0.88), (0.5 - w + 0.02, 0.88)]
    right = [(1 - x, y) for x, y in left]
    return [("poly", left, 0.9), ("poly", right, 0.9)]


def _pullover(r: np.random.Generator) -> _Shape:
    w = r.uniform(0.22, 0.28)
    body = [(0.4, 0.12), (0.6, 0.12), (0.5 + w, 0.2), (0.5 + w, 0.9), (0.5 - w, 0.9), (0.5 - w, 0.2)]
    return [*_long_sleeves(w, r), ("poly", body, 1.0)]


def _dress(r: np.random.Generator) -> _Shape:
    top, bottom = r.uniform(0.1, 0.16), r.uniform(0.28, 0.38)
    body = [(0.5 - top, 0.08), (0.5 + top, 0.08), (0.5 + top - 0.02, 0.4), (0.5 + bottom, 0.95)]
    body += [(0.5 - bottom, 0.95), (0.5 - top + 0.02, 0.4)]
    return [("poly", body, 1.0)]


def _coat(r: np.random.Generator) -> _Shape:
    w = r.uniform(0.24, 0.3)
    body = [(0.4, 0.1), (0.6, 0.1), (0.5 + w, 0.18), (0.5 + w, 0.95), (0.5 - w, 0.95), (0.5 - w, 0.18)]
    return [*_long_sleeves(w, r), ("poly", body, 0.8), ("line", [(0.5, 0.12), (0.5, 0.95)], 0.2)]


def _shirt(r: np.random.Generator) -> _Shape:
    w = r.uniform(0.22, 0.28)
    body = [(0.38, 0.12), (0.62, 0.12), (0.5 + w, 0.2), (0.5 + w, 0.9), (0.5 - w, 0.9), (0.5 - w, 0.2)]
    collar = [(0.38, 0.12), (0.5, 0.3), (0.62, 0.12)]
    shapes: _Shape = [*_long_sleeves(w, r), ("poly", body, 0.7), ("line", collar, 0.15)]
    shapes += [("line", [(0.5, 0.3), (0.5, 0.9)], 0.45)]
    return shapes


def _sandal(r: np.random.Generator) -> _Shape:
    sole = [(0.06, 0.72), (0.94, 0.66), (0.96, 0.76), (0.06, 0.8)]
    shapes: _Shape = [("poly", sole, 1.0)]
    n = int(r.integers(2, 5))
    for i in range(n):
        x = 0.15 + 0.7 * (i + 0.5) / n
        shapes.append(("line", [(x - 0.08, 0.7), (x, 0.45 + 0.1 * r.random()), (x + 0.08, 0.68)], 0.9))
    return shapes


def _sneaker(r: np.random.Generator) -> _Shape:
    h = r.uniform(0.3, 0.4)
    body = [(0.05, 0.78), (0.05, 0.78 - h * 0.6), (0.35, 0.78 - h), (0.6, 0.78 - h * 0.9)]
    body += [(0.95, 0.68), (0.95, 0.8), (0.05, 0.82)]
    sole = [(0.04, 0.78), (0.96, 0.76), (0.96, 0.84), (0.04, 0.84)]
    return [("poly", body, 0.85), ("poly", sole, 1.0)]


def _bag(r: np.random.Generator) -> _Shape:
    w, h = r.uniform(0.34, 0.42), r.uniform(0.25, 0.33)
    body = [(0.5 - w, 0.9 - 2 * h), (0.5 + w, 0.9 - 2 * h), (0.5 + w, 0.9), (0.5 - w, 0.9)]
    top = 0.9 - 2 * h
    handle = [(0.3, top), (0.32, top - 0.2), (0.68, top - 0.2), (0.7, top)]
    return [("poly", body, 1.0), ("line", handle, 0.9)]


def _boot(r: np.random.Generator) -> _Shape:
    shaft = r.uniform(0.3, 0.4)
    body = [(0.3, 0.1), (0.3 + shaft, 0.1), (0.3 + shaft, 0.55), (0.95, 0.68), (0.95, 0.88), (0.25, 0.88)]
    body += [(0.28, 0.5)]
    sole = [(0.24, 0.84), (0.96, 0.84), (0.96, 0.92), (0.24, 0.92)]
    return [("poly", body, 0.9), ("poly", sole, 1.0)]


_DRAWERS: list[Callable[[np.random.Generator], _Shape]] = [
    _tshirt,
    _trouser,
    _pullover,
    _dress,
    _coat,
    _sandal,
    _shirt,
    _sneaker,
    _bag,
    _boot,
]


def _render(shapes: _Shape, r: np.random.Generator, size: int, supersample: int = 4) -> np.ndarray:
    from PIL import Image, ImageDraw

    big = size * supersample
    angle = math.radians(r.uniform(-8.0, 8.0))
    sx, sy = r.uniform(0.85, 1.08), r.uniform(0.85, 1.08)
    tx, ty = r.uniform(-0.06, 0.06), r.uniform(-0.06, 0.06)
    ca, sa = math.cos(angle), math.sin(angle)
    brightness = r.uniform(110.0, 255.0)

    def tf(pts: _Poly) -> list[tuple[float, float]]:
        out = []
        for x, y in pts:
            u, v = (x - 0.5) * sx, (y - 0.5) * sy
            out.append(((u * ca - v * sa + 0.5 + tx) * big, (u * sa + v * ca + 0.5 + ty) * big))
        return out

    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for kind, pts, rel in shapes:
        value = int(np.clip(brightness * rel, 0, 255))
        if kind == "poly":
            draw.polygon(tf(pts), fill=value)
        else:
            draw.line(tf(pts), fill=value, width=max(1, int(0.035 * big)))
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    texture = 1.0 + r.normal(0.0, 0.08, small.shape).astype(np.float32)
    return np.clip(small * texture, 0, 255).astype(np.uint8)


def garment_images(n: int = 6000, *, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated items: ``(n, size, size)`` uint8 images and ``(n,)`` int64 labels 0..9.

    Classes cycle in a seeded random order, so any prefix is roughly balanced.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(_DRAWERS)).astype(np.int64)
    images = np.empty((n, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = _render(_DRAWERS[label](rng), rng, size)
    return images, labels


def garment_dataset(n: int = 6000, *, seed: int = 0, size: int = 28) -> ArrayDataset:
    """The generated garments as an :class:`~latentsearch.data.readers.ArrayDataset` of (size, size, 1)."""
    images, labels = garment_images(n, seed=seed, size=size)
    return ArrayDataset(
        images,
        labels=labels,
        label_names=list(GARMENT_CLASSES),
        path=f"generated:garments(n={n}, seed={seed})",
    )

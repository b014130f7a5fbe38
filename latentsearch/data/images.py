"""Small image conversions with Pillow: uint8 pixels to PNG bytes, and downscaling to a value budget.

Pixels are ``(H, W, C)`` uint8 in reader layout (:mod:`latentsearch.data.readers`) with ``C`` in
1 (grayscale), 3 (RGB) or 4 (RGBA), the channel counts PNG stores.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from latentsearch.errors import InvalidArgumentError

__all__ = ["PNG_CHANNELS", "fit_shape", "png_bytes", "resize_pixels"]

PNG_CHANNELS = (1, 3, 4)


def _image(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim != 3 or pixels.shape[2] not in PNG_CHANNELS or pixels.dtype != np.uint8:
        raise InvalidArgumentError(
            f"pixels must be (H, W, C) uint8 with C in {PNG_CHANNELS}, got {pixels.shape} {pixels.dtype}",
            field="pixels",
        )
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of ``(H, W, C)`` uint8 ``pixels`` (decodes to exactly these values)."""
    buf = io.BytesIO()
    _image(pixels).save(buf, format="PNG")
    return buf.getvalue()


def fit_shape(shape: tuple[int, int, int], max_values: int) -> tuple[int, int, int]:
    """The largest ``(h, w, C)`` with the aspect of ``(H, W, C)``, ``h <= H``, ``w <= W`` and
    ``h * w * C <= max_values`` (``shape`` itself when it fits; at least 1x1)."""
    h, w, c = shape
    if h * w * c <= max_values:
        return shape
    s = math.sqrt(max_values / (h * w * c))
    nh, nw = max(1, int(h * s)), max(1, int(w * s))
    while nh * nw * c > max_values and (nh > 1 or nw > 1):
        nh, nw = (nh - 1, nw) if nh >= nw else (nh, nw - 1)
    return nh, nw, c


def resize_pixels(pixels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 ``pixels`` resized to ``shape`` (box filter: each output pixel averages the
    input pixels it covers)."""
    h, w, c = shape
    if pixels.shape == shape:
        return pixels
    out = _image(pixels).resize((w, h), Image.Resampling.BOX)
    return np.asarray(out, dtype=np.uint8).reshape(h, w, c)

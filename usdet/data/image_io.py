"""Read any ultrasound still (PNG, JPEG, BMP, TIFF) as 8-bit RGB, or say clearly why not.

Exports carry every odd format there is (16-bit, palette, RGBA, 1-bit, CMYK JPEG, truncated
files); one reader with one error type keeps every entry point's messages alike.
"""
from __future__ import annotations

import os
import warnings

from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs well before they eat memory (a 20000x20000 frame is no ultrasound).
MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An input image could not be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_uint8(arr: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """The one >8-bit → 8-bit scaler of usdet: ``[lo, hi]`` → ``[0, 255]``, rounded and clipped.

    ``lo``/``hi`` default to the array's own range (min-max); pass a range fixed for a whole
    series so that all its frames share one grey scale. A constant array (or ``hi <= lo``) gives
    zeros; uint8 passes through and bool becomes 0/255.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    if lo is None:
        lo = float(a.min()) if a.size else 0.0
    if hi is None:
        hi = float(a.max()) if a.size else 0.0
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to an HxWx3 uint8 RGB array (16-bit is rescaled, alpha dropped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.repeat(to_uint8(np.asarray(img))[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: str) -> np.ndarray:
    """Return ``path`` as an HxWx3 uint8 RGB array; raise :class:`ImageReadError` otherwise."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageReadError(path, f"cannot open ({e.strerror})") from None
    if size == 0:
        raise ImageReadError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(path, f"image is {w}x{h}, over the {MAX_PIXELS} pixel limit "
                                         "(decompression-bomb guard)")
                if w < 2 or h < 2:
                    raise ImageReadError(path, f"image is {w}x{h}, too small to be an ultrasound frame")
                img.load()
                return pil_to_rgb(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None

"""Decode converter inputs (images and masks) fast, or say exactly why a file cannot be used.

Every converter (BUSI, BrEaST, BUS-BRA, generic image+mask folders) reads its files through
here, so the same broken file gets the same reason whichever dataset it comes from.
"""
from __future__ import annotations

import io
import warnings
from typing import List, Optional, Tuple

import cv2
import numpy as np

from usdet.data.image_io import MAX_PIXELS, ImageReadError, read_image, to_uint8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FileProblem(Exception):
    """A problem with one file: ``file`` and ``reason`` (plain Exception args, so it crosses worker processes)."""

    def __init__(self, file: str, reason: str):
        super().__init__(file, reason)
        self.file = file
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


class SkipFile(FileProblem):
    """This source cannot be used; ``file`` and ``reason`` become one line of report.json's ``skipped``."""


def header_size(data: np.ndarray) -> Optional[Tuple[int, int]]:
    """(width, height) from the file header without decoding pixels; None when unknown."""
    head = data[:24].tobytes()
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.tobytes())) as img:  # reads the header only
                return img.size
    except Image.DecompressionBombError:  # Pillow refuses to even open it: far over any limit
        return (1 << 16, 1 << 16)
    except Exception:  # not something Pillow knows: OpenCV (and its fallback) will say why
        return None


def decode_file(path: str, rel: str, is_mask: bool, color_mask: bool = False) -> Tuple[np.ndarray, List[str]]:
    """Decode with OpenCV (fast), falling back to Pillow for formats and errors OpenCV can't explain.

    Returns (array, notes): an image is HxW gray or HxWx3 BGR uint8 (>8-bit data scaled by
    :func:`usdet.data.image_io.to_uint8`); a mask is HxW at its native depth (HxWx3 BGR for a
    colour-coded mask). Raises :class:`SkipFile` naming ``rel`` and the problem.
    """
    kind = "mask" if is_mask else "image"
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
            # a PNG's header names its size, and OpenCV then reads the file itself (as the
            # decode + write floor of benchmarks/bench_convert.py does): reading it into a fresh
            # buffer first cost a sixth of the decode; other formats are read whole for Pillow
            png = len(head) == 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR"
            data = np.frombuffer(head if png else head + fh.read(), np.uint8)
    except OSError as e:
        raise SkipFile(rel, f"{kind} unreadable ({e.strerror or e})") from None
    if data.size == 0:
        raise SkipFile(rel, f"{kind} is a zero-byte file")
    size = header_size(data)
    if size is not None:
        w, h = size
        if w * h > MAX_PIXELS:  # refuse before decoding: a tiny file can claim gigabytes of pixels
            raise SkipFile(rel, f"{kind} is {w}x{h}, over the {MAX_PIXELS} pixel limit (decompression-bomb guard)")
        if w < 2 or h < 2:
            raise SkipFile(rel, f"{kind} is {w}x{h}, too small to be an ultrasound {kind}")
    notes: List[str] = []
    # plain masks: one channel at native depth is all a mask needs (and decodes faster than colour)
    if is_mask and not color_mask:
        flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
    elif is_mask:
        flags = cv2.IMREAD_COLOR
    else:
        flags = cv2.IMREAD_UNCHANGED
    arr = cv2.imread(path, flags) if png else cv2.imdecode(data, flags)
    if arr is None:
        # OpenCV says nothing about why; Pillow names the problem (truncated, not an image, ...)
        try:
            rgb = read_image(path)
        except ImageReadError as e:
            raise SkipFile(rel, f"{kind} unreadable: {e.reason}") from None
        notes.append(f"{kind} decoded by Pillow (OpenCV could not)")
        if is_mask and not color_mask:
            return rgb.max(axis=2), notes
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), notes
    if not data[:8].tobytes().startswith(_PNG_SIGNATURE) and rel.lower().endswith(".png"):
        notes.append(f"{kind} has a .png name but is not PNG data")
    if arr.dtype == np.uint16 and not is_mask:  # masks keep their values; mask_bool thresholds any depth
        notes.append("16-bit image rescaled to 8 bits (min-max)")
        arr = to_uint8(arr)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise SkipFile(rel, f"{kind} has unsupported pixel type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        if not is_mask and cv2.minMaxLoc(cv2.extractChannel(arr, 3))[0] < 255:
            notes.append("image has transparency: alpha dropped")
        elif not is_mask:
            notes.append("RGBA image: opaque alpha dropped")
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2BGR)  # contiguous, unlike arr[..., :3] (later steps copy it)
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray (+ alpha)
        arr = np.ascontiguousarray(arr[..., 0])
    return arr, notes


def mask_bool(arr: np.ndarray) -> np.ndarray:
    """Binary mask from any mask encoding (1-bit, 0/255 or 0/1 gray, 16-bit, colour read as gray).

    Thresholds at half the mask's own maximum, so 0/1 and 0/255 masks (and a coloured mask
    converted to gray) all work; an all-zero mask stays empty.
    """
    gray = arr.max(axis=2) if arr.ndim == 3 else arr
    top = float(cv2.minMaxLoc(gray)[1]) if gray.size else 0.0
    if top == 0:
        return np.zeros(gray.shape, bool)
    if np.issubdtype(gray.dtype, np.integer):  # g > top/2 <=> g > top//2 for integers, compared
        return gray > gray.dtype.type(int(top) // 2)  # in the mask's own type, not as float64
    return gray > (0 if top <= 1 else top / 2)


def distinct_values(gray: np.ndarray, limit: int = 3) -> int:
    """How many distinct values a 2-D mask holds, counted up to ``limit`` (a binary mask has at most 2)."""
    if gray.dtype == np.uint8:
        hist = cv2.calcHist([np.ascontiguousarray(gray)], [0], None, [256], [0, 256]).ravel()
        return min(limit, int(np.count_nonzero(hist)))
    return min(limit, len(np.unique(gray)))


def is_binary_mask(arr: np.ndarray) -> bool:
    """True for a mask with at most two grey values (0/1, 0/255, 0/65535, 1-bit).

    Two passes of OpenCV (its extremes, then any pixel strictly between them), cheaper than a
    histogram on the converter's per-image path.
    """
    gray = arr.max(axis=2) if arr.ndim == 3 else arr
    if gray.dtype not in (np.uint8, np.uint16) or gray.size == 0:
        return distinct_values(gray) <= 2
    gray = np.ascontiguousarray(gray)
    lo, hi = (int(v) for v in cv2.minMaxLoc(gray)[:2])
    return hi - lo <= 1 or cv2.countNonZero(cv2.inRange(gray, lo + 1, hi - 1)) == 0


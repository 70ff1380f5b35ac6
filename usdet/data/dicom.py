"""Read ultrasound DICOM (single- and multi-frame) as 8-bit RGB frames, or say clearly why not.

Scanner exports mix every photometric interpretation (MONOCHROME1/2, RGB, YBR_FULL/_422, YBR_RCT,
PALETTE COLOR) and transfer syntax (raw, RLE, JPEG baseline/lossless, JPEG 2000). pydicom >= 3
decodes them through its plugins (pylibjpeg/openjpeg for JPEG Lossless and JPEG 2000) and already
returns RGB for the YBR family; this module adds palette lookup, MONOCHROME1 inversion, >8-bit
scaling and one error type whose message names the file and the reason.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional

import numpy as np

from .image_io import MAX_PIXELS, ImageReadError

__all__ = ["DicomReadError", "read_dicom_frames", "iter_dicom_frames", "dicom_patient_id", "is_dicom_file",
           "DICOM_EXTENSIONS"]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomReadError(ImageReadError):
    """A DICOM file could not be turned into frames; the message names the file and the reason."""


def is_dicom_file(path: str) -> bool:
    """True for a .dcm/.dicom name, or any file with the DICM magic at byte 128 (extension-less exports)."""
    if os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_dataset(path: str, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DicomReadError(path, "cannot open (no such file)") from None
    except InvalidDicomError:
        raise DicomReadError(path, "not a DICOM file (no DICM preamble; not a DICOM Part 10 file)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DicomReadError(path, f"corrupt or truncated DICOM ({type(e).__name__}: {e})") from None


def _syntax_name(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "unknown transfer syntax"
    return f"{getattr(uid, 'name', str(uid))} ({uid})"


def _to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Scale >8-bit or signed data to 0..255 (VOI window if the file has one, else the stored range)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and ds.get("PhotometricInterpretation", "") in ("RGB", "PALETTE COLOR"):
        bits = int(ds.get("BitsStored", 16) or 16)
        if not np.issubdtype(arr.dtype, np.signedinteger):
            return (arr.astype(np.float32) * (255.0 / float((1 << bits) - 1))).round().clip(0, 255).astype(np.uint8)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        try:
            from pydicom.pixels import apply_voi_lut

            arr = apply_voi_lut(arr, ds)
        except Exception:  # noqa: BLE001  (a broken VOI falls back to the stored range)
            pass
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return ((a - lo) * (255.0 / (hi - lo))).round().clip(0, 255).astype(np.uint8)


def _frame_to_rgb(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        frame = apply_color_lut(frame, ds)
        if frame.dtype != np.uint8:
            desc = ds.get("RedPaletteColorLookupTableDescriptor", None)
            lut_bits = int(desc[2]) if desc is not None and len(desc) == 3 else 16
            frame = (frame.astype(np.uint32) >> max(0, lut_bits - 8)).clip(0, 255).astype(np.uint8)
    frame = _to_uint8(frame, ds)
    if photometric == "MONOCHROME1":
        frame = 255 - frame  # MONOCHROME1: 0 is white; usdet always shows 0 as black
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    elif frame.ndim == 3 and frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"unexpected decoded frame shape {frame.shape}")
    return np.ascontiguousarray(frame)


def iter_dicom_frames(path: str) -> Iterator[np.ndarray]:
    """Yield every frame of ``path`` as an HxWx3 uint8 RGB array, decoding one frame at a time.

    Long cine loops would not fit in memory decoded at once, so frames are decoded lazily.
    """
    path = os.fspath(path)
    ds = _read_dataset(path)
    if not any(t in ds for t in _PIXEL_TAGS):
        sop = ds.get("SOPClassUID", None)
        kind = f" ({getattr(sop, 'name', sop)})" if sop is not None else ""
        raise DicomReadError(path, f"DICOM has no pixel data{kind}; nothing to convert")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        raise DicomReadError(path, f"DICOM image is {cols}x{rows}, too small to be an ultrasound frame")
    if rows * cols > MAX_PIXELS:
        raise DicomReadError(path, f"DICOM frame is {cols}x{rows}, over the {MAX_PIXELS} pixel limit")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        from pydicom.pixels import iter_pixels
    except ImportError:  # pragma: no cover - pydicom < 3
        raise DicomReadError(path, "pydicom >= 3 is required to decode DICOM pixel data") from None
    try:
        frames = iter_pixels(ds)
        for frame in frames:
            yield _frame_to_rgb(frame, ds, photometric)
    except DicomReadError:
        raise
    except (NotImplementedError, RuntimeError) as e:
        raise DicomReadError(
            path, f"cannot decode pixel data in {_syntax_name(ds)}: no installed handler could decode it "
            f"(install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg or gdcm) [{str(e).splitlines()[0][:200]}]"
        ) from None
    except (ValueError, KeyError, AttributeError, TypeError, IndexError, OSError, EOFError) as e:
        raise DicomReadError(path, f"corrupt pixel data in {_syntax_name(ds)} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def read_dicom_frames(path: str) -> List[np.ndarray]:
    """Return all frames of ``path`` as HxWx3 uint8 RGB arrays; raise :class:`DicomReadError` otherwise."""
    return list(iter_dicom_frames(path))


def dicom_patient_id(path: str) -> Optional[str]:
    """The header's PatientID (for grouping frames by patient), or None when absent or empty.

    The value is an identifier: callers must pseudonymize it (usdet.data.privacy) before it
    reaches any output.
    """
    ds = _read_dataset(os.fspath(path), stop_before_pixels=True)
    value = ds.get("PatientID", None)
    if value is None:
        return None
    value = str(value).strip()
    return value or None

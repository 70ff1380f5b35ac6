"""Read ultrasound DICOM (single- and multi-frame) as 8-bit RGB frames, or say clearly why not.

Scanner exports mix every photometric interpretation (MONOCHROME1/2, RGB, YBR_FULL/_422, YBR_RCT,
PALETTE COLOR) and transfer syntax (raw, RLE, JPEG baseline/lossless, JPEG 2000). pydicom >= 3
decodes them through its plugins (pylibjpeg/openjpeg for JPEG Lossless and JPEG 2000) and already
returns RGB for the YBR family; this module adds palette lookup (also for big-endian files, see
``_native_palette``), MONOCHROME1 inversion, one >8-bit grey scale per file (the frames of a cine
clip share it), the header's ultrasound regions, and one error type whose message names the file and
the reason. A frame that decodes to a constant although its stored values vary is a decoding fault,
never passed on as a blank frame.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from .image_io import MAX_PIXELS, ImageReadError, to_uint8

__all__ = ["DicomReadError", "DicomFrames", "UltrasoundRegion", "read_dicom_frames", "iter_dicom_frames",
           "ultrasound_regions", "dicom_patient_id", "is_dicom_file", "write_ultrasound_dicom", "DICOM_EXTENSIONS",
           "GREY_SCALE_RULE"]

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


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of SequenceOfUltrasoundRegions (0018,6011); ``box`` is x1/y1-exclusive (MaxX1 + 1)."""

    box: Tuple[int, int, int, int]
    spatial_format: int  # RegionSpatialFormat: 1 = 2D image, 2 = M-mode, 3 = spectral, 4 = waveform
    data_type: Optional[int]  # RegionDataType: 1 = tissue, 2 = colour flow, ...; None when absent

    @property
    def is_tissue_2d(self) -> bool:
        """A 2D tissue image (colour-flow boxes nested in it and waveform panels are not)."""
        return self.spatial_format == 1 and self.data_type in (1, None)


def ultrasound_regions(ds) -> List[UltrasoundRegion]:
    """The header's ultrasound regions (every region with a complete pixel box), in header order."""
    out: List[UltrasoundRegion] = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            x0, y0, x1, y1 = (int(item[name].value) for name in
                              ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1",
                               "RegionLocationMaxY1"))
            fmt = int(item.get("RegionSpatialFormat", 0) or 0)
            dtype = item.get("RegionDataType", None)
        except (KeyError, TypeError, ValueError):
            continue
        out.append(UltrasoundRegion((x0, y0, x1 + 1, y1 + 1), fmt, None if dtype is None else int(dtype)))
    return out


def _native_palette(ds):
    """The palette LUT elements of a big-endian ``ds`` re-encoded as a little-endian dataset.

    pydicom 3.0 reads non-segmented palette LUT data (OW) in the machine's byte order whatever the
    transfer syntax, so an Explicit VR Big Endian PALETTE COLOR file decodes with byte-swapped
    colours (the 16-bit entries' high byte lands low: all black). The lookup itself stays pydicom's;
    only the bytes are handed over as a little-endian dataset, which pydicom reads right whether it
    honours the transfer syntax (a fixed release) or not. Tested in tests/test_dicom.py.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    lut = Dataset()
    lut.file_meta = FileMetaDataset()
    lut.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for elem in ds:
        if elem.tag.group == 0x0028 and 0x1101 <= elem.tag.element <= 0x1224:  # palette descriptors + data
            value = elem.value
            if elem.VR in ("OW", "US or OW", "US or SS or OW", "OB or OW") and isinstance(value, (bytes, bytearray)):
                value = np.frombuffer(value, ">u2").astype("<u2").tobytes()
            lut.add_new(elem.tag, elem.VR, value)
    for name in ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation"):
        if name in ds:
            setattr(lut, name, ds.get(name))
    return lut


def _palette_to_rgb(frame: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    big_endian = syntax is not None and syntax.is_transfer_syntax and not syntax.is_little_endian
    rgb = apply_color_lut(frame, _native_palette(ds) if big_endian else ds)
    if rgb.dtype != np.uint8:  # 16-bit LUT entries: the 8 significant bits are the high byte
        desc = ds.get("RedPaletteColorLookupTableDescriptor", None)
        lut_bits = int(desc[2]) if desc is not None and len(desc) == 3 else 16
        rgb = (rgb.astype(np.uint32) >> max(0, lut_bits - 8)).clip(0, 255).astype(np.uint8)
    return rgb


@dataclass
class _GreyScale:
    """How one file's stored values become 0..255: the same ``lo``/``hi`` for all its frames."""

    method: str  # short label for reports
    lo: Optional[float] = None
    hi: Optional[float] = None
    voi: bool = False

    def describe(self) -> str:
        if self.lo is None:
            return self.method
        return f"{self.method}: {self.lo:g}..{self.hi:g} -> 0..255"


#: how to read a file's ``grey_scale`` label (report.json / crops.json)
GREY_SCALE_RULE = ("one grey scale per file: 8-bit data as stored; >8-bit MONOCHROME through the file's VOI "
                   "window (its whole output range), else the min..max over all frames of the file; >8-bit "
                   "RGB by bit depth")


class DicomFrames:
    """One DICOM file opened for lazy decoding: ``for index, rgb in DicomFrames(path)``.

    Also carries the header's ultrasound ``regions`` and, once iteration has begun, ``grey_scale``
    (how >8-bit data was mapped to 8 bits; None for 8-bit data). Raises :class:`DicomReadError`.
    """

    def __init__(self, path: str):
        self.path = path = os.fspath(path)
        ds = self.ds = _read_dataset(path)
        if not any(t in ds for t in _PIXEL_TAGS):
            sop = ds.get("SOPClassUID", None)
            kind = f" ({getattr(sop, 'name', sop)})" if sop is not None else ""
            raise DicomReadError(path, f"DICOM has no pixel data{kind}; nothing to convert")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows < 2 or cols < 2:
            raise DicomReadError(path, f"DICOM image is {cols}x{rows}, too small to be an ultrasound frame")
        if rows * cols > MAX_PIXELS:
            raise DicomReadError(path, f"DICOM frame is {cols}x{rows}, over the {MAX_PIXELS} pixel limit")
        self.size = (cols, rows)
        self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        self.regions = ultrasound_regions(ds)
        self.grey_scale: Optional[str] = None
        self.grey_scale_method: Optional[str] = None

    def _raw_frames(self) -> Iterator[np.ndarray]:
        """pydicom's decoded frames (stored values; YBR already RGB), decode failures as DicomReadError."""
        path, ds = self.path, self.ds
        try:
            from pydicom.pixels import iter_pixels
        except ImportError:  # pragma: no cover - pydicom < 3
            raise DicomReadError(path, "pydicom >= 3 is required to decode DICOM pixel data") from None
        try:
            yield from iter_pixels(ds)
        except (NotImplementedError, RuntimeError) as e:
            raise DicomReadError(
                path, f"cannot decode pixel data in {_syntax_name(ds)}: no installed handler could decode it "
                f"(install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg or gdcm) [{str(e).splitlines()[0][:200]}]"
            ) from None
        except (ValueError, KeyError, AttributeError, TypeError, IndexError, OSError, EOFError) as e:
            raise DicomReadError(path, f"corrupt pixel data in {_syntax_name(ds)} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def _grey_scale(self, first: np.ndarray) -> _GreyScale:
        ds, pi = self.ds, self.photometric
        if first.dtype == np.uint8 or pi == "PALETTE COLOR":
            return _GreyScale("8-bit stored values" if first.dtype == np.uint8 else "palette colour lookup")
        if pi not in ("MONOCHROME1", "MONOCHROME2") and np.issubdtype(first.dtype, np.unsignedinteger):
            bits = int(ds.get("BitsStored", 16) or 16)
            return _GreyScale("bit depth", 0.0, float((1 << bits) - 1))
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            try:
                from pydicom.pixels import apply_voi_lut

                bits = int(ds.get("BitsStored", 16) or 16)
                signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
                ends = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
                out = np.asarray(apply_voi_lut(ends.astype(first.dtype), ds), np.float64)
                lo, hi = float(out.min()), float(out.max())
                if hi > lo:
                    return _GreyScale("VOI window", lo, hi, voi=True)
            except Exception:  # noqa: BLE001  (a broken VOI falls back to the file's range)
                pass
        lo, hi = np.inf, -np.inf
        frames = [first] if int(self.ds.get("NumberOfFrames", 1) or 1) == 1 else self._raw_frames()
        for frame in frames:  # a first pass over a cine: the range of the whole file, one frame in memory
            lo, hi = min(lo, float(frame.min())), max(hi, float(frame.max()))
        return _GreyScale("min-max over all frames of the file", lo, hi)

    def _to_rgb(self, frame: np.ndarray, scale: _GreyScale) -> np.ndarray:
        if self.photometric == "PALETTE COLOR":
            frame = _palette_to_rgb(frame, self.ds)
        elif frame.dtype != np.uint8:
            if scale.voi:
                from pydicom.pixels import apply_voi_lut

                frame = apply_voi_lut(frame, self.ds)
            frame = to_uint8(frame, scale.lo, scale.hi)
        if self.photometric == "MONOCHROME1":
            frame = 255 - frame  # MONOCHROME1: 0 is white; usdet always shows 0 as black
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        elif frame.ndim == 3 and frame.shape[2] == 1:
            frame = np.repeat(frame, 3, axis=2)
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = frame[:, :, :3]
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise DicomReadError(self.path, f"unexpected decoded frame shape {frame.shape}")
        return np.ascontiguousarray(frame)

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray]]:
        scale: Optional[_GreyScale] = None
        for i, raw in enumerate(self._raw_frames()):
            if scale is None:
                scale = self._grey_scale(raw)
                self.grey_scale, self.grey_scale_method = scale.describe(), scale.method
            rgb = self._to_rgb(raw, scale)
            if rgb.min() == rgb.max() and raw.min() != raw.max():
                raise DicomReadError(
                    self.path, f"frame {i} decodes to one constant colour although its stored values vary "
                    f"({raw.min()}..{raw.max()}; {self.photometric}, {_syntax_name(self.ds)}): a decoding fault, "
                    "not a blank frame")
            yield i, rgb


def iter_dicom_frames(path: str) -> Iterator[np.ndarray]:
    """Yield every frame of ``path`` as an HxWx3 uint8 RGB array, decoding one frame at a time.

    Long cine loops would not fit in memory decoded at once, so frames are decoded lazily.
    """
    for _, rgb in DicomFrames(path):
        yield rgb


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


def write_ultrasound_dicom(path: str, pixels: Optional[np.ndarray], photometric: str = "MONOCHROME2",
                           frames: Optional[int] = None, transfer_syntax: Optional[str] = None, **tags: Any) -> str:
    """Write an ultrasound DICOM of ``pixels`` with ``tags`` set (e.g. ``PatientID``); returns ``path``.

    The one writer behind synthetic clips (usdet.data.cine) and the tests' DICOM inputs, so that the
    files the reader above is tested on are built one way. ``pixels``: uint8 or uint16, HxW (grey)
    or HxWx3 (``photometric`` RGB or YBR_FULL); ``frames`` = N: a multi-frame file (Ultrasound
    Multi-frame Image Storage), frames on the first axis (N = 0 allowed: a clip with no frame);
    None: one frame. ``pixels`` None writes a header without pixel data. ``transfer_syntax``: a
    UID pydicom can encode (e.g. RLE Lossless), default Explicit VR Little Endian. Written to a
    temp file and renamed.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage,
                             generate_uid)

    from usdet.utils.io import atomic_write

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage if frames is None else UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixels is not None:
        arr = np.ascontiguousarray(pixels)
        samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
        ds.Rows, ds.Columns = (int(n) for n in (arr.shape[:2] if frames is None else arr.shape[1:3]))
        if frames is not None:
            ds.NumberOfFrames = int(frames)
        if samples == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8 * arr.dtype.itemsize
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = arr.tobytes()
        if transfer_syntax is not None and arr.size:
            ds.compress(transfer_syntax)
    atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True), fsync=False)
    return path

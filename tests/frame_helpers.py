"""Helpers of the frame-reading tests (DICOM, cropper, views): where the real DICOM samples are,
synthetic DICOM files written with pydicom, and box IoU."""
import os

import numpy as np

from train_helpers import REPO

#: the shared real DICOM samples (../shared/data/dicom_us beside the repository, or $USDET_DICOM_ROOT)
DICOM_DIR = os.environ.get("USDET_DICOM_ROOT", os.path.normpath(os.path.join(REPO, "..", "shared", "data", "dicom_us")))


def iou(a, b):
    """IoU of two [x0, y0, x1, y1] boxes (x1/y1 exclusive)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_dicom(path, pixels, photometric="MONOCHROME2", frames=1, syntax=None, **tags):
    """An ultrasound DICOM of ``pixels`` (uint8/uint16; ``frames`` > 1: first axis) with ``tags`` set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels is not None:
        arr = np.asarray(pixels)
        spp = 3 if photometric in ("RGB", "YBR_FULL") else 1
        ds.SamplesPerPixel = spp
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = (arr.shape[1], arr.shape[2]) if frames > 1 else arr.shape[:2]
        if frames > 1:
            ds.NumberOfFrames = frames
        if spp == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8 * arr.dtype.itemsize
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path

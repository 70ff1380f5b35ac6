"""Helpers of the frame-reading tests (DICOM, cropper, views): where the real DICOM samples are,
synthetic DICOM files (usdet.data.dicom's writer), and box IoU."""
import os

from train_helpers import REPO

#: the shared real DICOM samples (../shared/data/dicom_us beside the repository, or $USDET_DICOM_ROOT)
DICOM_DIR = os.environ.get("USDET_DICOM_ROOT", os.path.normpath(os.path.join(REPO, "..", "shared", "data", "dicom_us")))


def iou(a, b):
    """IoU of two [x0, y0, x1, y1] boxes (x1/y1 exclusive)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_dicom(path, pixels, photometric="MONOCHROME2", frames=1, **tags):
    """An ultrasound DICOM of ``pixels`` (uint8/uint16; ``frames`` > 1: first axis) with ``tags`` set."""
    from usdet.data.dicom import write_ultrasound_dicom

    return write_ultrasound_dicom(path, pixels, photometric, frames=frames if frames > 1 else None, **tags)

"""Cropper: synthetic scanner screens with known image boxes (real BUSI images and phantoms),
already-cropped and blank frames, real scanner DICOM screens, speed, mark suppression, batch tool."""
import glob
import json
import os
import re
import time

import cv2
import numpy as np
import pytest

from usdet.data.crop import CropResult, apply_crop, find_image_region, suppress_marks
from usdet.data.crop_folder import crop_directory
from usdet.data.screens import make_screen
from train_helpers import REPO
from frame_helpers import DICOM_DIR, iou

BUSI = os.environ.get("USDET_BUSI_ROOT", os.path.normpath(os.path.join(REPO, "..", "shared", "data", "busi")))


def contains(outer, inner):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def busi_samples(n, seed=0):
    """(gray image, lesion boxes x0,y0,x1,y1 exclusive) for n BUSI images with masks."""
    images = sorted(p for c in ("benign", "malignant") for p in glob.glob(os.path.join(BUSI, c, "*.png"))
                    if "_mask" not in p)
    if not images:
        pytest.skip(f"BUSI not found at {BUSI}: set USDET_BUSI_ROOT")
    rng = np.random.default_rng(seed)
    out = []
    for p in rng.choice(images, size=n, replace=False):
        img = cv2.imread(p, cv2.IMREAD_GRAYSCALE)
        stem = os.path.splitext(p)[0]
        boxes = []
        for m in glob.glob(glob.escape(stem) + "_mask*.png"):
            if not re.fullmatch(r"_mask(_\d+)?\.png", m[len(stem):]):
                continue
            mask = cv2.imread(m, cv2.IMREAD_GRAYSCALE)
            x, y, w, h = cv2.boundingRect((mask > 127).astype(np.uint8))
            if w and h:
                boxes.append((x, y, x + w, y + h))
        out.append((img, boxes))
    return out


def check_screens(screens):
    good, refused, wrong = 0, [], []
    for s in screens:
        r = find_image_region(s.frame)
        assert isinstance(r, CropResult) and 0.0 <= r.confidence <= 1.0 and r.reason
        if r.box is None:
            refused.append((s.info, r.reason))
            continue
        # never cut the lesion, whatever else happens
        for lb in s.lesion_boxes:
            assert contains(r.box, lb), (s.info, s.box, r.box, lb)
        if iou(r.box, s.box) >= 0.95:
            good += 1
        else:
            wrong.append((s.info, s.box, r.box, r.reason))
    n = len(screens)
    assert good >= 0.95 * n, (good, n, refused, wrong)
    assert not wrong, wrong  # the rest must be refusals, never a wrong crop
    return good, refused


def test_screens_with_busi_images():
    rng = np.random.default_rng(1)
    screens = [make_screen(rng, img, boxes) for img, boxes in busi_samples(60, seed=3)]
    assert sum(len(s.lesion_boxes) for s in screens) >= 55
    assert {s.info["probe"] for s in screens} == {"linear", "sector"}
    assert {s.info["theme"] for s in screens} == {"dark", "grey"}
    check_screens(screens)


def test_screens_with_phantoms():
    rng = np.random.default_rng(7)
    screens = [make_screen(rng) for _ in range(60)]
    # the variety the issue asks for is really there
    assert sum(s.info["gain"] < 0.4 for s in screens) >= 8
    assert sum(bool(s.info["doppler"]) for s in screens) >= 8
    assert sum("jpeg_quality" in s.info for s in screens) >= 8
    check_screens(screens)


def test_ticks_touching_and_dark_frames():
    """Linear probes with the depth-scale ticks touching the edge; very dark (gain 0.2) frames."""
    rng = np.random.default_rng(11)
    screens = [make_screen(rng, probe="linear", gain=0.2, jpeg_quality=0) for _ in range(10)]
    screens += [make_screen(rng, probe="sector", theme="dark", gain=0.25, jpeg_quality=0) for _ in range(10)]
    check_screens(screens)


def test_already_cropped_returns_whole_frame():
    rng = np.random.default_rng(5)
    for _ in range(5):
        s = make_screen(rng, already_cropped=True)
        r = find_image_region(s.frame)
        h, w = s.frame.shape[:2]
        assert r.box == (0, 0, w, h), r


def test_refuses_blank_and_text_only_frames():
    blank = np.zeros((480, 640, 3), np.uint8)
    r = find_image_region(blank)
    assert r.box is None and "blank" in r.reason
    text = blank.copy()
    for i in range(12):
        cv2.putText(text, "Gen 60  C5-1  28Hz", (20, 30 + 35 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255,) * 3, 1)
    r = find_image_region(text)
    assert r.box is None, r
    tiny = find_image_region(np.zeros((8, 8), np.uint8))
    assert tiny.box is None and "too small" in tiny.reason


def test_speed_1024x768():
    rng = np.random.default_rng(2)
    frames = [make_screen(rng, canvas=(1024, 768)).frame for _ in range(6)]
    find_image_region(frames[0])
    times = []
    for f in frames:
        t = time.perf_counter()
        find_image_region(f)
        times.append(time.perf_counter() - t)
    # well under 50 ms on one core; the median is robust to the shared test machine's hiccups
    assert float(np.median(times)) < 0.05, times


@pytest.mark.skipif(not os.path.isdir(DICOM_DIR), reason=f"DICOM samples not found at {DICOM_DIR}")
def test_real_scanner_screens():
    """Real exports: the crop holds the DICOM's tissue region (SequenceOfUltrasoundRegions) or its
    visible fan, and drops the header text."""
    from usdet.data.dicom import read_dicom_frames

    # OBXXXX1A (Philips CX50): tissue region [120, 60, 800, 518]; blue title bar with patient ID above
    ob = read_dicom_frames(os.path.join(DICOM_DIR, "OBXXXX1A.dcm"))[0]
    r = find_image_region(ob)
    assert r.box is not None and iou(r.box, (120, 60, 800, 518)) > 0.9 and r.box[1] >= 60, r
    # Medistim VeriQ C: tissue region [80, 28, 944, 568]; ECG panel and labels below must go
    med = read_dicom_frames(os.path.join(DICOM_DIR, "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm"))
    for frame in med:
        r = find_image_region(frame)
        assert r.box is not None and iou(r.box, (80, 28, 944, 568)) > 0.95, r
    # GE LOGIQ dual pane: header text (institution) occupies the top ~100 rows
    ge = read_dicom_frames(os.path.join(DICOM_DIR, "US1_J2KR.dcm"))[0]
    r = find_image_region(ge)
    assert r.box is not None and r.box[1] >= 95 and r.box[2] - r.box[0] > 560, r


def test_apply_crop_and_suppress_marks():
    frame = np.arange(20 * 30 * 3, dtype=np.uint32).reshape(20, 30, 3).astype(np.uint8)
    c = apply_crop(frame, (5, 2, 25, 12))
    assert c.shape == (10, 20, 3) and np.array_equal(c, frame[2:12, 5:25])
    assert apply_crop(frame, None) is frame
    with pytest.raises(ValueError):
        apply_crop(frame, (0, 0, 31, 5))
    rng = np.random.default_rng(0)
    img = np.repeat(cv2.GaussianBlur(rng.integers(40, 140, (120, 160)).astype(np.uint8), (3, 3), 0)[..., None], 3, 2)
    out, changed = suppress_marks(img)
    assert changed == 0 and np.array_equal(out, img)  # plain speckle is left alone
    marked = img.copy()
    cv2.drawMarker(marked, (60, 60), (255, 255, 255), cv2.MARKER_CROSS, 11, 1)
    cv2.line(marked, (10, 100), (60, 100), (250, 220, 0), 2)
    out, changed = suppress_marks(marked)
    mark_px = int(np.any(marked != img, axis=2).sum())
    assert changed >= mark_px
    assert int(np.any(out != marked, axis=2).sum()) == changed
    # the marks are gone: no saturated or pure-white pixel is left
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
    assert not ((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).any()
    assert out.max() < 250


def test_crop_directory(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    truths = {}
    for i in range(3):
        s = make_screen(rng, jpeg_quality=0)
        cv2.imwrite(str(src / "a" / f"f{i}.png"), s.frame[:, :, ::-1])
        truths[f"a/f{i}.png"] = s
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    entries = crop_directory(str(src), str(tmp_path / "out"), workers=1, progress=False)
    on_disk = json.loads((tmp_path / "out" / "crops.json").read_text())
    assert on_disk == json.loads(json.dumps(entries))
    assert set(on_disk) == set(truths) | {"broken.jpg"}
    assert on_disk["broken.jpg"]["box"] is None and "failed" in on_disk["broken.jpg"]["reason"]
    for key, s in truths.items():
        e = on_disk[key]
        if e["box"] is None:
            continue
        assert iou(e["box"], s.box) >= 0.95
        crop = cv2.imread(str(tmp_path / "out" / key))[:, :, ::-1]
        x0, y0, x1, y1 = e["box"]
        assert np.array_equal(crop, s.frame[y0:y1, x0:x1])

"""Where the image(s) of a frame are (issue 14 §1): DICOM ultrasound regions taken exactly (clipped
by one pixel, refused beyond), dual-view frames split into one crop per view in crop_workspace,
the hospital converter and prediction (boxes back on the full frame)."""
import csv
import json
import os

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402

from usdet.data.crop import find_image_region  # noqa: E402
from usdet.data.crop_folder import crop_directory  # noqa: E402
from usdet.data.dicom import DicomFrames  # noqa: E402
from usdet.data.screens import make_screen  # noqa: E402
from usdet.data.views import REGION_REASON, find_divider, find_views, regions_to_views  # noqa: E402
from train_helpers import QUICK_CFG  # noqa: E402
from frame_helpers import DICOM_DIR, iou, make_dicom  # noqa: E402


def region(x0, y0, x1_incl, y1_incl, fmt=1, dtype=1):
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType = fmt, dtype
    r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1_incl, y1_incl
    return r


def write_rgb_dicom(path, rgb, regions=()):
    return make_dicom(path, rgb, "RGB", PatientID="MRN-77", **({"SequenceOfUltrasoundRegions": list(regions)}
                                                                 if regions else {}))


# ---- DICOM ultrasound regions ------------------------------------------------------------------
def test_header_regions_give_the_exact_crop(tmp_path):
    """The crop is the header's 2D tissue region exactly (MaxX1/MaxY1 inclusive), not the pixel
    cropper's estimate; waveform panels and colour-flow boxes nested in the image are ignored."""
    s = make_screen(np.random.default_rng(5), canvas=(640, 480), probe="linear", gain=1.0, jpeg_quality=0)
    x0, y0, x1, y1 = s.box
    regions = [region(30, 440, 600, 470, fmt=4, dtype=10),  # ECG trace panel
               region(x0 + 20, y0 + 20, x0 + 60, y0 + 60, fmt=1, dtype=2),  # colour-flow box in the image
               region(x0 + 3, y0 + 2, x1 - 5, y1 - 4)]  # what the scanner says (not the drawn truth)
    p = write_rgb_dicom(str(tmp_path / "one.dcm"), s.frame, regions)
    src = DicomFrames(p)
    assert [r.box for r in src.regions][2] == (x0 + 3, y0 + 2, x1 - 4, y1 - 3)  # exclusive = inclusive + 1
    (_, frame), = list(src)
    (view,) = find_views(frame, src.regions)
    assert view.box == (x0 + 3, y0 + 2, x1 - 4, y1 - 3) and view.confidence == 1.0
    assert view.reason.startswith(REGION_REASON) and "clipped" not in view.reason
    assert find_image_region(frame).box != view.box  # the pixel cropper alone gives another box
    entries = crop_directory(str(tmp_path), str(tmp_path / "out"), progress=False)
    e = entries["one.dcm#0"]
    assert e["box"] == [x0 + 3, y0 + 2, x1 - 4, y1 - 3] and e["reason"].startswith("dicom ultrasound region")
    crop = cv2.imread(str(tmp_path / "out" / e["output"]))[:, :, ::-1]
    assert np.array_equal(crop, s.frame[y0 + 2:y1 - 3, x0 + 3:x1 - 4])


def test_header_region_past_the_frame_is_clipped_or_refused():
    inside = regions_to_views(DicomRegions([(10, 20, 99, 59)]), 100, 60)  # MaxX1 = last column: exact
    assert inside[0].box == (10, 20, 100, 60) and "clipped" not in inside[0].reason
    one = regions_to_views(DicomRegions([(10, 20, 100, 59)]), 100, 60)  # MaxX1 = Columns: 1 px past
    assert one[0].box == (10, 20, 100, 60) and one[0].reason.startswith(REGION_REASON) and "clipped" in one[0].reason
    far = regions_to_views(DicomRegions([(10, 20, 103, 59)]), 100, 60)
    assert far[0].box is None and far[0].reason.startswith(REGION_REASON)
    assert "reaches 4 px past the 100x60 frame" in far[0].reason
    assert regions_to_views(DicomRegions([(0, 0, 50, 50)], fmt=4), 100, 60) is None  # no 2D tissue: pixels decide


def DicomRegions(boxes, fmt=1):
    from usdet.data.dicom import ultrasound_regions

    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = [region(*b, fmt=fmt) for b in boxes]
    return ultrasound_regions(ds)


@pytest.mark.skipif(not os.path.isfile(os.path.join(DICOM_DIR, "OBXXXX1A.dcm")),
                    reason=f"DICOM samples not found at {DICOM_DIR} (set USDET_DICOM_ROOT)")
def test_real_header_region_reaching_one_pixel_past_is_clipped():
    """OBXXXX1A (Philips CX50, 800 columns) writes its tissue region as [120, 60, 800, 518]."""
    src = DicomFrames(os.path.join(DICOM_DIR, "OBXXXX1A.dcm"))
    (_, frame), = list(src)
    (view,) = find_views(frame, src.regions)
    assert view.box == (120, 60, 800, 519) and "clipped 1 px" in view.reason


# ---- dual views --------------------------------------------------------------------------------
def test_dual_view_screens_split_into_views():
    """Drawn two-image screens (side by side or stacked; line or gap divider; JPEG or not) give two
    crops matching each image, left/top first; single-image screens are not split."""
    rng = np.random.default_rng(11)
    for i in range(8):
        layout = "stacked" if i % 4 == 3 else "side"
        s = make_screen(rng, dual=layout, gain=float(rng.uniform(0.85, 1.15)), canvas=(720, 560))
        assert len(s.views) == 2
        views = find_views(s.frame)
        assert len(views) == 2, (i, s.info, [v.reason for v in views])
        for v, truth in zip(views, s.views):
            assert v.box is not None and iou(v.box, truth) > 0.9, (i, s.info, v, truth)
            assert v.reason.startswith("dual view")
        # the union crop spans both views and the divider: what the cropper gave before
        assert iou(find_image_region(s.frame).box, s.box) > 0.9
        if i == 0:  # a grey (HxW) frame gives the same views
            assert [v.box for v in find_views(s.frame[:, :, 0])] == [v.box for v in views]
    for i in range(10):
        s = make_screen(rng, canvas=(720, 560))
        assert len(find_views(s.frame)) == 1, s.info


def test_dark_or_uniform_middle_is_not_a_divider():
    rng = np.random.default_rng(2)
    img = np.repeat(rng.integers(40, 200, (200, 300), dtype=np.uint8)[..., None], 3, axis=2)
    assert find_divider(img, (0, 0, 300, 200)) is None
    dark = img.copy()
    dark[:, 140:146] = 0  # a black band with texture on both sides: a divider
    assert find_divider(dark, (0, 0, 300, 200)) == (1, 140, 146)
    assert find_divider(np.ascontiguousarray(dark.transpose(1, 0, 2)), (0, 0, 200, 300)) == (0, 140, 146)
    shadow = img.copy()
    shadow[100:, 140:146] = 0  # an acoustic shadow under a lesion: half the height only
    assert find_divider(shadow, (0, 0, 300, 200)) is None
    black = np.zeros_like(img)
    black[:, :100] = img[:, :100]  # dark right part of one image: no texture on one side
    assert find_divider(black, (0, 0, 300, 200)) is None


def test_crop_workspace_writes_one_crop_per_view(tmp_path):
    rng = np.random.default_rng(21)
    src = tmp_path / "in"
    src.mkdir()
    s = make_screen(rng, dual="side", gain=1.0, canvas=(720, 540), jpeg_quality=0)
    cv2.imwrite(str(src / "dual.png"), s.frame[:, :, ::-1])
    # a DICOM whose header holds two tissue regions, listed right view first
    (a, b) = s.views
    regions = [region(b[0], b[1], b[2] - 1, b[3] - 1), region(a[0], a[1], a[2] - 1, a[3] - 1)]
    write_rgb_dicom(str(src / "dual.dcm"), s.frame, regions)
    entries = crop_directory(str(src), str(tmp_path / "out"), progress=False)
    assert set(entries) == {"dual.png@view0", "dual.png@view1", "dual.dcm#0@view0", "dual.dcm#0@view1"}
    for k in (0, 1):
        e = entries[f"dual.dcm#0@view{k}"]
        assert e["box"] == list(s.views[k]) and e["reason"].startswith("dicom ultrasound region")
        assert e["frame"] == "dual.dcm#0" and e["view"] == k and e["output"] == f"dual.dcm.frame0000.view{k}.png"
        e = entries[f"dual.png@view{k}"]
        assert e["frame"] == "dual.png" and e["output"] == f"dual.view{k}.png" and iou(e["box"], s.views[k]) > 0.9
        x0, y0, x1, y1 = e["box"]
        written = cv2.imread(str(tmp_path / "out" / e["output"]))[:, :, ::-1]
        assert np.array_equal(written, s.frame[y0:y1, x0:x1])


def test_frames_converter_puts_each_box_in_its_view(tmp_path):
    """A dual-view frame becomes two images (same source_file, patient and split); each lesion box
    lands in the image of the view that holds it, shifted exactly by that view's crop."""
    from usdet.data.frames import convert_frames, shift_box
    from usdet.data.privacy import Pseudonymizer

    rng = np.random.default_rng(8)
    src = tmp_path / "src"
    rows, truth = [], {}
    for p in range(4):
        for k in range(2):
            while True:  # a screen with lesions in both views
                s = make_screen(rng, dual="side", gain=1.0, canvas=(720, 540), jpeg_quality=0)
                if set(s.lesion_views) == {0, 1}:
                    break
            rel = f"P{p}/f{k}.png"
            os.makedirs(src / f"P{p}", exist_ok=True)
            cv2.imwrite(str(src / rel), s.frame[:, :, ::-1])
            truth[rel] = s
            rows += [(rel, *b, "lesion", f"PAT{p}") for b in s.lesion_boxes]
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x0", "y0", "x1", "y1", "label", "patient_id"])
        w.writerows(rows)
    report = convert_frames(str(src), str(tmp_path / "boxes.csv"), str(tmp_path / "out"), b"k" * 16, progress=False)
    assert report["counts"]["multi_view_frames"] == len(truth) and report["counts"]["refused"] == 0
    assert report["counts"]["images"] == 2 * len(truth) and report["counts"]["boxes_dropped"] == 0
    pseudo = Pseudonymizer(b"k" * 16)
    images = {}
    for split in ("train", "val", "test"):
        doc = json.load(open(tmp_path / "out" / "annotations" / f"{split}.json"))
        for im in doc["images"]:
            anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
            images[(im["source_file"], im["view"])] = (split, im, anns)
    checked = 0
    for rel, s in truth.items():
        v0, v1 = images[(pseudo(rel, "img"), 0)], images[(pseudo(rel, "img"), 1)]
        assert v0[0] == v1[0] and v0[1]["patient"] == v1[1]["patient"]  # one split, one patient
        assert v0[1]["file_name"] != v1[1]["file_name"] and v0[1]["file_name"].endswith("_view0.png")
        for k, (split, im, anns) in enumerate((v0, v1)):
            assert iou(im["crop_box"], s.views[k]) > 0.9
            want = sorted(shift_box(b, im["crop_box"], 0.5)[0]
                          for b, view in zip(s.lesion_boxes, s.lesion_views) if view == k)
            assert want and None not in want
            assert sorted(a["bbox"] for a in anns) == [[round(v, 3) for v in b] for b in want]
            checked += len(want)
    assert checked >= 2 * len(truth)


# ---- prediction ---------------------------------------------------------------------------------
def test_predict_runs_each_view_and_maps_boxes_to_the_full_frame(tmp_path):
    import torch
    from detectron2.modeling import build_model

    from usdet.engine.predictor import BatchPredictor, _iter_frames, build_predictor_cfg, predict_sources

    s = make_screen(np.random.default_rng(31), dual="side", gain=1.0, canvas=(640, 480), jpeg_quality=0)
    path = str(tmp_path / "dual.png")
    cv2.imwrite(path, s.frame[:, :, ::-1])
    items = list(_iter_frames([path], crop=True))
    assert [it.view for it in items] == [0, 1] and all(it.crop_note is None for it in items)
    for it, truth in zip(items, s.views):
        assert iou(it.crop_box, truth) > 0.9
    cfg = build_predictor_cfg(QUICK_CFG, "", "cpu", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                                     "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "320"])
    torch.manual_seed(0)
    pred = BatchPredictor(cfg, batch_size=2, model=build_model(cfg))
    records, failures = predict_sources(pred, [path], score_thresh=0.0, progress=False)
    assert not failures and [r["view"] for r in records] == [0, 1]
    for r, it in zip(records, items):
        x0, y0, x1, y1 = it.crop_box
        assert r["crop_box"] == [x0, y0, x1, y1]
        inst = pred([np.ascontiguousarray(s.frame[y0:y1, x0:x1])])[0]
        order = np.argsort(-inst.scores.numpy(), kind="stable")
        want = inst.pred_boxes.tensor.numpy()[order] + np.array([x0, y0, x0, y0])
        got = np.array([b["bbox_xyxy_original"] for b in r["boxes"]]).reshape(-1, 4)
        assert len(got) > 0 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=0.006)
        assert (got[:, 0] >= x0 - 1e-3).all() and (got[:, 2] <= x1 + 1e-3).all()


@pytest.mark.skipif(not os.path.isfile(os.path.join(DICOM_DIR, "US1_J2KR.dcm")),
                    reason=f"DICOM samples not found at {DICOM_DIR} (set USDET_DICOM_ROOT)")
def test_real_screens_from_pixels():
    """Without the header regions, the pixels alone: the GE LOGIQ split screen (two panes, a 1 px line at
    x 318) gives two views; the single-image scanners (Medistim, Philips EPIQ and CX50) stay whole."""
    from usdet.data.dicom import read_dicom_frames

    ge = read_dicom_frames(os.path.join(DICOM_DIR, "US1_J2KR.dcm"))[0]
    left, right = find_views(ge)
    assert left.box[2] == 318 and right.box[0] == 319 and "divider at x 318..318" in left.reason
    assert left.box[0] <= 20 and right.box[2] >= 615 and left.box[1] >= 95 and right.box[1] >= 95
    for name in ("JPEGLosslessP14SV1_3s_2f_u_08_08.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A.dcm"):
        for frame in read_dicom_frames(os.path.join(DICOM_DIR, name)):
            views = find_views(frame)
            assert len(views) == 1 and views[0].box == find_image_region(frame).box, name


def test_converter_scales_a_16bit_cine_once_and_says_how(tmp_path):
    """Two frames of one 16-bit clip (header region, no VOI window): one grey scale for the file, so
    a stored value is the same grey in both written images; report.json names the rule used."""
    from usdet.data.frames import convert_frames

    rng = np.random.default_rng(0)
    base = rng.integers(1000, 2500, (120, 160)).astype(np.uint16)
    cine = np.stack([base, base + 1000])  # the second frame is brighter: 2000..3499
    os.makedirs(tmp_path / "src")
    make_dicom(str(tmp_path / "src" / "clip.dcm"), cine, frames=2, SequenceOfUltrasoundRegions=[region(10, 10, 149, 109)])
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        fh.write("file,x0,y0,x1,y1,label,patient_id\nclip.dcm#0,,,,,,P1\nclip.dcm#1,,,,,,P1\n")
    report = convert_frames(str(tmp_path / "src"), str(tmp_path / "boxes.csv"), str(tmp_path / "out"), b"k" * 16,
                            fractions=(1.0, 0.0, 0.0), progress=False)
    assert report["grey_scale"]["dicom_files"] == {"min-max over all frames of the file": 1}
    assert "one grey scale per file" in report["grey_scale"]["rule"]
    doc = json.load(open(tmp_path / "out" / "annotations" / "train.json"))
    assert len(doc["images"]) == 2 and all(im["crop_box"] == [10, 10, 150, 110] for im in doc["images"])
    written = {}
    for im in doc["images"]:
        img = cv2.imread(str(tmp_path / "out" / im["file_name"]), cv2.IMREAD_GRAYSCALE)
        written[img.mean()] = img
    dim, bright = (written[k] for k in sorted(written))
    stored_dim, stored_bright = cine[0][10:110, 10:150], cine[1][10:110, 10:150]
    both = np.intersect1d(stored_dim, stored_bright)  # 2000..2499 is in both frames
    assert both.size
    v = int(both[0])
    assert set(dim[stored_dim == v]) == set(bright[stored_bright == v])  # one grey for one stored value
    assert dim.max() < 200 and bright.max() == 255 and dim.min() == 0

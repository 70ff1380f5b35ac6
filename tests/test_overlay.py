"""Overlays: colours at the box edges, outcome naming, original-frame mapping, contact sheets."""
import json
import os

import numpy as np
import pytest

from usdet.utils.io import atomic_write_image
from usdet.visualization.overlay import (
    PRED_COLOR,
    TRUTH_COLOR,
    draw_overlay,
    match_image,
    outcome_file_name,
    overlay_scale,
    visualize_coco_results,
)
from train_helpers import load_tool



def _close(pixel, color, tol=40):
    return np.abs(np.asarray(pixel, int) - np.asarray(color, int)).max() <= tol


def _edge_pixels(img, box, scale, side):
    """Pixels along the middle third of one edge of ``box`` (input coords) in the scaled overlay."""
    x0, y0, x1, y1 = [v * scale for v in box]
    if side == "left":
        ys = np.linspace(y0 + (y1 - y0) / 3, y1 - (y1 - y0) / 3, 5).astype(int)
        return img[ys, int(round(x0))]
    if side == "bottom":
        xs = np.linspace(x0 + (x1 - x0) / 3, x1 - (x1 - x0) / 3, 5).astype(int)
        return img[int(round(y1)), xs]
    raise ValueError(side)


def test_truth_and_prediction_colours_at_box_edges():
    img = np.full((128, 160, 3), 70, np.uint8)
    truth, pred = [20, 30, 70, 80], [60, 50, 140, 110]
    out = draw_overlay(img, [truth], ["lesion"], [pred], [0.91], ["lesion"], title="TP")
    s = overlay_scale(128, 160)
    assert out.shape == (int(round(128 * s)), int(round(160 * s)), 3)
    for px in _edge_pixels(out, truth, s, "left"):
        assert _close(px, TRUTH_COLOR), px
    for px in _edge_pixels(out, pred, s, "bottom"):
        assert _close(px, PRED_COLOR), px
    # inside the truth box, away from lines and labels, the image is untouched
    assert tuple(out[int(55 * s), int(40 * s)]) == (70, 70, 70)
    # the two colours are really different
    assert np.abs(np.subtract(TRUTH_COLOR, PRED_COLOR)).max() > 150


@pytest.mark.parametrize(
    "truth,preds,scores,expected,tp,fp,fn",
    [
        ([], [], [], "TN", 0, 0, 0),
        ([[10, 10, 50, 50]], [[12, 10, 50, 50]], [0.9], "TP", 1, 0, 0),
        ([[10, 10, 50, 50]], [], [], "FN", 0, 0, 1),
        ([], [[10, 10, 50, 50]], [0.8], "FP", 0, 1, 0),
        ([[10, 10, 50, 50]], [[60, 60, 90, 90]], [0.8], "FN-FP", 0, 1, 1),
        # two predictions on one lesion: the better-scored one is the TP, the other an FP
        ([[10, 10, 50, 50]], [[10, 10, 50, 50], [11, 11, 50, 50]], [0.6, 0.9], "TP-FP", 1, 1, 0),
        ([[10, 10, 50, 50], [60, 60, 100, 100]], [[10, 10, 50, 50]], [0.7], "TP-FN", 1, 0, 1),
    ],
)
def test_match_image_outcomes(truth, preds, scores, expected, tp, fp, fn):
    res = match_image(truth, preds, scores, iou_thresh=0.5)
    assert (res.outcome, res.tp, res.fp, res.fn) == (expected, tp, fp, fn)


def test_match_image_iou_and_file_name():
    res = match_image([[0, 0, 10, 10]], [[0, 0, 10, 20]], [0.9], iou_thresh=0.5)
    assert res.best_iou == pytest.approx(0.5)
    assert res.outcome == "TP"
    assert outcome_file_name("images/test/benign (3).png", res) == "TP_iou0.50_benign_3_.png"
    miss = match_image([[0, 0, 10, 10]], [[0, 0, 10, 20]], [0.9], iou_thresh=0.6)
    assert miss.outcome == "FN-FP" and outcome_file_name("a/b.png", miss).startswith("FN-FP_iou0.50_b")


@pytest.fixture()
def small_coco(tmp_path):
    """A 4-image COCO layout (TP, FP, FN, TN) with source frames 20 px larger on each side."""
    root = tmp_path / "ds"
    src = tmp_path / "source"
    rng = np.random.default_rng(0)
    images, anns = [], []
    truth = {1: [20, 20, 30, 25], 3: [40, 30, 25, 25]}  # xywh
    for i in range(1, 5):
        crop = rng.integers(40, 120, (96, 112, 3), dtype=np.uint8)
        atomic_write_image(str(root / "images" / f"im{i}.png"), crop)
        frame = np.zeros((96 + 40, 112 + 40, 3), np.uint8)
        frame[20:116, 24:136] = crop
        atomic_write_image(str(src / f"frame{i}.png"), frame)
        images.append({"id": i, "file_name": f"images/im{i}.png", "width": 112, "height": 96,
                       "source_file": f"frame{i}.png", "crop_box": [24, 20, 136, 116]})
        if i in truth:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": truth[i],
                         "area": 750.0, "iscrowd": 0})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "lesion"}]}
    os.makedirs(root / "annotations")
    with open(root / "annotations" / "test.json", "w") as f:
        json.dump(gt, f)
    preds = [
        {"image_id": 1, "category_id": 1, "bbox": [21, 20, 30, 25], "score": 0.95},  # TP
        {"image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.88},  # FP
        {"image_id": 3, "category_id": 1, "bbox": [40, 30, 25, 25], "score": 0.20},  # below threshold -> FN
    ]
    with open(tmp_path / "results.json", "w") as f:
        json.dump(preds, f)
    return root, src, gt, preds, tmp_path


def test_visualize_coco_results_names_sheets_and_original(small_coco):
    root, src, gt, preds, tmp = small_coco
    out = tmp / "vis"
    summary = visualize_coco_results(gt, preds, str(root), str(out), conf_threshold=0.5,
                                     original=True, source_root=str(src), worst_k=4, progress=False)
    assert summary["outcomes"] == {"FN": 1, "FP": 1, "TN": 1, "TP": 1}
    assert summary["boxes"] == {"tp": 1, "fp": 1, "fn": 1}
    names = sorted(e["overlay"] for e in summary["images"])
    assert names == ["FN_iou0.00_im3.png", "FP_iou0.00_im2.png", "TN_iou0.00_im4.png",
                     f"TP_iou{(29 * 25) / (31 * 25):.2f}_im1.png"]
    for n in names:
        assert (out / n).is_file() and (out / "original" / n).is_file()

    # crop overlay: truth colour on the truth box's left edge of image 3 (the miss)
    from usdet.data.image_io import read_image

    crop_img = read_image(str(out / "FN_iou0.00_im3.png"))
    s = overlay_scale(96, 112)
    for px in _edge_pixels(crop_img, [40, 30, 65, 55], s, "left"):
        assert _close(px, TRUTH_COLOR), px
    # original overlay: the same box shifted by the crop offset (24, 20) on the 136x152 frame
    orig = read_image(str(out / "original" / "FN_iou0.00_im3.png"))
    so = overlay_scale(136, 152)
    assert orig.shape[:2] == (int(round(136 * so)), int(round(152 * so)))
    for px in _edge_pixels(orig, [64, 50, 89, 75], so, "left"):
        assert _close(px, TRUTH_COLOR), px
    # prediction colour at the FP's bottom edge on its original frame
    orig2 = read_image(str(out / "original" / "FP_iou0.00_im2.png"))
    for px in _edge_pixels(orig2, [74, 70, 94, 90], so, "bottom"):
        assert _close(px, PRED_COLOR), px

    for sheet in ("worst_false_positives.png", "worst_misses.png"):
        img = read_image(str(out / sheet))
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 10
    # the FP tile shows the prediction colour; the miss tile the truth colour
    fp_sheet = read_image(str(out / "worst_false_positives.png"))
    assert (np.abs(fp_sheet.astype(int) - PRED_COLOR).max(axis=2) < 30).sum() > 20
    miss_sheet = read_image(str(out / "worst_misses.png"))
    assert (np.abs(miss_sheet.astype(int) - TRUTH_COLOR).max(axis=2) < 30).sum() > 20
    with open(out / "summary.json") as f:
        assert json.load(f)["outcomes"] == summary["outcomes"]


def test_tool_lists_unreadable_image_and_draws_the_rest(small_coco, capsys):
    root, src, gt, preds, tmp = small_coco
    (root / "images" / "im2.png").write_bytes(b"not a png")
    visualize_json_results = load_tool("visualize_json_results")
    out = tmp / "vis_tool"
    rc = visualize_json_results.main(["--input", str(tmp / "results.json"), "--gt",
                                      str(root / "annotations" / "test.json"), "--output", str(out),
                                      "--worst", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [f["file_name"] for f in summary["failures"]] == ["images/im2.png"]
    assert "im2.png" in summary["failures"][0]["reason"]
    assert len(summary["images"]) == 3
    assert len([p for p in os.listdir(out) if p.endswith(".png") and "worst" not in p]) == 3
    assert "im2.png" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --original on real converter output: BUSI with --max-size, hospital frames with --mapping
def _near_colour(img, color, tol=40):
    return np.abs(img.astype(int) - np.asarray(color, int)).max(axis=2) <= tol


def _left_edge_drawn(img, box_xyxy, s, color, band=1.5):
    """The box's left edge (source pixels, box_xyxy) is drawn in ``color`` within ``band`` source px."""
    x0, y0, x1, y1 = box_xyxy
    rows = np.linspace(y0 + (y1 - y0) / 3, y1 - (y1 - y0) / 3, 5) * s
    lo, hi = int((x0 - band) * s), int(np.ceil((x0 + band) * s)) + 1
    hit = _near_colour(img[rows.astype(int), max(lo, 0):hi], color)
    return bool(hit.any(axis=1).all())


def test_original_overlay_of_a_max_size_busi_copy(tmp_path):
    """A --max-size BUSI copy: boxes go back onto the source image through the image's scale."""
    from PIL import Image

    from usdet.data.image_io import read_image
    from usdet.data.phantom import render_phantom

    root, truth = tmp_path / "busi", {}
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for i in (1, 2, 3):
            rgb, boxes, _, masks = render_phantom(np.random.default_rng([i, len(label)]), (96, 128), [label],
                                                  return_masks=True)
            Image.fromarray(rgb).save(root / label / f"{label} ({i}).png")
            Image.fromarray(masks[0].astype(np.uint8) * 255).convert("1").save(root / label / f"{label} ({i})_mask.png")
            truth[f"{label}/{label} ({i}).png"] = boxes[0]
    convert = load_tool("convert_to_coco")
    out = tmp_path / "small"
    assert convert.main(["busi", "--root", str(root), "--output", str(out), "--max-size", "64", "--split", "1,0,0",
                         "--no-progress"]) == 0
    gt_path = out / "annotations" / "train.json"
    gt = json.loads(gt_path.read_text())
    assert all(im["scale"] == 0.5 and (im["width"], im["height"]) == (64, 48) for im in gt["images"])
    (tmp_path / "none.json").write_text("[]")  # no detections: every lesion drawn as a miss
    vis = tmp_path / "vis"
    tool = load_tool("visualize_json_results")
    assert tool.main(["--input", str(tmp_path / "none.json"), "--gt", str(gt_path), "--output", str(vis),
                      "--original", "--source-root", str(root), "--worst", "0", "--no-progress"]) == 0
    summary = json.loads((vis / "summary.json").read_text())
    assert not summary["failures"] and len(summary["images"]) == 6
    so = overlay_scale(96, 128)
    for e in summary["images"]:
        src = next(im["source_file"] for im in gt["images"] if im["id"] == e["image_id"])
        x, y, w, h = truth[src]
        orig = read_image(str(vis / e["overlay_original"]))
        assert orig.shape[:2] == (int(round(96 * so)), int(round(128 * so)))
        # drawn where the lesion is on the source image, not at the copy's (half-size) coordinates
        assert _left_edge_drawn(orig, [x, y, x + w, y + h], so, TRUTH_COLOR), src
        assert not _left_edge_drawn(orig, [x / 2, y / 2, (x + w) / 2, (y + h) / 2], so, TRUTH_COLOR, band=0.5), src


def test_original_overlay_of_pseudonymized_hospital_frames_needs_the_mapping(tmp_path, monkeypatch):
    """Hospital frames: source_file is a pseudonym; --mapping finds the frame, boxes land on the lesion."""
    import cv2

    from usdet.data.image_io import read_image
    from usdet.data.screens import make_screen

    src, rows, screens = tmp_path / "src", [], {}
    rng = np.random.default_rng(3)
    for p in ("SMITH_J_MRN1001", "DOE_A_MRN1002"):
        for k in range(2):
            s = make_screen(rng, canvas=(560, 420), jpeg_quality=0, gain=1.0, probe="linear", doppler=False)
            while not s.lesion_boxes:
                s = make_screen(rng, canvas=(560, 420), jpeg_quality=0, gain=1.0, probe="linear", doppler=False)
            rel = f"{p}/frame_{k}.png"
            (src / p).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(src / rel), s.frame[:, :, ::-1])
            screens[rel] = s
            rows += [[rel, *b, "benign", p, "clip1"] for b in s.lesion_boxes]
    with open(tmp_path / "boxes.csv", "w") as fh:
        fh.write("file,x0,y0,x1,y1,label,patient_id,clip_id\n")
        fh.writelines(",".join(str(v) for v in r) + "\n" for r in rows)
    monkeypatch.setenv("USDET_PSEUDONYM_KEY", "test-key-0123456789")
    convert = load_tool("convert_to_coco")
    out, mapping = tmp_path / "hospital", tmp_path / "secure" / "map.json"
    assert convert.main(["frames", "--images", str(src), "--annotations", str(tmp_path / "boxes.csv"),
                         "--output", str(out), "--mapping", str(mapping), "--split", "1,0,0", "--no-progress"]) == 0
    gt_path = out / "annotations" / "train.json"
    gt = json.loads(gt_path.read_text())
    assert len(gt["images"]) == 4 and all("SMITH" not in im["source_file"] for im in gt["images"])
    (tmp_path / "none.json").write_text("[]")
    tool = load_tool("visualize_json_results")
    base = ["--input", str(tmp_path / "none.json"), "--gt", str(gt_path), "--original", "--source-root", str(src),
            "--worst", "0", "--no-progress"]
    # without the mapping the pseudonymous sources cannot be found (and no real name is printed)
    assert tool.main(base + ["--output", str(tmp_path / "v0")]) == 0
    s0 = (tmp_path / "v0" / "summary.json").read_text()
    assert len(json.loads(s0)["failures"]) == 4 and "SMITH" not in s0 and "DOE" not in s0
    assert tool.main(base + ["--output", str(tmp_path / "v1"), "--mapping", str(mapping)]) == 0
    summary = json.loads((tmp_path / "v1" / "summary.json").read_text())
    assert not summary["failures"] and len(summary["images"]) == 4
    real = json.loads(mapping.read_text())["files"]
    for e in summary["images"]:
        im = next(i for i in gt["images"] if i["id"] == e["image_id"])
        screen = screens[real[im["source_file"]]]
        orig = read_image(str(tmp_path / "v1" / e["overlay_original"]))
        so = overlay_scale(*screen.frame.shape[:2])
        for box in screen.lesion_boxes:
            assert _left_edge_drawn(orig, box, so, TRUTH_COLOR), (e["overlay"], box)
        # outside the crop the frame is blacked out (burned-in patient text never reaches an output)
        assert orig[2:6, 2:6].max() == 0


def test_ignore_regions_drawn_dashed_grey_and_their_detections_not_false_positives(small_coco):
    from usdet.data.image_io import read_image
    from usdet.visualization.overlay import IGNORE_COLOR

    root, src, gt, preds, tmp = small_coco
    gt = json.loads(json.dumps(gt))
    gt["annotations"].append({"id": 9, "image_id": 4, "category_id": 1, "bbox": [10, 10, 60, 60], "area": 3600.0,
                              "iscrowd": 1})
    preds = preds + [{"image_id": 4, "category_id": 1, "bbox": [20, 20, 30, 30], "score": 0.9}]  # inside it
    out = tmp / "vis_ignore"
    summary = visualize_coco_results(gt, preds, str(root), str(out), conf_threshold=0.5, worst_k=4, progress=False)
    assert summary["outcomes"] == {"FN": 1, "FP": 1, "TN": 1, "TP": 1}  # image 4 stays a TN
    assert summary["detections_in_ignore_regions"] == 1 and summary["ignore_regions"] == 1
    img = read_image(str(out / "TN_iou0.00_im4.png"))
    s = overlay_scale(96, 112)
    x0 = int(round(10 * s))
    column = _near_colour(img[int(25 * s):int(65 * s), x0 - 2:x0 + 3], IGNORE_COLOR, tol=25).any(axis=1)
    assert 0.2 < column.mean() < 0.9  # a dashed line: grey with gaps
    # the removed detection is not drawn (the legend, lower right, still names the prediction colour)
    assert not _near_colour(img[: int(60 * s), : int(60 * s)], PRED_COLOR, tol=30).any()

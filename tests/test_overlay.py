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

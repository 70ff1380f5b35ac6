"""FROC (LUNA16 convention) on hand-computed cases, including one where FROC and AP disagree."""
import math

import numpy as np
import pytest

from usdet.evaluation.coco_metrics import coco_bbox_metrics
from usdet.evaluation.froc import FROC_RATES, froc, froc_curve, froc_hits, sensitivity_at_rates
from usdet.evaluation.inputs import build_detection_data


def coco(images, anns, cats=("lesion",)):
    return {
        "images": [{"id": i, "width": 100, "height": 100} for i in images],
        "annotations": [
            {"id": k + 1, "image_id": im, "bbox": list(b), "category_id": 1, "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, b) in enumerate(anns)
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(cats)],
    }


def P(img, box, score, cat=1):
    return {"image_id": img, "bbox": list(box), "score": score, "category_id": cat}


def test_hand_case_rates_and_cpm():
    gt = coco([1, 2], [(1, [0, 0, 10, 10]), (2, [0, 0, 10, 10])])
    preds = [
        P(1, [0, 0, 10, 10], 0.9),  # finds lesion 1
        P(1, [1, 0, 10, 10], 0.8),  # IoU 0.82 with the found lesion: neither TP nor FP
        P(1, [50, 50, 10, 10], 0.7),  # FP
        P(2, [60, 60, 5, 5], 0.5),  # FP
        P(2, [0, 0, 10, 10], 0.3),  # finds lesion 2
    ]
    d = build_detection_data(gt, preds)
    h = froc_hits(d)
    assert h.truth_score.tolist() == [0.9, 0.3]
    assert sorted(h.fp_score.tolist()) == [0.5, 0.7]  # the duplicate is not an FP
    fps, sens, thr = froc_curve(h)
    # thresholds +inf, .9, .8(no change), .7, .5, .3
    assert fps.tolist() == [0, 0, 0.5, 1.0, 1.0]
    assert sens.tolist() == [0, 0.5, 0.5, 0.5, 1.0]
    r = froc(d, "iou", 0.5)
    # FP/image 0.5 reached with sensitivity 0.5; 1 FP/image reached at sensitivity 1
    assert r["sensitivity"] == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert r["cpm"] == pytest.approx(5.5 / 7)
    assert r["fps_per_image"] == list(FROC_RATES)
    assert r["hit"] == "iou" and r["num_lesions"] == 2


def test_froc_and_ap_differ_on_duplicates():
    """Duplicates on a found lesion are FPs for AP but ignored by FROC (LUNA16)."""
    gt = coco([1, 2], [(1, [0, 0, 10, 10]), (2, [30, 30, 10, 10])])
    preds = [P(1, [0, 0, 10, 10], 0.9)]
    preds += [P(1, [dx, 0, 10, 10], s) for dx, s in ((1, 0.85), (0.5, 0.84), (1.5, 0.83))]  # IoU >= 0.74
    preds += [P(2, [30, 30, 10, 10], 0.5)]
    r = froc(build_detection_data(gt, preds))
    assert r["sensitivity"] == [1.0] * 7 and r["cpm"] == 1.0  # no FP at all
    ap50 = coco_bbox_metrics(gt, preds)["metrics"]["AP50"]
    # COCO: TP(.9) FP FP FP TP(.5): precision 1 up to recall .5, then 2/5 -> (51*1 + 50*0.4)/101
    assert ap50 == pytest.approx(100 * (51 + 50 * 0.4) / 101)
    assert r["cpm"] * 100 - ap50 > 25


def test_center_rule_hits_where_iou_does_not():
    gt = coco([1], [(1, [0, 0, 10, 10])])
    preds = [P(1, [2, 2, 16, 16], 0.9)]  # centre (10, 10) on the truth edge; IoU 64/292
    d = build_detection_data(gt, preds)
    miss = froc(d, "iou", 0.5)  # 1 FP on 1 image, lesion missed: rates above 1 FP/image extended
    assert miss["sensitivity"] == [0.0] * 7 and miss["cpm"] == 0.0 and miss["extended_rates"] == [2.0, 4.0, 8.0]
    assert froc(d, "iou", 0.2)["cpm"] == 1.0
    rc = froc(d, "center")
    assert rc["cpm"] == 1.0 and rc["hit"] == "center" and rc["iou_thresh"] is None
    far = build_detection_data(gt, [P(1, [4, 4, 20, 20], 0.9)])  # centre (14, 14) outside
    h = froc_hits(far, "center")
    assert h.fp_score.tolist() == [0.9] and np.isneginf(h.truth_score).all()


def test_one_prediction_can_find_two_nested_lesions_and_any_class_counts():
    gt = coco([1], [(1, [0, 0, 20, 20]), (1, [5, 5, 10, 10])], cats=("benign", "malignant"))
    d = build_detection_data(gt, [P(1, [8, 8, 4, 4], 0.7, cat=2)])
    h = froc_hits(d, "center")
    assert h.truth_score.tolist() == [0.7, 0.7] and len(h.fp_score) == 0


def test_rates_use_average_over_all_images_and_nan_without_lesions():
    # 8 lesion-free images: 2 FPs -> 0.25 FP/image
    gt = coco(list(range(1, 10)), [(9, [0, 0, 10, 10])])
    preds = [P(1, [0, 0, 5, 5], 0.9), P(2, [0, 0, 5, 5], 0.8), P(9, [0, 0, 10, 10], 0.7)]
    r = froc(build_detection_data(gt, preds))
    assert r["sensitivity"][:3] == [0.0, 1.0, 1.0]  # 2 FP / 9 images = 0.22 <= 0.25
    empty = froc(build_detection_data(coco([1], []), [P(1, [0, 0, 5, 5], 0.9)]))
    assert math.isnan(empty["cpm"])


def test_sensitivity_at_rates_is_best_not_above_rate():
    fps = np.array([0.0, 0.1, 0.3, 0.3, 1.5])
    sens = np.array([0.0, 0.2, 0.4, 0.6, 0.9])
    assert sensitivity_at_rates(fps, sens, [0.05, 0.125, 0.3, 1.0, 2.0]).tolist() == [0.0, 0.2, 0.6, 0.6, 0.9]


def test_rates_beyond_the_curve_carry_its_last_value_and_are_flagged():
    """The curve ends at the last detection: higher rates take its end value (the detector has no more
    boxes to give), so a conservative model has a CPM; those rates are listed as extended."""
    gt = coco([1, 2, 3, 4], [(1, [0, 0, 10, 10]), (2, [0, 0, 10, 10]), (3, [0, 0, 10, 10])])
    preds = [P(1, [0, 0, 10, 10], 0.9), P(4, [50, 50, 5, 5], 0.8), P(2, [60, 60, 5, 5], 0.4)]
    r = froc(build_detection_data(gt, preds))
    # 2 FPs on 4 images: the curve ends at 0.5 FP/image with 1 of 3 lesions found
    assert r["max_fps_per_image"] == 0.5
    assert r["extended"] == [False, False, False, True, True, True, True]
    assert r["extended_rates"] == [1.0, 2.0, 4.0, 8.0]
    assert r["sensitivity"] == [pytest.approx(1 / 3)] * 7
    assert r["cpm"] == pytest.approx(1 / 3)
    # the same detections plus a lower-scoring FP that reaches 0.75 FP/image: the values are those of
    # a curve that really runs on, only 1 FP/image and beyond stay extended
    longer = froc(build_detection_data(gt, preds + [P(3, [70, 70, 5, 5], 0.1)]))
    assert longer["sensitivity"] == r["sensitivity"] and longer["extended_rates"] == [1.0, 2.0, 4.0, 8.0]
    # every lesion found: sensitivity 1 cannot rise, nothing is extended
    found = froc(build_detection_data(gt, preds + [P(2, [0, 0, 10, 10], 0.3), P(3, [0, 0, 10, 10], 0.2)]))
    assert found["extended_rates"] == [] and not any(found["extended"]) and found["sensitivity"][-1] == 1.0
    assert found["cpm"] == pytest.approx((1 / 3 * 2 + 1.0 * 5) / 7)  # both late TPs come at 0.5 FP/image

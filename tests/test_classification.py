"""Image-level lesion detection and malignancy classification on hand cases."""
import math

import numpy as np
import pytest

from usdet.evaluation.bootstrap import _AucStat
from usdet.evaluation.classification import binary_metrics, image_level, malignancy, top_score_per_image
from usdet.evaluation.inputs import build_detection_data


def coco(images, anns, cats):
    return {
        "images": [{"id": i, "width": 100, "height": 100} for i in images],
        "annotations": [
            {"id": k + 1, "image_id": im, "bbox": [0, 0, 10, 10], "category_id": c, "area": 100, "iscrowd": 0}
            for k, (im, c) in enumerate(anns)
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(cats)],
    }


def P(img, score, cat=1):
    return {"image_id": img, "bbox": [0, 0, 10, 10], "score": score, "category_id": cat}


def test_image_level_auc_and_threshold_metrics():
    # lesion images 1-4 (top scores .9, .8, .4, none), normal images 5-7 (.7, .3, none)
    gt = coco(range(1, 8), [(1, 1), (2, 1), (3, 1), (4, 1)], ["lesion"])
    preds = [P(1, 0.9), P(1, 0.2), P(2, 0.8), P(3, 0.4), P(5, 0.7), P(6, 0.3)]
    d = build_detection_data(gt, preds)
    assert top_score_per_image(d).tolist() == [0.9, 0.8, 0.4, 0.0, 0.7, 0.3, 0.0]
    r = image_level(d, score_thresh=0.45)
    # 12 lesion/normal pairs: .9 and .8 beat all 3, .4 beats 2, 0 ties one (1/2) -> 8.5/12
    assert r["auc"] == pytest.approx(8.5 / 12)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 2)
    assert r["sensitivity"] == pytest.approx(0.5)
    assert r["specificity"] == pytest.approx(2 / 3)
    assert r["ppv"] == pytest.approx(2 / 3)
    assert r["npv"] == pytest.approx(0.5)
    assert (r["num_lesion_images"], r["num_normal_images"]) == (4, 3)
    # the bootstrap's weighted Mann-Whitney AUC agrees with scikit-learn at unit weights
    y = d.gt_count_per_image() > 0
    auc = _AucStat(y, top_score_per_image(d), np.ones(7, bool))(np.ones((7, 1)))[0]
    assert auc == pytest.approx(8.5 / 12)


def test_auc_nan_with_one_class_and_ratios_nan_on_zero_division():
    d = build_detection_data(coco([1, 2], [], ["lesion"]), [P(1, 0.9)])
    r = image_level(d)
    assert math.isnan(r["auc"]) and math.isnan(r["sensitivity"]) and r["specificity"] == 0.5
    b = binary_metrics(np.array([True, False]), np.array([False, False]))
    assert math.isnan(b["ppv"]) and b["npv"] == 0.5


def test_malignancy_auc_confusion_matrix():
    cats = ["benign", "malignant"]
    # lesion images: 1 mal, 2 mal, 3 benign, 4 benign, 5 mal (missed); 6 normal (ignored)
    gt = coco(range(1, 7), [(1, 2), (2, 2), (3, 1), (4, 1), (5, 2)], cats)
    preds = [
        P(1, 0.9, 2), P(1, 0.6, 1),  # score .9-.6 = .3, call malignant
        P(2, 0.7, 1), P(2, 0.5, 2),  # -.2, call benign
        P(3, 0.8, 1),  # -.8, call benign
        P(4, 0.9, 2), P(4, 0.6, 1),  # .3 (same float as image 1), call malignant
        P(5, 0.2, 2),  # .2, below threshold -> no detection
        P(6, 0.99, 2),
    ]
    r = malignancy(build_detection_data(gt, preds), score_thresh=0.45)
    assert (r["num_images"], r["num_malignant"], r["num_benign"]) == (5, 3, 2)
    # malignant scores {.3, -.2, .2} vs benign {-.8, .3}: .3 beats -.8, ties .3 (1/2); -.2 beats -.8; .2 beats -.8
    assert r["auc"] == pytest.approx(3.5 / 6)
    cm = r["confusion_matrix"]
    assert cm["rows_truth"] == ["benign", "malignant"]
    assert cm["columns_predicted"] == ["benign", "malignant", "no detection"]
    assert cm["counts"] == [[1, 1, 0], [1, 1, 1]]
    assert r["sensitivity"] == pytest.approx(1 / 3)
    assert r["specificity"] == pytest.approx(1 / 2)


def test_malignancy_only_for_benign_malignant_sets():
    gt = coco([1], [(1, 1)], ["lesion"])
    assert malignancy(build_detection_data(gt, [P(1, 0.9)])) is None


def test_roc_hand_case_with_ties_and_one_class():
    from usdet.evaluation.classification import roc

    r = roc(np.array([1, 0, 1, 0], bool), np.array([0.9, 0.8, 0.8, 0.1]))
    # pairs: 0.9 beats both negatives, 0.8 ties one (1/2) and beats 0.1 -> 3.5 / 4
    assert r["auc"] == pytest.approx(0.875)
    assert r["tpr"] == [0.0, 0.5, 1.0, 1.0] and r["fpr"] == [0.0, 0.0, 0.5, 1.0]
    assert math.isnan(r["thresholds"][0]) and r["thresholds"][1:] == [0.9, 0.8, 0.1]
    one = roc(np.ones(3, bool), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(one["auc"]) and one["fpr"] == []

"""Penalized IoU against hand-computed cases, a brute-force reference, and the detectron2 evaluator."""
import json
import math

import numpy as np
import pytest

from usdet.evaluation.penalized_iou import SWEEP_THRESHOLDS, penalized_iou
from usdet.utils.io import dumps_json


def P(img, box, score, cat=1):
    return {"image_id": img, "bbox": list(box), "score": score, "category_id": cat}


# img1: two lesions; img2: FP only; img3: pred below s (TN); img4: nothing (TN); img5: missed lesion.
GTS = {
    1: [{"bbox": [0, 0, 10, 10], "category_id": 1}, {"bbox": [20, 20, 10, 10], "category_id": 1}],
    2: [],
    3: [],
    4: [],
    5: [{"bbox": [0, 0, 10, 10], "category_id": 1}],
}
PREDS = [
    P(1, [20, 20, 10, 10], 0.9),  # IoU 1 with the 2nd lesion
    P(1, [0, 0, 10, 5], 0.8),  # IoU 0.5 with the 1st
    P(1, [50, 50, 5, 5], 0.7),  # overlaps nothing
    P(2, [0, 0, 4, 4], 0.6),
    P(3, [0, 0, 4, 4], 0.2),
]


def test_multi_lesion_tn_fp_topk1():
    r = penalized_iou(GTS, PREDS, score_thresh=0.45, iou_thresh=0.0, topk=1)
    # img1 keeps only its best (IoU 1); its 1st lesion and img5's are FN; img2 FP; img3, img4 TN.
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 2, 2)
    assert r["score"] == pytest.approx(1.0 / 4)
    assert r["mean_iou_tp"] == pytest.approx(1.0)
    assert (r["score_thresh"], r["iou_thresh"], r["topk"]) == (0.45, 0.0, 1)


@pytest.mark.parametrize(
    "k, expected",
    [
        (2, dict(tp=2, fp=1, fn=1, tn=2, score=1.5 / 4)),
        # 3rd pred of img1: both lesions already taken -> FP
        (3, dict(tp=2, fp=2, fn=1, tn=2, score=1.5 / 5)),
    ],
)
def test_topk(k, expected):
    r = penalized_iou(GTS, PREDS, score_thresh=0.45, topk=k)
    assert {key: r[key] for key in expected if key != "score"} == {key: v for key, v in expected.items() if key != "score"}
    assert r["score"] == pytest.approx(expected["score"])
    assert r["mean_iou_tp"] == pytest.approx(0.75)


def test_sweep_and_best():
    r = penalized_iou(GTS, PREDS, score_thresh=0.45, topk=1)
    sw = r["sweep"]
    assert sw["score_thresh"] == pytest.approx(list(SWEEP_THRESHOLDS))
    by_s = dict(zip(np.round(sw["score_thresh"], 2), sw["score"]))
    assert by_s[0.05] == pytest.approx(1 / 5)  # img3's 0.2 pred kept -> 2 FP
    assert by_s[0.25] == pytest.approx(1 / 4)
    assert by_s[0.65] == pytest.approx(1 / 3)  # img2's 0.6 pred dropped
    assert by_s[0.95] == pytest.approx(0.0)  # nothing kept: 3 FN
    assert r["best_score"] == pytest.approx(1 / 3)
    assert r["best_score_thresh"] == pytest.approx(0.65)  # first s of the best value
    tn = dict(zip(np.round(sw["score_thresh"], 2), sw["tn"]))
    assert (tn[0.05], tn[0.25], tn[0.65]) == (1, 2, 3)


def test_iou_threshold_double_penalty():
    gts = {1: [{"bbox": [0, 0, 10, 10], "category_id": 1}]}
    preds = [P(1, [0, 0, 10, 2], 0.9)]  # IoU 0.2
    r0 = penalized_iou(gts, preds, iou_thresh=0.0)
    assert (r0["tp"], r0["fp"], r0["fn"]) == (1, 0, 0)
    assert r0["score"] == pytest.approx(0.2)
    r5 = penalized_iou(gts, preds, iou_thresh=0.5)
    # below t: the prediction is an FP AND its lesion an FN
    assert (r5["tp"], r5["fp"], r5["fn"]) == (0, 1, 1)
    assert r5["score"] == 0.0
    assert math.isnan(r5["mean_iou_tp"])


def test_t0_non_overlapping_prediction_is_zero_iou_match():
    gts = {1: [{"bbox": [0, 0, 10, 10], "category_id": 1}]}
    r = penalized_iou(gts, [P(1, [40, 40, 5, 5], 0.9)], iou_thresh=0.0)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0) and r["score"] == 0.0


@pytest.mark.parametrize("order, expected_sum", [("T1,T2", 1 / 3), ("T2,T1", 1 + 1 / 3)])
def test_greedy_ties_first_in_annotation_order(order, expected_sum):
    t1 = {"bbox": [0, 0, 10, 10], "category_id": 1}
    t2 = {"bbox": [10, 0, 10, 10], "category_id": 1}
    gts = {1: [t1, t2] if order == "T1,T2" else [t2, t1]}
    preds = [P(1, [5, 0, 10, 10], 0.9), P(1, [0, 0, 10, 10], 0.8)]  # 1st: IoU 1/3 with both
    r = penalized_iou(gts, preds, topk=2, iou_thresh=0.0)
    assert r["tp"] == 2
    assert r["score"] == pytest.approx(expected_sum / 2)
    # with t > 0, in order T1,T2 the 2nd prediction finds only T2 (IoU 0): FP, and T2 is an FN
    r = penalized_iou(gts, preds, topk=2, iou_thresh=0.1)
    if order == "T1,T2":
        assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
        assert r["score"] == pytest.approx((1 / 3) / 3)
    else:
        assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)


def test_nan_when_nothing_to_score():
    gts = {1: [], 2: []}
    r = penalized_iou(gts, [P(1, [0, 0, 5, 5], 0.1)], score_thresh=0.45)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (0, 0, 0, 2)
    assert math.isnan(r["score"])
    assert json.loads(dumps_json({"piou": r}))["piou"]["score"] is None
    r = penalized_iou(gts, [])
    assert math.isnan(r["best_score"]) and r["best_score_thresh"] is None


def test_class_aware():
    gts = {1: [{"bbox": [0, 0, 10, 10], "category_id": 1}]}  # benign
    preds = [P(1, [0, 0, 10, 10], 0.9, cat=2), P(1, [0, 0, 10, 5], 0.8, cat=1)]
    r = penalized_iou(gts, preds, topk=1)
    assert r["score"] == pytest.approx(1.0) and not r["class_aware"]
    r = penalized_iou(gts, preds, topk=1, class_aware=True)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1) and r["score"] == 0.0
    r = penalized_iou(gts, preds, topk=2, class_aware=True)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["score"] == pytest.approx(0.5 / 2)


def test_coco_dict_input_and_bare_boxes():
    coco = {
        "images": [{"id": 7, "width": 50, "height": 50}, {"id": 8, "width": 50, "height": 50}],
        "annotations": [{"id": 1, "image_id": 7, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "lesion"}],
    }
    preds = [P(7, [0, 0, 10, 5], 0.9)]
    assert penalized_iou(coco, preds)["score"] == pytest.approx(0.5)
    assert penalized_iou({7: [[0, 0, 10, 10]], 8: []}, preds)["score"] == pytest.approx(0.5)


# ---------------------------------------------------------------- brute-force reference
def _iou(a, b):
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _reference(gts, preds, s, t, k, class_aware):
    tp = fp = fn = tn = 0
    total = 0.0
    for img, anns in gts.items():
        mine = sorted([p for p in preds if p["image_id"] == img and p["score"] >= s], key=lambda p: -p["score"])[:k]
        taken = [False] * len(anns)
        for p in mine:
            best, bi = -1.0, -1
            for j, a in enumerate(anns):
                if taken[j] or (class_aware and a["category_id"] != p["category_id"]):
                    continue
                v = _iou(p["bbox"], a["bbox"])
                if v > best:
                    best, bi = v, j
            if bi >= 0 and best >= t:
                taken[bi] = True
                tp += 1
                total += best
            else:
                fp += 1
        fn += taken.count(False)
        if not anns and not mine:
            tn += 1
    den = tp + fp + fn
    return (total / den if den else float("nan")), tp, fp, fn, tn


@pytest.mark.parametrize("k, t, class_aware", [(1, 0.0, False), (3, 0.0, False), (3, 0.3, False), (2, 0.1, True)])
def test_matches_brute_force_reference(k, t, class_aware):
    rng = np.random.default_rng(k * 10 + int(t * 10))
    gts, preds = {}, []
    for img in range(40):
        anns = []
        for _ in range(rng.integers(0, 4)):
            x, y = rng.integers(0, 40, 2)
            anns.append({"bbox": [float(x), float(y), float(rng.integers(4, 20)), float(rng.integers(4, 20))],
                         "category_id": int(rng.integers(1, 3))})
        gts[img] = anns
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(0, 40, 2)
            preds.append(P(img, [float(x), float(y), float(rng.integers(4, 20)), float(rng.integers(4, 20))],
                           float(rng.uniform()), int(rng.integers(1, 3))))
    for s in (0.2, 0.45, 0.7):
        r = penalized_iou(gts, preds, score_thresh=s, iou_thresh=t, topk=k, class_aware=class_aware)
        ref = _reference(gts, preds, s, t, k, class_aware)
        assert (r["tp"], r["fp"], r["fn"], r["tn"]) == ref[1:]
        assert r["score"] == pytest.approx(ref[0])
    # every sweep point equals a fresh evaluation at that threshold
    for s, v in zip(r["sweep"]["score_thresh"], r["sweep"]["score"]):
        assert v == pytest.approx(_reference(gts, preds, s, t, k, class_aware)[0], nan_ok=True)


# ---------------------------------------------------------------- detectron2 evaluator
def test_detectron2_evaluator_matches_function():
    torch = pytest.importorskip("torch")
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode, Boxes, Instances

    from usdet.config import add_usdet_config
    from usdet.evaluation.evaluator import PenalizedIoUEvaluator

    name = "usdet_test_piou_evaluator"
    # records as detectron2 loads them: contiguous 0-based classes, XYXY boxes allowed
    records = [
        {"image_id": 1, "height": 64, "width": 64, "annotations": [
            {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {"bbox": [20, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]},
        {"image_id": 2, "height": 64, "width": 64, "annotations": []},
        {"image_id": 3, "height": 64, "width": 64, "annotations": [
            {"bbox": [5, 5, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 1}]},
    ]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)

    def inst(boxes_xyxy, scores):
        i = Instances((64, 64))
        i.pred_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
        i.scores = torch.tensor(scores, dtype=torch.float32)
        i.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
        return i

    cfg = get_cfg()
    add_usdet_config(cfg)
    cfg.TEST.PIOU.TOPK = 2
    cfg.TEST.PIOU.SCORE_THRESH = 0.5
    ev = PenalizedIoUEvaluator(name, cfg=cfg)
    assert (ev.topk, ev.score_thresh) == (2, 0.5)
    ev.reset()
    outputs = [
        {"instances": inst([[20, 20, 30, 30], [0, 0, 10, 5], [40, 40, 50, 50]], [0.9, 0.8, 0.7])},
        {"instances": inst([[0, 0, 4, 4]], [0.6])},
    ]
    ev.process([{"image_id": 1}, {"image_id": 2}], outputs)
    ev.process([{"image_id": 3}], [{"instances": inst([], [])}])
    res = ev.evaluate()
    p = res["piou"]
    # img1: IoU 1 + IoU 0.5 (XYXY [0,0,10,10] -> 10x10 box); img2: FP; img3: crowd only -> TN
    assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (2, 1, 0, 1)
    assert p["score"] == pytest.approx(1.5 / 3)
    assert all(isinstance(v, (int, float)) for v in p.values())  # flattenable for EventStorage
    gts = {1: [{"bbox": [0, 0, 10, 10], "category_id": 0}, {"bbox": [20, 20, 10, 10], "category_id": 0}], 2: [], 3: []}
    preds = [P(1, [20, 20, 10, 10], 0.9, 0), P(1, [0, 0, 10, 5], 0.8, 0), P(1, [40, 40, 10, 10], 0.7, 0), P(2, [0, 0, 4, 4], 0.6, 0)]
    ref = penalized_iou(gts, preds, score_thresh=0.5, topk=2)
    assert p["best_score"] == pytest.approx(ref["best_score"])
    # kwargs override the config
    ev2 = PenalizedIoUEvaluator(name, cfg=cfg, topk=1, distributed=False)
    ev2.process([{"image_id": 1}, {"image_id": 2}], outputs)
    assert ev2.evaluate()["piou"]["score"] == pytest.approx(1.0 / 3)
    DatasetCatalog.remove(name)

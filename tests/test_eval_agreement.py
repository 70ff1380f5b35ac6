"""One ground-truth cleaner and one ignore-region rule: the training-time evaluators and the report agree.

The set has what real exports carry: a degenerate box, an unknown category, a box past the
image edge, and ignore regions (COCO ``iscrowd: 1``) with detections inside them.
"""
import copy
import json
import math

import numpy as np
import pytest

from usdet.evaluation.report import evaluate_predictions

CATS = [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]


def ann(k, img, box, cat=1, crowd=0):
    return {"id": k, "image_id": img, "bbox": list(box), "category_id": cat, "area": box[2] * box[3], "iscrowd": crowd}


def det(img, box, score, cat=1):
    return {"image_id": img, "bbox": list(box), "score": score, "category_id": cat}


def dirty_gt():
    images = [{"id": i, "file_name": f"images/{i}.png", "width": 64, "height": 64} for i in range(1, 9)]
    anns = [
        ann(1, 1, [10, 10, 20, 20], 1),
        ann(2, 2, [30, 30, 20, 20], 2),
        ann(3, 3, [5, 5, 0, 12], 1),  # degenerate: dropped
        ann(4, 3, [20, 20, 10, 10], 9),  # unknown category: dropped
        ann(5, 4, [50, 40, 30, 20], 2),  # past the right edge: clipped to [50, 40, 14, 20]
        ann(6, 5, [0, 0, 30, 30], 1, crowd=1),  # ignore region on a lesion-free image
        ann(7, 6, [5, 5, 15, 15], 1),
        ann(8, 6, [35, 35, 25, 25], 1, crowd=1),  # ignore region beside a lesion
        ann(9, 7, [12, 12, 20, 20], 2),
    ]
    return {"images": images, "annotations": anns, "categories": CATS}


def detections():
    return [
        det(1, [11, 10, 20, 20], 0.9, 1),
        det(1, [40, 5, 10, 10], 0.3, 1),
        det(2, [30, 32, 20, 16], 0.8, 2),
        det(3, [20, 20, 10, 10], 0.7, 1),  # on the unknown-category box: an FP once it is dropped
        det(4, [50, 40, 14, 18], 0.6, 2),
        det(5, [2, 2, 20, 20], 0.95, 1),  # inside the ignore region: removed
        det(6, [38, 38, 15, 15], 0.99, 1),  # top-1 of image 6, inside the ignore region: removed first
        det(6, [5, 6, 15, 14], 0.5, 1),  # so this one is image 6's top-1 and a TP
        det(7, [12, 12, 20, 20], 0.4, 1),
        det(8, [30, 30, 8, 8], 0.2, 1),
    ]


@pytest.fixture(scope="module")
def trained_vs_report(tmp_path_factory):
    """Run detectron2's evaluators the trainer builds on a registered JSON, then the report on its output."""
    torch = pytest.importorskip("torch")
    from detectron2.config import get_cfg
    from detectron2.structures import Boxes, Instances

    from usdet.config import add_usdet_config
    from usdet.data.register import register_usdet_dataset
    from usdet.engine.trainer import Trainer

    tmp = tmp_path_factory.mktemp("agree")
    gt_path = tmp / "annotations" / "test.json"
    gt_path.parent.mkdir()
    gt_path.write_text(json.dumps(dirty_gt()))
    name = "usdet_test_agreement"
    register_usdet_dataset(name, str(gt_path), str(tmp))
    cfg = get_cfg()
    add_usdet_config(cfg)
    cfg.TEST.PIOU.SCORE_THRESH = 0.35
    out = tmp / "inference"
    evaluator = Trainer.build_evaluator(cfg, name, str(out))
    evaluator.reset()
    dets = detections()
    for i in range(1, 9):
        mine = [d for d in dets if d["image_id"] == i]
        inst = Instances((64, 64))
        xyxy = [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (d["bbox"] for d in mine)]
        inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in mine], dtype=torch.int64)
        evaluator.process([{"image_id": i}], [{"instances": inst}])
    trained = evaluator.evaluate()
    report = evaluate_predictions(str(gt_path), str(out / "coco_instances_results.json"), str(tmp / "report"),
                                  piou_score_thresh=0.35, bootstrap=0, plots=False)
    params = json.loads((out / "penalized_iou.json").read_text())["params"]
    return trained, report, params


def test_training_time_evaluators_and_report_agree_exactly(trained_vs_report):
    trained, report, _ = trained_vs_report
    for key in ("score", "tp", "fp", "fn", "tn", "best_score"):
        assert trained["piou"][key] == report["piou"][key], key
    for key in ("AP", "AP50", "AP75", "AP-benign", "AP-malignant"):
        a, b = trained["bbox"][key], report["bbox"][key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), key
    # the cleaned truth: 5 lesions (degenerate and unknown-category boxes dropped), 2 ignore regions
    assert report["inputs"]["num_truth_boxes"] == 5 and report["inputs"]["num_ignore_regions"] == 2
    assert report["inputs"]["num_predictions_in_ignore_regions"] == 2
    # s = 0.35, top-1: TPs on images 1, 2, 4, 6, 7; image 3 an FP; images 5 and 8 TN (5: its detection is ignored)
    assert (report["piou"]["tp"], report["piou"]["fp"], report["piou"]["fn"], report["piou"]["tn"]) == (5, 1, 0, 2)


def test_evaluation_parameters_are_configuration_not_metrics(trained_vs_report):
    trained, _, params = trained_vs_report
    assert not {"score_thresh", "iou_thresh", "topk", "class_aware"} & set(trained["piou"])
    assert params == {"score_thresh": 0.35, "iou_thresh": 0.0, "topk": 1, "class_aware": False}


def _without_ignored(gt, dets):
    """The same set with the ignore regions and the detections inside them taken out by hand."""
    gt = copy.deepcopy(gt)
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    dets = [d for d in dets if not (d["image_id"] in (5, 6) and d["score"] in (0.95, 0.99))]
    return gt, dets


def test_ignore_regions_equal_removing_their_detections_in_every_score(tmp_path):
    gt, dets = dirty_gt(), detections()
    with_ignore = evaluate_predictions(gt, dets, str(tmp_path / "a"), piou_score_thresh=0.35, bootstrap=50,
                                       plots=False)
    gt2, dets2 = _without_ignored(gt, dets)
    by_hand = evaluate_predictions(gt2, dets2, str(tmp_path / "b"), piou_score_thresh=0.35, bootstrap=50,
                                   plots=False)
    for section in ("piou", "froc", "image_level", "malignancy", "bbox", "bbox_agnostic", "bootstrap"):
        assert json.dumps(with_ignore[section], sort_keys=True) == json.dumps(by_hand[section], sort_keys=True), section
    # ignore regions are not lesions: image 5 (ignore region only) is a normal image, and a TN
    assert with_ignore["image_level"]["num_normal_images"] == 3 and with_ignore["froc"]["num_lesions"] == 5
    # without the rule the ignored detections would count: image 5 an FP, and image 6's top-1 (in the
    # region) would take its lesion at IoU 0 (t = 0), pushing out the good detection
    plain = evaluate_predictions(gt2, dets, str(tmp_path / "c"), piou_score_thresh=0.35, bootstrap=0, plots=False)
    assert plain["piou"]["fp"] == with_ignore["piou"]["fp"] + 1 and plain["piou"]["tn"] == with_ignore["piou"]["tn"] - 1
    assert plain["piou"]["mean_iou_tp"] < with_ignore["piou"]["mean_iou_tp"] - 0.1
    assert "2 detections inside ignore regions" in (tmp_path / "a" / "report.md").read_text()


def test_ignore_rule_keeps_matches_and_needs_half_the_detection_inside():
    from usdet.evaluation.inputs import build_detection_data

    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": CATS[:1],
          "annotations": [ann(1, 1, [0, 0, 20, 20]), ann(2, 1, [0, 0, 60, 60], crowd=1)]}
    dets = [
        det(1, [1, 0, 20, 20], 0.9),  # matches the lesion (inside the region too): kept
        det(1, [0, 1, 20, 20], 0.8),  # a duplicate: matches nothing, inside the region: removed
        det(1, [50, 50, 20, 20], 0.7),  # a quarter of it inside the region: kept (an FP)
        det(1, [40, 50, 20, 20], 0.6),  # half of it inside: removed
    ]
    d = build_detection_data(gt, dets)
    assert d.pred_scores.tolist() == [0.9, 0.7] and d.num_ignored_predictions == 2
    assert d.gt_boxes.tolist() == [[0, 0, 20, 20]] and d.ignore_boxes.tolist() == [[0, 0, 60, 60]]
    assert np.array_equal(d.ignore_image, [0])

"""evaluate_predictions end to end, bad inputs, COCO cross-check, bootstrap exactness, CLI."""
import json
import math

import numpy as np
import pytest

from usdet.evaluation.bootstrap import _Ap50Stat, _AucStat, _CpmStat, _PiouStat, bootstrap_metrics, resample_weights
from usdet.evaluation.classification import image_level, top_score_per_image
from usdet.evaluation.froc import froc
from usdet.evaluation.coco_metrics import coco_bbox_metrics
from usdet.evaluation.inputs import EvaluationInputError, build_detection_data
from usdet.evaluation.penalized_iou import match_penalized_iou, penalized_iou
from usdet.evaluation.report import evaluate_predictions
from train_helpers import load_tool

CATS = [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]


def ann(k, img, box, cat):
    return {"id": k, "image_id": img, "bbox": box, "category_id": cat, "area": box[2] * box[3], "iscrowd": 0}


def P(img, box, score, cat):
    return {"image_id": img, "bbox": box, "score": score, "category_id": cat}


HAND_GT = {
    "images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)],
    "annotations": [
        ann(1, 1, [10, 10, 20, 20], 1),  # benign
        ann(2, 2, [30, 30, 20, 20], 2),  # malignant
        ann(3, 4, [5, 5, 10, 10], 2),  # malignant, missed; image 3 is normal
    ],
    "categories": CATS,
}
HAND_PRED = [
    P(1, [10, 10, 20, 20], 0.9, 1),  # exact
    P(1, [10, 10, 20, 20], 0.3, 2),  # duplicate, wrong class, low score
    P(2, [30, 30, 20, 10], 0.8, 2),  # IoU 0.5
    P(3, [0, 0, 5, 5], 0.6, 1),  # FP on the normal image
]


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_end_to_end_hand_case(tmp_path):
    gt = write(tmp_path, "gt.json", HAND_GT)
    pred = write(tmp_path, "pred.json", HAND_PRED)
    out = tmp_path / "report"
    m = evaluate_predictions(gt, pred, str(out), bootstrap=200, seed=3)
    for f in ("metrics.json", "report.md", "pr_curves.png", "froc.png", "roc.png", "confusion_matrix.png",
              "piou_vs_score_thresh.png"):
        assert (out / f).is_file(), f
    disk = json.loads((out / "metrics.json").read_text())
    # penalized IoU (s=.45, k=1, t=0): TP 1 + TP .5, FP image 3, FN image 4
    p = disk["piou"]
    assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (2, 1, 1, 0)
    assert p["score"] == pytest.approx(1.5 / 4)
    # FROC: lesions found at .9 and .8 (IoU exactly .5 hits), FP .6 on 4 images, duplicate ignored
    f = disk["froc"]
    # the curve ends at 1 FP / 4 images: higher rates carry its end value, flagged as extended
    assert f["sensitivity"] == pytest.approx([2 / 3] * 7) and f["extended_rates"] == [0.5, 1, 2, 4, 8]
    assert f["cpm"] == pytest.approx(2 / 3) and f["max_fps_per_image"] == 0.25
    assert f["hit"] == "iou" and f["fps_per_image"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    # image level: lesion images top .9, .8, 0 vs normal .6
    il = disk["image_level"]
    assert il["auc"] == pytest.approx(2 / 3)
    assert (il["tp"], il["fp"], il["tn"], il["fn"]) == (2, 1, 0, 1)
    assert il["specificity"] == 0.0 and il["npv"] == 0.0
    assert disk["bbox"]["APl"] is None  # no large boxes: NaN written as null
    # malignancy: image 1 -0.6 (benign), image 2 +0.8, image 4 0 -> AUC 1
    mal = disk["malignancy"]
    assert mal["auc"] == pytest.approx(1.0)
    assert mal["confusion_matrix"]["counts"] == [[1, 0, 0], [0, 1, 1]]
    # COCO keys as detectron2 names them, equal to pycocotools
    ref = coco_bbox_metrics(HAND_GT, HAND_PRED, backend="pycocotools")["metrics"]
    assert set(disk["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-benign", "AP-malignant"}
    for k, v in ref.items():
        assert (disk["bbox"][k] is None and math.isnan(v)) or disk["bbox"][k] == pytest.approx(v)
    assert "AP50" in disk["bbox_agnostic"]
    b = disk["bootstrap"]
    assert b["n_resamples"] == 200 and b["seed"] == 3
    assert set(b["metrics"]) == {"AP50", "piou", "cpm", "image_auc", "malignancy_auc"}
    lo, hi = b["metrics"]["piou"]["low"], b["metrics"]["piou"]["high"]
    assert 0 <= lo <= p["score"] <= hi <= 1
    assert disk["warnings"] == []
    md = (out / "report.md").read_text()
    assert "IoU >= 0.5" in md and "s = 0.45" in md and "top-k = 1" in md
    assert "| sensitivity | 0.667 | 0.667 | 0.667* | 0.667* | 0.667* | 0.667* | 0.667* | 0.667* |" in md
    assert "the curve ends at 0.250 FP/image before finding every lesion" in md
    assert "at 0.5, 1, 2, 4, 8 FP/image the sensitivity is the curve's last value carried on" in md
    assert "Bootstrap 95% confidence intervals" in md and "200 resamples" in md
    for png in disk["plots"].values():
        assert f"]({png})" in md
    # returned dict is what was written
    assert m["piou"]["score"] == pytest.approx(p["score"])


def test_options_reach_the_metrics(tmp_path):
    gt = write(tmp_path, "gt.json", HAND_GT)
    m = evaluate_predictions(gt, HAND_PRED, str(tmp_path / "o"), piou_topk=2, piou_iou_thresh=0.6,
                             piou_class_aware=True, froc_hit="center", score_thresh=0.7, bootstrap=0, plots=False)
    assert m["piou"]["topk"] == 2 and m["piou"]["iou_thresh"] == 0.6 and m["piou"]["class_aware"]
    # image 2's IoU-0.5 pred is below t: FP + FN; image 1: TP 1 (+ its 2nd pred below s)
    assert (m["piou"]["tp"], m["piou"]["fp"], m["piou"]["fn"]) == (1, 2, 2)
    assert m["froc"]["hit"] == "center" and m["image_level"]["score_thresh"] == 0.7
    assert "bootstrap" not in m and m["plots"] == {}
    assert "prediction centre inside the truth box" in (tmp_path / "o" / "report.md").read_text()


def test_bad_inputs_are_reported_and_the_rest_scored(tmp_path):
    gt = json.loads(json.dumps(HAND_GT))
    gt["annotations"] += [
        ann(10, 3, [5, 5, -4, 8], 1),  # negative width: dropped
        ann(11, 99, [5, 5, 4, 8], 1),  # unknown image: dropped
        ann(12, 3, [60, 60, 10, 10], 1),  # outside the 64x64 image: kept, reported
    ]
    gt_path = write(tmp_path, "bad_gt.json", gt)
    preds = HAND_PRED + [
        P(42, [0, 0, 5, 5], 0.9, 1),  # unknown image id
        P(1, [0, 0, 5, 5], 0.9, 7),  # unknown category
        {"image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 1},  # no score
        P(1, [0, 0, float("nan"), 5], 0.9, 1),
        P([1], [0, 0, 5, 5], 0.9, 1),  # unhashable image id
    ]
    pred_path = str(tmp_path / "bad_pred.json")
    with open(pred_path, "w") as fh:
        json.dump(preds, fh)  # NaN as JSON NaN (Python writes it)
    m = evaluate_predictions(gt_path, pred_path, str(tmp_path / "o"), bootstrap=0, plots=False)
    w = "\n".join(m["warnings"])
    assert "bad_gt.json: 1 annotations with a non-positive bbox width or height (dropped): 10" in w
    assert "bad_gt.json: 1 annotations of an unknown image_id (dropped): 11" in w
    assert "bad_gt.json: 1 annotations whose bbox extends outside the image (clipped to the image): 12" in w
    assert "bad_pred.json: ignored 2 detection(s) with unknown image_id (not in the ground truth) (42, [1])" in w
    assert "bad_pred.json: ignored 1 detection(s) with unknown category_id (7)" in w
    assert "bad_pred.json: ignored 1 detection(s) with missing key(s) score" in w
    assert "bad_pred.json: ignored 1 detection(s) with bbox that is not 4 finite numbers" in w
    assert m["inputs"]["num_predictions"] == 4 and m["inputs"]["num_predictions_ignored"] == 5
    assert m["inputs"]["num_truth_boxes"] == 4  # 3 + the out-of-image one (clipped to [60, 60, 4, 4])
    # image 3 now has a lesion (at the image corner): with t = 0 its prediction matches it at IoU 0
    assert (m["piou"]["tp"], m["piou"]["fp"], m["piou"]["fn"]) == (3, 0, 1)
    assert m["piou"]["score"] == pytest.approx(1.5 / 4)
    assert "## Input problems" in (tmp_path / "o" / "report.md").read_text()


def test_unusable_files_raise_naming_the_file(tmp_path):
    gt = write(tmp_path, "gt.json", HAND_GT)
    with pytest.raises(EvaluationInputError, match="missing.json: ground-truth file not found"):
        evaluate_predictions(str(tmp_path / "missing.json"), [], str(tmp_path / "o"))
    no_images = write(tmp_path, "noimg.json", {"annotations": [], "categories": CATS})
    with pytest.raises(EvaluationInputError, match="noimg.json: missing top-level key 'images'"):
        evaluate_predictions(no_images, [], str(tmp_path / "o"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, ')
    with pytest.raises(EvaluationInputError, match="broken.json: not valid JSON"):
        evaluate_predictions(gt, str(broken), str(tmp_path / "o"))
    as_dict = write(tmp_path, "dict_pred.json", {"image_id": 1})
    with pytest.raises(EvaluationInputError, match="dict_pred.json: expected a list of detections"):
        evaluate_predictions(gt, as_dict, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="froc_hit"):
        evaluate_predictions(gt, [], str(tmp_path / "o"), froc_hit="centre")


def test_no_predictions_gives_nan_not_crash(tmp_path):
    gt = write(tmp_path, "gt.json", HAND_GT)
    m = evaluate_predictions(gt, [], str(tmp_path / "o"), bootstrap=50)
    assert math.isnan(m["bbox"]["AP"]) and m["piou"]["score"] == 0.0 and m["froc"]["cpm"] == 0.0
    assert m["froc"]["extended_rates"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]  # no detection: every rate carried
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["bbox"]["AP"] is None


def random_case(seed, n_images=60, ncls=2):
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 128, "height": 128} for i in range(n_images)]
    anns, preds = [], []
    for i in range(n_images):
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 90, 2)
            w, h = rng.uniform(4, 40, 2)
            c = int(rng.integers(1, ncls + 1))
            anns.append(ann(len(anns) + 1, i + 1, [x, y, w, h], c))
            if rng.uniform() < 0.7:
                preds.append(P(i + 1, list(np.array([x, y, w, h]) + rng.normal(0, 3, 4)), float(rng.uniform(0.2, 1)), c))
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 90, 2)
            w, h = rng.uniform(4, 40, 2)
            preds.append(P(i + 1, [x, y, w, h], float(rng.uniform(0, 0.8)), int(rng.integers(1, ncls + 1))))
    for p in preds:
        p["bbox"] = [float(v) for v in p["bbox"]]
        p["bbox"][2] = abs(p["bbox"][2]) + 1
        p["bbox"][3] = abs(p["bbox"][3]) + 1
    return {"images": images, "annotations": anns, "categories": CATS[:ncls]}, preds


def test_coco_metrics_match_pycocotools_on_random_case():
    gt, preds = random_case(0)
    fast = coco_bbox_metrics(gt, preds)["metrics"]
    ref = coco_bbox_metrics(gt, preds, backend="pycocotools")["metrics"]
    assert set(fast) == set(ref)
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), k
    # the bootstrap's AP50 at unit weights is COCO's AP50
    d = build_detection_data(gt, preds)
    assert _Ap50Stat(d)(np.ones((d.num_images, 1)))[0] == pytest.approx(ref["AP50"], abs=1e-9)


def _resampled(gt, preds, counts):
    """The resampled data set made explicit: each image copied counts[i] times under new ids."""
    images, anns, out = [], [], []
    for i, im in enumerate(gt["images"]):
        for c in range(int(counts[i])):
            nid = len(images) + 1
            images.append(dict(im, id=nid))
            anns += [dict(a, image_id=nid) for a in gt["annotations"] if a["image_id"] == im["id"]]
            out += [dict(p, image_id=nid) for p in preds if p["image_id"] == im["id"]]
    for k, a in enumerate(anns):
        a["id"] = k + 1
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


def test_bootstrap_weighted_sums_equal_reevaluating_a_resample():
    gt, preds = random_case(1)
    d = build_detection_data(gt, preds)
    counts = resample_weights(np.random.default_rng(5), d.num_images, 1)[:, 0]
    rgt, rpreds = _resampled(gt, preds, counts)
    m = match_penalized_iou(d)
    assert _PiouStat(m, 0.45)(counts[:, None])[0] == pytest.approx(penalized_iou(rgt, rpreds)["score"])
    ref_ap50 = coco_bbox_metrics(rgt, rpreds, backend="pycocotools")["metrics"]["AP50"]
    assert _Ap50Stat(d)(counts[:, None])[0] == pytest.approx(ref_ap50, abs=1e-6)
    rd = build_detection_data(rgt, rpreds)
    for hit in ("iou", "center"):
        ref = froc(rd, hit)["cpm"]
        assert _CpmStat(d, hit, 0.5)(counts[:, None])[0] == pytest.approx(ref, nan_ok=True)
    auc = _AucStat(d.gt_count_per_image() > 0, top_score_per_image(d), np.ones(d.num_images, bool))
    assert auc(counts[:, None])[0] == pytest.approx(image_level(rd)["auc"])


def test_bootstrap_is_seeded():
    gt, preds = random_case(2)
    d = build_detection_data(gt, preds)
    a = bootstrap_metrics(d, 100, seed=1)
    b = bootstrap_metrics(d, 100, seed=1)
    c = bootstrap_metrics(d, 100, seed=2)
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(c)
    assert set(a["metrics"]) == {"AP50", "piou", "cpm", "image_auc", "malignancy_auc"}
    # about 2.5 FPs per image: 4 and 8 FP/image are extended, yet every resample has a CPM
    f = froc(d)
    assert f["extended_rates"] == [4.0, 8.0] and a["metrics"]["cpm"]["estimate"] == pytest.approx(f["cpm"])
    for k, v in a["metrics"].items():
        assert v["low"] <= v["high"] and v["n_valid"] == 100, k
    assert a["metrics"]["cpm"]["low"] < f["cpm"] < a["metrics"]["cpm"]["high"]


def test_evaluate_json_cli(tmp_path, capsys):
    tool = load_tool("evaluate_json")
    gt = write(tmp_path, "gt.json", HAND_GT)
    pred = write(tmp_path, "pred.json", HAND_PRED)
    out = tmp_path / "cli"
    rc = tool.main(["--gt", gt, "--pred", pred, "--output", str(out), "--piou-topk", "2", "--froc-hit", "center",
                    "--bootstrap", "20", "--seed", "1", "--no-plots"])
    assert rc == 0
    disk = json.loads((out / "metrics.json").read_text())
    assert disk["piou"]["topk"] == 2 and disk["froc"]["hit"] == "center" and disk["bootstrap"]["n_resamples"] == 20
    assert not list(out.glob("*.png"))
    assert "piou=" in capsys.readouterr().out
    assert tool.main(["--gt", str(tmp_path / "nope.json"), "--pred", pred, "--output", str(out)]) == 2
    assert "nope.json: ground-truth file not found" in capsys.readouterr().err


def test_class_agnostic_run_in_a_forked_child_equals_sequential():
    from usdet.evaluation.coco_metrics import class_agnostic, coco_bbox_metrics_and_agnostic

    gt, preds = random_case(3)
    seq = coco_bbox_metrics_and_agnostic(gt, [dict(p) for p in preds], parallel=False)
    par = coco_bbox_metrics_and_agnostic(gt, [dict(p) for p in preds], parallel=True)
    assert seq[0]["metrics"] == pytest.approx(par[0]["metrics"], nan_ok=True)
    assert seq[1]["metrics"] == pytest.approx(par[1]["metrics"], nan_ok=True)
    ref = coco_bbox_metrics(*class_agnostic(gt, preds), backend="pycocotools")["metrics"]
    assert par[1]["metrics"]["AP50"] == pytest.approx(ref["AP50"]) and "AP-lesion" in par[1]["metrics"]


def test_report_with_forked_side_job_equals_in_process(tmp_path, monkeypatch):
    import usdet.evaluation.report as report_mod
    from usdet.evaluation.parallel import can_fork

    if not can_fork():
        pytest.skip("no fork or a single CPU")
    gt, preds = random_case(4)
    here = evaluate_predictions(gt, preds, str(tmp_path / "a"), bootstrap=50, plots=False)
    monkeypatch.setattr(report_mod, "PARALLEL_MIN_DETECTIONS", 1)
    forked = evaluate_predictions(gt, preds, str(tmp_path / "b"), bootstrap=50, plots=False)
    for key in ("bbox", "bbox_agnostic", "bootstrap", "piou", "froc"):
        assert json.dumps(here[key], sort_keys=True) == json.dumps(forked[key], sort_keys=True), key


def test_non_integer_image_ids_are_scored(tmp_path):
    gt = {"images": [{"id": "a"}, {"id": "b"}], "categories": [{"id": 3, "name": "lesion"}],
          "annotations": [{"id": 1, "image_id": "a", "bbox": [0, 0, 5, 5], "category_id": 3}]}
    preds = [P("a", [0, 0, 5, 5], 0.9, 3), {"image_id": "b", "bbox": [0, 0, 5, 5], "score": 0.2}]  # 1 class: id implied
    m = evaluate_predictions(gt, preds, str(tmp_path), bootstrap=10, plots=False)
    assert m["bbox"]["AP50"] == pytest.approx(100.0) and m["bbox"]["AP-lesion"] == pytest.approx(100.0)
    assert m["piou"]["score"] == 1.0 and m["piou"]["tn"] == 1 and m["inputs"]["num_predictions"] == 2

"""benchmarks/peer_yolo.py's data side (no Ultralytics needed): usdet COCO -> YOLO labels -> COCO results."""
import importlib.util
import json
import os

import pytest

from train_helpers import REPO


def _peer():
    spec = importlib.util.spec_from_file_location("peer_yolo", os.path.join(REPO, "benchmarks", "peer_yolo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_yolo_labels_round_trip_to_coco_results(tmp_path):
    from usdet.data.phantom import make_phantom_dataset

    root = make_phantom_dataset(str(tmp_path / "ph"), num_images=10, size=96, seed=3, classes="benign,malignant")
    peer = _peer()
    info = peer.coco_to_yolo(root, str(tmp_path / "yolo"))
    test = json.load(open(os.path.join(root, "annotations", "test.json")))
    assert info["names"] == ["benign", "malignant"] and info["splits"]["test"]["images"] == len(test["images"])
    by_id = {im["id"]: im for im in test["images"]}
    fake = []
    for fname, image_id in info["splits"]["test"]["files"].items():
        # every image is linked, not copied
        assert os.path.islink(tmp_path / "yolo" / "images" / "test" / fname)
        lines = open(tmp_path / "yolo" / "labels" / "test" / (os.path.splitext(fname)[0] + ".txt")).read().split()
        anns = [a for a in test["annotations"] if a["image_id"] == image_id]
        assert len(lines) == 5 * len(anns)  # lesion-free image: empty label file
        w, h = by_id[image_id]["width"], by_id[image_id]["height"]
        for k, a in enumerate(anns):
            c, cx, cy, bw, bh = (float(v) for v in lines[5 * k:5 * k + 5])
            assert info["category_ids"][int(c)] == a["category_id"]
            box = [cx * w - bw * w / 2, cy * h - bh * h / 2, bw * w, bh * h]
            assert box == pytest.approx(a["bbox"], abs=1e-3)
            fake.append({"file": fname, "bbox": box, "score": 0.9, "cls": int(c)})
    preds = peer.to_coco_results({"detections": fake}, info)
    truth = sorted((a["image_id"], a["category_id"]) for a in test["annotations"])
    assert sorted((p["image_id"], p["category_id"]) for p in preds) == truth
    from usdet.evaluation.report import evaluate_predictions

    m = evaluate_predictions(os.path.join(root, "annotations", "test.json"), preds, str(tmp_path / "ev"),
                             bootstrap=0, plots=False)
    assert m["bbox"]["AP50"] == pytest.approx(100.0)
    yaml_text = open(info["yaml"]).read()
    assert "train: images/train" in yaml_text and "1: malignant" in yaml_text

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
    preds = peer.to_coco_results({"detections": {"test": fake}}, info)
    truth = sorted((a["image_id"], a["category_id"]) for a in test["annotations"])
    assert sorted((p["image_id"], p["category_id"]) for p in preds) == truth
    from usdet.evaluation.report import evaluate_predictions

    m = evaluate_predictions(os.path.join(root, "annotations", "test.json"), preds, str(tmp_path / "ev"),
                             bootstrap=0, plots=False)
    assert m["bbox"]["AP50"] == pytest.approx(100.0)
    yaml_text = open(info["yaml"]).read()
    assert "train: images/train" in yaml_text and "1: malignant" in yaml_text


def _peer_venv():
    """benchmarks/.venv-peer, or $USDET_PEER_VENV (a worktree can use the main checkout's)."""
    venv = os.environ.get("USDET_PEER_VENV") or _peer().PEER_VENV
    if not os.path.isfile(os.path.join(venv, ".peer-ready")):
        pytest.skip(f"{venv} is not set up (benchmarks/peer_yolo.py creates it on first use, installing Ultralytics "
                    "from PyPI; this test does not)")
    return venv


def test_driver_trains_and_predicts_at_a_tiny_budget_in_the_peer_venv(tmp_path):
    """The driver script embedded in peer_yolo.py, run as the benchmark runs it, in the peer's venv."""
    from usdet.data.phantom import make_phantom_dataset

    venv = _peer_venv()
    peer = _peer()
    root = make_phantom_dataset(str(tmp_path / "ph"), num_images=10, size=64, seed=4, classes="benign,malignant")
    info = peer.coco_to_yolo(root, str(tmp_path / "yolo"))
    work = tmp_path / "work"
    work.mkdir()
    res = peer.run_peer(peer.peer_python(venv), info, str(work), budget_min=0.05, device="cpu", imgsz=64, batch=2,
                        workers=0, seed=0, log=str(tmp_path / "peer_log.txt"), threads=1)
    assert res["epochs"] >= 1 and res["train_seconds"] > 0 and res["wall_seconds"] >= res["train_seconds"]
    assert os.path.isfile(res["weights"]) and os.path.basename(res["weights"]) in ("best.pt", "last.pt")
    test_files = info["splits"]["test"]["files"]
    assert set(res["detections"]) == {"test"} and res["infer_images_per_s"]["test"] > 0  # batch-1 rate
    assert {d["file"] for d in res["detections"]["test"]} <= set(test_files)
    assert all(d["score"] >= 0.001 for d in res["detections"]["test"])  # the stated test-time cap
    for d in res["detections"]["test"]:
        assert d["cls"] in (0, 1) and 0 <= d["score"] <= 1 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0
    preds = peer.to_coco_results(res, info)
    assert len(preds) == len(res["detections"]["test"])
    assert {p["image_id"] for p in preds} <= set(test_files.values())
    assert {p["category_id"] for p in preds} <= set(info["category_ids"])
    from usdet.evaluation.report import evaluate_predictions

    m = evaluate_predictions(os.path.join(root, "annotations", "test.json"), preds, str(tmp_path / "ev"), bootstrap=0,
                             plots=False)
    assert m["inputs"]["num_images"] == info["splits"]["test"]["images"] and m["warnings"] == []

"""cross_validate: K = 3 folds on phantoms with the quick schedule, pooled predictions, resume."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from train_helpers import QUICK_CFG, load_tool

OPTS = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]


@pytest.fixture
def dataset(tmp_path):
    """18 phantoms whose images come in pairs of one patient (group), spread over the splits."""
    from usdet.data.phantom import make_phantom_dataset

    root = tmp_path / "ph"
    make_phantom_dataset(str(root), num_images=18, size=96, seed=0, classes="lesion")
    for f in (root / "annotations").glob("*.json"):
        doc = json.loads(f.read_text())
        for im in doc["images"]:
            im["group"] = f"patient{(im['id'] - 1) // 2}"
        f.write_text(json.dumps(doc))
    return root


def _load(path):
    return json.loads(open(path).read())


def test_three_folds_pooled_and_resume(dataset, tmp_path, capsys):
    tool = load_tool("cross_validate")
    out = tmp_path / "cv"
    args = ["--config-file", QUICK_CFG, "--dataset-root", str(dataset), "--folds", "3", "--output", str(out),
            "--bootstrap", "50", "--in-process", *OPTS]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tool.main(args) == 0, capsys.readouterr().err
        # folds: each image tested once, train/val/test disjoint, a patient's images never split
        tested = []
        for k in range(3):
            parts = {p: _load(out / "folds" / f"fold{k}" / "annotations" / f"{p}.json") for p in ("train", "val", "test")}
            names = {p: {im["file_name"] for im in d["images"]} for p, d in parts.items()}
            assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
            assert len(names["train"] | names["val"] | names["test"]) == 18
            for p, d in parts.items():
                groups = {im["group"] for im in d["images"]}
                others = [im["group"] for q, e in parts.items() if q != p for im in e["images"]]
                assert not groups & set(others), (k, p)
                assert all(os.path.isfile(out / "folds" / f"fold{k}" / im["file_name"]) for im in d["images"])
            tested += sorted(names["test"])
        assert len(tested) == len(set(tested)) == 18
        assert os.path.islink(out / "folds" / "fold0" / "images")  # linked, not copied

        s = _load(out / "cv_summary.json")
        pooled = _load(out / "pooled_predictions.json")
        n_pred = 0
        for k, f in enumerate(s["per_fold"]):
            m = _load(out / f"fold{k}" / "inference" / f"fold{k}_test" / "metrics.json")
            assert f["metrics"]["penalized IoU"] == m["piou"]["score"]
            assert f["num_images"] == m["inputs"]["num_images"]
            n_pred += len(_load(out / f"fold{k}" / "inference" / f"fold{k}_test" / "coco_instances_results.json"))
        assert len(pooled) == n_pred > 0
        auc = [f["metrics"]["image AUC"] for f in s["per_fold"]]
        assert s["mean_sd"]["image AUC"]["mean"] == pytest.approx(np.mean(auc))
        assert s["mean_sd"]["image AUC"]["sd"] == pytest.approx(np.std(auc, ddof=1))
        pm = _load(out / "pooled" / "metrics.json")
        assert s["pooled"]["num_images"] == pm["inputs"]["num_images"] == 18
        assert s["pooled"]["metrics"]["penalized IoU"]["low"] == pm["bootstrap"]["metrics"]["piou"]["low"]
        assert (out / "cv_summary.png").stat().st_size > 1000 and "| pooled | 18 |" in (out / "cv_summary.md").read_text()

        # pooling keeps each prediction on its image: a fold's test ids are the pooled ground truth's ids
        gt = _load(out / "pooled_gt.json")
        pooled_name = {im["id"]: im["file_name"] for im in gt["images"]}
        for k in range(3):
            fold = _load(out / "folds" / f"fold{k}" / "annotations" / "test.json")
            fold_name = {im["id"]: im["file_name"] for im in fold["images"]}
            preds = _load(out / f"fold{k}" / "inference" / f"fold{k}_test" / "coco_instances_results.json")
            assert preds and all(pooled_name[p["image_id"]] == fold_name[p["image_id"]] for p in preds)
        # the pooled image AUC, recomputed here from the pooled file (top score per image, 0 where none)
        lesion = {a["image_id"] for a in gt["annotations"]}
        top = {i: 0.0 for i in pooled_name}
        for p in pooled:
            top[p["image_id"]] = max(top[p["image_id"]], p["score"])
        pos, neg = [top[i] for i in top if i in lesion], [top[i] for i in top if i not in lesion]
        assert pos and neg
        auc = float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg]))
        assert s["pooled"]["metrics"]["image AUC"]["estimate"] == pytest.approx(auc, abs=1e-9)

        # compare_models reads the pooled files: the pooled model against an oracle (each truth box at
        # score 1); top-1 penalized IoU of the oracle = lesion images / truth boxes (a second box is an FN)
        from usdet.evaluation.compare import compare_models

        oracle = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt["annotations"]]
        c = compare_models(str(out / "pooled_gt.json"), {"pooled": str(out / "pooled_predictions.json"),
                                                         "oracle": oracle}, n_resamples=200)
        assert c["num_images"] == 18
        piou = c["metrics"]["piou"]
        assert piou["values"]["pooled"] == pytest.approx(s["pooled"]["metrics"]["penalized IoU"]["estimate"])
        assert piou["values"]["oracle"] == pytest.approx(len(lesion) / len(gt["annotations"]))
        assert piou["delta"]["estimate"] == pytest.approx(piou["values"]["oracle"] - piou["values"]["pooled"])
        image_auc = c["metrics"]["image_auc"]
        assert image_auc["values"] == {"pooled": pytest.approx(auc, abs=1e-9), "oracle": 1.0}
        assert image_auc["delta"]["estimate"] == pytest.approx(1.0 - auc, abs=1e-9)

        # a CV killed in fold 2 after its first checkpoint: folds 0 and 1 are skipped, fold 2 resumes
        before = {k: os.path.getmtime(out / f"fold{k}" / "inference" / f"fold{k}_test" / "metrics.json") for k in (0, 1)}
        preds2 = _load(out / "fold2" / "inference" / "fold2_test" / "coco_instances_results.json")
        shutil.rmtree(out / "fold2" / "inference" / "fold2_test")
        for f in ("model_final.pth", "model_0000001.pth", "model_best.pth", "best_metric.json"):
            (out / "fold2" / f).unlink()
        (out / "fold2" / "last_checkpoint").write_text("model_0000000.pth")
        assert tool.main(args) == 0, capsys.readouterr().err
        for k in (0, 1):
            assert os.path.getmtime(out / f"fold{k}" / "inference" / f"fold{k}_test" / "metrics.json") == before[k]
        assert "Starting training from iteration 1" in (out / "fold2" / "log.txt").read_text()
        assert _load(out / "fold2" / "inference" / "fold2_test" / "coco_instances_results.json") == preds2
    finally:
        torch.set_num_threads(n)

    # another partition into the same folder is refused; --print-commands runs nothing
    assert tool.main([*args[:5], "4", *args[6:]]) == 2
    assert "holds a CV with" in capsys.readouterr().err
    assert tool.main(["--config-file", QUICK_CFG, "--dataset-root", str(dataset), "--folds", "3",
                      "--output", str(tmp_path / "cmds"), "--print-commands", *OPTS]) == 0
    text = capsys.readouterr().out
    assert text.count("# fold") == 3 and text.count("--resume") == 3 and text.count("--eval-only") == 3
    assert f"USDET_DATASETS={tmp_path / 'cmds' / 'folds'}" in text
    assert (tmp_path / "cmds" / "folds" / "fold2" / "annotations" / "test.json").is_file()
    assert not (tmp_path / "cmds" / "fold0").exists()

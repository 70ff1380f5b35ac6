"""cross_eval: two tiny models x two phantom datasets through the engine's --eval-only path."""
import json
import math
import os

import pytest
import torch

from train_helpers import QUICK_CFG, load_tool, make_datasets_root, quick_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Datasets root and a 4-iteration quick run with checkpoints after iterations 2 and 4."""
    from usdet.engine import Trainer

    root = make_datasets_root(str(tmp_path_factory.mktemp("xeval_datasets")))
    out = tmp_path_factory.mktemp("xeval_run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = quick_cfg(out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0")
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(n)
    return root, out


def _top_scores(predictions, dataset):
    """(top detection score or 0, has a lesion) of each image of a registered dataset."""
    from detectron2.data import MetadataCatalog

    gt = json.loads(open(MetadataCatalog.get(dataset).json_file).read())
    lesion = {a["image_id"] for a in gt["annotations"]}
    top = {im["id"]: 0.0 for im in gt["images"]}
    for p in json.loads(open(predictions).read()):
        top[p["image_id"]] = max(top[p["image_id"]], p["score"])
    return [(t, i in lesion) for i, t in top.items()]


def _calls_at(thresh, dataset, predictions):
    calls = [(t >= thresh, lesion) for t, lesion in _top_scores(predictions, dataset)]
    return {"tp": sum(c and y for c, y in calls), "fn": sum(y and not c for c, y in calls),
            "tn": sum(not c and not y for c, y in calls), "fp": sum(c and not y for c, y in calls)}


def test_cross_eval_table_matches_each_report(trained, tmp_path, capsys):
    root, run = trained
    tool = load_tool("cross_eval")
    out = tmp_path / "xe"
    torch.set_num_threads(1)
    rc = tool.main(["--config-file", QUICK_CFG, "--weights", f"early={run / 'model_0000001.pth'}",
                    "--weights", f"final={run / 'model_final.pth'}", "--val-dataset", "ph1_val",
                    "--target-sensitivity", "0.9", "--bootstrap", "50", "--output", str(out),
                    "--datasets", "ph1_val", "ph1_test", "MODEL.DEVICE", "cpu"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "cross_eval.json").read_text())
    assert [(x["model"], x["dataset"]) for x in r["rows"]] == [
        ("early", "ph1_val"), ("early", "ph1_test"), ("final", "ph1_val"), ("final", "ph1_test")]
    calls = {}
    for row in r["rows"]:
        m = json.loads((out / row["model"] / "inference" / row["dataset"] / "metrics.json").read_text())
        assert row["num_images"] == m["inputs"]["num_images"] > 0
        # every phantom split has lesions: AP50 is a number (COCO's NaN means "no truth"), the report's
        assert math.isfinite(m["bbox"]["AP50"]) and row["metrics"]["AP50"]["estimate"] == m["bbox"]["AP50"]
        assert row["metrics"]["penalized IoU"]["estimate"] == m["piou"]["score"]
        assert row["metrics"]["penalized IoU"]["low"] == m["bootstrap"]["metrics"]["piou"]["low"]
        assert m["bootstrap"]["n_resamples"] == 50
        calls[row["model"], row["dataset"]] = _calls_at(row["operating_point"]["score_thresh"], row["dataset"],
                                                       out / row["predictions"])
        op = row["operating_point"]
        # each set's calls at the threshold, recounted here from that set's own predictions
        assert {k: op["test"][k] for k in ("tp", "fn", "tn", "fp")} == calls[row["model"], row["dataset"]]
    for model in ("early", "final"):
        # the threshold is the highest val score that still calls 90% of the val lesion images
        op = next(x["operating_point"] for x in r["rows"] if x["model"] == model)
        tops = _top_scores(out / model / "inference" / "ph1_val" / "coco_instances_results.json", "ph1_val")
        lesion_tops = sorted((t for t, lesion in tops if lesion), reverse=True)
        assert op["score_thresh"] == lesion_tops[math.ceil(0.9 * len(lesion_tops)) - 1]
        assert {k: op["val"][k] for k in ("tp", "fn", "tn", "fp")} == calls[model, "ph1_val"]
    md = (out / "cross_eval.md").read_text()
    assert "| early | ph1_test |" in md and "| final | ph1_val |" in md
    assert (out / "cross_eval.png").stat().st_size > 1000
    # a model whose weights are missing: one clear line, no table
    rc = tool.main(["--config-file", QUICK_CFG, "--weights", str(run / "nope.pth"), "--datasets", "ph1_val",
                    "--output", str(tmp_path / "bad"), "MODEL.DEVICE", "cpu"])
    assert rc == 2 and "nope.pth: weights file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad" / "cross_eval.json")

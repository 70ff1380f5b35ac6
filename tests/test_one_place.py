"""One place for each job: code that had near-copies now has one home, and its users agree.

Each test fails if a copy came back (a second formatter, resampling loop, EMA lookup, box mapping,
train/val rule or converter constant) or if the users of the one copy disagreed.
"""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from eval_synth import synth_gt, synth_model
from train_helpers import load_benchmark, load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- formatting
def test_formatting_rules():
    from usdet.evaluation.formatting import fmt_estimate, fmt_number, fmt_value, markdown_table

    assert fmt_value(0.12345) == "0.123" and fmt_value(3) == "3" and fmt_value(np.int64(7)) == "7"
    assert fmt_value(True) == "True" and fmt_value("x") == "x"
    assert fmt_value(None) == fmt_value(float("nan")) == fmt_value(float("inf")) == "n/a"
    assert fmt_estimate({"estimate": 81.69456, "low": 74.438, "high": 87.349}, 1) == "81.7 [74.4, 87.3]"
    assert fmt_estimate({"estimate": 0.5}) == "0.500"  # no interval stored
    assert fmt_estimate({"estimate": float("nan"), "low": 0.1, "high": 0.2}) == "n/a"
    assert fmt_estimate({"estimate": 0.5, "low": float("nan"), "high": float("nan")}, undefined="–") == "0.500 [–, –]"
    assert fmt_estimate({"estimate": None}, undefined="–") == "–"
    assert fmt_number(None, ".2f", undefined="–") == "–" and fmt_number(0.5, "+.2f") == "+0.50"
    assert markdown_table(["a", "b"], [["x", 0.5], [1, None]], 2) == "| a | b |\n|---|---|\n| x | 0.50 |\n| 1 | n/a |\n"


def test_cross_site_table_writes_intervals_as_every_report_does(monkeypatch):
    """benchmarks/cross_site.py had its own ``_ci`` (NaN printed as 'nan'); its cells are now
    fmt_estimate's, the same cells as tools/cross_eval.py's table."""
    from usdet.evaluation.formatting import fmt_estimate

    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # its sibling modules
    cross_site = load_benchmark("cross_site")
    with open(os.path.join(REPO, "benchmarks", "results", "cross_site.json"), encoding="utf-8") as fh:
        result = json.load(fh)
    name, ev = next(iter(result["evaluations"].items()))
    ds, row = next(iter(ev["datasets"].items()))
    row["metrics"]["image AUC"] = {"estimate": float("nan"), "low": float("nan"), "high": float("nan")}
    row["metrics"]["CPM"]["low"] = float("nan")
    md = cross_site.render(result)
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} | {ds} |"))
    cells = [c.strip() for c in line.strip("|").split("|")][3:]
    m = row["metrics"]
    assert cells == [fmt_estimate(m[k], 1 if k.startswith("AP") else 3, undefined="–")
                     for k in ("AP50", "AP", "penalized IoU", "CPM", "image AUC")]
    assert cells[4] == "–" and cells[3].endswith(" [–, " + f"{m['CPM']['high']:.3f}]")
    assert "nan" not in md


# ---------------------------------------------------------------------------------------------- inputs, bootstrap
def test_report_and_comparison_read_inputs_the_same_way(tmp_path):
    """One reader (inputs.load_inputs): the report counts what the comparison's loader counts."""
    from usdet.evaluation import compare, inputs, operating_point
    from usdet.evaluation.report import evaluate_predictions

    assert compare.load_detection_data is inputs.load_detection_data
    assert operating_point.load_detection_data is inputs.load_detection_data
    gt = synth_gt(30, seed=4)
    preds = synth_model(gt, 0.7, seed=5)
    preds += [{"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9},
              {"image_id": 1, "category_id": 1, "bbox": [1, 1, float("nan"), 5], "score": 0.9}]
    nested = [{"image_id": i, "instances": [p for p in preds if p["image_id"] == i]}
              for i in sorted({p["image_id"] for p in preds})]
    x = inputs.load_inputs(gt, nested)  # detectron2's instances_predictions layout, flattened
    assert x.num_raw_predictions == len(preds) and len(x.predictions) == len(preds) - 2
    m = evaluate_predictions(gt, preds, str(tmp_path), bootstrap=0, plots=False, html=False)
    x = inputs.load_inputs(gt, preds)
    assert m["inputs"]["num_predictions_ignored"] == len(preds) - len(x.predictions) == 2
    assert m["inputs"]["num_predictions"] == len(x.data.pred_scores)
    assert m["warnings"] == x.warnings and len(x.warnings) == 2


def test_report_bootstrap_is_the_weighted_resampling():
    """The report's CIs (bootstrap_metrics) and the subgroup/comparison CIs (weighted) come from one
    resampling loop and one percentile rule: the same seed gives the same bounds, to the bit."""
    from usdet.evaluation.bootstrap import bootstrap_metrics
    from usdet.evaluation.inputs import load_detection_data
    from usdet.evaluation.weighted import metric_functions, percentile_ci, resampled_values

    gt = synth_gt(60, seed=1)
    _, data, _ = load_detection_data(gt, synth_model(gt, 0.6, seed=2, jitter=6.0))
    names = ("AP50", "piou", "cpm", "image_auc")
    b = bootstrap_metrics(data, n_resamples=150, seed=7)["metrics"]
    values = resampled_values([metric_functions(data, names)], data.num_images, 150, seed=7)[0]
    for k in names:
        ci = percentile_ci(values[k])
        assert (b[k]["low"], b[k]["high"], b[k]["n_valid"]) == (ci["low"], ci["high"], ci["n_valid"]), k
        assert ci["low"] < ci["high"], k
    # the 2.5/97.5 percentiles exactly
    assert percentile_ci(np.arange(41.0))["low"] == 1.0 and percentile_ci(np.arange(41.0))["high"] == 39.0


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_lookup_reads_what_the_trainer_saves():
    """hooks.ema_weights finds EMAHook's averaged weights where detectron2's trainer state puts them;
    --eval-only and the predictor use that one function."""
    from detectron2.engine.train_loop import TrainerBase

    from usdet.engine import hooks, predictor, trainer

    assert trainer.ema_weights is hooks.ema_weights and predictor.ema_weights is hooks.ema_weights
    model = torch.nn.Linear(3, 2)
    ema = hooks.EMAHook(model, decay=0.9)
    loop = TrainerBase()
    loop.register_hooks([ema])
    ema.before_train()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step()
    ckpt = {"model": model.state_dict(), "trainer": loop.state_dict()}
    got = hooks.ema_weights(ckpt)
    assert torch.equal(got["weight"], ema.ema_state_dict()["weight"])
    assert not torch.equal(got["weight"], model.weight)
    assert hooks.ema_weights({"model": {}, "trainer": {"iteration": 3}}) is None
    assert hooks.ema_weights({"trainer": {"hooks": None}}) is None  # the old --eval-only lookup crashed here
    assert hooks.ema_weights(None) is None


# ---------------------------------------------------------------------------------------------- box mapping
def test_predictor_and_overlay_map_boxes_to_the_source_frame_alike():
    from detectron2.structures import Boxes, Instances

    from usdet.data.crop import boxes_to_source
    from usdet.engine import predictor
    from usdet.visualization import overlay

    assert predictor.boxes_to_source is boxes_to_source and overlay.boxes_to_source is boxes_to_source
    boxes = [[0.0, 0.0, 50.0, 100.0], [5.5, 10.25, 20.0, 30.0]]
    # a converted image: crop [10, 20, 110, 220] of the source, written at half size (50 x 100)
    entry = {"crop_box": [10, 20, 110, 220], "scale": 0.5, "width": 50, "height": 100}
    assert overlay.image_to_source(boxes, entry, (100, 50)) == [[10.0, 20.0, 110.0, 220.0], [21.0, 40.5, 50.0, 80.0]]
    assert overlay.image_to_source(boxes, {"scale": 0.5, "width": 50, "height": 100}, (100, 50))[0] == \
        [0.0, 0.0, 100.0, 200.0]
    # the predictor's crop is not resized: its boxes shift by the crop origin, as the overlay's
    # mapping of an unresized crop does
    inst = Instances((200, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor([0.9, 0.8])
    inst.pred_classes = torch.tensor([0, 0])
    out = predictor.instances_to_boxes(inst, (10, 20, 110, 220), ["lesion"], 0.0)
    same = overlay.image_to_source(boxes, {"crop_box": [10, 20, 110, 220], "width": 100, "height": 200}, (200, 100))
    assert [o["bbox_xyxy_original"] for o in out] == same == [[10.0, 20.0, 60.0, 120.0], [15.5, 30.25, 30.0, 50.0]]


# ---------------------------------------------------------------------------------------------- splits
def test_published_test_fold_and_kfold_split_train_val_by_one_rule():
    """busbra --test-fold and --folds split the non-test images into train/val by the same rule
    (split.train_val_split, seed + 1): with the same test images they give the same train/val."""
    from usdet.data.convert import ConvertOptions, SourceScan, _assign_splits
    from usdet.data.convert_image import SourceImage
    from usdet.data.split import assign_groups, kfold_split, train_val_split

    n = 60
    keys = [f"img{i:02d}.png" for i in range(n)]
    groups = [f"case{i // 2}" for i in range(n)]
    labels = ["malignant" if i % 3 == 0 else "benign" for i in range(n)]
    seed, folds = 4, 5
    part = assign_groups(keys, groups, labels, [1.0 / folds] * folds, seed)  # kfold_split's fold of each key
    want = kfold_split(keys, groups, labels, folds, fold=2, val_fraction=0.25, seed=seed)
    scan = SourceScan("synthetic", [], [SourceImage(file=k, path=k, name=k, folder="", label=lab, group=g,
                                                    fold=part[k]) for k, g, lab in zip(keys, groups, labels)])
    kept = list(range(n))
    split_of, _, _ = _assign_splits(scan, kept, dict(zip(kept, labels)), dict(zip(kept, groups)),
                                    ConvertOptions(seed=seed, test_fold=2, val_fraction=0.25))
    assert {keys[i]: s for i, s in split_of.items()} == want
    rest = [i for i in range(n) if part[keys[i]] != 2]
    inner = train_val_split([keys[i] for i in rest], [groups[i] for i in rest], [labels[i] for i in rest], 0.25, seed)
    assert inner == {k: s for k, s in want.items() if s != "test"}
    assert set(inner.values()) == {"train", "val"}


# ---------------------------------------------------------------------------------------------- converter constants
def test_converter_command_line_and_core_share_their_constants():
    import usdet.data.coco as coco
    import usdet.data.convert as convert
    import usdet.data.defaults as defaults
    import usdet.data.duplicates as duplicates
    import usdet.data.split as split

    tool = load_tool("convert_to_coco")
    assert tool.CLASS_CHOICES is convert.CLASS_CHOICES is defaults.CLASS_CHOICES
    assert (tool.NEAR_DUP_CORR, tool.NEAR_DUP_HAMMING) == (duplicates.NEAR_DUP_CORR, duplicates.NEAR_DUP_HAMMING)
    assert convert.ConvertOptions().near_dup_corr == defaults.NEAR_DUP_CORR
    assert tool.SPLITS is split.SPLITS and coco.SPLIT_ORDER is split.SPLITS
    p = tool.build_parser()
    args = p.parse_args(["busi", "--root", "r", "--output", "o", "--classes", "benign,malignant"])
    assert tool.core_options(args).classes == ["benign", "malignant"]
    with pytest.raises(SystemExit):
        p.parse_args(["busi", "--root", "r", "--output", "o", "--classes", "cyst"])
    assert copy.deepcopy(defaults.CLASS_CHOICES) == {"lesion": ["lesion"], "benign,malignant": ["benign", "malignant"]}
    assert math.isclose(defaults.NEAR_DUP_CORR, 0.95) and defaults.NEAR_DUP_HAMMING == 10

"""Issue 23 item 2: a checkpoint carries the PIXEL_MEAN/STD its weights were trained with, and every
inference load (--eval-only, predict, export, cross_eval) uses them whatever the config says.

Before this, detectron2 checkpoints held no normalization, so a model trained with one mean was
run with another config's (the README's ``busi`` + ``mixed`` cross_eval normalized the mixed model
with BUSI's statistics) and gave other predictions, silently.
"""
import glob
import json
import os

import numpy as np
import pytest
import torch

from train_helpers import QUICK_CFG, capture_log, load_tool, make_datasets_root, quick_cfg

# Two non-default normalizations (BGR order, 0-255) and the quick config's own (ImageNet).
OWN_A = ([90.0, 100.0, 110.0], [40.0, 50.0, 60.0])
OWN_B = ([20.0, 30.0, 40.0], [80.0, 70.0, 60.0])
ALL_BOXES = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # a 2-iteration model: keep every box
CKPT_LOG = "fvcore.common.checkpoint"  # the logger of detectron2's (fvcore's) Checkpointer


def norm_opts(norm):
    mean, std = norm
    return ["INPUT.NORMALIZATION", "config", "MODEL.PIXEL_MEAN", str(mean), "MODEL.PIXEL_STD", str(std)]


def _train(out, norm, *opts):
    from usdet.engine import Trainer

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(quick_cfg(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
                                    *norm_opts(norm), *opts))
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-iteration phantom trainings, A and B, each with its own non-default normalization.

    A evaluates after iteration 1 (so it also writes model_best.pth)."""
    root = make_datasets_root(str(tmp_path_factory.mktemp("norm_datasets")))
    a = _train(tmp_path_factory.mktemp("run_a"), OWN_A, "TEST.EVAL_PERIOD", "1", *ALL_BOXES)
    b = _train(tmp_path_factory.mktemp("run_b"), OWN_B, "TEST.EVAL_PERIOD", "0")
    return root, a, b


def test_every_checkpoint_of_a_training_records_its_normalization(runs):
    _, a, b = runs
    files = sorted(glob.glob(str(a / "*.pth")))
    names = {os.path.basename(f) for f in files}
    assert {"model_final.pth", "model_best.pth", "model_0000000.pth"} <= names
    for f in files:
        rec = torch.load(f, map_location="cpu", weights_only=True)["usdet_normalization"]
        np.testing.assert_allclose(rec["pixel_mean"], OWN_A[0], atol=1e-4, err_msg=f)
        np.testing.assert_allclose(rec["pixel_std"], OWN_A[1], atol=1e-4, err_msg=f)
        assert rec["input_format"] == "BGR"  # the quick config's
    rec = torch.load(str(b / "model_final.pth"), map_location="cpu", weights_only=True)["usdet_normalization"]
    np.testing.assert_allclose(rec["pixel_mean"], OWN_B[0], atol=1e-4)


def _phantoms(n=3):
    from usdet.data.phantom import render_phantom

    rng = np.random.default_rng(5)
    return [render_phantom(rng, 128, kinds=["benign"])[0] for _ in range(n)]


def _predict(weights, *opts):
    from usdet.engine.predictor import BatchPredictor, build_predictor_cfg

    torch.set_num_threads(1)
    p = BatchPredictor(build_predictor_cfg(QUICK_CFG, weights, "cpu", [*ALL_BOXES, *opts]), batch_size=3)
    return p, p(_phantoms())


def test_predict_under_another_config_uses_the_checkpoint_normalization(runs):
    _, a, _ = runs
    weights = str(a / "model_final.pth")
    own, own_out = _predict(weights, *norm_opts(OWN_A))
    with capture_log(CKPT_LOG) as log:
        other, other_out = _predict(weights)  # the quick config: ImageNet mean/std
    assert sum(len(x) for x in own_out) > 0
    for x, y in zip(own_out, other_out):  # the old code normalized with the ImageNet values here
        assert len(x) == len(y)
        np.testing.assert_allclose(x.pred_boxes.tensor.numpy(), y.pred_boxes.tensor.numpy(), atol=1e-4)
        np.testing.assert_allclose(x.scores.numpy(), y.scores.numpy(), atol=1e-5)
    assert other.normalization["source"] == "checkpoint"
    np.testing.assert_allclose(other.normalization["pixel_mean"], OWN_A[0], atol=1e-4)
    lines = [m for m in log.messages if "was trained with PIXEL_MEAN" in m]
    assert len(lines) == 1 and "the checkpoint's are used" in lines[0] and "model_final.pth" in lines[0], log.text
    assert "PIXEL_MEAN" in other.weights_note and "(the checkpoint's)" in other.weights_note
    # the override forces the config's normalization: other inputs, other boxes (so the above bites)
    forced, forced_out = _predict(weights, "INPUT.NORMALIZATION_FROM_CHECKPOINT", "False")
    assert forced.normalization["source"] == "config"
    np.testing.assert_allclose(forced.normalization["pixel_mean"], [103.53, 116.28, 123.675], atol=1e-3)
    assert any(len(x) != len(y) or not np.allclose(x.scores.numpy(), y.scores.numpy(), atol=1e-4)
               for x, y in zip(own_out, forced_out))


def _coco(path):
    return sorted((d["image_id"], d["category_id"], round(d["score"], 5), *[round(v, 2) for v in d["bbox"]])
                  for d in json.loads(path.read_text()))


def test_cross_eval_uses_each_models_own_normalization(runs, tmp_path, capsys):
    """Two models of different normalization under one (ImageNet) config: each model's detections
    are exactly those of --eval-only under its own training config."""
    from usdet.engine import evaluate_checkpoint

    _, a, b = runs
    weights = {"a": a / "model_final.pth", "b": b / "model_final.pth"}
    torch.set_num_threads(1)
    out = tmp_path / "xe"
    rc = load_tool("cross_eval").main(
        ["--config-file", QUICK_CFG, "--weights", f"a={weights['a']}", "--weights", f"b={weights['b']}",
         "--datasets", "ph1_val", "--output", str(out), "--bootstrap", "0", "--no-plots",
         "MODEL.DEVICE", "cpu", *ALL_BOXES])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "cross_eval.json").read_text())
    for name, norm in (("a", OWN_A), ("b", OWN_B)):
        own = tmp_path / f"own_{name}"
        evaluate_checkpoint(quick_cfg(own, "MODEL.WEIGHTS", str(weights[name]), *ALL_BOXES, *norm_opts(norm)))
        got = _coco(out / name / "inference" / "ph1_val" / "coco_instances_results.json")
        want = _coco(own / "inference" / "ph1_val" / "coco_instances_results.json")
        assert len(want) > 0 and got == want, name
        assert r["normalization"][name]["source"] == "checkpoint"
        np.testing.assert_allclose(r["normalization"][name]["pixel_mean"], norm[0], atol=1e-4)
        np.testing.assert_allclose(r["normalization"][name]["pixel_std"], norm[1], atol=1e-4)
    md = (out / "cross_eval.md").read_text()
    assert "- a: PIXEL_MEAN [90.0, 100.0, 110.0] PIXEL_STD [40.0, 50.0, 60.0] (the checkpoint's)" in md


def test_export_records_and_bakes_in_the_checkpoint_normalization(runs, tmp_path):
    from usdet.engine.export import export_model
    from usdet.engine.predictor import build_predictor_cfg

    _, a, _ = runs
    torch.set_num_threads(1)
    meta = export_model(build_predictor_cfg(QUICK_CFG, str(a / "model_final.pth"), "cpu", ALL_BOXES),
                        "torchscript", str(tmp_path / "exp"))
    norm = meta["input"]["normalization"]
    assert norm["source"] == "checkpoint" and norm["pixel_mean"] == OWN_A[0] and norm["pixel_std"] == OWN_A[1]
    on_disk = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert on_disk["input"]["normalization"] == norm


# ------------------------------------------------------------------ the checkpointer alone (no training)
def _model(*opts):
    from detectron2.modeling import build_model

    from usdet.engine.predictor import build_predictor_cfg

    cfg = build_predictor_cfg(QUICK_CFG, "", "cpu", list(opts))
    return cfg, build_model(cfg)


def test_a_checkpoint_without_the_record_keeps_the_config_normalization(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer, model_normalization

    path = str(tmp_path / "old.pth")
    torch.save({"model": _model(*norm_opts(OWN_A))[1].state_dict()}, path)  # what usdet wrote before: weights only
    cfg, model = _model()
    with capture_log(CKPT_LOG) as log:
        ckpt = UsdetCheckpointer.for_inference(model, cfg)
        ckpt.load(path, checkpointables=[])
    assert ckpt.normalization["source"] == "config"
    np.testing.assert_allclose(model_normalization(model)["pixel_mean"], [103.53, 116.28, 123.675], atol=1e-3)
    assert "PIXEL_MEAN" not in log.text


def test_training_keeps_its_config_normalization_and_says_so(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer, model_normalization

    _, src = _model(*norm_opts(OWN_A))
    UsdetCheckpointer(src, str(tmp_path)).save_model_only("a")
    cfg, model = _model()
    with capture_log(CKPT_LOG) as log:
        UsdetCheckpointer(model, normalization_from_checkpoint=False).load(str(tmp_path / "a.pth"), checkpointables=[])
    np.testing.assert_allclose(model_normalization(model)["pixel_mean"], [103.53, 116.28, 123.675], atol=1e-3)
    assert "config has" in log.text and "training, or INPUT.NORMALIZATION_FROM_CHECKPOINT False" in log.text


def test_another_channel_order_is_refused_with_the_fix(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer

    _, src = _model(*norm_opts(OWN_A))
    UsdetCheckpointer(src, str(tmp_path)).save_model_only("bgr")
    cfg, model = _model("INPUT.FORMAT", "RGB")
    with pytest.raises(ValueError, match=r"bgr\.pth was trained with .*\(BGR input\), but INPUT\.FORMAT is RGB.*"
                                         r"Set INPUT\.FORMAT BGR"):
        UsdetCheckpointer.for_inference(model, cfg).load(str(tmp_path / "bgr.pth"), checkpointables=[])


def test_library_takes_a_config_not_a_command_line():
    """Issue 23, one place for each job: cross_eval and crossval take a config and overrides; they no
    longer fake an argparse Namespace or load tools/train_net.py from its file."""
    import inspect

    from usdet.experiments import cross_eval, crossval

    assert list(inspect.signature(cross_eval.cross_evaluate).parameters)[0] == "cfg"
    for mod in (cross_eval, crossval):
        src = inspect.getsource(mod)
        assert "SimpleNamespace" not in src and "spec_from_file_location" not in src, mod.__name__
    o = crossval.fold_overrides("/out", 1, ["SEED", "3"], bootstrap=7, weights="w.pth")
    assert o["test"] == ["TEST.BOOTSTRAP", "7", "SEED", "3", "MODEL.WEIGHTS", "w.pth", "DATASETS.TEST",
                         "('fold1_test',)", "OUTPUT_DIR", "/out/fold1"]
    train = crossval.fold_overrides("/out", 1, ["SEED", "3"])["train"]
    assert crossval.fold_commands("c.yaml", "/out", 1, ["SEED", "3"])["train"][-len(train) - 1:] == ["--resume", *train]

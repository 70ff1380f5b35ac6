"""usdet Trainer on phantoms: loss falls, metrics and reports written, hooks, NaN guard."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage

from train_helpers import capture_log, link_busi_subset, make_datasets_root, quick_cfg


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("htrain_datasets")))


def _events(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_end_to_end_loss_falls_metrics_val_loss_and_report(datasets_root, tmp_path, one_thread):
    from usdet.engine import Trainer, evaluate_checkpoint

    out = tmp_path / "run"
    cfg = quick_cfg(out, "SOLVER.MAX_ITER", "24", "SOLVER.STEPS", "(18,)", "TEST.EVAL_PERIOD", "12",
                    "TEST.VAL_LOSS_PERIOD", "12", "SOLVER.CHECKPOINT_PERIOD", "12")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.85 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"

    events = _events(out / "metrics.json")
    keys = set().union(*events)
    assert {"bbox/AP50", "piou/score", "piou/tp", "piou/fn", "val_loss", "val_loss_rpn_cls", "lr"} <= keys
    val = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(val) == 2 and all(math.isfinite(v) and v > 0 for v in val)
    assert (out / "inference" / "ph1_val" / "coco_instances_results.json").is_file()
    best = json.load(open(out / "best_metric.json"))
    assert best["metric"] == "piou/score" and best["iteration"] in (11, 23)
    assert open(out / "last_checkpoint").read() == "model_final.pth"

    # --eval-only path: the full report lands beside the saved predictions.
    cfg_eval = quick_cfg(tmp_path / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"))
    results = evaluate_checkpoint(cfg_eval)
    assert "piou" in results and "bbox" in results
    report_dir = tmp_path / "eval" / "inference" / "ph1_val"
    metrics = json.load(open(report_dir / "metrics.json"))
    assert "piou" in metrics and "bbox" in metrics
    assert metrics["piou"]["fn"] + metrics["piou"]["tp"] == results["piou"]["fn"] + results["piou"]["tp"]
    assert (report_dir / "report.md").is_file()


def test_validation_loss_leaves_bn_stats_and_rng_untouched(datasets_root, tmp_path, one_thread):
    from usdet.engine import Trainer, ValidationLossHook

    cfg = quick_cfg(tmp_path / "run", "TEST.VAL_LOSS_PERIOD", "1")
    trainer = Trainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, ValidationLossHook))
    bn_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k}
    assert bn_before, "the quick config uses BN: running stats expected"
    rng_before = torch.get_rng_state()
    trainer.iter, trainer.max_iter = 0, 5
    with EventStorage(0) as trainer.storage:
        hook._do()
        first = trainer.storage.latest()["val_loss"][0]
        hook._do()
        second = trainer.storage.latest()["val_loss"][0]
    assert math.isfinite(first) and first > 0
    assert first == pytest.approx(second, rel=1e-6)  # fixed seed: comparable between calls
    assert torch.equal(rng_before, torch.get_rng_state())
    for k, v in trainer.model.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), f"{k} changed during the validation-loss pass"
    assert trainer.model.training and all(m.training for m in trainer.model.modules())


def _poison_from(trainer, start_iter):
    def hook(module, inputs, output):
        if module.training and trainer.iter >= start_iter:
            return {k: v * float("nan") for k, v in output.items()}
        return output

    trainer.model.register_forward_hook(hook)


def test_nan_loss_stops_with_iteration_checkpoint_and_causes(datasets_root, tmp_path, one_thread):
    from usdet.engine import Trainer, TrainingDivergedError

    out = tmp_path / "run"
    cfg = quick_cfg(out, "SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    _poison_from(trainer, 3)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    msg = str(info.value)
    assert "Training diverged at iteration 3" in msg
    assert f"last good checkpoint is {out / 'model_0000001.pth'}" in msg
    assert "SOLVER.BASE_LR 0.01" in msg and "SOLVER.CLIP_GRADIENTS" in msg
    assert isinstance(info.value, FloatingPointError)
    assert not (out / "model_0000003.pth").exists()
    assert open(out / "last_checkpoint").read() == "model_0000001.pth"


def test_nan_message_names_frozen_bn_from_scratch(datasets_root, tmp_path, one_thread):
    from usdet.engine import Trainer, TrainingDivergedError

    cfg = quick_cfg(tmp_path / "run", "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "TEST.EVAL_PERIOD", "0")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    _poison_from(trainer, 0)
    with pytest.raises(TrainingDivergedError, match="iteration 0") as info:
        trainer.train()
    assert "FrozenBN with random initial weights (MODEL.WEIGHTS is empty: THIS config)" in str(info.value)
    assert "no checkpoint was written yet" in str(info.value)


# ---------------------------------------------------------------------------- best-model hook
def _hook_env(tmp_path, metric="piou/score", mode="max"):
    from usdet.engine import BestModelHook, UsdetCheckpointer

    model = torch.nn.Linear(3, 2)
    ck = UsdetCheckpointer(model, str(tmp_path))
    hook = BestModelHook(2, ck, metric, mode, str(tmp_path))
    hook.trainer = SimpleNamespace(storage=EventStorage(0), iter=0, max_iter=100)
    return model, hook


def _evaluate(model, hook, iteration, value, metric="piou/score"):
    """What EvalHook does at ``iteration``, then the best-model hook's turn."""
    with torch.no_grad():
        model.weight.fill_(float(iteration))  # weights identify the iteration they come from
    hook.trainer.iter = iteration
    hook.trainer.storage.iter = iteration
    hook.trainer.storage.put_scalars(**{metric: value}, smoothing_hint=False)
    hook.after_step()


def _best(tmp_path):
    rec = json.load(open(tmp_path / "best_metric.json"))
    weights = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert weights["usdet_best"] == rec and weights["iteration"] == rec["iteration"]
    assert float(weights["model"]["weight"][0, 0]) == rec["iteration"]
    return rec["value"], rec["iteration"]


def test_best_model_hook_keeps_best_across_resume(tmp_path):
    model, hook = _hook_env(tmp_path)
    hook.restore(resumed=False)
    _evaluate(model, hook, 1, 0.3)
    assert _best(tmp_path) == (0.3, 1)
    hook.best_value = 0.0  # pretend a lower best: a stale value must still not be re-saved
    hook.trainer.iter = hook.trainer.storage.iter = 3  # no evaluation at this step
    hook.after_step()
    assert _best(tmp_path) == (0.3, 1)
    hook.best_value = 0.3
    _evaluate(model, hook, 3, 0.5)
    _evaluate(model, hook, 5, 0.4)
    _evaluate(model, hook, 7, float("nan"))
    assert _best(tmp_path) == (0.5, 3)
    assert not (tmp_path / "last_checkpoint").exists()  # best saves never tag last_checkpoint

    # --resume: a new process, a new hook; the best value comes back from model_best.pth.
    model, hook = _hook_env(tmp_path)
    hook.restore(resumed=True)
    assert (hook.best_value, hook.best_iter) == (0.5, 3)
    _evaluate(model, hook, 9, 0.45)  # detectron2's BestCheckpointer would overwrite here
    assert _best(tmp_path) == (0.5, 3)
    _evaluate(model, hook, 11, 0.6)
    assert _best(tmp_path) == (0.6, 11)

    # A kill between the two writes: model_best.pth (the file on disk) is the truth.
    model.weight.data.fill_(13.0)
    hook._checkpointer.save_model_only("model_best", iteration=13,
                                       usdet_best={"metric": "piou/score", "value": 0.7, "iteration": 13})
    model, hook = _hook_env(tmp_path)
    hook.restore(resumed=True)
    assert _best(tmp_path) == (0.7, 13) and hook.best_value == 0.7

    # Without --resume a run starts a fresh record.
    model, hook = _hook_env(tmp_path)
    hook.restore(resumed=False)
    _evaluate(model, hook, 1, 0.1)
    assert _best(tmp_path) == (0.1, 1)


def test_best_model_hook_min_mode_other_metric_and_missing_metric(tmp_path):
    model, hook = _hook_env(tmp_path, metric="bbox/AP50", mode="min")
    _evaluate(model, hook, 1, 40.0, metric="bbox/AP50")
    _evaluate(model, hook, 3, 30.0, metric="bbox/AP50")
    _evaluate(model, hook, 5, 35.0, metric="bbox/AP50")
    assert _best(tmp_path) == (30.0, 3)
    # The record names its metric: a resumed run choosing by another metric starts afresh.
    model2, other = _hook_env(tmp_path, metric="piou/score")
    other.restore(resumed=True)
    assert other.best_value is None
    _evaluate(model2, other, 7, 0.2)  # storage of this hook has piou/score now
    assert json.load(open(tmp_path / "best_metric.json"))["metric"] == "piou/score"

    model, hook = _hook_env(tmp_path / "x", metric="bbox/AP75")
    with capture_log("usdet.engine.hooks") as log:
        _evaluate(model, hook, 1, 0.5, metric="piou/score")
    assert "bbox/AP75" in log.text and "piou/score" in log.text
    assert not (tmp_path / "x" / "model_best.pth").exists()
    with pytest.raises(ValueError, match="MODE"):
        _hook_env(tmp_path, mode="best")


# ---------------------------------------------------------------------------- EMA, test-time flip
def test_ema_hook_averages_and_round_trips():
    from usdet.engine import EMAHook

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMAHook(model, decay=0.5)
    ema.before_train()
    expected = 0.0
    for step, w in enumerate([1.0, 3.0, -2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.after_step()
        d = min(0.5, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * w
        assert float(ema.ema_state_dict()["weight"][0, 0]) == pytest.approx(expected)
    with ema.averaged_weights():
        assert float(model.weight[0, 0]) == pytest.approx(expected)
    assert float(model.weight[0, 0]) == -2.0  # raw weights back after evaluation

    resumed = EMAHook(torch.nn.Linear(2, 1, bias=False), decay=0.5)
    resumed.load_state_dict(ema.state_dict())
    resumed.before_train()  # must not re-initialize a restored average
    assert resumed.updates == 3
    assert torch.equal(resumed.ema_state_dict()["weight"], ema.ema_state_dict()["weight"])
    with pytest.raises(ValueError, match="DECAY"):
        EMAHook(model, decay=1.0)


def test_ema_is_torch_averaged_model_with_buffers():
    from torch.optim.swa_utils import AveragedModel

    from usdet.engine import EMAHook

    model = torch.nn.BatchNorm1d(1)
    ema = EMAHook(model, decay=0.5)
    assert isinstance(ema._averaged, AveragedModel) and ema._averaged.use_buffers
    ema.before_train()
    means = [0.0]
    for step, m in enumerate([4.0, 8.0], start=1):
        model.running_mean.fill_(m)
        model.num_batches_tracked.fill_(10 * step)
        ema.after_step()
        d = min(0.5, (1 + step) / (10 + step))
        means.append(d * means[-1] + (1 - d) * m)
    state = ema.state_dict()
    assert float(state["ema"]["running_mean"][0]) == pytest.approx(means[-1])  # BN statistics averaged too
    assert int(state["ema"]["num_batches_tracked"]) == 20 and state["updates"] == 2


def test_ema_weights_are_evaluated_and_kept_as_best_and_flip_tta(datasets_root, tmp_path, one_thread):
    from usdet.engine import Trainer, evaluate_checkpoint

    out = tmp_path / "run"
    cfg = quick_cfg(out, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "3", "SOLVER.CHECKPOINT_PERIOD", "3",
                    "MODEL.EMA.ENABLED", "True", "MODEL.EMA.DECAY", "0.9")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert best["iteration"] == 2  # the first evaluation always sets the best
    ckpt = torch.load(out / "model_0000002.pth", weights_only=True)
    ema, raw = ckpt["trainer"]["hooks"]["EMAHook"]["ema"], ckpt["model"]
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())

    # --eval-only of a periodic checkpoint evaluates its EMA weights; TEST.FLIP adds the flip.
    low = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.EMA.ENABLED", "True"]
    preds = {}
    for flip in ("False", "True"):
        ev = tmp_path / f"eval_flip_{flip}"
        evaluate_checkpoint(quick_cfg(ev, "MODEL.WEIGHTS", str(out / "model_0000002.pth"), "TEST.FLIP", flip, *low))
        preds[flip] = json.load(open(ev / "inference" / "ph1_val" / "coco_instances_results.json"))
    assert preds["False"] and preds["True"] and preds["False"] != preds["True"]

    # --eval-only --resume evaluates the run's last periodic checkpoint (model_final.pth here).
    with capture_log("usdet.engine.trainer") as log:
        evaluate_checkpoint(quick_cfg(out, "MODEL.EMA.ENABLED", "True"), resume=True)
    assert f"Evaluating the EMA weights stored in {out / 'model_final.pth'}" in log.text
    assert (out / "inference" / "ph1_val" / "report.md").is_file()


def test_end_to_end_on_a_busi_subset(busi_root, tmp_path, one_thread):
    """Real BUSI frames (a 24-image subset, converted by usdet at 160 px): loss falls, metrics written."""

    from usdet.data.busi import ConvertOptions, convert_busi
    from usdet.data.register import register_all_usdet_datasets
    from usdet.engine import Trainer

    subset = link_busi_subset(busi_root, tmp_path / "busi")
    root = tmp_path / "datasets"
    convert_busi(str(subset), str(root / "busisub"), ConvertOptions(max_size=160, image_format="jpg", progress=False))
    register_all_usdet_datasets(str(root))

    out = tmp_path / "run"
    cfg = quick_cfg(out, "DATASETS.TRAIN", "('busisub_train',)", "DATASETS.TEST", "('busisub_val',)",
                    "SOLVER.MAX_ITER", "16", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    events = _events(out / "metrics.json")
    assert any("piou/score" in e and "bbox/AP50" in e for e in events)
    assert (out / "model_final.pth").is_file()

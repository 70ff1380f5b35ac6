"""Two-stage training: stage 2 loads stage 1's model_best.pth as a new run, any class count."""
import json
import os

import pytest
import torch

from train_helpers import make_datasets_root, quick_cfg, run_train_net, state_tensors, tail


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("htrain_datasets")))


@pytest.fixture(scope="module")
def stage1(datasets_root, tmp_path_factory):
    """Stage 1 on ph1 (one class, 'lesion'): 4 iterations, evaluated after 2 and 4."""
    from usdet.engine import Trainer

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("stage1")
        trainer = Trainer(quick_cfg(out, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2"))
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(n)
    assert (out / "model_best.pth").is_file()
    return out


def _weights(path):
    return state_tensors(torch.load(path, map_location="cpu", weights_only=True)["model"])


def test_stage2_other_class_count_reinitializes_heads_and_starts_fresh(datasets_root, stage1, tmp_path):
    best = str(stage1 / "model_best.pth")
    out = tmp_path / "stage2"
    # --resume in a fresh folder is harmless: nothing to resume, so MODEL.WEIGHTS is loaded.
    r = run_train_net(datasets_root, str(out), "MODEL.WEIGHTS", best, "MODEL.ROI_HEADS.NUM_CLASSES", "2",
                      "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "2", "TEST.EVAL_PERIOD", "0",
                      "SOLVER.CHECKPOINT_PERIOD", "100", dataset="ph2", resume=True)
    assert r.returncode == 0, tail(r.stderr)
    log = open(out / "log.txt").read()
    assert "Starting training from iteration 0" in log
    assert f"New run from weights {best}: iteration 0, fresh optimizer and LR schedule" in log
    line = next(ln for ln in log.splitlines() if "Loaded weights for a different class count" in ln)
    assert "4 class-dependent head parameters re-initialized" in line and "this model has 2 class(es)" in line
    assert "roi_heads.box_predictor.cls_score.weight (2, 256)->(3, 256)" in line
    assert "roi_heads.box_predictor.bbox_pred.weight (4, 256)->(8, 256)" in line

    s1, s2 = _weights(best), _weights(out / "model_final.pth")
    assert s2["roi_heads.box_predictor.cls_score.weight"].shape == (3, 256)
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 1  # 2 iterations of a new run, not stage 1's count
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
    # Shared layers started from stage 1 (2 SGD steps at warm-up LR move them only slightly).
    stem = "backbone.bottom_up.stem.conv1.weight"
    drift = float((s2[stem] - s1[stem]).abs().max())
    scale = float(s1[stem].abs().max())
    assert drift < 0.05 * scale, f"stem moved by {drift} (scale {scale}): not loaded from stage 1?"


def test_stage2_same_class_count_loads_every_weight(datasets_root, stage1, tmp_path):
    from usdet.engine import Trainer

    best = str(stage1 / "model_best.pth")
    trainer = Trainer(quick_cfg(tmp_path / "s2", "MODEL.WEIGHTS", best))
    trainer.resume_or_load(resume=False)
    assert trainer.start_iter == 0 and trainer.scheduler.last_epoch == 0
    live = state_tensors(trainer.model.state_dict())
    saved = _weights(best)
    assert live.keys() == saved.keys()
    assert all(torch.equal(live[k], saved[k]) for k in saved)
    assert not trainer.optimizer.state_dict()["state"]  # fresh optimizer: no momentum yet
    best_rec = json.load(open(stage1 / "best_metric.json"))
    assert torch.load(best, weights_only=True)["usdet_best"] == best_rec
    # A new run in a new folder keeps no best record from stage 1.
    assert trainer._best_hook.best_value is None
    assert not os.path.exists(tmp_path / "s2" / "best_metric.json")

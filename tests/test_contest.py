"""benchmarks/contest.py: usdet's schedule is fitted to the same wall-clock budget as the peer's."""
import importlib.util
import os

import pytest

from train_helpers import REPO


def _contest():
    spec = importlib.util.spec_from_file_location("contest", os.path.join(REPO, "benchmarks", "contest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_schedule_fills_the_budget_with_training_and_its_evaluations():
    c = _contest()
    probe = {"seconds_per_iter": 0.7, "infer_images_per_s": 12.0}
    s = c.fit_schedule(4140.0, probe, val_images=118, evals=8)
    eval_s = 8 * 1.2 * 118 / 12.0
    assert s["max_iter"] == int((4140.0 - eval_s) / 0.7)
    assert s["eval_period"] == s["max_iter"] // 8
    # what it plans fits the budget and leaves less than one iteration unused
    assert 0 <= 4140.0 - (s["max_iter"] * 0.7 + eval_s) < 0.7
    # a slower model gets proportionally fewer iterations
    assert c.fit_schedule(4140.0, dict(probe, seconds_per_iter=1.4), 118, 8)["max_iter"] == int((4140.0 - eval_s) / 1.4)
    with pytest.raises(SystemExit, match="too short"):
        c.fit_schedule(100.0, probe, val_images=118, evals=8)


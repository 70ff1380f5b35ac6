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



def _fake_run(tmp_path, evals, deadline):
    """A detectron2-like run folder: metrics.json with val AP at some iterations, checkpoints whose
    mtimes are ``deadline + offset``."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for it, ap, offset in evals:
        lines.append(json.dumps({"iteration": it, "total_loss": 1.0}))
        lines.append(json.dumps({"iteration": it, "bbox/AP": ap, "bbox/AP50": ap + 20}))
        ck = run / f"model_{it:07d}.pth"
        ck.write_bytes(b"x")
        os.utime(ck, (deadline + offset, deadline + offset))
    lines.append('{"iteration": 9')  # cut by the stop at the deadline
    (run / "metrics.json").write_text("\n".join(lines))
    return run


def test_only_checkpoints_written_within_the_budget_can_be_chosen(tmp_path):
    c = _contest()
    deadline = 1_800_000_000.0
    # the best val AP (50) was reached after the deadline: it must not be chosen
    run = _fake_run(tmp_path, [(99, 30.0, -300), (199, 42.0, -100), (299, 50.0, +60)], deadline)
    best = c.in_budget_checkpoint(str(run), deadline)
    assert best["iteration"] == 199 and best["value"] == 42.0
    assert best["weights"].endswith("model_0000199.pth") and best["saved_s_before_deadline"] == 100.0
    # with a later deadline the later, better checkpoint wins
    assert c.in_budget_checkpoint(str(run), deadline + 120)["iteration"] == 299
    with pytest.raises(SystemExit, match="within the budget"):
        c.in_budget_checkpoint(str(run), deadline - 1000)


def test_a_run_still_going_at_its_deadline_is_stopped_not_failed(tmp_path):
    import sys
    import time

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import run_until

    t0 = time.time()
    wall, stopped = run_until([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "a.log"),
                              deadline=t0 + 1.0, cwd=str(tmp_path))
    assert stopped and wall < 20
    wall, stopped = run_until([sys.executable, "-c", "print('done')"], str(tmp_path / "b.log"),
                              deadline=time.time() + 60, cwd=str(tmp_path))
    assert not stopped and (tmp_path / "b.log").read_text().strip() == "done"
    with pytest.raises(SystemExit, match="exited 3"):
        run_until([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "c.log"), cwd=str(tmp_path))

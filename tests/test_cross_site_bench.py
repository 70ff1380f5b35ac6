"""benchmarks/cross_site.py's bookkeeping: a training killed mid-way is counted, not passed off as timed."""
import json
import os

import pytest

from train_helpers import load_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def cross_site(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    return load_benchmark("cross_site", "cross_site_bench")


def _finish(run_dir):
    """What a finished train_net.py run leaves (the files train() reads afterwards)."""
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        fh.write(json.dumps({"iteration": 9, "time": 2.0, "bbox/AP50": 50.0}) + "\n")
    with open(os.path.join(run_dir, "best_metric.json"), "w") as fh:
        json.dump({"metric": "bbox/AP50", "value": 50.0, "iteration": 9}, fh)
    open(os.path.join(run_dir, "model_final.pth"), "w").close()


def test_interrupted_attempt_is_counted_and_resume_point_recorded(cross_site, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    sched = {"MAX_ITER": 10, "WARMUP_ITERS": 1, "CHECKPOINT_PERIOD": 5, "EVAL_PERIOD": 5}
    calls = []

    def killed(cmd, log, env, progress, total):  # the session stops: the process dies, nothing after runs
        calls.append(cmd)
        with open(os.path.join(run_dir, "last_checkpoint"), "w") as fh:
            fh.write("model_0000004.pth")
        raise KeyboardInterrupt

    monkeypatch.setattr(cross_site, "_run", killed)
    with pytest.raises(KeyboardInterrupt):
        cross_site.train("m", "cfg.yaml", ["busi"], str(tmp_path), run_dir, sched, str(tmp_path))
    assert "--resume" not in calls[0]

    def finishes(cmd, log, env, progress, total):
        calls.append(cmd)
        _finish(run_dir)
        return 120.0

    monkeypatch.setattr(cross_site, "_run", finishes)
    t = cross_site.train("m", "cfg.yaml", ["busi"], str(tmp_path), run_dir, sched, str(tmp_path))
    assert "--resume" in calls[1]
    assert t["train_wall_s"] == 120.0 and t["attempts"] == 1
    assert t["interrupted_attempts"] == 1 and t["resumed_from_iteration"] == [5]
    assert "1 earlier attempt interrupted and not timed (resumed at iteration 5)" in cross_site._interrupted(t)


def test_uninterrupted_run_reports_no_interruption(cross_site, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")

    def finishes(cmd, log, env, progress, total):
        _finish(run_dir)
        return 60.0

    monkeypatch.setattr(cross_site, "_run", finishes)
    t = cross_site.train("m", "cfg.yaml", ["busi"], str(tmp_path), run_dir,
                         {"MAX_ITER": 10, "WARMUP_ITERS": 1, "CHECKPOINT_PERIOD": 5, "EVAL_PERIOD": 5}, str(tmp_path))
    assert t["attempts"] == 1 and t["interrupted_attempts"] == 0 and cross_site._interrupted(t) == ""

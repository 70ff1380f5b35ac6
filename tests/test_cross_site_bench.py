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
        fh.write(json.dumps({"iteration": 9, "time": 2.0, "total_loss": 0.5}) + "\n")
        fh.write(json.dumps({"iteration": 10, "bbox/AP50": 50.0}) + "\n")  # the final evaluation
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


def test_full_run_is_a_wall_clock_budget_and_iterations_turn_it_off(cross_site, tmp_path, monkeypatch):
    from usdet.engine.setup import build_config

    recipe = build_config(cross_site.BUDGET_RECIPE, resolve=False).SOLVER.TIME_BUDGET_MIN
    monkeypatch.chdir(tmp_path)  # as in a clean clone: no converted datasets, no pixel_stats.json
    full = cross_site.schedule(None, 5)
    assert recipe > 0 and full == {"TIME_BUDGET_MIN": recipe}
    opts = cross_site.schedule_opts(full)
    assert opts == ["SOLVER.TIME_BUDGET_MIN", str(recipe)] and "SOLVER.MAX_ITER" not in opts
    assert cross_site.budget_record(cross_site.schedule(None, 5, 30.0))["reduced"]
    # the full budget is the recipe's, read from it: a recipe with another budget moves it
    other = tmp_path / "other.yaml"
    other.write_text(f'_BASE_: "{cross_site.BUDGET_RECIPE}"\nSOLVER:\n  TIME_BUDGET_MIN: 12.5\n')
    monkeypatch.setattr(cross_site, "BUDGET_RECIPE", str(other))
    assert cross_site.schedule(None, 5) == {"TIME_BUDGET_MIN": 12.5}
    b = cross_site.budget_record(cross_site.schedule(None, 5, 30.0))
    assert b["full_budget_min"] == 12.5 and not b["reduced"]
    short = cross_site.schedule(20, 2)
    assert short["MAX_ITER"] == 20 and short["EVAL_PERIOD"] == 10 and short["TIME_BUDGET_MIN"] == 0.0
    assert cross_site.schedule_opts(short)[:2] == ["SOLVER.MAX_ITER", "20"]
    with pytest.raises(SystemExit, match="not both"):
        cross_site.schedule(20, 2, 30.0)


def _finished_run(cross_site, src, cfg, opts, wall_s=4150.0):
    """A finished training's folder: the config it was trained with and the files train() reads."""
    from usdet.engine.setup import build_config

    os.makedirs(src)
    with open(os.path.join(src, "config.yaml"), "w") as fh:
        fh.write(build_config(cfg, opts).dump())
    _finish(src)
    open(os.path.join(src, "model_best.pth"), "w").close()
    with open(os.path.join(src, "evaluations.jsonl"), "w") as fh:
        fh.write(json.dumps({"elapsed_s": wall_s - 20, "eval_end_s": wall_s, "iteration": 9}) + "\n")


def test_adopted_training_is_used_not_retrained(cross_site, tmp_path, monkeypatch):
    cfg = os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml")
    sched = cross_site.schedule(None, 5)
    run_dir, src = str(tmp_path / "out" / "m"), str(tmp_path / "elsewhere")
    # made elsewhere with the same training config and schedule, another output folder and other
    # clip-prediction defaults (read at prediction time only)
    _finished_run(cross_site, src, cfg, cross_site.train_opts([], str(tmp_path), sched, src) + ["CLIP.WINDOW", "10"])
    before = sorted(os.listdir(src))
    cross_site.adopt("m", src, run_dir, cfg, cross_site.train_opts([], str(tmp_path), sched, run_dir))
    assert os.path.realpath(run_dir) == src
    # the adopted run's folder (another tool's output, maybe adopted by other scripts) is not written to
    assert sorted(os.listdir(src)) == before and os.path.isfile(cross_site.state_path(run_dir))
    assert os.path.dirname(cross_site.state_path(run_dir)) == str(tmp_path / "out")

    def must_not_train(*a, **k):
        raise AssertionError("an adopted training was trained again")

    monkeypatch.setattr(cross_site, "_run", must_not_train)
    t = cross_site.train("m", cfg, [], str(tmp_path), run_dir, sched, str(tmp_path))
    assert t["train_wall_s"] == 4150.0 and t["adopted_from"] and t["load_avg_1min_mean"] is None
    assert t["iterations"] == 10
    # a second invocation finds it adopted already
    cross_site.adopt("m", src, run_dir, cfg, cross_site.train_opts([], str(tmp_path), sched, run_dir))


def test_adopting_a_run_of_another_config_is_refused_naming_the_keys(cross_site, tmp_path):
    cfg = os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml")
    sched = cross_site.schedule(None, 5)
    src = str(tmp_path / "elsewhere")
    _finished_run(cross_site, src, cfg, cross_site.train_opts([], str(tmp_path), sched, src)
                  + ["MODEL.ROI_BOX_HEAD.FC_DIM", "64"])
    run_dir = str(tmp_path / "out" / "m")
    with pytest.raises(SystemExit, match="MODEL.ROI_BOX_HEAD.FC_DIM"):
        cross_site.adopt("m", src, run_dir, cfg, cross_site.train_opts([], str(tmp_path), sched, run_dir))
    assert not os.path.lexists(run_dir)
    with pytest.raises(SystemExit, match="NAME=RUN_DIR"):
        cross_site.parse_adopt(["other=" + src], ["m"])

"""benchmarks/contest.py: usdet trains under the same wall-clock budget as the peer and is scored from its
own evaluation log (evaluations.jsonl); an earlier run without that log by its checkpoints' times."""
import importlib.util
import os

import pytest

from train_helpers import REPO


def _contest():
    spec = importlib.util.spec_from_file_location("contest", os.path.join(REPO, "benchmarks", "contest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _evaluations_run(run, aps, best_iteration):
    """A usdet run folder as the trainer leaves it: evaluations.jsonl (iteration, training seconds,
    metrics), best_metric.json naming ``best_iteration``, model_best.pth."""
    import json

    run.mkdir(parents=True)
    lines = [json.dumps({"iteration": it, "elapsed_s": el, "eval_end_s": el + 20.0,
                         "metrics": {"bbox/AP": ap, "bbox/AP50": None if ap is None else ap + 30, "piou/score": 0.5}})
             for it, el, ap in aps]
    (run / "evaluations.jsonl").write_text("\n".join(lines) + "\n")
    best = max((a for a in aps if a[2] is not None), key=lambda a: a[2])
    (run / "best_metric.json").write_text(json.dumps({"metric": "bbox/AP", "value": best[2], "iteration": best_iteration}))
    (run / "model_best.pth").write_bytes(b"x")
    return run


def test_usdet_val_curve_and_chosen_checkpoint_come_from_evaluations_jsonl(tmp_path):
    c = _contest()
    # the trainer stopped itself at the budget: its last evaluation is the final one (iteration 4416)
    aps = [(630, 600.0, 27.5), (1261, 1200.0, None), (3785, 3600.0, 54.2), (4416, 4141.2, 51.3)]
    run = _evaluations_run(tmp_path / "run", aps, best_iteration=3785)
    r = c.usdet_curve(str(run))
    assert [p["iteration"] for p in r["val_curve"]] == [630, 1261, 3785, 4416]
    assert [p["elapsed_min"] for p in r["val_curve"]] == [10.0, 20.0, 60.0, 69.02]
    assert [p["AP"] for p in r["val_curve"]] == [27.5, None, 54.2, 51.3]
    assert r["val_curve"][0]["AP50"] == 57.5
    ch = r["chosen"]
    assert (ch["iteration"], ch["value"], ch["elapsed_min"]) == (3785, 54.2, 60.0)
    assert ch["weights"] == str(run / "model_best.pth")
    assert r["final_iteration"] == 4416 and r["budget_used_min"] == round((4141.2 + 20) / 60, 2)
    # model_best.pth chosen by another rule than the log's best: refused, saying why
    other = _evaluations_run(tmp_path / "other", aps, best_iteration=4416)
    with pytest.raises(SystemExit, match="iteration 4416.*iteration 3785"):
        c.usdet_curve(str(other))
    with pytest.raises(SystemExit, match="no evaluations.jsonl"):
        c.usdet_curve(str(tmp_path))


def test_safety_deadline_leaves_room_for_start_up_and_the_final_evaluation():
    c = _contest()
    assert c.safety_deadline_s(4140.0) == 4140.0 + 621.0
    assert c.safety_deadline_s(60.0) == 660.0


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

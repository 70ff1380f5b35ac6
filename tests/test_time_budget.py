"""SOLVER.TIME_BUDGET_MIN (usdet/engine/budget.py): the LR schedule on elapsed time, the stop at the
budget, the clock across --resume, rank 0's clock on every rank, and evaluations.jsonl.

The trainings run the quick phantom config in process with a fake clock that advances 10 s per
training step (the clock only moves inside ``run_step``, as wall time mostly does), so what they
check does not depend on this machine's speed or load.
"""
import json
import math
import os
import socket
import textwrap
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from train_helpers import REPO, make_datasets_root, quick_cfg, tail, train_net_cmd, train_net_env

BASE_LR = 0.01
STEP_S = 10.0
# A 1-minute budget at 10 s per step: iteration k starts at 10k s, so iteration 6 (60 s) is the
# last one. MAX_ITER 50 is only an upper bound. Checkpoints and evaluations after 2 and 5, then
# the final checkpoint and evaluation after 6.
SCHEDULE = ["SOLVER.TIME_BUDGET_MIN", "1.0", "SOLVER.MAX_ITER", "50", "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR",
            "SOLVER.BASE_LR", str(BASE_LR), "SOLVER.WARMUP_ITERS", "2", "SOLVER.WARMUP_FACTOR", "0.1",
            "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "3", "SOLVER.BEST_CHECKPOINT.METRIC", "bbox/AP50",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.PIOU.SCORE_THRESH", "0.0"]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("budget_datasets")))


def expected_lr(iteration: int, elapsed_s: float, budget_s: float = 60.0, warmup_iters: int = 2,
                warmup_factor: float = 0.1) -> float:
    """detectron2's linear warmup (in iterations) times the cosine at the elapsed fraction."""
    w = 1.0 if iteration >= warmup_iters else warmup_factor + (1 - warmup_factor) * iteration / warmup_iters
    return BASE_LR * w * 0.5 * (1 + math.cos(math.pi * min(elapsed_s / budget_s, 1.0)))


def _train(out, *opts, resume=False, clock_start=0.0):
    """Train in process with the fake clock; returns (trainer, [(iteration, lr used, elapsed at its start)])."""
    from usdet.engine import Trainer

    trainer = Trainer(quick_cfg(out, *SCHEDULE, *opts))
    fake = {"t": clock_start}
    trainer.budget_hook.clock = lambda: fake["t"]
    steps = []
    run_step = trainer.run_step

    def timed_step():
        steps.append((trainer.iter, trainer.optimizer.param_groups[0]["lr"], trainer.budget_hook.elapsed_s))
        run_step()
        fake["t"] += STEP_S

    trainer.run_step = timed_step
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer, steps


@pytest.fixture(scope="module")
def budget_run(datasets_root, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("budget") / "run"
        trainer, steps = _train(str(out))
    finally:
        torch.set_num_threads(n)
    return str(out), trainer, steps


# ---------------------------------------------------------------------------- the schedule
def test_lr_at_an_elapsed_fraction_follows_the_configs_shape():
    from usdet.engine import build_config
    from usdet.engine.budget import TimeBudgetLR, build_time_budget_scheduler
    from train_helpers import QUICK_CFG

    def sched_for(*opts):
        cfg = build_config(QUICK_CFG, ["SOLVER.TIME_BUDGET_MIN", "2.0", "SOLVER.BASE_LR", str(BASE_LR), *opts])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        return build_time_budget_scheduler(cfg, opt), opt

    s, opt = sched_for("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.WARMUP_ITERS", "4",
                       "SOLVER.WARMUP_FACTOR", "0.2", "SOLVER.MAX_ITER", "100000")
    assert isinstance(s, TimeBudgetLR) and s.budget_s == 120.0
    # After warmup: the cosine at elapsed / budget, whatever the iteration or MAX_ITER (an upper bound).
    for it, elapsed, f in [(10, 0.0, 0.0), (10, 30.0, 0.25), (500, 60.0, 0.5), (7, 90.0, 0.75), (9, 300.0, 1.0)]:
        s.last_epoch, s.elapsed_s = it, elapsed
        s.apply()
        assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * f)), abs=1e-12)
    # Warmup stays in iterations and multiplies the shape: iteration 2 of 4 at half the budget.
    assert s.multiplier(2, 60.0) == pytest.approx((0.2 + 0.8 * 2 / 4) * 0.5, abs=1e-12)
    assert s.multiplier(0, 0.0) == pytest.approx(0.2)
    # A multi-step shape: STEPS / MAX_ITER = 15 / 20 -> the drop at three quarters of the budget.
    s, _ = sched_for("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(15,)", "SOLVER.MAX_ITER", "20",
                     "SOLVER.GAMMA", "0.1", "SOLVER.WARMUP_ITERS", "0")
    assert s.multiplier(3, 0.74 * 120) == pytest.approx(1.0)
    assert s.multiplier(3, 0.76 * 120) == pytest.approx(0.1)


def test_the_hook_sets_each_steps_lr_from_the_clock_and_names_the_last_iteration():
    from usdet.engine.budget import TimeBudgetHook, TimeBudgetLR
    from fvcore.common.param_scheduler import CosineParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = TimeBudgetLR(opt, CosineParamScheduler(1, 0), budget_s=100.0)
    now = {"t": 1000.0}
    last = []
    hook = TimeBudgetHook(100.0, clock=lambda: now["t"], on_last_iteration=last.append)
    hook.trainer = SimpleNamespace(iter=0, max_iter=10_000, scheduler=sched)
    hook.before_train()
    lrs = []
    for k in range(20):
        hook.trainer.iter = sched.last_epoch = k
        hook.before_step()
        lrs.append(opt.param_groups[0]["lr"])
        if hook.last_iter is not None:
            break
        now["t"] += 30.0  # 30 s per step
    # iterations start at 0, 30, 60, 90, 120 s: the one starting at 120 s (past the budget) is the last
    assert last == [4] and hook.last_iter == 4
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * min(t / 100, 1))) for t in (0, 30, 60, 90, 120)])
    assert hook.state_dict() == {"elapsed_s": 120.0, "budget_s": 100.0}


# ---------------------------------------------------------------------------- a real training
def test_training_stops_at_the_budget_with_final_checkpoint_and_evaluation(budget_run):
    out, trainer, steps = budget_run
    # iterations 0..6 trained (6 starts at 60 s = the budget), not MAX_ITER 50
    assert [k for k, _, _ in steps] == list(range(7))
    # left as detectron2's loop leaves a completed run: iter == max_iter
    assert trainer.iter == 7 and trainer.max_iter == 7 and trainer.budget_hook.last_iter == 6
    # each step's LR is the schedule at the elapsed fraction, not at iteration / MAX_ITER
    for k, lr, elapsed in steps:
        assert elapsed == STEP_S * k
        assert lr == pytest.approx(expected_lr(k, elapsed), rel=1e-9, abs=1e-15), k
    assert steps[-1][1] == pytest.approx(0.0, abs=1e-15)  # annealed to the end
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 6
    assert final["trainer"]["hooks"]["TimeBudgetHook"] == {"elapsed_s": 70.0, "budget_s": 60.0}
    ckpt = torch.load(os.path.join(out, "model_0000005.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["hooks"]["TimeBudgetHook"]["elapsed_s"] == 60.0
    assert not os.path.exists(os.path.join(out, "model_0000008.pth"))
    # the final evaluation ran and the best-model hook saw it (last_evaluation.json: iteration 6)
    assert json.load(open(os.path.join(out, "last_evaluation.json")))["iteration"] == 6
    # ... and its metrics are logged at iteration MAX_ITER, as detectron2 logs a completed run's
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert max(m["iteration"] for m in metrics if "bbox/AP50" in m) == 7


def test_evaluations_jsonl_has_one_line_per_evaluation(budget_run):
    from usdet.engine.hooks import read_evaluations

    out, trainer, _ = budget_run
    lines = open(os.path.join(out, "evaluations.jsonl")).read().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(lines) == 3 and read_evaluations(out) == recs
    assert [r["iteration"] for r in recs] == [2, 5, 6]
    # elapsed_s: the training time when the evaluated weights were made (after steps 2, 5, 6)
    assert [r["elapsed_s"] for r in recs] == [30.0, 60.0, 70.0]
    assert all(r["eval_end_s"] >= r["elapsed_s"] for r in recs)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    # metrics.json keeps the latest value per write (every 20 iterations): evaluations 5 and the final one
    for r in recs[1:]:
        at = 7 if r["iteration"] == 6 else r["iteration"]
        logged = next(m for m in metrics if m["iteration"] == at and "bbox/AP50" in m)
        assert set(r["metrics"]) >= {"bbox/AP", "bbox/AP50", "piou/score"}
        for key in ("bbox/AP50", "piou/score"):
            assert r["metrics"][key] == pytest.approx(logged[key]) or (r["metrics"][key] is None
                                                                       and math.isnan(logged[key]))
    best = json.load(open(os.path.join(out, "best_metric.json")))
    chosen = max((r for r in recs if r["metrics"]["bbox/AP50"] is not None), key=lambda r: r["metrics"]["bbox/AP50"])
    assert best["value"] == pytest.approx(chosen["metrics"]["bbox/AP50"])


def test_resume_continues_the_elapsed_time(budget_run, tmp_path, one_thread):
    import shutil

    out, _, ref_steps = budget_run
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    # As if killed after the checkpoint of iteration 2 (30 s of training): resume from there.
    (run / "last_checkpoint").write_text("model_0000002.pth")
    for later in ("model_0000005.pth", "model_final.pth"):
        (run / later).unlink()
    # A new process's clock reads anything: only the time since its own start counts.
    trainer, steps = _train(str(run), resume=True, clock_start=5000.0)
    assert trainer.budget_hook.restored
    # Continues at 30 s: iteration 3 starts at 30 s and iteration 6 is again the last one
    # (a clock restarted at 0 would run to iteration 9).
    assert [k for k, _, _ in steps] == [3, 4, 5, 6]
    assert [e for _, _, e in steps] == [30.0, 40.0, 50.0, 60.0]
    assert [lr for _, lr, _ in steps] == pytest.approx([lr for _, lr, _ in ref_steps[3:]], rel=1e-9, abs=1e-15)
    final = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 6 and final["trainer"]["hooks"]["TimeBudgetHook"]["elapsed_s"] == 70.0
    # evaluations.jsonl: the rewound evaluations (5, 6) replaced, one line per evaluation
    assert [json.loads(x)["iteration"] for x in open(run / "evaluations.jsonl")] == [2, 5, 6]


def test_resuming_a_run_whose_budget_is_spent_trains_nothing_more(budget_run, tmp_path, one_thread):
    import shutil

    out, _, _ = budget_run
    run = tmp_path / "spent"
    shutil.copytree(out, run)
    (run / "last_checkpoint").write_text("model_final.pth")  # 70 s of a 60 s budget
    trainer, steps = _train(str(run), resume=True)
    assert steps == [] and trainer.max_iter == 7
    # only the final evaluation runs again (of the same weights), replacing its own line
    assert [json.loads(x)["iteration"] for x in open(run / "evaluations.jsonl")] == [2, 5, 6]


def test_bad_budget_is_refused_with_the_key(datasets_root, tmp_path):
    from usdet.engine import Trainer

    with pytest.raises(ValueError, match="SOLVER.TIME_BUDGET_MIN"):
        Trainer(quick_cfg(str(tmp_path / "bad"), "SOLVER.TIME_BUDGET_MIN", "-1.0"))


# ---------------------------------------------------------------------------- several processes
WORKER = textwrap.dedent('''
    import datetime, importlib.util, json, sys
    from types import SimpleNamespace
    import torch.distributed as dist

    rank, url, out, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    spec = importlib.util.spec_from_file_location("budget", path)  # the module alone, not all of usdet.engine
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)
    TimeBudgetHook = budget.TimeBudgetHook
    # a collective the other rank never joins fails after 60 s instead of gloo's 30 minutes
    dist.init_process_group("gloo", init_method=url, world_size=2, rank=rank, timeout=datetime.timedelta(seconds=60))
    # the two ranks' clocks disagree: rank 1's runs 3x as fast, from another origin
    now = {"t": 0.0 if rank == 0 else 777.0}
    step = 10.0 if rank == 0 else 30.0
    hook = TimeBudgetHook(55.0, clock=lambda: now["t"])
    hook.trainer = SimpleNamespace(iter=0, max_iter=1000, scheduler=None)
    hook.before_train()
    seen = []
    for k in range(30):
        hook.trainer.iter = k
        hook.before_step()
        seen.append(hook.elapsed_s)
        if hook.last_iter is not None:
            break
        dist.barrier()  # a collective every step, as DDP's gradient all-reduce
        now["t"] += step
    json.dump({"last": hook.last_iter, "seen": seen}, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
''')


def test_every_rank_takes_rank_0s_clock_and_stops_at_the_same_iteration(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    module = os.path.join(REPO, "usdet", "engine", "budget.py")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), url, str(tmp_path / f"r{r}.json"), module],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for p in procs:
        try:  # generous: importing torch in two processes on a loaded 2-core machine can take minutes
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung waiting for the other")
        assert p.returncode == 0, tail(err)
    r0, r1 = (json.load(open(tmp_path / f"r{r}.json")) for r in (0, 1))
    # rank 0's clock (10 s per step) decides for both: iteration 6 starts at 60 s >= 55 s
    assert r0 == r1 == {"last": 6, "seen": [10.0 * k for k in range(7)]}


def test_two_training_processes_stop_together_at_a_real_budget(datasets_root, tmp_path):
    """tools/train_net.py --num-gpus 2 (gloo) with a 6-second budget and MAX_ITER 500: both ranks stop at the
    same iteration, well before MAX_ITER, and the run ends (no rank left in a collective)."""
    import re

    out = tmp_path / "run"
    cmd = train_net_cmd(str(out), "SOLVER.TIME_BUDGET_MIN", "0.1", "SOLVER.MAX_ITER", "500",
                        "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.WARMUP_ITERS", "2",
                        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0",
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.PIOU.SCORE_THRESH", "0.0")
    cmd[2:2] = ["--num-gpus", "2"]
    r = subprocess.run(cmd, env=train_net_env(datasets_root), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, tail(r.stderr)
    last = {}
    for name in ("log.txt", "log.txt.rank1"):
        found = re.findall(r"Time budget of 0.1 min spent \(.*?\) at iteration (\d+)", (out / name).read_text())
        assert len(found) == 1, name
        last[name] = int(found[0])
    k = last["log.txt"]
    assert last["log.txt.rank1"] == k and k < 499
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == k and final["trainer"]["hooks"]["TimeBudgetHook"]["elapsed_s"] >= 6.0
    # the final evaluation ran (both ranks take part in it) and the best-model hook logged it
    assert [json.loads(x)["iteration"] for x in open(out / "evaluations.jsonl")] == [k]

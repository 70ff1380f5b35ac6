"""Honest resume: SIGKILL mid-run, then --resume, must continue as if never stopped.

Also: a kill during a checkpoint save leaves last_checkpoint naming a complete file, and
last_checkpoint never names model_best.pth.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from train_helpers import (REPO, capture_log, make_datasets_root, quick_cfg, run_train_net, state_tensors, tail,
                           train_net_cmd, train_net_env)

# 8 iterations; checkpoints after iterations 1, 3, 5, 7; evaluation after 2, 5 and 7 (final);
# weight EMA on, so its state must resume too.
SCHEDULE = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "3",
            "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "3", "SOLVER.BEST_CHECKPOINT.METRIC", "piou/score",
            "MODEL.EMA.ENABLED", "True", "MODEL.EMA.DECAY", "0.9"]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("htrain_datasets")))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# The interrupted run loads data in 2 worker processes, the reference in the main process: the
# batches (images and augmentation) must not depend on that either.
WORKERS = ["DATALOADER.NUM_WORKERS", "2"]


def _kill_after_checkpoint(datasets_root, out, checkpoint, timeout=240):
    """Start train_net and SIGKILL it as soon as last_checkpoint names ``checkpoint``."""
    proc = subprocess.Popen(train_net_cmd(out, *SCHEDULE, *WORKERS), env=train_net_env(datasets_root), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tag = os.path.join(out, "last_checkpoint")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if os.path.exists(tag) and open(tag).read().strip() == checkpoint:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail("train_net ended before it could be killed:\n" + tail(proc.stderr.read()))
            time.sleep(0.01)
        else:
            pytest.fail(f"no {checkpoint} within {timeout} s")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_resume_matches_uninterrupted_run(datasets_root, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    r = run_train_net(datasets_root, ref, *SCHEDULE)
    assert r.returncode == 0, tail(r.stderr)

    _kill_after_checkpoint(datasets_root, run, "model_0000003.pth")
    # last_checkpoint names the newest periodic checkpoint even though model_best.pth was saved
    # later in wall time... (eval after iteration 2 wrote it before checkpoint 3; check both exist)
    assert open(os.path.join(run, "last_checkpoint")).read() == "model_0000003.pth"
    best_before = json.load(open(os.path.join(run, "best_metric.json")))
    assert best_before["metric"] == "piou/score" and best_before["iteration"] == 2
    best_bytes_before = open(os.path.join(run, "model_best.pth"), "rb").read()

    # In-process: --resume restores iteration, LR position and optimizer momentum exactly.
    from usdet.engine import Trainer

    ckpt = _load(os.path.join(run, "model_0000003.pth"))
    trainer = Trainer(quick_cfg(run, *SCHEDULE))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    saved_opt = ckpt["trainer"]["_trainer"]["optimizer"]
    momentum = {k: v["momentum_buffer"] for k, v in saved_opt["state"].items()}
    assert len(momentum) > 10 and any(float(b.abs().sum()) > 0 for b in momentum.values())
    live = trainer.optimizer.state_dict()
    for k, buf in momentum.items():
        assert torch.equal(live["state"][k]["momentum_buffer"], buf)
    assert [g["lr"] for g in live["param_groups"]] == [g["lr"] for g in saved_opt["param_groups"]]
    assert trainer.scheduler.last_epoch == 4
    del trainer

    r = run_train_net(datasets_root, run, *SCHEDULE, *WORKERS, resume=True)
    assert r.returncode == 0, tail(r.stderr)
    log = open(os.path.join(run, "log.txt")).read()
    assert "Starting training from iteration 4" in log

    # The resumed run ends exactly where the uninterrupted one does: same weights, same
    # momentum, same LR schedule position (no restart of schedule, optimizer or data order).
    a, b = _load(os.path.join(ref, "model_final.pth")), _load(os.path.join(run, "model_final.pth"))
    assert a["iteration"] == b["iteration"] == 7
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    ta, tb = state_tensors(a["model"]), state_tensors(b["model"])
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel())
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run's by up to {worst}"
    ea, eb = state_tensors(a["trainer"]["hooks"]["EMAHook"]), state_tensors(b["trainer"]["hooks"]["EMAHook"])
    assert ea.keys() == eb.keys() and len(ea) == len(ta)
    assert all(torch.allclose(ea[k].double(), eb[k].double(), atol=1e-5) for k in ea)
    assert a["trainer"]["hooks"]["EMAHook"]["updates"] == b["trainer"]["hooks"]["EMAHook"]["updates"] == 8
    ma = state_tensors(a["trainer"]["_trainer"]["optimizer"]["state"])
    mb = state_tensors(b["trainer"]["_trainer"]["optimizer"]["state"])
    assert ma.keys() == mb.keys()
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)

    # Best-so-far survived the kill: the record in model_best.pth and best_metric.json agree,
    # and a final score that is not better left the pre-kill model_best.pth untouched.
    best_after = json.load(open(os.path.join(run, "best_metric.json")))
    assert _load(os.path.join(run, "model_best.pth"))["usdet_best"] == best_after
    ref_best = json.load(open(os.path.join(ref, "best_metric.json")))
    assert best_after == ref_best
    if best_after["iteration"] == 2:
        assert open(os.path.join(run, "model_best.pth"), "rb").read() == best_bytes_before
    assert "Resumed best-model record: piou/score" in log
    assert open(os.path.join(run, "last_checkpoint")).read() == "model_final.pth"


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from usdet.engine.checkpoint import UsdetCheckpointer
    out = sys.argv[1]
    model = torch.nn.Linear(64, 64)
    ck = UsdetCheckpointer(model, out)
    ck.save("model_0000001", iteration=1)
    real_save = torch.save
    def dying_save(obj, fh, *a, **k):
        fh.write(b"PK\\x03\\x04 half a checkpoint")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    ck.save("model_0000003", iteration=3)
""")


def test_sigkill_during_checkpoint_save_keeps_last_checkpoint_valid(tmp_path):
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, out], env=train_net_env(str(tmp_path)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, tail(r.stderr)
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000001.pth"
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))
    leftovers = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model_0000003.pth.")
    assert _load(os.path.join(out, "model_0000001.pth"))["iteration"] == 1

    from usdet.engine.checkpoint import UsdetCheckpointer

    ck = UsdetCheckpointer(torch.nn.Linear(64, 64), out)  # a new run cleans the dead temp file
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert ck.get_checkpoint_file().endswith("model_0000001.pth")
    assert ck.resume_or_load("", resume=True)["iteration"] == 1


def test_best_model_save_never_moves_last_checkpoint(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer

    ck = UsdetCheckpointer(torch.nn.Linear(4, 4), str(tmp_path))
    ck.save("model_0000009", iteration=9)
    ck.save_model_only("model_best", iteration=4, usdet_best={"metric": "m", "value": 1.0, "iteration": 4})
    assert open(tmp_path / "last_checkpoint").read() == "model_0000009.pth"
    best = _load(tmp_path / "model_best.pth")
    assert set(best) == {"model", "iteration", "usdet_best"}  # weights only: no optimizer state


def test_missing_checkpoint_named_by_last_checkpoint_is_a_clear_error(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer

    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    ck = UsdetCheckpointer(torch.nn.Linear(4, 4), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_0000099.pth, which does not exist"):
        ck.resume_or_load("", resume=True)


# ---------------------------------------------------------------------------- data order
def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_sampler_skips_to_any_iteration_exactly():
    from usdet.data.loader import ResumableBatchSampler

    sizes = [(120, 90) if i % 3 else (90, 120) for i in range(11)]  # two aspect-ratio buckets
    fresh = ResumableBatchSampler(sizes, 2, seed=5, rank=0, world_size=1)
    batches = _take(iter(fresh), 40)
    for k in (1, 7, 23):
        resumed = ResumableBatchSampler(sizes, 2, seed=5, rank=0, world_size=1)
        resumed.start_batch = k
        assert _take(iter(resumed), 10) == batches[k:k + 10]
    for batch in batches:  # grouped: one bucket per batch
        assert len({sizes[i][0] > sizes[i][1] for _, i in batch}) == 1
    positions = sorted(p for b in batches for p, _ in b)
    assert len(set(positions)) == len(positions)
    # every epoch is a permutation; another seed gives another order
    flat = ResumableBatchSampler(sizes, 11, seed=5, aspect_ratio_grouping=False, rank=0, world_size=1)
    epoch0, epoch1 = _take(iter(flat), 2)
    assert sorted(i for _, i in epoch0) == list(range(11)) == sorted(i for _, i in epoch1)
    other = ResumableBatchSampler(sizes, 11, seed=6, aspect_ratio_grouping=False, rank=0, world_size=1)
    assert [i for _, i in next(iter(other))] != [i for _, i in epoch0]


def test_batch_sampler_ranks_split_the_stream():
    from usdet.data.loader import ResumableBatchSampler

    sizes = [(100, 80)] * 9
    per_rank = [_take(iter(ResumableBatchSampler(sizes, 2, seed=1, rank=r, world_size=2)), 6) for r in range(2)]
    pos = [[p for b in batches for p, _ in b] for batches in per_rank]
    assert set(pos[0]).isdisjoint(pos[1])
    assert sorted(pos[0] + pos[1]) == list(range(24))


def test_seeded_dataset_is_a_function_of_position(tmp_path):
    import numpy as np

    from usdet.data.image_io import ImageReadError
    from usdet.data.loader import SeededMapDataset

    def mapper(d):
        if d["bad"]:
            raise ImageReadError(d["file_name"], "corrupt or truncated image")
        return (d["file_name"], float(np.random.uniform()))

    dicts = [{"file_name": f"f{i}.png", "bad": i == 2} for i in range(4)]
    ds = SeededMapDataset(dicts, mapper, seed=9)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    with capture_log("usdet.data.loader") as log:
        a = [ds[(p, p % 4)] for p in range(8)]
    assert np.array_equal(state, np.random.get_state()[1])  # the caller's NumPy stream is untouched
    b = [ds[(p, p % 4)] for p in reversed(range(8))][::-1]
    assert a == b  # order of calls does not matter: worker count and resume cannot change it
    assert a[0] != SeededMapDataset(dicts, mapper, seed=10)[(0, 0)]
    assert a[2][0] == "f3.png"  # the unreadable frame is replaced by the next readable one
    assert "f2.png: corrupt or truncated image" in log.text


def test_corrupt_checkpoint_is_named(tmp_path):
    from usdet.engine.checkpoint import UsdetCheckpointer

    (tmp_path / "model_0000001.pth").write_bytes(b"\x00not a checkpoint")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(RuntimeError, match=r"model_0000001.pth: not a readable checkpoint"):
        UsdetCheckpointer(torch.nn.Linear(4, 4), str(tmp_path)).resume_or_load("", resume=True)


# ---------------------------------------------------------------------------- kill during evaluation
# Checkpoints and evaluations both after iterations 2 and 5 (CHECKPOINT_PERIOD == EVAL_PERIOD, as in
# every shipped config), final after 7; the best model is chosen by the validation loss, so the
# evaluation at 5 is a best-model candidate.
EVAL_SCHEDULE = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "3",
                 "TEST.VAL_LOSS_PERIOD", "3", "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "3",
                 "SOLVER.BEST_CHECKPOINT.METRIC", "val_loss", "SOLVER.BEST_CHECKPOINT.MODE", "min",
                 "MODEL.EMA.ENABLED", "True", "MODEL.EMA.DECAY", "0.9"]

# train_net, SIGKILLed by itself as the second periodic evaluation (iteration 5) starts its inference:
# after the checkpoint of 5 and the validation loss of 5, before the metrics and the best-model check.
KILL_DURING_EVAL = textwrap.dedent("""
    import os, signal, sys
    from usdet.engine import trainer as T
    real_test, calls = T.Trainer.test.__func__, []
    def dying_test(cls, cfg, model, evaluators=None):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_test(cls, cfg, model, evaluators)
    T.Trainer.test = classmethod(dying_test)
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    import train_net
    train_net.cli(sys.argv[2:])
""")


def _eval_metrics(run_dir):
    """{iteration: {evaluation key: value}} from metrics.json."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.json")):
        rec = json.loads(line)
        ev = {k: v for k, v in rec.items() if k.startswith(("bbox/", "piou/", "val_"))}
        if ev:
            out.setdefault(rec["iteration"], {}).update(ev)
    return out


def _best_lines(run_dir):
    return [ln.split("] ", 1)[-1] for ln in open(os.path.join(run_dir, "log.txt")).read().splitlines()
            if "Saved model_best.pth" in ln or "Best-model hook:" in ln]


def test_sigkill_during_evaluation_runs_the_missed_evaluation_on_resume(datasets_root, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    r = run_train_net(datasets_root, ref, *EVAL_SCHEDULE)
    assert r.returncode == 0, tail(r.stderr)

    cmd = train_net_cmd(run, *EVAL_SCHEDULE)
    r = subprocess.run([sys.executable, "-c", KILL_DURING_EVAL, REPO, *cmd[2:]], env=train_net_env(datasets_root),
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, tail(r.stderr)
    assert open(os.path.join(run, "last_checkpoint")).read() == "model_0000005.pth"
    assert json.load(open(os.path.join(run, "last_evaluation.json"))) == {"iteration": 2}
    assert _load(os.path.join(run, "model_0000005.pth"))["trainer"]["usdet"]["pending_evaluation"] == 5
    assert json.load(open(os.path.join(run, "best_metric.json")))["iteration"] == 2  # 5 never judged

    r = run_train_net(datasets_root, run, *EVAL_SCHEDULE, resume=True)
    assert r.returncode == 0, tail(r.stderr)
    log = open(os.path.join(run, "log.txt")).read()
    assert "The evaluation of iteration 5 was interrupted" in log
    assert "Starting training from iteration 6" in log

    # The evaluation of 5 happened, at iteration 5, with the uninterrupted run's values, and the
    # best-model decisions (each candidate and its value) are the uninterrupted run's.
    ref_metrics, run_metrics = _eval_metrics(ref), _eval_metrics(run)
    assert 5 in ref_metrics and "bbox/AP50" in ref_metrics[5] and "piou/score" in ref_metrics[5]
    assert run_metrics.keys() == ref_metrics.keys()
    for it, values in ref_metrics.items():
        assert run_metrics[it] == pytest.approx(values, rel=1e-6, abs=1e-9, nan_ok=True), it
    assert _best_lines(run) == _best_lines(ref)
    assert any("at iteration 5" in ln for ln in _best_lines(ref))  # 5 was judged in both runs
    assert json.load(open(os.path.join(run, "best_metric.json"))) == json.load(open(os.path.join(ref,
                                                                                                 "best_metric.json")))
    assert json.load(open(os.path.join(run, "last_evaluation.json"))) == {"iteration": 7}

    # model_final was saved before the final validation loss, so it names 7 as pending; the record
    # says 7 finished, so another --resume does not run it twice.
    assert _load(os.path.join(run, "model_final.pth"))["trainer"]["usdet"].get("pending_evaluation") == 7

"""Multi-process training on CPU (gloo) through usdet's launcher: evaluation, checkpoints, data order,
resume, NaN handling and a 2-"machine" loopback run, all with real processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from train_helpers import (REPO, capture_log, make_datasets_root, quick_cfg, state_tensors, tail, train_net_cmd,
                           train_net_env)

# 6 iterations of total batch 2 (1 image per process); checkpoints, evaluations and validation
# losses after iterations 1 and 3, final after 5.
SCHEDULE = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2",
            "TEST.VAL_LOSS_PERIOD", "2", "SOLVER.STEPS", "(4,)", "SOLVER.WARMUP_ITERS", "2",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.PIOU.SCORE_THRESH", "0.0"]
EVAL_PREFIXES = ("bbox/", "piou/")


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("dist_datasets")))


def _run(datasets_root, out, *opts, procs=2, resume=False, timeout=300, **popen):
    cmd = train_net_cmd(out, *SCHEDULE, *opts, resume=resume)
    cmd[2:2] = ["--num-gpus", str(procs)]
    return subprocess.run(cmd, env=train_net_env(datasets_root), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def two_proc_run(datasets_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "run")
    r = _run(datasets_root, out)
    assert r.returncode == 0, tail(r.stderr)
    return out


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics(run_dir):
    out = {}
    for line in open(os.path.join(run_dir, "metrics.json")):
        rec = json.loads(line)
        out.setdefault(rec["iteration"], {}).update(rec)
    return out


def test_two_processes_write_each_checkpoint_once_and_complete(two_proc_run):
    run = two_proc_run
    log0 = open(os.path.join(run, "log.txt")).read()
    log1 = open(os.path.join(run, "log.txt.rank1")).read()
    assert "World size: 2" in log0 and "Rank of current process: 1. World size: 2" in log1
    assert "Saving checkpoint" not in log1 and "best" not in log1.lower()
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth"):
        assert log0.count(f"Saving checkpoint to {os.path.join(run, name)}") == 1
        ck = _load(os.path.join(run, name))
        assert not any(k.startswith("module.") for k in ck["model"])  # the model, not the DDP wrapper
        assert {"model", "trainer", "iteration"} <= set(ck)
        assert ck["trainer"]["usdet"]["world_size"] == 2 and ck["trainer"]["usdet"]["ims_per_batch"] == 2
        assert ck["trainer"]["_trainer"]["optimizer"]["state"]  # complete: momentum included
    assert open(os.path.join(run, "last_checkpoint")).read() == "model_final.pth"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    best = json.load(open(os.path.join(run, "best_metric.json")))
    assert _load(os.path.join(run, "model_best.pth"))["usdet_best"] == best


def test_evaluation_in_two_processes_is_the_one_process_evaluation_of_the_checkpoint(two_proc_run, tmp_path):
    from detectron2.evaluation.testing import flatten_results_dict
    from detectron2.utils.events import EventStorage

    from usdet.engine import Trainer, evaluate_checkpoint
    from usdet.engine.hooks import ValidationLossHook

    metrics = _metrics(two_proc_run)
    for it, weights in ((3, "model_0000003.pth"), (6, "model_final.pth")):  # the final one is logged at 6
        cfg = quick_cfg(str(tmp_path / str(it)), *SCHEDULE, "MODEL.WEIGHTS", os.path.join(two_proc_run, weights))
        one = flatten_results_dict(evaluate_checkpoint(cfg))
        two = {k: v for k, v in metrics[it].items() if k.startswith(EVAL_PREFIXES)}
        assert len(two) > 10 and two.keys() == one.keys()
        counts = [k for k in two if k.startswith("piou/") and float(two[k]).is_integer()]
        assert counts and all(two[k] == one[k] for k in counts)  # counts exact
        assert two == pytest.approx(one, rel=1e-9, abs=1e-12, nan_ok=True)
    assert metrics[6]["piou/tp"] + metrics[6]["piou/fp"] > 0  # the scores had detections to count
    # The boxes and scores themselves (the last evaluation's predictions, of model_final): equal only
    # if rank 1 evaluated with rank 0's BatchNorm statistics.
    preds = [sorted((p["image_id"], round(p["score"], 5), [round(v, 3) for v in p["bbox"]]) for p in json.load(open(
        os.path.join(d, "inference", "ph1_val", "coco_instances_results.json")))) for d in (two_proc_run, cfg.OUTPUT_DIR)]
    assert len(preds[0]) > 10 and preds[0] == preds[1]
    # the validation loss of the last step: the mean over all images, as one process computes it
    trainer = Trainer(cfg)
    trainer.checkpointer.load(os.path.join(two_proc_run, "model_final.pth"), checkpointables=[])
    hook = ValidationLossHook(2, lambda: Trainer.build_val_loss_loader(cfg), seed=cfg.SEED)
    hook.trainer, trainer.iter = trainer, 5
    with EventStorage(5) as storage:
        trainer.storage = storage
        with capture_log("usdet.engine.hooks") as log:
            hook._do()
        one_val = storage.latest()["val_loss"][0]
    from detectron2.data import DatasetCatalog

    assert f"over {len(DatasetCatalog.get('ph1_val'))} images" in log.text
    assert metrics[5]["val_loss"] == pytest.approx(one_val, rel=1e-6)


DATA_ORDER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))

    def dump(out, n):
        from detectron2.utils import comm
        from train_helpers import make_datasets_root, quick_cfg
        from usdet.engine import Trainer
        make_datasets_root(os.environ["USDET_DATASETS"])
        train_loader = Trainer.build_train_loader(quick_cfg(out))
        loader, positions = iter(train_loader), iter(train_loader.batch_sampler)
        batches = [[(d["file_name"], float(d["image"].float().mean())) for d in next(loader)] for _ in range(n)]
        json.dump({"batches": batches, "positions": [[p for p, _ in next(positions)] for _ in range(n)]},
                  open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w"))

    if __name__ == "__main__":
        from usdet.engine.launch import launch
        launch(dump, 2, args=(sys.argv[2], 8))
""")


def test_two_ranks_split_the_one_process_stream(datasets_root, tmp_path):
    script = tmp_path / "dump.py"
    script.write_text(DATA_ORDER)
    r = subprocess.run([sys.executable, str(script), REPO, str(tmp_path)], env=train_net_env(datasets_root), cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, tail(r.stderr)
    ranks = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(2)]
    from usdet.engine import Trainer

    loader = iter(Trainer.build_train_loader(quick_cfg(str(tmp_path))))
    one = [[[d["file_name"], float(d["image"].float().mean())] for d in next(loader)] for _ in range(8)]
    # disjoint stream positions (each sample is seen once), together every position of the stream
    pos = [[p for b in r["positions"] for p in b] for r in ranks]
    assert set(pos[0]).isdisjoint(pos[1]) and sorted(pos[0] + pos[1]) == list(range(16))
    for i in range(8):
        assert len(ranks[0]["batches"][i]) == len(ranks[1]["batches"][i]) == 1
        # same images with the same augmentation: the 1-process batch of the same total size
        assert sorted(ranks[0]["batches"][i] + ranks[1]["batches"][i]) == sorted(one[i])


def test_two_process_run_killed_and_resumed_matches_the_uninterrupted_one(datasets_root, two_proc_run, tmp_path):
    run = str(tmp_path / "run")
    cmd = train_net_cmd(run, *SCHEDULE)
    cmd[2:2] = ["--num-gpus", "2"]
    proc = subprocess.Popen(cmd, env=train_net_env(datasets_root), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    tag, deadline = os.path.join(run, "last_checkpoint"), time.time() + 240
    try:
        while time.time() < deadline:
            if os.path.exists(tag) and open(tag).read().strip() == "model_0000003.pth":
                os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, as a node failure would
                break
            if proc.poll() is not None:
                pytest.fail("train_net ended before it could be killed:\n" + tail(proc.stderr.read()))
            time.sleep(0.01)
        else:
            pytest.fail("no model_0000003.pth within 240 s")
    finally:
        proc.wait()
    r = _run(datasets_root, run, resume=True)
    assert r.returncode == 0, tail(r.stderr)
    assert "Starting training from iteration 4" in open(os.path.join(run, "log.txt")).read()
    a, b = _load(os.path.join(two_proc_run, "model_final.pth")), _load(os.path.join(run, "model_final.pth"))
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    ta, tb = state_tensors(a["model"]), state_tensors(b["model"])
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel())
    assert worst < 1e-5, f"resumed 2-process weights differ from the uninterrupted run's by up to {worst}"


def test_resume_with_another_world_size_says_what_changes(two_proc_run, tmp_path):
    import shutil

    from usdet.engine import Trainer

    run = str(tmp_path / "copy")
    shutil.copytree(two_proc_run, run)
    os.unlink(os.path.join(run, "model_final.pth"))
    open(os.path.join(run, "last_checkpoint"), "w").write("model_0000003.pth")
    trainer = Trainer(quick_cfg(run, *SCHEDULE))
    with capture_log("usdet.engine.trainer") as log:
        trainer.resume_or_load(resume=True)
    assert ("Resuming at iteration 4 a checkpoint written by 2 process(es) with SOLVER.IMS_PER_BATCH 2, now 1 "
            "process(es) with 2" in log.text and "every 1-th" in log.text)
    trainer = Trainer(quick_cfg(run, *SCHEDULE, "SOLVER.IMS_PER_BATCH", "4"))
    with capture_log("usdet.engine.trainer") as log:
        trainer.resume_or_load(resume=True)
    assert "read 4 samples per iteration instead of 2" in log.text and "LR schedule continues" in log.text


NAN_ON_RANK1 = textwrap.dedent("""
    import os, sys
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils import comm
    from detectron2.utils.events import get_event_storage
    real_forward = GeneralizedRCNN.forward
    def forward(self, batched_inputs):
        out = real_forward(self, batched_inputs)
        if self.training and comm.get_rank() == 1 and get_event_storage().iter == 2:
            out = {k: v * float("nan") for k, v in out.items()}
        return out
    GeneralizedRCNN.forward = forward
    sys.path.insert(0, sys.argv[1])
    from usdet.engine.trainer import Trainer
    real_message = Trainer._divergence_message
    def slow_message(self, err):  # rank 0 slow to stop, as on a loaded machine: rank 1 is out first
        if comm.get_rank() == 0:
            import time
            time.sleep(5)
        return real_message(self, err)
    Trainer._divergence_message = slow_message
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    import train_net
    if __name__ == "__main__":
        train_net.cli(sys.argv[2:])
""")


def test_nan_on_one_rank_stops_every_rank_with_the_message(datasets_root, tmp_path):
    out = str(tmp_path / "nan")
    script = tmp_path / "nan_rank1.py"
    script.write_text(NAN_ON_RANK1)
    cmd = train_net_cmd(out, *SCHEDULE)
    r = subprocess.run([sys.executable, str(script), REPO, "--num-gpus", "2", *cmd[2:]],
                       env=train_net_env(datasets_root), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "Training diverged at iteration 2" in r.stderr, tail(r.stderr)
    # both ranks stopped on their own with the message (not killed by the launcher once rank 1 was out,
    # although rank 0 took 5 s longer)
    for log in ("log.txt", "log.txt.rank1"):
        assert "Training diverged at iteration 2" in open(os.path.join(out, log)).read(), log
    assert "detected on rank 0" in open(os.path.join(out, "log.txt.rank1")).read()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_complete(datasets_root, tmp_path):
    out, url = str(tmp_path / "machines"), f"tcp://127.0.0.1:{_port()}"
    procs = []
    for rank in (0, 1):
        cmd = train_net_cmd(out, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100")
        cmd[2:2] = ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url]
        procs.append(subprocess.Popen(cmd, env=train_net_env(datasets_root), cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], tail(errs[0]) + tail(errs[1])
    ck = _load(os.path.join(out, "model_final.pth"))
    assert ck["iteration"] == 2 and ck["trainer"]["usdet"]["world_size"] == 2
    assert "World size: 2" in open(os.path.join(out, "log.txt.rank1")).read()

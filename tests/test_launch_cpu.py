"""usdet's CPU launcher: torch threads per process (the cores shared out, OMP_NUM_THREADS kept) and a
clean exit (the DDP model and every process group gone before the interpreter shuts down)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from train_helpers import REPO, tail
from usdet.engine.launch import available_cores, threads_per_process

WORKER = textwrap.dedent("""
    import gc, json, os, sys, weakref
    sys.path.insert(0, sys.argv[1])

    def main(out):
        import torch
        import torch.distributed as dist
        from detectron2.utils import comm
        from torch.nn.parallel import DistributedDataParallel

        class Holder:  # a trainer-like reference cycle around a DDP model, as usdet's Trainer has
            pass

        h = Holder()
        h.me = h
        h.model = DistributedDataParallel(torch.nn.Linear(4, 2))
        h.model(torch.randn(3, 4)).sum().backward()  # one gradient all-reduce over gloo
        rank = comm.get_rank()
        path = os.path.join(out, f"rank{rank}.json")
        record = {"threads": torch.get_num_threads(), "local_size": comm.get_local_size()}
        json.dump(record, open(path, "w"))

        def freed(path=path, record=record):  # when the DDP model goes: is the group still there?
            record["ddp_freed_with_group_alive"] = dist.is_initialized()
            json.dump(record, open(path, "w"))

        weakref.finalize(h.model, freed)

    if __name__ == "__main__":
        import logging
        from usdet.engine.launch import launch
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        launch(main, 2, args=(sys.argv[2],))
""")


def _launch(tmp_path, **env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    e = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    e.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore", **env)
    r = subprocess.run([sys.executable, str(script), REPO, str(tmp_path)], env=e, cwd=REPO, capture_output=True,
                       text=True, timeout=900)  # spawned torch imports are slow on a loaded machine
    assert r.returncode == 0, tail(r.stderr)
    return [json.load(open(tmp_path / f"rank{k}.json")) for k in range(2)], r.stderr


def test_threads_per_process_shares_the_cores_and_keeps_an_explicit_setting():
    assert threads_per_process(2, cores=16, environ={}) == 8
    assert threads_per_process(3, cores=16, environ={}) == 5
    assert threads_per_process(4, cores=2, environ={}) == 1  # never 0
    assert threads_per_process(2, cores=16, environ={"OMP_NUM_THREADS": "3"}) is None
    assert threads_per_process(1, environ={}) == available_cores()


def test_two_cpu_processes_share_the_cores_and_leave_no_ddp_model_for_the_interpreter_exit(tmp_path):
    ranks, err = _launch(tmp_path)
    expected = max(1, available_cores() // 2)
    assert [r["threads"] for r in ranks] == [expected, expected]
    assert f"{expected} torch thread(s) each" in err
    assert [r["local_size"] for r in ranks] == [2, 2]
    # the DDP model (its reducer holds the group and gloo work) was collected while the group was alive,
    # not left to interpreter finalization, where its teardown can abort the process
    assert [r.get("ddp_freed_with_group_alive") for r in ranks] == [True, True]


def test_an_explicit_omp_num_threads_is_kept(tmp_path):
    if available_cores() < 2:
        pytest.skip("one core: OMP_NUM_THREADS 2 and the cap (1) would not differ")
    ranks, err = _launch(tmp_path, OMP_NUM_THREADS="2")  # not the cap, cores // 2 (torch allows up to the cores)
    assert [r["threads"] for r in ranks] == [2, 2] and "OMP_NUM_THREADS=2 torch thread(s)" in err

"""usdet's CPU launcher: torch threads per process (the cores shared out, an explicit OMP_NUM_THREADS
kept), read back from each real rank, and a clean exit: no process group (nor the DDP model holding
one) left for the interpreter's finalization, where gloo's teardown can abort the process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from train_helpers import REPO, tail
from usdet.engine.launch import available_cores, threads_per_process

WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])

    def main(out):
        import torch
        from detectron2.utils import comm

        record = {"threads": torch.get_num_threads(), "local_size": comm.get_local_size()}
        json.dump(record, open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w"))

    if __name__ == "__main__":
        import logging
        from usdet.engine.launch import launch
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        launch(main, 2, args=(sys.argv[2],))
""")


TEARDOWN = textwrap.dedent("""
    import atexit, json, os, sys, weakref
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
        h.model(torch.randn(3, 4)).sum().backward()  # a gradient all-reduce over gloo
        comm.all_gather(comm.get_rank())  # as training does: detectron2 caches the world group
        refs = {"ddp model": weakref.ref(h.model), "world group": weakref.ref(dist.group.WORLD),
                "local group": weakref.ref(comm._LOCAL_PROCESS_GROUP)}
        path, record = os.path.join(out, f"rank{comm.get_rank()}.json"), {"all_gather": comm.all_gather(1)}

        def at_exit():  # atexit runs before the interpreter clears modules and frees what is left
            record["alive_at_exit"] = sorted(k for k, r in refs.items() if r() is not None)
            record["initialized_at_exit"] = dist.is_initialized()
            json.dump(record, open(path, "w"))

        atexit.register(at_exit)

    if __name__ == "__main__":
        from usdet.engine.launch import launch
        launch(main, 2, args=(sys.argv[2],))
""")


def _launch(tmp_path, worker=WORKER, **env):
    script = tmp_path / "worker.py"
    script.write_text(worker)
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
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


def test_two_cpu_processes_share_the_cores(tmp_path):
    if available_cores() < 2:
        pytest.skip("one core: the cap (1 thread) and torch's default (1 per core) would not differ")
    ranks, err = _launch(tmp_path)
    expected = available_cores() // 2
    # without the cap each rank would run torch's default, a thread per core (available_cores() each)
    assert [r["threads"] for r in ranks] == [expected, expected]
    assert f"{expected} torch thread(s) each" in err
    assert [r["local_size"] for r in ranks] == [2, 2]


def test_an_explicit_omp_num_threads_is_kept(tmp_path):
    if available_cores() < 2:
        pytest.skip("one core: OMP_NUM_THREADS=1 and the cap (1) would not differ")
    cores = available_cores()  # not the cap, cores // 2
    ranks, err = _launch(tmp_path, OMP_NUM_THREADS=str(cores))
    assert [r["threads"] for r in ranks] == [cores, cores] and f"OMP_NUM_THREADS={cores} torch thread(s)" in err


def test_every_process_group_is_gone_before_the_interpreter_exits(tmp_path):
    ranks, _ = _launch(tmp_path, TEARDOWN, OMP_NUM_THREADS="1")
    assert [r["all_gather"] for r in ranks] == [[1, 1], [1, 1]]
    # the DDP model in its reference cycle, the world group in detectron2's lru_cache and the local
    # group in comm._LOCAL_PROCESS_GROUP: all freed while the interpreter was fully alive
    assert [r["alive_at_exit"] for r in ranks] == [[], []]
    assert [r["initialized_at_exit"] for r in ranks] == [False, False]

"""usdet's CPU launcher: torch threads per process (the cores shared out, an explicit OMP_NUM_THREADS
kept), read back from each real rank."""
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

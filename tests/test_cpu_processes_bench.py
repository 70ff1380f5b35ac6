"""benchmarks/cpu_processes.py: its bookkeeping (every variant, rotating order, ratios, the results file)
and one real tiny training timed from detectron2's log. The timing itself is never checked."""
import importlib.util
import json
import os

import pytest

from train_helpers import REPO

NAMES = ["1 process", "2 processes", "2 processes, every core each"]


def _bench():
    spec = importlib.util.spec_from_file_location("cpu_processes", os.path.join(REPO, "benchmarks", "cpu_processes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_variant_in_rotating_order_and_the_ratios(tmp_path, monkeypatch):
    bench = _bench()
    fake = {(1, None): [4.0, 4.4], (2, None): [2.5, 2.0], (2, "x"): [3.0, 3.2]}  # s/it per run, by variant
    calls = []

    def run_training(datasets, out, processes, omp, args):
        key = (processes, None if omp is None else "x")
        calls.append((processes, omp))
        assert os.path.isfile(os.path.join(datasets, "bp", "annotations", "train.json"))  # phantoms made
        return {"s_per_iter": fake[key][sum(1 for c in calls if c == calls[-1]) - 1], "timed_iterations": 2,
                "wall_s": 1.0}

    monkeypatch.setattr(bench, "run_training", run_training)
    rc = bench.main(["--iters", "5", "--size", "64", "--images", "8", "--batch", "2", "--repeats", "2",
                     "--name", "fake", "--results-dir", str(tmp_path)])
    r = json.load(open(tmp_path / "fake.json"))
    ncores = r["cores"]
    assert calls == [(1, None), (2, None), (2, str(ncores)), (2, None), (2, str(ncores)), (1, None)]  # rotated
    assert r["s_per_iter"] == {"1 process": 4.2, "2 processes": 2.25, "2 processes, every core each": 3.1}
    assert r["speedup_2_vs_1"] == round(4.2 / 2.25, 3) and r["capped_vs_every_core"] == round(2.25 / 3.1, 3)
    assert r["meets_target"] is True and rc == 0
    assert r["threads_per_process"] == {"1 process": ncores, "2 processes": max(1, ncores // 2),
                                        "2 processes, every core each": ncores}
    assert [len(r["runs"][k]) for k in NAMES] == [2, 2, 2] and r["machine"]["cpus"]
    fake[(2, None)] = [3.5, 3.5]  # the cap costing time misses the target: exit 1
    calls.clear()
    assert bench.main(["--iters", "5", "--repeats", "2", "--images", "8", "--size", "64", "--batch", "2",
                       "--name", "fake", "--results-dir", str(tmp_path)]) == 1


def test_one_tiny_training_is_timed_from_detectrons_log(tmp_path):
    from usdet.data.phantom import make_phantom_dataset

    bench = _bench()
    make_phantom_dataset(str(tmp_path / "data" / "bp"), num_images=8, size=64, seed=0)
    args = bench.build_parser().parse_args(["--iters", "5", "--size", "64", "--batch", "2"])
    run = bench.run_training(str(tmp_path / "data"), str(tmp_path / "run"), 1, None, args)
    assert run["s_per_iter"] > 0 and run["timed_iterations"] >= 1 and run["wall_s"] > run["s_per_iter"]


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        _bench().main(["--iters", "3"])
    with pytest.raises(SystemExit):
        _bench().main(["--batch", "3"])

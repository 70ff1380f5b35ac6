#!/usr/bin/env python
"""Multi-process CPU training: 1 process vs 2 (``--num-gpus 2`` without CUDA), seconds per iteration.

The same tiny phantom training (quick R18-FPN config, the same total batch, so the same work per
iteration) is run by tools/train_net.py three ways:

* ``1 process``: torch's default threads (one per core);
* ``2 processes``: usdet's launcher gives each ``cores // 2`` threads (usdet.engine.launch's
  per-rank cap, ``threads_per_process``; recorded from that function);
* ``2 processes, every core each``: ``OMP_NUM_THREADS`` = cores, as before the per-rank cap
  (each process starts a thread per core: the machine oversubscribed twice).

Figure: detectron2's "Overall training speed" (s / it after its warm-up iterations), the median
over ``--repeats`` runs taken in rotating order, so load changes on a shared machine hit every
variant alike. Ratios: ``speedup_2_vs_1`` = 1 process / 2 processes (> 1: two processes pay), and
``capped_vs_every_core`` = capped / uncapped 2-process time (target <= 1.05: the cap never costs).
Writes benchmarks/results/cpu_processes.json. Not in run_all.py (``make bench``): nine trainings
take minutes.

  python benchmarks/cpu_processes.py [--iters 30] [--size 128] [--images 24] [--batch 4] [--repeats 3]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, load_average, write_result  # noqa: E402

TARGET = 1.05
SPEED = re.compile(r"Overall training speed: (\d+) iterations in \S+ \(([0-9.]+) s / it\)")
CONFIG = os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml")


def variants(cores: int):
    """name -> (processes, OMP_NUM_THREADS or None for the launcher's default)."""
    return {"1 process": (1, None), "2 processes": (2, None), "2 processes, every core each": (2, str(cores))}


def run_training(datasets: str, out: str, processes: int, omp, args) -> dict:
    """One tools/train_net.py run; its seconds per iteration and wall time."""
    never = str(100 * args.iters)
    s = str(args.size)
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG,
           "--num-gpus", str(processes), "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu",
           "DATASETS.TRAIN", "('bp_train',)", "DATASETS.TEST", "('bp_val',)", "SOLVER.IMS_PER_BATCH", str(args.batch),
           "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
           "SOLVER.CHECKPOINT_PERIOD", never, "TEST.EVAL_PERIOD", never, "TEST.VAL_LOSS_PERIOD", never,
           "INPUT.MIN_SIZE_TRAIN", f"({s},)", "INPUT.MAX_SIZE_TRAIN", str(2 * args.size),
           "INPUT.MIN_SIZE_TEST", s, "INPUT.MAX_SIZE_TEST", str(2 * args.size)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(USDET_DATASETS=datasets, PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    if omp:
        env.update(OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"train_net failed ({processes} process(es)):\n" + r.stderr[-3000:])
    m = SPEED.search(open(os.path.join(out, "log.txt")).read())
    if not m:
        raise SystemExit(f"no 'Overall training speed' line in {out}/log.txt (--iters must exceed the warm-up)")
    return {"s_per_iter": float(m.group(2)), "timed_iterations": int(m.group(1)), "wall_s": round(wall, 1)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30, help="training iterations per run (> 4; 3 are warm-up)")
    ap.add_argument("--size", type=int, default=128, help="phantom image size and training short side")
    ap.add_argument("--images", type=int, default=24, help="phantom images (60%% train)")
    ap.add_argument("--batch", type=int, default=4, help="SOLVER.IMS_PER_BATCH, the total over the processes")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, in rotating order")
    ap.add_argument("--name", default="cpu_processes", help="results file name (RESULTS_DIR/NAME.json)")
    ap.add_argument("--results-dir", default=RESULTS, help="default benchmarks/results")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.iters < 5:
        ap.error("--iters must be at least 5 (detectron2 times the iterations after its 3 warm-up ones)")
    if args.batch % 2:
        ap.error("--batch must be even (split over 2 processes)")

    from usdet.data.phantom import make_phantom_dataset
    from usdet.engine.launch import available_cores, threads_per_process

    cores = available_cores()
    tmp = tempfile.mkdtemp(prefix="bench_cpu_processes_")
    make_phantom_dataset(os.path.join(tmp, "data", "bp"), num_images=args.images, size=args.size, seed=0)
    names = variants(cores)
    runs = {k: [] for k in names}
    load_before = load_average()
    order = list(names)
    for rep in range(args.repeats):
        for k in order[rep % len(order):] + order[:rep % len(order)]:  # rotate who goes first
            processes, omp = names[k]
            runs[k].append(run_training(os.path.join(tmp, "data"), os.path.join(tmp, f"run{rep}_{processes}_{omp}"),
                                        processes, omp, args))
            print(f"[bench] {k}: {runs[k][-1]}", flush=True)
    med = {k: statistics.median(r["s_per_iter"] for r in v) for k, v in runs.items()}
    capped = med["2 processes"] / med["2 processes, every core each"]
    write_result(args.name, {
        "s_per_iter": {k: round(v, 4) for k, v in med.items()},
        "speedup_2_vs_1": round(med["1 process"] / med["2 processes"], 3),
        "capped_vs_every_core": round(capped, 3),
        "target_capped_vs_every_core_max": TARGET,
        "meets_target": capped <= TARGET,
        # what the launcher sets (its own rule; an explicit OMP_NUM_THREADS is kept); 1 process: torch's
        # default, a thread per core
        "threads_per_process": {k: (cores if p == 1 else
                                    threads_per_process(p, cores, {"OMP_NUM_THREADS": omp} if omp else {}) or int(omp))
                                for k, (p, omp) in names.items()},
        "load_before": load_before,
        "load_after": load_average(),
        "cores": cores,
        "runs": runs,
        "config": os.path.relpath(CONFIG, REPO),
        "image_size": args.size,
        "images": args.images,
        "ims_per_batch": args.batch,
        "iterations": args.iters,
        "repeats": args.repeats,
    }, results_dir=args.results_dir)
    return 0 if capped <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

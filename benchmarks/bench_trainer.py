#!/usr/bin/env python
"""usdet's Trainer vs detectron2's plain DefaultTrainer: seconds per training iteration.

Same config, same phantom data, same initial weights, same process. The two trainers step in
turn (one full iteration each: every hook's before_step, run_step with data loading, every
hook's after_step), so load changes on a shared machine hit both alike. usdet's hooks
(best-model, validation loss) are registered with periods beyond the run: between evaluations
they must cost nothing. Figure: median wall time per iteration, warm-up excluded. Writes
benchmarks/results/trainer.json with both and their ratio (target <= 1.05).

  python benchmarks/bench_trainer.py [--iters 40] [--size 256] [--device cpu|cuda] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, write_result  # noqa: E402

TARGET = 1.05


WARMUP = 3


def _build(trainer_cls, cfg):
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    seed_all_rng(cfg.SEED)  # identical initial weights for both trainers
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    trainer.storage = EventStorage(0)
    with trainer.storage:
        trainer.before_train()
    return trainer


def _timed_iteration(trainer, i):
    """One iteration exactly as ``TrainerBase.train`` runs it, timed from the first hook to the last."""
    trainer.iter = i
    with trainer.storage:
        t0 = time.perf_counter()
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()
        if trainer.model.parameters().__next__().is_cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml"))
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--size", type=int, default=256, help="phantom image size and training short side")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 shared cores: 1 is steadier)")
    ap.add_argument("--name", default="trainer", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args()

    import torch
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    from usdet.data.phantom import make_phantom_dataset
    from usdet.data.register import register_usdet_dataset
    from usdet.engine import Trainer, build_config

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="bench_trainer_")
    data = make_phantom_dataset(os.path.join(tmp, "phantom"), num_images=args.images, size=args.size, seed=0)
    for split in ("train", "val"):
        register_usdet_dataset(f"bench_phantom_{split}", os.path.join(data, "annotations", f"{split}.json"), data)

    class PlainTrainer(DefaultTrainer):
        """detectron2's DefaultTrainer as its docs show it: only an evaluator added."""

        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            return COCOEvaluator(dataset_name, ("bbox",), False, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"),
                                 use_fast_impl=False)

    never = str(10 * args.iters)
    s = str(args.size)

    def cfg_for(kind):
        return build_config(args.config_file, [
            "OUTPUT_DIR", os.path.join(tmp, kind), "MODEL.DEVICE", device,
            "DATASETS.TRAIN", "('bench_phantom_train',)", "DATASETS.TEST", "('bench_phantom_val',)",
            "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "5",
            "SOLVER.CHECKPOINT_PERIOD", never, "TEST.EVAL_PERIOD", never, "TEST.VAL_LOSS_PERIOD", never,
            "INPUT.MIN_SIZE_TRAIN", f"({s},)", "INPUT.MAX_SIZE_TRAIN", str(2 * args.size),
            "INPUT.MIN_SIZE_TEST", s, "INPUT.MAX_SIZE_TEST", str(2 * args.size), *args.opts])

    trainers = {"detectron2": _build(PlainTrainer, cfg_for("plain")), "usdet": _build(Trainer, cfg_for("usdet"))}
    times = {k: [] for k in trainers}
    order = list(trainers)
    for i in range(args.iters):
        for k in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            dt = _timed_iteration(trainers[k], i)
            if i >= WARMUP:
                times[k].append(dt)
    plain, ours = statistics.median(times["detectron2"]), statistics.median(times["usdet"])
    ratio = ours / plain
    paired = statistics.median(u / p for u, p in zip(times["usdet"], times["detectron2"]))
    write_result(args.name, {
        "usdet_s_per_iter": round(ours, 4),
        "detectron2_s_per_iter": round(plain, 4),
        "ratio": round(ratio, 3),
        "median_paired_ratio": round(paired, 3),
        "target_ratio_max": TARGET,
        "meets_target": ratio <= TARGET,
        "config": os.path.relpath(args.config_file, REPO),
        "overrides": args.opts,
        "device": device,
        "threads": args.threads,
        "image_size": args.size,
        "iterations": args.iters,
        "timed_iterations": len(times["usdet"]),
    })
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The CPU recipe for real on this machine (issue 7): train, choose on val, test once, summarize.

  python benchmarks/cpu_busi.py [--train-dir output/busi_cpu_real] [--skip-train] [--baseline-probe 30]

1. Trains ``configs/BUSI/recipe_scratch_cpu.yaml`` with weight EMA switched on. The EMA is a side
   copy of the weights (training itself is unchanged), so one run yields both candidates: the
   raw weights of every periodic checkpoint and the averaged weights (``model_best.pth``).
2. On the val split, four candidates each chosen by the config's own rule (best val AP50 among
   the periodic evaluations): raw or EMA weights, each with and without test-time horizontal
   flip. The one with the highest val penalized IoU (the target the earlier recipe missed) wins.
3. The winner is evaluated ONCE on the test split (bootstrap 1000).
4. ``--baseline-probe N``: N iterations of the plain detectron2 baseline on the same machine, so
   the recipe's seconds per iteration are compared with the baseline's in the same run.

Writes ``benchmarks/results/cpu_recipe.json`` (summarize_run's format plus the val choice and the
wall-clock figures). Without ``../shared/data/busi`` converted (``make
datasets/busi/annotations/test.json``) there is nothing to train on.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, run_logged, write_result  # noqa: E402
import summarize_run  # noqa: E402

CFG = "configs/BUSI/recipe_scratch_cpu.yaml"
PY = sys.executable



REUSE = False  # --reuse: keep the evaluations an interrupted run already finished


def evaluate(weights: str, out: str, split: str, ema: bool, flip: bool, bootstrap: int = 0) -> Dict[str, float]:
    """``tools/train_net.py --eval-only`` of ``weights`` on ``busi_<split>``: AP, AP50, pIoU."""
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "inference", f"busi_{split}", "metrics.json")
    if not (REUSE and os.path.isfile(report)):
        run_logged([PY, "tools/train_net.py", "--config-file", CFG, "--eval-only", "MODEL.WEIGHTS", weights,
             "MODEL.EMA.ENABLED", str(ema), "TEST.FLIP", str(flip), "DATASETS.TEST", f"('busi_{split}',)",
             "TEST.BOOTSTRAP", str(bootstrap), "OUTPUT_DIR", out], os.path.join(out, "log.txt"))
    with open(report) as fh:
        rep = json.load(fh)
    return {"AP": rep["bbox"]["AP"], "AP50": rep["bbox"]["AP50"], "piou": rep["piou"]["score"]}


def iteration_of(checkpoint: str) -> int:
    """The iteration in a periodic checkpoint's name (``model_0000879.pth`` -> 879)."""
    return int(re.findall(r"(\d+)\.pth$", checkpoint)[0])


def periodic_checkpoints(train_dir: str) -> List[str]:
    """``model_XXXXXXX.pth`` in iteration order (the raw weights of each periodic evaluation)."""
    return sorted(glob.glob(os.path.join(train_dir, "model_[0-9]*.pth")), key=iteration_of)


def choose_on_val(train_dir: str, work: str) -> Dict[str, object]:
    """The four val candidates and the winner by val penalized IoU."""
    raw = {}
    for ck in periodic_checkpoints(train_dir):
        it = iteration_of(ck)
        raw[it] = dict(evaluate(ck, os.path.join(work, f"val_raw_{it}"), "val", ema=False, flip=False), weights=ck)
        print(f"val raw iteration {it}: {raw[it]}", flush=True)
    raw_best_it = max(raw, key=lambda i: raw[i]["AP50"])  # the config's rule: best val AP50
    raw_w = raw[raw_best_it]["weights"]
    ema_w = os.path.join(train_dir, "model_best.pth")
    cands = {
        "raw": dict(raw[raw_best_it], ema=False, flip=False, iteration=raw_best_it),
        "raw+flip": dict(evaluate(raw_w, os.path.join(work, "val_raw_flip"), "val", False, True),
                         weights=raw_w, ema=False, flip=True, iteration=raw_best_it),
    }
    with open(os.path.join(train_dir, "best_metric.json")) as fh:
        ema_it = json.load(fh)["iteration"]
    for flip in (False, True):
        name = "ema+flip" if flip else "ema"
        cands[name] = dict(evaluate(ema_w, os.path.join(work, "val_" + name.replace("+", "_")), "val", True, flip),
                           weights=ema_w, ema=True, flip=flip, iteration=ema_it)
    for k, v in cands.items():
        print(f"val candidate {k}: AP50 {v['AP50']:.2f} pIoU {v['piou']:.4f}", flush=True)
    winner = max(cands, key=lambda k: (cands[k]["piou"], cands[k]["AP50"]))
    return {"rule": "highest val penalized IoU (ties: AP50); each candidate's checkpoint by val AP50",
            "raw_checkpoints_val": {str(k): {m: v[m] for m in ("AP", "AP50", "piou")} for k, v in raw.items()},
            "candidates": {k: {m: v[m] for m in ("AP", "AP50", "piou", "iteration", "ema", "flip")}
                           for k, v in cands.items()},
            "winner": winner, "_winner": cands[winner]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-dir", default="output/busi_cpu_real", help="relative to the repository root")
    ap.add_argument("--skip-train", action="store_true", help="use the finished run in --train-dir")
    ap.add_argument("--train-seconds", type=float, default=None, help="wall time of a run made earlier")
    ap.add_argument("--baseline-probe", type=int, default=0, help="iterations of the plain baseline to time")
    ap.add_argument("--reuse", action="store_true", help="reuse evaluations already written in the work folder")
    ap.add_argument("--device", default="cpu", help="MODEL.DEVICE of the baseline probe")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    os.chdir(REPO)  # paths stay relative to the repository, so reports do not name this machine's folders
    train_dir = os.path.relpath(args.train_dir)
    work = train_dir + "_eval"
    os.makedirs(work, exist_ok=True)
    train_s = args.train_seconds
    if not args.skip_train:
        train_s = run_logged([PY, "tools/train_net.py", "--config-file", CFG, "MODEL.EMA.ENABLED", "True",
                        "OUTPUT_DIR", train_dir], os.path.join(work, "train.log"))
    choice = choose_on_val(train_dir, work)
    w = choice.pop("_winner")
    evaluate(w["weights"], os.path.join(work, "test"), "test", w["ema"], w["flip"], bootstrap=1000)
    ns = argparse.Namespace(train_dir=train_dir, test_dir=os.path.join(work, "test"), config=os.path.join(REPO, CFG),
                            max_iter=None, train_seconds=train_s, variant=choice["winner"], ablation_root=None)
    result = summarize_run.summarize(ns)
    result["config"] = CFG
    result["max_iter"] = iteration_of(periodic_checkpoints(train_dir)[-1]) + 1
    # best_metric.json and the val curve of the run are the EMA's (it was on); the winner's record:
    result["chosen_on_val"] = {"metric": "bbox/AP50", "value": w["AP50"], "iteration": w["iteration"],
                               "weights": "EMA" if w["ema"] else "raw", "test_flip": w["flip"],
                               "val_piou": w["piou"]}
    result["val_curve_ema"] = result.pop("val_curve")
    result["val_choice"] = choice
    result["trained_on"] = "this machine's CPU (the committed recipe, real wall clock)"
    if args.baseline_probe:
        probe = os.path.join(work, "baseline_probe")
        if not (REUSE and os.path.isfile(os.path.join(probe, "model_final.pth"))):
            run_logged([PY, "benchmarks/train_plain_baseline.py", "--output", probe, "SOLVER.MAX_ITER",
                  str(args.baseline_probe), "DATALOADER.NUM_WORKERS", "2", "MODEL.DEVICE", args.device],
                 probe + ".log")
        base = summarize_run.seconds_per_iter(summarize_run._events(os.path.join(probe, "metrics.json")))
        result["baseline_seconds_per_iter"] = base
        result["baseline_wall_budget_s"] = base * 680 if base else None
        if base and result["seconds_per_iter"]:
            result["seconds_per_iter_ratio_vs_baseline"] = result["seconds_per_iter"] / base
    if args.results:
        import common

        common.RESULTS = args.results
    write_result("cpu_recipe", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The detector ablation on BUSI val at a short proxy budget (issue 21): one row per lever.

  python benchmarks/detector_ablation.py [--budget-s 600] [--variants lite_half,half_paste,...] \
      [--speed benchmarks/results/detector_speed.json] [--output output/ablation]

Every variant (``ABLATION`` below: a config and ``KEY VALUE`` overrides) trains from scratch for
the same *idle-machine* wall-clock budget: its iteration count is ``budget / seconds_per_iter``,
where ``seconds_per_iter`` is the CPU recipe's committed idle figure (``cpu_recipe.json``) times the
variant's cost ratio to that recipe, measured side by side by ``benchmarks/detector_speed.py``
(levers that leave the model unchanged share its ratio). So a cheaper model gets more
iterations, as it would in a real run of that length, and the
ablation can run beside other work without its result depending on the machine's load: each
run's real wall time and load average are recorded too. The schedule (warmup, cosine) is scaled
to the iteration count; val is evaluated twice (half-way and at the end) and the row keeps the
better AP50 evaluation, as the recipe's best-model hook would. Test is never looked at.
Resumable: a variant with a finished row in ``--output``/rows.json is skipped.
Results: ``benchmarks/results/detector_ablation.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, load_average, run_logged, write_result  # noqa: E402
from detector_speed import HALF_WIDTH, LITE, OLD  # noqa: E402

GIOU = ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "2.0"]
MOSAIC = ["INPUT.AUG.MOSAIC.ENABLED", "True"]
PASTE = ["INPUT.AUG.COPY_PASTE.ENABLED", "True"]
EMA = ["MODEL.EMA.ENABLED", "True", "MODEL.EMA.DECAY", "0.998"]

#: name -> (config, overrides, the detector_speed variant whose cost it has, what it tests)
ABLATION: Dict[str, Tuple[str, List[str], str, str]] = {
    "baseline": (OLD, [], "baseline", "the current CPU recipe (R18-FPN P2-P6, 256-ch FPN, 1000 proposals)"),
    "lite": (OLD, LITE, "lite", "cost per image: FPN P3-P6 at 128 ch, 256/100 proposals, 64 ROI samples, 256-d head"),
    "lite_half": (OLD, LITE + HALF_WIDTH, "lite_half", "lite + half-width R18 (usdet's slim backbone)"),
    "half_giou": (OLD, LITE + HALF_WIDTH + GIOU, "lite_half", "lite_half + GIoU box loss in the ROI head"),
    "half_mosaic": (OLD, LITE + HALF_WIDTH + MOSAIC, "lite_half", "lite_half + mosaic (p 0.5, canvas at 1x: same cost)"),
    "half_paste": (OLD, LITE + HALF_WIDTH + PASTE, "lite_half", "lite_half + lesion copy-paste (p 0.5)"),
    "half_ema": (OLD, LITE + HALF_WIDTH + EMA, "lite_half", "lite_half + weight EMA (evaluated on the averaged weights)"),
}


def _reference_idle_seconds_per_iter() -> float:
    """The CPU recipe's seconds per iteration on an idle machine (its committed full run)."""
    with open(os.path.join(REPO, "benchmarks", "results", "cpu_recipe.json")) as fh:
        return float(json.load(fh)["seconds_per_iter"])


REFERENCE_IDLE_S_PER_IT = _reference_idle_seconds_per_iter()



def _val_rows(out: str) -> List[Dict[str, Any]]:
    rows = []
    with open(os.path.join(out, "metrics.json")) as fh:
        for line in fh:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "bbox/AP50" in ev:
                rows.append({"iteration": ev["iteration"] + 1, "AP50": ev["bbox/AP50"], "AP": ev["bbox/AP"],
                             "AP75": ev["bbox/AP75"], "piou": ev.get("piou/score")})
    return rows


def run_variant(name: str, budget_s: float, speed: Dict[str, Any], out_root: str) -> Dict[str, Any]:
    config, opts, speed_key, what = ABLATION[name]
    # Idle-machine seconds per iteration: the committed idle figure of the CPU recipe (the
    # reference) times this variant's cost ratio measured beside the reference in one run.
    ratio = float(speed["variants"][speed_key]["seconds_per_iter"]) / float(speed["variants"]["baseline"]["seconds_per_iter"])
    s_it = REFERENCE_IDLE_S_PER_IT * ratio
    max_iter = max(20, int(budget_s / s_it))
    half = max(10, max_iter // 2)
    out = os.path.join(out_root, name)
    cmd = [sys.executable, "tools/train_net.py", "--config-file", config, *opts,
           "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", str(max(10, max_iter // 11)),
           "TEST.EVAL_PERIOD", str(half), "SOLVER.CHECKPOINT_PERIOD", str(half), "OUTPUT_DIR", out]
    load_before = load_average()
    os.makedirs(out, exist_ok=True)
    wall = run_logged(cmd, os.path.join(out_root, f"{name}.log"))
    evals = _val_rows(out)
    best = max(evals, key=lambda r: r["AP50"])
    return {"what": what, "config": config, "opts": opts, "cost_ratio": round(ratio, 3),
            "seconds_per_iter_idle": round(s_it, 3), "max_iter": max_iter,
            "images_seen": max_iter * 4, "budget_s_idle": budget_s, "wall_s": round(wall, 1),
            "load_before": load_before, "load_after": load_average(), "val_evals": evals, "best": best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="idle-machine seconds per variant (default 600: a seventh of the CPU recipe's 69 min)")
    p.add_argument("--variants", default=",".join(ABLATION))
    p.add_argument("--speed", default=os.path.join(REPO, "benchmarks", "results", "detector_speed.json"))
    p.add_argument("--output", default="output/ablation")
    args = p.parse_args(argv)
    with open(args.speed) as fh:
        speed = json.load(fh)
    os.makedirs(os.path.join(REPO, args.output), exist_ok=True)
    rows_path = os.path.join(REPO, args.output, "rows.json")
    rows: Dict[str, Any] = {}
    if os.path.isfile(rows_path):
        with open(rows_path) as fh:
            rows = json.load(fh)
    for name in [n.strip() for n in args.variants.split(",") if n.strip()]:
        if name not in ABLATION:
            raise SystemExit(f"unknown variant {name!r}; known: {list(ABLATION)}")
        if name in rows:
            print(f"{name}: done earlier, kept", flush=True)
            continue
        print(f"{name}: training ({ABLATION[name][3]})", flush=True)
        rows[name] = run_variant(name, args.budget_s, speed, os.path.join(REPO, args.output))
        b = rows[name]["best"]
        print(f"{name}: val AP50 {b['AP50']:.1f} AP {b['AP']:.1f} AP75 {b['AP75']:.1f} "
              f"({rows[name]['max_iter']} it, {rows[name]['wall_s']:.0f} s wall)", flush=True)
        with open(rows_path + ".tmp", "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(rows_path + ".tmp", rows_path)
    write_result("detector_ablation", {"split": "busi_val (118 images); test never evaluated",
                                       "budget_s_idle": args.budget_s, "speed_source": os.path.relpath(args.speed, REPO),
                                       "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

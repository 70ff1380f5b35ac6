#!/usr/bin/env python
"""Summarize one recipe run (training + test-split evaluation) into benchmarks/results/<name>.json.

  python benchmarks/summarize_run.py --name gpu_busi --config CFG --train-dir DIR --test-dir DIR \
      --train-seconds S --max-iter N [--results benchmarks/results]

Reads the training event log (detectron2 metrics.json, one JSON per line), best_metric.json and
the --eval-only report's metrics.json (usdet.evaluation.report), so the committed summary holds the
exact config, iteration count, val-chosen checkpoint and test figures with bootstrap intervals.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402


def _events(path: str) -> list:
    out = []
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a partial last line of a killed run
    return out


def _find_report(test_dir: str) -> dict:
    for path in sorted(glob.glob(os.path.join(test_dir, "**", "metrics.json"), recursive=True)):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, dict) and "piou" in data:
            data["_path"] = path
            return data
    raise SystemExit(f"no report metrics.json with a 'piou' key under {test_dir}")


def seconds_per_iter(events: list):
    """Median seconds per iteration, leaving out the first quarter (start-up, warm-up)."""
    times = [e["time"] for e in events if "time" in e]
    return statistics.median(times[len(times) // 4:]) if times else None


def summarize(args: argparse.Namespace) -> dict:
    events = _events(os.path.join(args.train_dir, "metrics.json"))
    s_iter = seconds_per_iter(events)
    with open(args.config) as fh:
        cfg_text = fh.read()
    saved_cfg = os.path.join(args.train_dir, "config.yaml")
    best = {}
    if os.path.isfile(os.path.join(args.train_dir, "best_metric.json")):
        with open(os.path.join(args.train_dir, "best_metric.json")) as fh:
            best = json.load(fh)
    val_curve = [{k: v for k, v in e.items() if k.startswith(("bbox/AP", "piou/score", "iteration"))}
                 for e in events if any(k.startswith("bbox/") for k in e)]
    rep = _find_report(args.test_dir)
    ims_per_batch = None
    for line in cfg_text.splitlines():
        if line.strip().startswith("IMS_PER_BATCH:"):
            ims_per_batch = int(line.split(":")[1].split("#")[0])
    if os.path.isfile(saved_cfg):
        with open(saved_cfg) as fh:
            for line in fh:
                if line.strip().startswith("IMS_PER_BATCH:"):
                    ims_per_batch = int(line.split(":")[1])
    ablation = {}
    if args.ablation_root:
        for name in sorted(os.listdir(args.ablation_root)):
            bm = os.path.join(args.ablation_root, name, "best_metric.json")
            if name.startswith("cpu_") and os.path.isfile(bm):
                with open(bm) as fh:
                    b = json.load(fh)
                it = b.get("iteration")
                evs = [e for e in _events(os.path.join(args.ablation_root, name, "metrics.json"))
                       if "piou/score" in e and it is not None and e.get("iteration") in (it, it + 1)]
                ablation[name] = {"val_" + str(b.get("metric")): b.get("value"), "iteration": b.get("iteration"),
                                  "val_piou": evs[-1]["piou/score"] if evs else None}
    bbox = rep.get("bbox", {})
    boot = rep.get("bootstrap", {})
    return {
        "config": args.config,
        "max_iter": args.max_iter,
        "train_seconds": args.train_seconds,
        "seconds_per_iter": s_iter,
        "train_images_per_s": (ims_per_batch / s_iter) if (s_iter and ims_per_batch) else None,
        "ims_per_batch": ims_per_batch,
        "variant": args.variant,
        "chosen_on_val": best,
        "ablation_val": ablation,
        "val_curve": val_curve,
        "test": {
            "AP": bbox.get("AP"), "AP50": bbox.get("AP50"), "AP75": bbox.get("AP75"),
            "piou": rep.get("piou", {}).get("score"),
            "cpm": rep.get("froc", {}).get("cpm"),
            "image_level": rep.get("image_level"),
            "bootstrap": boot,
            "report": os.path.relpath(rep["_path"]),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--train-dir", required=True)
    ap.add_argument("--test-dir", required=True)
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--variant", default=None, help="name of the variant chosen on val")
    ap.add_argument("--ablation-root", default=None, help="folder holding cpu_* variant runs")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    result = summarize(args)
    if args.results:
        import common

        common.RESULTS = args.results
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

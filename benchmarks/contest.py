#!/usr/bin/env python
"""The fair contest (issue 21): usdet's CPU recipe and YOLOv8n back to back, same budget, same rules.

  python benchmarks/contest.py --budget-min 69 [--config configs/BUSI/recipe_lite_cpu.yaml] \
      [--output output/contest] [--result-name contest] [--max-images 0] [--max-iter 0] [--skip-peer] [--skip-usdet] \
      [--usdet-run DIR [--usdet-start 2026-12-07T04:00:29Z]] [--device cpu] [--workers N] \
      [--peer-venv DIR] [--peer-wheels DIR] [--without-peer REASON] [--results DIR] [KEY VALUE ...]

On a GPU (``--device cuda``, as ``benchmarks/gpu_busi.sh`` runs it) both sides train on it: usdet
with its recipe's AMP setting, the peer with the same (``amp``), both with ``--workers`` loader
workers. Trailing ``KEY VALUE`` pairs override usdet's config (e.g. a tiny input for smoke runs).

One command, one machine, one after the other (never at once), each side given:
- the same wall-clock budget, measured the same way: training *plus its own validation passes*,
  counted from the start of the training loop. Ultralytics' ``time`` includes its per-epoch val,
  anneals its learning rate by elapsed time and stops training at the budget; usdet gets
  ``SOLVER.TIME_BUDGET_MIN`` (usdet/engine/budget.py): its LR schedule follows the elapsed
  fraction of the budget, its periodic val evaluations and checkpoints count, and it stops itself
  at the budget with a final checkpoint and evaluation (as the peer validates after its last
  epoch). ``SOLVER.MAX_ITER`` is only an upper bound. A safety deadline (budget + 15 %, at least
  10 min, for start-up and the final evaluation) stops a run that overruns;
- the same threads (all cores) and, where the peer allows, loader workers (Ultralytics forces 0
  workers on CPU; usdet keeps its recipe's 2, recorded);
- the same test-time caps: score threshold ``--conf`` (0.001) and ``--max-det`` (100) boxes per
  image for both;
- the checkpoint chosen on val by the same metric: val AP (mAP50-95) for both (usdet's
  ``SOLVER.BEST_CHECKPOINT.METRIC bbox/AP``, i.e. ``model_best.pth``; Ultralytics' fitness patched
  to mAP50-95 alone). usdet's val curve (iteration, elapsed minutes, AP, AP50) and the chosen
  checkpoint's training time come from the run's ``evaluations.jsonl``;
- the same scorer: usdet's evaluator on both sides' predictions, paired by ``compare_models``,
  the image-level operating point chosen on val (sensitivity 0.95) and applied to test.
Both sides' val and test predictions are written to ``benchmarks/results/<result-name>/`` (small)
so the comparison can be re-scored without retraining. Inference throughput (batch 1) and
training throughput (images/s) of both are measured in the same run.

``--usdet-run DIR`` scores an earlier usdet training instead of training: with its
``evaluations.jsonl`` as above; a run from before usdet wrote it (the 2026-12-07 contest, trained
on an iteration schedule) needs ``--usdet-start T``, and then only its checkpoints written by
T + budget take part.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, load_average, run_logged, run_until, write_result  # noqa: E402
import peer_yolo  # noqa: E402

PY = sys.executable




def usdet_curve(run_dir: str, metric: str = "bbox/AP") -> Dict[str, Any]:
    """usdet's val curve and val-chosen checkpoint, from the run's ``evaluations.jsonl``.

    The best-model hook writes one line per evaluation (iteration, training seconds when the
    weights were made, metrics) and keeps ``model_best.pth`` by the same metric; under
    ``SOLVER.TIME_BUDGET_MIN`` every evaluation lies within the budget (the trainer stops itself).
    The chosen evaluation is the first with the best ``metric`` (the hook's rule: only a strictly
    better value replaces the best), and ``best_metric.json`` must agree with it.
    """
    from usdet.engine.hooks import read_evaluations

    recs = read_evaluations(run_dir)
    if not recs:
        raise SystemExit(f"{run_dir}: no evaluations.jsonl (or it is empty): not a usdet run that evaluated on val")

    def minutes(r: Dict[str, Any], key: str) -> Optional[float]:
        return None if r.get(key) is None else round(float(r[key]) / 60.0, 2)

    curve = [{"iteration": int(r["iteration"]), "elapsed_min": minutes(r, "elapsed_s"),
              "AP": r["metrics"].get("bbox/AP"), "AP50": r["metrics"].get("bbox/AP50")} for r in recs]
    best: Optional[Dict[str, Any]] = None
    for r in recs:
        v = r["metrics"].get(metric)
        if v is not None and (best is None or v > best["metrics"][metric]):
            best = r
    if best is None:
        raise SystemExit(f"{run_dir}/evaluations.jsonl: no evaluation has {metric}")
    record_path = os.path.join(run_dir, "best_metric.json")
    try:
        with open(record_path) as fh:
            record = json.load(fh)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{record_path}: unreadable ({e}); the run kept no model_best.pth") from None
    if record.get("metric") != metric or int(record.get("iteration", -1)) != int(best["iteration"]):
        raise SystemExit(f"{record_path} names {record.get('metric')} at iteration {record.get('iteration')}, but "
                         f"evaluations.jsonl's best {metric} is at iteration {best['iteration']}: train with "
                         f"SOLVER.BEST_CHECKPOINT.METRIC {metric}")
    chosen = {"weights": os.path.join(run_dir, "model_best.pth"), "iteration": int(best["iteration"]),
              "metric": metric, "value": float(best["metrics"][metric]), "elapsed_min": minutes(best, "elapsed_s")}
    last = recs[-1]
    return {"val_curve": curve, "chosen": chosen, "final_iteration": int(last["iteration"]),
            "budget_used_min": minutes(last, "eval_end_s")}


def _records(run_dir: str) -> List[Dict[str, Any]]:
    """``metrics.json`` of a detectron2 run; a last line cut by a stop at the deadline is skipped."""
    recs = []
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        for line in fh:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs


def in_budget_checkpoint(run_dir: str, deadline: float, metric: str = "bbox/AP") -> Dict[str, Any]:
    """The checkpoint with the best val ``metric`` among those written by ``deadline`` (epoch seconds).

    For a run from before ``evaluations.jsonl`` and ``SOLVER.TIME_BUDGET_MIN`` (an iteration
    schedule stopped from outside at its deadline, the 2026-12-07 contest).

    detectron2's PeriodicCheckpointer writes ``model_{iter:07d}.pth`` (``model_final.pth`` at the
    end) just before the EvalHook evaluates the same weights at the same iteration (the contest
    gives both hooks one period), so each evaluation in ``metrics.json`` names its checkpoint. A
    checkpoint counts if it was on disk by the deadline, as the peer's budget ends with its last
    epoch and its final validation of ``best.pt`` comes after.
    """
    evals = [r for r in _records(run_dir) if metric in r]
    last_it = max((int(r["iteration"]) for r in evals), default=-1)
    best: Optional[Dict[str, Any]] = None
    for r in evals:
        it = int(r["iteration"])
        path = os.path.join(run_dir, f"model_{it:07d}.pth")
        if not os.path.isfile(path) and it == last_it:
            path = os.path.join(run_dir, "model_final.pth")
        if not os.path.isfile(path) or os.path.getmtime(path) > deadline:
            continue
        if best is None or float(r[metric]) > best["value"]:
            best = {"weights": path, "iteration": it, "metric": metric, "value": float(r[metric]),
                    "saved_s_before_deadline": round(deadline - os.path.getmtime(path), 1)}
    if best is None:
        raise SystemExit(f"{run_dir}: no evaluated checkpoint was written within the budget")
    return best


def _schedule_of(run_dir: str) -> Dict[str, int]:
    """The time budget, MAX_ITER and EVAL_PERIOD of a run, from the config.yaml detectron2 wrote."""
    from detectron2.config import CfgNode

    with open(os.path.join(run_dir, "config.yaml")) as fh:
        cfg = CfgNode.load_cfg(fh)
    return {"time_budget_min": float(cfg.SOLVER.get("TIME_BUDGET_MIN", 0.0)), "max_iter": int(cfg.SOLVER.MAX_ITER),
            "eval_period": int(cfg.TEST.EVAL_PERIOD), "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH)}


def _config_of(run_dir: str):
    """The config.yaml detectron2 wrote for a run (what it really trained with)."""
    from detectron2.config import CfgNode

    with open(os.path.join(run_dir, "config.yaml")) as fh:
        return CfgNode.load_cfg(fh)


def usdet_overrides(args) -> List[str]:
    """usdet's ``KEY VALUE`` overrides for the device, loader workers and the trailing pairs.

    The normalization statistics are those of ``--dataset-root`` when it has them (the recipes name
    ``datasets/busi/pixel_stats.json``, absent where the data lives elsewhere, e.g. the GPU carry).
    """
    opts = ["MODEL.DEVICE", args.device]
    if args.workers is not None:
        opts += ["DATALOADER.NUM_WORKERS", str(args.workers)]
    stats = os.path.join(os.path.abspath(args.dataset_root), "pixel_stats.json")
    if os.path.isfile(stats):
        opts += ["INPUT.NORMALIZATION_FILE", stats]
    if len(args.opts) % 2:
        raise SystemExit(f"config overrides come in KEY VALUE pairs, got {len(args.opts)} words: {args.opts}")
    return opts + list(args.opts)


def peer_device(device: str) -> str:
    """Ultralytics' name for a torch device: ``cpu`` stays, ``cuda``/``cuda:N`` become ``0``/``N``."""
    if device == "cpu":
        return "cpu"
    return device.split(":", 1)[1] if ":" in device else "0"


def safety_deadline_s(budget_s: float) -> float:
    """How long the contest lets usdet's process run: its own budget plus start-up and the final evaluation."""
    return budget_s + max(600.0, 0.15 * budget_s)


def run_usdet(args, work: str, splits: Dict[str, str], n_train: int) -> Dict[str, Any]:
    """Train under ``SOLVER.TIME_BUDGET_MIN``, evaluate the val-chosen checkpoint on val and test.

    With ``--usdet-run DIR`` the training is an earlier one: scored from its ``evaluations.jsonl``,
    or, for a run from before that file, from its checkpoints written by ``--usdet-start`` + budget.
    """
    from detector_speed import measure

    caps = ["TEST.DETECTIONS_PER_IMAGE", str(args.max_det), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.conf)]
    caps += usdet_overrides(args)  # device, loader workers, normalization file, trailing KEY VALUE pairs
    data = ["DATASETS.TRAIN", f"('{splits['train']}',)", "DATASETS.TEST", f"('{splits['val']}',)", *caps]
    budget_s = args.budget_min * 60
    load_before, stopped = None, False
    if args.usdet_run:
        out = os.path.abspath(args.usdet_run)
        if not os.path.isfile(os.path.join(out, "evaluations.jsonl")) and not args.usdet_start:
            raise SystemExit(f"{out} has no evaluations.jsonl (a run from before the time budget): give --usdet-start")
        t0 = parse_start(args.usdet_start) if args.usdet_start else None
        last_write = os.path.getmtime(os.path.join(out, "metrics.json"))
        train_end = last_write if t0 is None else min(last_write, t0 + budget_s)
    else:
        out = os.path.join(work, "usdet_train")
        train_cmd = [PY, "tools/train_net.py", "--config-file", args.config, *data,
                     "SOLVER.TIME_BUDGET_MIN", repr(float(args.budget_min)),
                     *(["SOLVER.MAX_ITER", str(args.max_iter)] if args.max_iter else []),  # smoke runs
                     "SOLVER.BEST_CHECKPOINT.METRIC", "bbox/AP", "OUTPUT_DIR", out]
        load_before = load_average()
        t0 = time.time()
        _, stopped = run_until(train_cmd, os.path.join(work, "usdet_train.log"), deadline=t0 + safety_deadline_s(budget_s))
        train_end = time.time()
    sched = _schedule_of(out)
    ims_per_batch = sched.pop("ims_per_batch")
    if os.path.isfile(os.path.join(out, "evaluations.jsonl")):
        curve = usdet_curve(out)
        chosen = curve.pop("chosen")
    else:  # legacy: an iteration schedule stopped from outside at t0 + budget
        curve, chosen = {}, in_budget_checkpoint(out, t0 + budget_s)
    speed = measure(args.config, data, iters=5, warmup=2, infer_images=20)  # batch-1 inference, after training
    iterations = 1 + max((int(r["iteration"]) for r in _records(out) if "iteration" in r), default=-1)
    iterations = min(iterations, curve.get("final_iteration", iterations - 1) + 1)  # the final eval logs at MAX_ITER
    # The process's wall clock (start-up and final evaluation included, as the peer's train_seconds);
    # for an earlier run scored without its start time, the trainer's own clock.
    wall_s = train_end - t0 if t0 is not None else 60.0 * float(curve["budget_used_min"])
    preds = {}
    for split in ("val", "test"):
        ev = os.path.join(work, f"usdet_{split}")
        run_logged([PY, "tools/train_net.py", "--config-file", args.config, "--eval-only", *caps,
                    "DATASETS.TEST", f"('{splits[split]}',)", "MODEL.WEIGHTS", chosen["weights"], "OUTPUT_DIR", ev],
                   os.path.join(work, f"usdet_{split}.log"))
        preds[split] = os.path.join(ev, "inference", splits[split], "coco_instances_results.json")
    ims = iterations * ims_per_batch
    ran = _config_of(out)
    chosen["weights"] = os.path.relpath(chosen["weights"], REPO)
    return {"config": args.config, "schedule": sched, "iterations_done": iterations,
            "stopped_by_contest_deadline": stopped, "budget_used_min": curve.get("budget_used_min"),
            "budget_wall_s": round(wall_s, 1), "train_images_per_s": round(ims / wall_s, 3),
            "infer_images_per_s_batch1": speed["infer_images_per_s"],
            "epochs": round(ims / n_train, 2), "images_seen": ims, "val_curve": curve.get("val_curve"),
            "chosen": chosen, "loader_workers": int(ran.DATALOADER.NUM_WORKERS), "device": ran.MODEL.DEVICE,
            "amp": bool(ran.SOLVER.AMP.ENABLED), "load_before": load_before, "load_after": load_average(),
            "predictions": preds}


def parse_start(text: str) -> float:
    """Epoch seconds of ``--usdet-start`` (ISO 8601, e.g. 2026-12-07T04:00:29Z, or epoch seconds)."""
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=69.0, help="each side's wall-clock budget (default 69)")
    ap.add_argument("--config", default="configs/BUSI/recipe_lite_cpu.yaml", help="usdet's recipe")
    ap.add_argument("--dataset-root", default=os.path.join(REPO, "datasets", "busi"))
    ap.add_argument("--conf", type=float, default=0.001, help="test-time score threshold, both sides (default 0.001)")
    ap.add_argument("--max-det", type=int, default=100, help="test-time boxes per image, both sides (default 100)")
    ap.add_argument("--imgsz", type=int, default=416, help="the peer's image size (usdet's input: short <= 320, long <= 512)")
    ap.add_argument("--batch", type=int, default=16, help="the peer's batch (default 16)")
    ap.add_argument("--max-images", type=int, default=0, help="smoke runs: first N images of each split")
    ap.add_argument("--max-iter", type=int, default=0,
                    help="smoke runs: at most N usdet iterations (a tiny budget is mostly process start-up)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--output", default=os.path.join(REPO, "output", "contest"))
    ap.add_argument("--result-name", default="contest")
    ap.add_argument("--skip-peer", action="store_true", help="reuse the peer predictions already in the result folder")
    ap.add_argument("--skip-usdet", action="store_true", help="reuse usdet's predictions already in the result folder")
    ap.add_argument("--usdet-run", default="", help="score an earlier usdet training folder instead of training")
    ap.add_argument("--usdet-start", default="",
                    help="with --usdet-run of a run without evaluations.jsonl: when its budget started (ISO 8601 UTC)")
    ap.add_argument("--device", default="cpu", help="both sides' torch device: cpu (default) or cuda[:N]")
    ap.add_argument("--workers", type=int, default=None,
                    help="loader workers, both sides (default: usdet's recipe value; the peer 0, as on CPU it must)")
    ap.add_argument("--peer-venv", default=peer_yolo.PEER_VENV, help="the peer's virtual environment "
                    "(default benchmarks/.venv-peer; made on first use)")
    ap.add_argument("--peer-wheels", default=None, help="make the peer's venv offline from these wheels "
                    "(benchmarks/prepare_gpu_carry.sh's .carry/peer_whl) instead of PyPI")
    ap.add_argument("--without-peer", default="", metavar="REASON",
                    help="run usdet alone, recording REASON as why the peer was not run (no comparison)")
    ap.add_argument("--results", default=RESULTS, help="folder of <result-name>.json and <result-name>/ "
                    "(default benchmarks/results)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="usdet config overrides, KEY VALUE pairs")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    from usdet.evaluation.compare import compare_models
    from usdet.evaluation.operating_point import operating_point_from_files
    from usdet.evaluation.report import evaluate_predictions
    from usdet.data.register import register_all_usdet_datasets

    work = os.path.abspath(args.output)
    os.makedirs(work, exist_ok=True)
    keep = os.path.join(os.path.abspath(args.results), args.result_name)
    os.makedirs(keep, exist_ok=True)
    threads = os.cpu_count() or 1
    result: Dict[str, Any] = OrderedDict(budget_min=args.budget_min, conf=args.conf, max_det=args.max_det,
                                         threads=threads, selection="val AP (mAP50-95), both sides",
                                         max_images_per_split=args.max_images or None, device=args.device)
    with tempfile.TemporaryDirectory(prefix="usdet_contest_") as tmp:
        info = peer_yolo.coco_to_yolo(os.path.abspath(args.dataset_root), os.path.join(tmp, "yolo"),
                                      max_images=args.max_images)
        gts = {s: info["splits"][s]["gt"] for s in ("val", "test")}
        # usdet trains and is scored on --dataset-root: its folder becomes $USDET_DATASETS (for
        # train_net's processes and this one's probe) and its name the dataset's (busi -> busi_train).
        root = os.path.abspath(args.dataset_root)
        name = os.path.basename(root)
        splits = {s: f"{name}_{s}" for s in ("train", "val", "test")}
        if args.max_images > 0:
            # A subset (smoke runs): its own $USDET_DATASETS/<name> with the subset annotations and
            # the real images, so train_net's processes register it under the usual names.
            sub = root = os.path.join(work, "datasets", name)
            os.makedirs(os.path.join(sub, "annotations"), exist_ok=True)
            for s in ("train", "val", "test"):
                gts[s] = os.path.join(sub, "annotations", f"{s}.json")
                shutil.copyfile(info["splits"][s]["gt"], gts[s])
            if not os.path.lexists(os.path.join(sub, "images")):
                os.symlink(os.path.join(os.path.abspath(args.dataset_root), "images"), os.path.join(sub, "images"))
        os.environ["USDET_DATASETS"] = os.path.dirname(root)
        register_all_usdet_datasets(os.path.dirname(root))  # this process registered the default root on import
        if not args.skip_usdet:
            u = run_usdet(args, work, splits, info["splits"]["train"]["images"])
            for s in ("val", "test"):
                shutil.copyfile(u["predictions"][s], os.path.join(keep, f"usdet_{s}.json"))
            u["predictions"] = {s: os.path.relpath(os.path.join(keep, f"usdet_{s}.json"), REPO) for s in ("val", "test")}
            result["usdet"] = u
        if args.without_peer:
            result["yolo"] = {"skipped": args.without_peer}
        elif not args.skip_peer:
            py = peer_yolo.peer_python(args.peer_venv, wheels=args.peer_wheels)
            load_before = load_average()
            # the peer gets usdet's device, loader workers and AMP setting (as usdet's run recorded them)
            amp = bool(result.get("usdet", {}).get("amp", False))
            workers = 0 if args.workers is None else args.workers
            res = peer_yolo.run_peer(py, info, tmp, args.budget_min, peer_device(args.device), args.imgsz, args.batch,
                                     workers, 0, os.path.join(work, "peer_log.txt"), threads=threads, conf=args.conf,
                                     max_det=args.max_det, select="AP", predict_splits=("val", "test"), amp=amp)
            for s in ("val", "test"):
                with open(os.path.join(keep, f"yolo_{s}.json"), "w") as fh:
                    json.dump(peer_yolo.to_coco_results(res, info, s), fh)
            n_train = info["splits"]["train"]["images"]
            result["yolo"] = {"peer": peer_yolo.ULTRALYTICS, "imgsz": args.imgsz, "batch": args.batch,
                              "loader_workers": workers, "device": peer_device(args.device), "amp": amp,
                              "epochs": res["epochs"],
                              "budget_wall_s": round(res["train_seconds"], 1),
                              "train_images_per_s": round((res["epochs"] or 0) * n_train / res["train_seconds"], 3),
                              "infer_images_per_s_batch1": round(res["infer_images_per_s"]["test"], 3),
                              "load_before": load_before, "load_after": load_average(),
                              "predictions": {s: os.path.relpath(os.path.join(keep, f"yolo_{s}.json"), REPO)
                                              for s in ("val", "test")}}
    scores: Dict[str, Any] = {}
    sides = ("usdet",) if args.without_peer else ("usdet", "yolo")
    for side in sides:
        val_pred, test_pred = (os.path.join(keep, f"{side}_{s}.json") for s in ("val", "test"))
        op = operating_point_from_files(gts["val"], val_pred, 0.95)
        m = evaluate_predictions(gts["test"], test_pred, os.path.join(work, f"{side}_report"), bootstrap=args.bootstrap,
                                 operating_point=op, title=f"{side} (contest, {args.budget_min:g} min)")
        scores[side] = {"AP": m["bbox"].get("AP"), "AP50": m["bbox"].get("AP50"), "AP75": m["bbox"].get("AP75"),
                        "piou": m["piou"]["score"], "cpm": m["froc"]["cpm"], "image_auc": m["image_level"]["auc"],
                        "operating_point": m.get("operating_point")}
    result["test"] = scores
    if not args.without_peer:
        c = compare_models(gts["test"], OrderedDict([("yolo", os.path.join(keep, "yolo_test.json")),
                                                     ("usdet", os.path.join(keep, "usdet_test.json"))]),
                           os.path.join(work, "compare"), n_resamples=args.bootstrap)
        result["usdet_minus_yolo"] = {k: v["delta"] for k, v in c["metrics"].items()}
    write_result(args.result_name, result, results_dir=os.path.abspath(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

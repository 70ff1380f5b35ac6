#!/usr/bin/env python
"""`make demo`: the whole usdet pipeline on synthetic ultrasound phantoms, on the CPU, in minutes.

  python tools/demo.py --output output/demo [--iters N] [--images 200]

Every step runs the same tool a user runs (the command is printed first), so the demo doubles as
a worked example. Steps: phantom dataset (COCO layout) -> train the demo R18-FPN config
(configs/demo/) with the penalized-IoU evaluator and best-model hook -> --eval-only report
(report.html, metrics.json, report.md, plots)
-> training curves -> overlays of truth vs predictions -> Grad-CAM -> phantoms drawn inside
synthetic scanner screens -> crop_workspace -> predict on the full screens -> a synthetic cine clip
through predict.py --clip (tracks, temporal decision, overlay video). With BUSI converted
(datasets/busi), README.md shows the same commands on real data.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations
DEMO_CFG = os.path.join("configs", "demo", "phantom_R18_FPN_demo.yaml")
# the penalized-IoU default (TEST.PIOU.SCORE_THRESH): overlays, Grad-CAM and predictions draw
# what the report scores
SCORE = 0.45
# issue 15: what the demo must show within 10 minutes on an idle 2-core machine
TARGETS = {"AP50": 90.0, "piou": 0.6, "seconds": 600}
STEP_SECONDS: dict = {}


def run(cmd: list, env: dict) -> None:
    """Print then run one tool; stop the demo with its exit code if it fails."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, env=env, cwd=REPO)
    if rc:
        sys.exit(f"demo step failed (exit {rc}): {shown}")
    step = os.path.basename(cmd[1])
    STEP_SECONDS[step] = round(STEP_SECONDS.get(step, 0.0) + time.time() - t0, 1)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def make_screens(dataset_dir: str, out_dir: str, count: int = 6, split: str = "test") -> str:
    """Draw ``split`` phantoms inside synthetic scanner screens (new frames for predict).

    Writes the screens and ``truth.json`` (each screen's lesion boxes, xyxy in screen pixels).
    No colour-Doppler box: drawn over a lesion it hides the B-mode pattern the model learned
    (the cropper's tests cover Doppler screens).
    """
    import json

    import numpy as np

    from usdet.data.image_io import read_image
    from usdet.data.screens import make_screen
    from usdet.utils.io import atomic_write_image, atomic_write_json

    with open(os.path.join(dataset_dir, "annotations", f"{split}.json")) as fh:
        test = json.load(fh)
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    truth = {}
    for k, im in enumerate(test["images"][:count]):
        img = read_image(os.path.join(dataset_dir, im["file_name"]))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in
                 (a["bbox"] for a in test["annotations"] if a["image_id"] == im["id"])]
        screen = make_screen(rng, img, boxes, probe="linear", doppler=False)
        name = f"screen_{k:02d}.png"
        atomic_write_image(os.path.join(out_dir, name), screen.frame)
        truth[name] = [list(map(float, b)) for b in screen.lesion_boxes]
    path = os.path.join(out_dir, "truth.json")
    atomic_write_json(path, truth)
    return path


def check_screens(truth_json: str, predictions_json: str) -> dict:
    """One box per lesion on the full screens? Counts boxes that hit a lesion (IoU >= 0.5), extra
    boxes and missed lesions at the demo's score threshold."""
    import json

    from usdet.visualization.overlay import match_image

    with open(truth_json) as fh:
        truth = json.load(fh)
    with open(predictions_json) as fh:
        records = {os.path.basename(r["source"]): r["boxes"] for r in json.load(fh)}
    out = {"screens": len(truth), "lesions": 0, "found": 0, "extra_boxes": 0, "missed": 0}
    for name, lesions in truth.items():
        boxes = records.get(name, [])
        res = match_image(lesions, [b["bbox_xyxy_original"] for b in boxes], [b["score"] for b in boxes], 0.5)
        out["lesions"] += len(lesions)
        out["found"] += res.tp
        out["extra_boxes"] += res.fp
        out["missed"] += res.fn
    out["one_box_per_lesion"] = out["found"] == out["lesions"] and out["extra_boxes"] == 0
    return out


def training_speed(train_dir: str) -> float:
    """Median seconds per training iteration from detectron2's event file."""
    import json
    import statistics

    times = []
    with open(os.path.join(train_dir, "metrics.json")) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "time" in rec:
                times.append(float(rec["time"]))
    return round(statistics.median(times), 4) if times else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/demo")
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default: the demo config's 600)")
    ap.add_argument("--images", type=int, default=200, help="phantom images, split 60/20/20 (default 200)")
    args = ap.parse_args()
    out = os.path.abspath(args.output)
    datasets = os.path.join(out, "datasets")
    env = dict(os.environ, USDET_DATASETS=datasets, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.environ["USDET_DATASETS"] = datasets
    py = sys.executable
    t_start = time.time()

    print("== 1. phantom dataset (COCO layout) ==", flush=True)
    from usdet.data.phantom import make_phantom_dataset

    phantom = make_phantom_dataset(os.path.join(datasets, "phantom"), num_images=args.images, size=128, seed=0)
    print(f"  wrote {phantom} (registered as phantom_train / phantom_val / phantom_test)")

    print("\n== 2. train (demo R18-FPN schedule; penalized-IoU evaluator, best-model hook on phantom_val) ==")
    train_dir = os.path.join(out, "train")
    schedule = []
    if args.iters:
        period = max(args.iters // 4, 1)
        schedule = ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", f"({int(args.iters * 0.8)},)",
                    "SOLVER.CHECKPOINT_PERIOD", str(period), "TEST.EVAL_PERIOD", str(period)]
    run([py, "tools/train_net.py", "--config-file", DEMO_CFG, *schedule, "OUTPUT_DIR", train_dir], env)
    weights = os.path.join(train_dir, "model_best.pth")
    if not os.path.isfile(weights):
        weights = os.path.join(train_dir, "model_final.pth")

    print("\n== 3. evaluate the best checkpoint on the test split (report.html, metrics.json, plots) ==")
    eval_dir = os.path.join(out, "eval")
    run([py, "tools/train_net.py", "--config-file", DEMO_CFG, "--eval-only", "MODEL.WEIGHTS", weights,
         "DATASETS.TEST", "('phantom_test',)", "TEST.BOOTSTRAP", "200", "OUTPUT_DIR", eval_dir], env)
    report_dir = os.path.join(eval_dir, "inference", "phantom_test")

    print("\n== 4. training curves ==")
    run([py, "tools/plot_metrics.py", os.path.join(train_dir, "metrics.json"),
         "--output", os.path.join(out, "training_curves.png")], env)

    print("\n== 5. overlays of truth vs predictions ==")
    run([py, "tools/visualize_json_results.py", "--input", os.path.join(report_dir, "coco_instances_results.json"),
         "--dataset", "phantom_test", "--output", os.path.join(out, "overlays"), "--conf-threshold", str(SCORE),
         "--no-progress"], env)

    print("\n== 6. Grad-CAM (EigenCAM) ==")
    test_images = sorted(glob.glob(os.path.join(phantom, "images", "*.png")))[-2:]
    run([py, "tools/gradcam.py", "--config-file", DEMO_CFG, "--weights", weights, "--input", *test_images,
         "--output", os.path.join(out, "gradcam"), "--method", "eigencam", "--score-thresh", str(SCORE),
         "--no-progress"], env)

    print("\n== 7. new frames: phantoms inside synthetic scanner screens -> crop -> predict ==")
    screens = os.path.join(out, "screens")
    truth = make_screens(phantom, screens)
    run([py, "tools/crop_workspace.py", "--input", screens, "--output", os.path.join(out, "screens_cropped"),
         "--no-progress"], env)
    run([py, "tools/predict.py", "--config-file", DEMO_CFG, "--weights", weights, "--input", screens,
         "--output", os.path.join(out, "predict"), "--score-thresh", str(SCORE), "--overlays", "--no-progress"], env)

    print("\n== 8. a cine clip: probe sweep over phantoms in a scanner screen -> predict.py --clip "
          "(tracks, temporal decision, overlay video) ==")
    clip_truth = make_clip(os.path.join(out, "clip", "sweep.mp4"))
    run([py, "tools/predict.py", "--config-file", DEMO_CFG, "--weights", weights, "--clip", "--input",
         os.path.join(out, "clip", "sweep.mp4"), "--output", os.path.join(out, "predict_clip"),
         "--score-thresh", str(SCORE), "--no-progress"], env)
    clip = check_clip(clip_truth, os.path.join(out, "predict_clip", "clip_000"), SCORE)

    seconds = round(time.time() - t_start, 1)
    summary = demo_summary(out, train_dir, report_dir, truth, seconds, clip)
    print(f"\n== demo finished in {seconds:.0f} s; outputs under {out} ==")
    for name, path in [
        ("phantom dataset", phantom),
        ("training run (checkpoints, metrics.json, best_metric.json)", train_dir),
        ("test report (metrics.json, report.md, plots)", report_dir),
        ("training curves", os.path.join(out, "training_curves.png")),
        ("overlays and contact sheets", os.path.join(out, "overlays")),
        ("Grad-CAM heatmaps", os.path.join(out, "gradcam")),
        ("cropped screens (crops.json)", os.path.join(out, "screens_cropped")),
        ("predictions on full screens (predictions.json, overlays/)", os.path.join(out, "predict")),
        ("cine clip: tracks.csv, overlay.mp4, peaks.png", os.path.join(out, "predict_clip", "clip_000")),
        ("these figures", os.path.join(out, "demo_summary.json")),
    ]:
        print(f"  {name}: {path}")
    m, sc = summary["test"], summary["screens"]
    print(f"\nTest split: AP50 {m['AP50']:.1f} (target >= {TARGETS['AP50']:g}), penalized IoU {m['piou']:.3f} at "
          f"score {SCORE:g} (target >= {TARGETS['piou']:g}); full screens: {sc['found']}/{sc['lesions']} lesions "
          f"found, {sc['extra_boxes']} extra boxes; {seconds:.0f} s in all, training "
          f"{summary['seconds_per_iter']:.3f} s/iteration (target: 10 min on an idle 2-core machine).")
    print(f"Cine clip ({clip['frames']} frames): {clip['lesions_found']}/{clip['lesions']} lesions found by a "
          f"reported track; boxes per lesion-free frame {clip['single_fp_per_lesion_free_frame']} single-frame "
          f"(score >= {SCORE:g}) vs {clip['temporal_fp_per_lesion_free_frame']} temporal.")
    if not summary["targets_met"]:
        print("The demo model missed a target: " + ", ".join(k for k, v in summary["met"].items() if not v))
    print(f"\nOpen this page in a browser: {os.path.join(report_dir, 'report.html')}")
    return 0


def make_clip(path: str, seed: int = 0, frames: int = 120) -> str:
    """A synthetic cine clip (usdet/data/cine.py: a probe sweeping over phantoms, inside a static
    scanner screen) written as a video; returns its truth JSON."""
    from usdet.data.cine import make_cine_clip

    return make_cine_clip(path, seed=seed, num_frames=frames, screen=True, sweep_frames=(50, 70), lesion_prob=0.8)


def check_clip(truth_json: str, clip_dir: str, score: float) -> dict:
    """How the clip went: lesions found by a reported track (IoU >= 0.5 on some frame), and boxes
    per lesion-free frame of the single-frame rule (score >= ``score``) and of the temporal rule."""
    import json

    from usdet.evaluation.clips import clip_table, rule_metrics

    with open(truth_json) as fh:
        truth = json.load(fh)
    with open(os.path.join(clip_dir, "predictions.json")) as fh:
        records = json.load(fh)
    with open(os.path.join(clip_dir, "tracks.json")) as fh:
        rule = json.load(fh)["temporal_rule"]
    table = clip_table(records, truth["frames"])
    single, temporal = rule_metrics(table, "single", score), rule_metrics(table, "temporal", rule["score_thresh"])
    return {"frames": len(records), "lesions": temporal["lesions"], "lesions_found": temporal["lesions_found"],
            "single_per_frame_sensitivity": single["per_frame_sensitivity"],
            "temporal_per_frame_sensitivity": temporal["per_frame_sensitivity"],
            "single_fp_per_lesion_free_frame": single["fp_per_lesion_free_frame"],
            "temporal_fp_per_lesion_free_frame": temporal["fp_per_lesion_free_frame"]}


def demo_summary(out: str, train_dir: str, report_dir: str, truth_json: str, seconds: float,
                 clip: dict | None = None) -> dict:
    """Write ``demo_summary.json``: the test figures, the screens check and the time, vs the targets."""
    import json

    from usdet.utils.io import atomic_write_json

    with open(os.path.join(report_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    test = {"AP50": metrics["bbox"]["AP50"], "AP": metrics["bbox"]["AP"], "piou": metrics["piou"]["score"],
            "piou_score_thresh": metrics["piou"]["score_thresh"], "cpm": metrics["froc"]["cpm"]}
    screens = check_screens(truth_json, os.path.join(out, "predict", "predictions.json"))
    met = {"AP50": test["AP50"] >= TARGETS["AP50"], "piou": test["piou"] >= TARGETS["piou"],
           "one_box_per_lesion": screens["one_box_per_lesion"], "seconds": seconds <= TARGETS["seconds"]}
    summary = {"seconds": seconds, "seconds_per_step": STEP_SECONDS, "seconds_per_iter": training_speed(train_dir),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
               "test": test, "screens": screens, "clip": clip, "targets": TARGETS, "met": met,
               "targets_met": all(v for k, v in met.items() if k != "seconds")}
    atomic_write_json(os.path.join(out, "demo_summary.json"), summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())

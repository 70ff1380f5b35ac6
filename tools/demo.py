#!/usr/bin/env python
"""`make demo`: the whole usdet pipeline on synthetic ultrasound phantoms, on the CPU, in minutes.

  python tools/demo.py --output output/demo [--iters 100] [--images 60]

Every step runs the same tool a user runs (the command is printed first), so the demo doubles as
a worked example. Steps: phantom dataset (COCO layout) -> train the quick R18-FPN config with the
penalized-IoU evaluator and best-model hook -> --eval-only report (metrics.json, report.md, plots)
-> training curves -> overlays of truth vs predictions -> Grad-CAM -> phantoms drawn inside
synthetic scanner screens -> crop_workspace -> predict on the full screens. With BUSI converted
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
QUICK_CFG = os.path.join("configs", "quick_schedules", "phantom_R18_FPN.yaml")
# A 100-iteration model is right about where lesions are long before it is confident: the demo
# keeps the checkpoint by AP50 and draws detections from a low score up.
SCORE = 0.1


def run(cmd: list, env: dict) -> None:
    """Print then run one tool; stop the demo with its exit code if it fails."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, env=env, cwd=REPO)
    if rc:
        sys.exit(f"demo step failed (exit {rc}): {shown}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def make_screens(dataset_dir: str, out_dir: str, count: int = 6) -> None:
    """Draw test-split phantoms inside synthetic scanner screens (new frames for predict)."""
    import json

    import numpy as np

    from usdet.data.image_io import read_image
    from usdet.data.screens import make_screen
    from usdet.utils.io import atomic_write_image

    with open(os.path.join(dataset_dir, "annotations", "test.json")) as fh:
        test = json.load(fh)
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    for k, im in enumerate(test["images"][:count]):
        img = read_image(os.path.join(dataset_dir, im["file_name"]))
        screen = make_screen(rng, img, probe="linear")
        atomic_write_image(os.path.join(out_dir, f"screen_{k:02d}.png"), screen.frame)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/demo")
    ap.add_argument("--iters", type=int, default=100, help="training iterations (default 100)")
    ap.add_argument("--images", type=int, default=60, help="phantom images (default 60)")
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

    print("\n== 2. train (quick R18-FPN schedule; penalized-IoU evaluator, best-model hook) ==")
    train_dir = os.path.join(out, "train")
    period = max(args.iters // 4, 1)
    run([py, "tools/train_net.py", "--config-file", QUICK_CFG, "SOLVER.MAX_ITER", str(args.iters),
         "SOLVER.STEPS", f"({int(args.iters * 0.8)},)", "SOLVER.CHECKPOINT_PERIOD", str(period),
         "TEST.EVAL_PERIOD", str(period), "SOLVER.BEST_CHECKPOINT.METRIC", "bbox/AP50",
         "OUTPUT_DIR", train_dir], env)
    weights = os.path.join(train_dir, "model_best.pth")
    if not os.path.isfile(weights):
        weights = os.path.join(train_dir, "model_final.pth")

    print("\n== 3. evaluate the best checkpoint on the test split (report, plots) ==")
    eval_dir = os.path.join(out, "eval")
    run([py, "tools/train_net.py", "--config-file", QUICK_CFG, "--eval-only", "MODEL.WEIGHTS", weights,
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
    run([py, "tools/gradcam.py", "--config-file", QUICK_CFG, "--weights", weights, "--input", *test_images,
         "--output", os.path.join(out, "gradcam"), "--method", "eigencam", "--score-thresh", str(SCORE),
         "--no-progress"], env)

    print("\n== 7. new frames: phantoms inside synthetic scanner screens -> crop -> predict ==")
    screens = os.path.join(out, "screens")
    make_screens(phantom, screens)
    run([py, "tools/crop_workspace.py", "--input", screens, "--output", os.path.join(out, "screens_cropped"),
         "--no-progress"], env)
    run([py, "tools/predict.py", "--config-file", QUICK_CFG, "--weights", weights, "--input", screens,
         "--output", os.path.join(out, "predict"), "--score-thresh", str(SCORE), "--overlays", "--no-progress"], env)

    print(f"\n== demo finished in {time.time() - t_start:.0f} s; outputs under {out} ==")
    for name, path in [
        ("phantom dataset", phantom),
        ("training run (checkpoints, metrics.json, best_metric.json)", train_dir),
        ("test report (metrics.json, report.md, plots)", report_dir),
        ("training curves", os.path.join(out, "training_curves.png")),
        ("overlays and contact sheets", os.path.join(out, "overlays")),
        ("Grad-CAM heatmaps", os.path.join(out, "gradcam")),
        ("cropped screens (crops.json)", os.path.join(out, "screens_cropped")),
        ("predictions on full screens (predictions.json, overlays/)", os.path.join(out, "predict")),
    ]:
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

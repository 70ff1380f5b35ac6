#!/usr/bin/env python
"""Exported models vs eager PyTorch on CPU: tools/predict.py's pipeline with each backend.

The same PNG frames, the same weights (random init: speed does not depend on them), the same
thread budget (torch's, which onnxruntime is given too), in the same process: images/s of
``--backend torch`` (eager, batched), ``torchscript`` and ``onnxruntime`` (both exported with
tools/export_model.py, one frame per call). Cropping is off (--no-crop) so only the model path
differs. Targets: onnxruntime >= 1.3x eager; TorchScript is reported against the same bar.
Writes benchmarks/results/export.json.

  python benchmarks/bench_export.py [--images 32] [--size 256 320] [--config-file CFG]
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, best_time, write_result  # noqa: E402

TARGET = 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    ap.add_argument("--min-size-test", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import logging

    import numpy as np
    import torch
    from detectron2.modeling import build_model

    from usdet.data.phantom import render_phantom
    from usdet.data.sources import list_sources
    from usdet.engine.export import export_model
    from usdet.engine.predictor import BatchPredictor, ExportedPredictor, build_predictor_cfg, predict_sources
    from usdet.utils.io import atomic_write_image

    logging.getLogger("usdet").setLevel(logging.WARNING)
    opts = ["INPUT.MIN_SIZE_TEST", str(args.min_size_test), "INPUT.MAX_SIZE_TEST", str(2 * args.min_size_test)]
    tmp = tempfile.mkdtemp(prefix="bench_export_")
    cfg = build_predictor_cfg(args.config_file, "", "cpu", opts)
    torch.manual_seed(0)
    weights = os.path.join(tmp, "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg = build_predictor_cfg(args.config_file, weights, "cpu", opts)
    for fmt in ("torchscript", "onnx"):
        export_model(cfg, fmt, os.path.join(tmp, fmt))

    rng = np.random.default_rng(0)
    frames_dir = os.path.join(tmp, "frames")
    for i in range(args.images):
        img, _, _ = render_phantom(rng, tuple(args.size))
        atomic_write_image(os.path.join(frames_dir, f"frame_{i:04d}.png"), img)
    paths = list_sources(frames_dir)

    predictors = {
        "torch": BatchPredictor(cfg, batch_size=args.batch_size),
        "torchscript": ExportedPredictor(os.path.join(tmp, "torchscript", "model.ts"), "torchscript"),
        "onnxruntime": ExportedPredictor(os.path.join(tmp, "onnx", "model.onnx"), "onnxruntime"),
    }
    counts = {}

    def runner(name):
        def run():
            records, failures = predict_sources(predictors[name], paths, score_thresh=0.0, crop=False, progress=False)
            assert not failures and len(records) == len(paths)
            counts[name] = sum(len(r["boxes"]) for r in records)
        return run

    for name in predictors:  # warm-up (allocator, onnxruntime's first-run planning)
        runner(name)()
    ips = {name: len(paths) / best_time(runner(name), args.repeat) for name in predictors}
    ratio_ort = ips["onnxruntime"] / ips["torch"]
    ratio_ts = ips["torchscript"] / ips["torch"]
    import onnxruntime

    result = {
        "target": f"onnxruntime images/s >= {TARGET}x eager PyTorch (TorchScript reported against the same bar)",
        "device": "cpu",
        "config": os.path.relpath(args.config_file, REPO),
        "images": len(paths),
        "image_size": list(args.size),
        "min_size_test": args.min_size_test,
        "eager_batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "onnxruntime_version": onnxruntime.__version__,
        "eager_images_per_s": round(ips["torch"], 2),
        "torchscript_images_per_s": round(ips["torchscript"], 2),
        "onnxruntime_images_per_s": round(ips["onnxruntime"], 2),
        "onnxruntime_ratio": round(ratio_ort, 3),
        "torchscript_ratio": round(ratio_ts, 3),
        "same_box_counts": len(set(counts.values())) == 1,
        "met_onnxruntime": bool(ratio_ort >= TARGET),
        "met_torchscript": bool(ratio_ts >= TARGET),
    }
    write_result("export", result)
    return 0 if ratio_ort >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

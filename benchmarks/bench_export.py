#!/usr/bin/env python
"""Exported models vs eager PyTorch on CPU: tools/predict.py's pipeline with each backend.

The same PNG frames, the same weights (random init: speed does not depend on them), the same
thread budget (torch's, which onnxruntime is given too), in the same process: images/s of
``--backend torch`` (eager, batched), ``torchscript`` and ``onnxruntime`` (both exported with
tools/export_model.py, one frame per call). Cropping is off (--no-crop) so only the model path
differs. The model is usdet's R50-FPN (configs/Base-US-RCNN-FPN.yaml) at the CPU recipe's test
size (320 px short edge); one thread each by default (on a shared 2-core machine, two threads
measure contention more than the backends). Targets: onnxruntime >= 1.3x eager; TorchScript is
reported against the same bar. Writes benchmarks/results/export.json.

  python benchmarks/bench_export.py [--images 8] [--size 320 400] [--threads 1] [--config-file CFG]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, best_time, predictor_setup, write_result  # noqa: E402

TARGET = 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "Base-US-RCNN-FPN.yaml"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(320, 400), metavar=("H", "W"))
    ap.add_argument("--min-size-test", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import logging

    import torch

    from usdet.engine.export import export_model
    from usdet.engine.predictor import BatchPredictor, ExportedPredictor, predict_sources

    logging.getLogger("usdet").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg, tmp, paths = predictor_setup(args.config_file, args.min_size_test, "cpu", args.images, args.size,
                                      "bench_export_")
    for fmt in ("torchscript", "onnx"):
        export_model(cfg, fmt, os.path.join(tmp, fmt))

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
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "met_onnxruntime": bool(ratio_ort >= TARGET),
        "met_torchscript": bool(ratio_ts >= TARGET),
    }
    write_result("export", result)
    return 0 if ratio_ort >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

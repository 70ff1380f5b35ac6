#!/usr/bin/env python
"""tools/predict.py's pipeline vs detectron2's DefaultPredictor looped over the same images.

Both read the same PNG frames from disk and run the same model and weights (random init: speed
does not depend on them) in the same process; the reference is the loop users write by hand
(read -> DefaultPredictor -> next). usdet batches frames and reads the next ones while the
model runs. Writes benchmarks/results/predict.json with images/s of both and their ratio
(target >= 1.0). Cropping is off (--no-crop) so both do the same work; the cropper has its own
benchmark.

  python benchmarks/bench_predict.py [--images 32] [--size 256 320] [--batch-size 8] [--device cpu|cuda]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, best_time, predictor_setup, write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    ap.add_argument("--min-size-test", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch
    from detectron2.engine import DefaultPredictor

    from usdet.data.image_io import read_image
    from usdet.engine.predictor import BatchPredictor, predict_sources
    from usdet.utils.io import atomic_write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, tmp, paths = predictor_setup(args.config_file, args.min_size_test, device, args.images, args.size,
                                      "bench_predict_")

    reference = DefaultPredictor(cfg)
    ours = BatchPredictor(cfg, batch_size=args.batch_size)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_reference():
        out = []
        for p in paths:
            inst = reference(read_image(p)[:, :, ::-1])["instances"].to("cpu")  # it takes BGR
            out.append(len(inst))
        sync()
        return out

    def run_ours():
        records, failures = predict_sources(ours, paths, score_thresh=0.0, crop=False, progress=False)
        atomic_write_json(os.path.join(tmp, "predictions.json"), records)
        sync()
        assert not failures and len(records) == len(paths)
        return records

    run_reference()  # warm-up (allocator, cudnn autotune)
    run_ours()
    t_ref = best_time(run_reference, args.repeat)
    t_ours = best_time(run_ours, args.repeat)
    ratio = t_ref / t_ours
    result = {
        "target": "usdet predict images/s >= DefaultPredictor loop images/s (ratio >= 1.0)",
        "device": device,
        "config": os.path.relpath(args.config_file, REPO),
        "images": len(paths),
        "image_size": list(args.size),
        "min_size_test": args.min_size_test,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "default_predictor_images_per_s": round(len(paths) / t_ref, 2),
        "usdet_predict_images_per_s": round(len(paths) / t_ours, 2),
        "ratio": round(ratio, 3),
        "met": bool(ratio >= 1.0),
    }
    write_result("predict", result)
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

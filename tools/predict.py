#!/usr/bin/env python
"""Detect lesions in new frames: images, folders, DICOM (multi-frame too).

Each frame is cropped to the ultrasound image region (usdet.data.crop), run through the model
in batches, and its boxes are mapped back to the full source frame. Writes OUTPUT/predictions.json
(one entry per frame) and OUTPUT/report.json (counts and the inputs that failed, with reasons);
``--overlays`` also draws OUTPUT/overlays/*.png. Exit status 1 only when nothing was processed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (e.g. the run's config.yaml)")
    p.add_argument("--weights", required=True, help="checkpoint (.pth), e.g. output/.../model_best.pth")
    p.add_argument("--input", required=True, nargs="+", help="images, folders, DICOM files")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep boxes with score >= this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: the config's MODEL.DEVICE")
    p.add_argument("--overlays", action="store_true", help="also draw each frame with its boxes")
    p.add_argument("--no-crop", action="store_true", help="frames are already cropped: use them whole")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from usdet.engine.predictor import run_predict_tool

    return run_predict_tool(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Grad-CAM-family heatmaps (pytorch-grad-cam EigenCAM / AblationCAM) for each detection.

Writes OUTPUT/<image>_<method>_det<k>.png (heatmap over the image with the detection's box;
<image>_<method>_image.png when nothing is detected, EigenCAM only) and OUTPUT/gradcam.json.
Frames are cropped to the ultrasound image first (as for training; --no-crop to skip).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True, nargs="+", help="images, folders or DICOM files")
    p.add_argument("--output", required=True)
    p.add_argument("--method", default="eigencam", choices=["eigencam", "ablationcam"])
    p.add_argument("--layer", nargs="+", default=None,
                   help="module name(s), e.g. backbone.bottom_up.res3 ... res5, backbone (all FPN levels); "
                        "default: backbone.bottom_up.res3")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--ablation-batch-size", type=int, default=32)
    p.add_argument("--ablation-ratio", type=float, default=1.0,
                   help="fraction of channels to ablate (pytorch-grad-cam's ratio_channels_to_ablate); <1 is faster")
    p.add_argument("--no-crop", action="store_true", help="images are already cropped: use them whole")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides: KEY VALUE anywhere on the line (after --input too), or after --")
    from usdet.utils.overrides import parse_with_overrides

    return parse_with_overrides(p, sys.argv[1:] if argv is None else argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from detectron2.modeling import build_model

    from usdet.data.sources import list_sources
    from usdet.engine.predictor import build_predictor_cfg, load_inference_weights, thing_classes_for
    from usdet.visualization.gradcam import DetectorCAM, write_cams

    cfg = build_predictor_cfg(args.config_file, args.weights, args.device, args.opts)
    model = build_model(cfg)
    load_inference_weights(model, cfg)  # the weights and normalization predict.py uses
    try:
        cam = DetectorCAM(model, cfg, args.method, args.layer, ablation_batch_size=args.ablation_batch_size,
                          ratio_channels_to_ablate=args.ablation_ratio)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sources = list_sources(args.input)
    summary = write_cams(cam, sources, args.output, thing_classes_for(cfg), args.score_thresh,
                         progress=not args.no_progress, crop=not args.no_crop)
    print(f"{len(summary['pictures'])} heatmap picture(s) in {args.output}; {len(summary['failures'])} failed")
    for f in summary["failures"]:
        print(f"  FAILED {f['source']}: {f['reason']}", file=sys.stderr)
    return 0 if summary["pictures"] else 1


if __name__ == "__main__":
    sys.exit(main())

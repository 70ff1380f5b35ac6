#!/usr/bin/env python
"""Draw truth vs predictions for every image of a COCO ground truth, named by outcome.

  python tools/visualize_json_results.py --input OUT/inference/busi_test/coco_instances_results.json \
      --dataset busi_test --output vis/ [--original --source-root ../shared/data/busi]
  python tools/visualize_json_results.py --input results.json --gt datasets/hospital/annotations/test.json \
      --output vis/ --original --source-root /data/hospital_frames --mapping /secure/hospital_mapping.json

Reads detectron2's coco_instances_results.json (from --eval-only or tools/evaluate_json.py
inputs) and writes OUTPUT/<TP|FP|FN|TN...>_iou<x>_<image>.png, contact sheets of the worst false
positives and misses, and OUTPUT/summary.json. Ignore regions (COCO iscrowd) are drawn dashed grey;
detections inside them (the evaluation's ignore rule) are not drawn. With --original the boxes
are also drawn on the full source frame (through each image's crop_box and --max-size scale)
under OUTPUT/original/; hospital frames, whose source_file is a pseudonym, need the converter's
--mapping file.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="coco_instances_results.json")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", help="registered dataset name, e.g. busi_test")
    g.add_argument("--gt", help="ground-truth COCO JSON (OUT/annotations/<split>.json)")
    p.add_argument("--image-root", default=None, help="folder file_name is relative to (default: the layout root)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--conf-threshold", type=float, default=0.5, help="draw and count predictions >= this score")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a prediction to hit a truth box")
    p.add_argument("--original", action="store_true", help="also draw on the full source frames")
    p.add_argument("--source-root", default=None, help="folder each image's source_file is relative to")
    p.add_argument("--mapping", default=None,
                   help="the hospital converter's --mapping JSON (pseudonym -> real source path), for --original")
    p.add_argument("--worst", type=int, default=16, help="tiles per contact sheet (0: no sheets)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_ground_truth(gt_json, dataset):
    """COCO dict and image root from a JSON file (images relative to its layout root) or a
    registered dataset name (its metadata's ``json_file`` / ``image_root``)."""
    if dataset:
        from detectron2.data import MetadataCatalog

        from usdet.data.register import ensure_usdet_datasets

        ensure_usdet_datasets()  # registers $USDET_DATASETS/<dataset>_<split>

        meta = MetadataCatalog.get(dataset)
        gt_json = meta.get("json_file", None)
        if not gt_json:
            raise ValueError(f"dataset {dataset!r} is not registered with a json_file (see usdet.data.register)")
        image_root = meta.get("image_root", os.path.dirname(os.path.dirname(gt_json)))
    else:
        # usdet layout: OUT/annotations/<split>.json with file_name relative to OUT
        image_root = os.path.dirname(os.path.dirname(os.path.abspath(gt_json)))
    from usdet.evaluation.inputs import load_gt_json

    return load_gt_json(gt_json), image_root


def load_mapping(path):
    """``{pseudonym: real source path}`` from the hospital converter's ``--mapping`` file."""
    with open(path, encoding="utf-8") as f:
        mp = json.load(f)
    if not isinstance(mp, dict) or not isinstance(mp.get("files"), dict):
        raise ValueError(f"{path}: not a usdet mapping file (no 'files' object: pseudonym -> source path)")
    return mp["files"]


def main(argv=None) -> int:
    args = parse_args(argv)
    from usdet.evaluation.inputs import EvaluationInputError
    from usdet.visualization.overlay import visualize_coco_results

    if args.original and not args.source_root:
        print("error: --original needs --source-root (the folder source_file is relative to)", file=sys.stderr)
        return 2
    if args.mapping and not args.original:
        print("error: --mapping is only used with --original", file=sys.stderr)
        return 2
    try:
        gt, image_root = load_ground_truth(args.gt, args.dataset)
        names = load_mapping(args.mapping) if args.mapping else None
        with open(args.input) as f:
            predictions = json.load(f)
        if not isinstance(predictions, list):
            raise ValueError(f"{args.input}: expected a list of COCO results")
    except (OSError, ValueError, EvaluationInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = visualize_coco_results(
        gt, predictions, args.image_root or image_root, args.output,
        conf_threshold=args.conf_threshold, iou_thresh=args.iou_threshold, original=args.original,
        source_root=args.source_root, worst_k=args.worst, progress=not args.no_progress, source_names=names,
    )
    outcomes = ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items())
    print(f"{len(summary['images'])} overlays in {args.output} ({outcomes}); "
          f"{len(summary['failures'])} problem(s)")
    for f in summary["failures"]:
        print(f"  {f['file_name']}: {f['reason']}", file=sys.stderr)
    return 0 if summary["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
